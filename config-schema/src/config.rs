//! A config file: one tree (a CAS, as `get`, `put` and embedders use), or for
//! `serve` a CAS and an action cache side by side, and an execution tree
//! where `serve` forwards remote execution:
//!
//! ```yaml
//! content_addressable_storage:
//!   memory: {max_size_bytes: 1GiB}
//! action_cache:
//!   completeness_checking:
//!     backend:
//!       memory: {max_size_bytes: 64MiB}
//! ```

use crate::Node;
use blob_access::{BlobAccess, BuildContext, BuildNode, Result, Storage, StorageType};
use std::sync::Arc;

/// The trees of a config file.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Config {
    pub content_addressable_storage: Node,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action_cache: Option<Node>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub execution: Option<Node>,
    /// Written as a single node (CAS only); its paths then start at the node.
    #[serde(skip)]
    single_node: bool,
}

const TREE_KEYS: &[&str] = &["content_addressable_storage", "action_cache", "execution"];

impl Config {
    /// A config of two trees; their nodes' paths start with the trees' keys.
    pub fn new(content_addressable_storage: Node, action_cache: Option<Node>) -> Self {
        Config {
            content_addressable_storage,
            action_cache,
            execution: None,
            single_node: false,
        }
    }

    /// This config with an execution tree.
    pub fn with_execution(mut self, execution: Node) -> Self {
        self.execution = Some(execution);
        self
    }

    /// A config of one CAS tree, as a file holding a single node.
    pub fn cas_only(node: Node) -> Self {
        Config {
            content_addressable_storage: node,
            action_cache: None,
            execution: None,
            single_node: true,
        }
    }

    /// Where a tree's nodes sit: a single node's CAS at the root (as it is
    /// written), every other tree under its key.
    fn context(&self, ctx: &BuildContext, storage: StorageType) -> BuildContext {
        match self.path_of(storage) {
            "" => ctx.clone(),
            key => ctx.child(key),
        }
    }

    fn path_of(&self, storage: StorageType) -> &'static str {
        match (self.single_node, storage) {
            (true, StorageType::Cas) => "",
            _ => storage.key(),
        }
    }

    /// Builds the CAS tree: what `get`, `put` and `find_missing` go through.
    pub fn build_cas(&self, ctx: &BuildContext) -> Result<Arc<dyn BlobAccess>> {
        let ctx = self.context(ctx, StorageType::Cas);
        self.content_addressable_storage.build(&ctx)
    }

    /// Builds both trees; the action cache's nodes see the CAS (for
    /// `completeness_checking`).
    pub fn build(&self, ctx: &BuildContext) -> Result<Storage> {
        let cas = self.build_cas(ctx)?;
        let mut storage = Storage::new(cas.clone());
        if let Some(ac) = &self.action_cache {
            let ctx = self.context(ctx, StorageType::ActionCache).with_cas(cas);
            storage = storage.with_action_cache(ac.build_action_cache(&ctx)?);
        }
        if let Some(exec) = &self.execution {
            let ctx = self.context(ctx, StorageType::Execution);
            storage = storage.with_execution(exec.build_execution(&ctx)?);
        }
        Ok(storage)
    }

    /// Checks that every node suits its tree; `Err((path, message))` names the first that does not.
    pub fn check(&self) -> std::result::Result<(), (String, String)> {
        let trees = [
            (StorageType::Cas, Some(&self.content_addressable_storage)),
            (StorageType::ActionCache, self.action_cache.as_ref()),
            (StorageType::Execution, self.execution.as_ref()),
        ];
        for (storage, node) in trees {
            if let Some(node) = node {
                node.check(storage, self.path_of(storage))?;
            }
        }
        Ok(())
    }
}

/// Either form: a map whose keys are the trees' names, or a single node.
impl<'de> serde::Deserialize<'de> for Config {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Config;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(
                    f,
                    "a node (a map with a single key, one of {}) or a map of trees ({})",
                    Node::KINDS.join(", "),
                    TREE_KEYS.join(", ")
                )
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Config, A::Error> {
                use serde::de::Error;
                let first = crate::first_key(&mut map)?;
                if !TREE_KEYS.contains(&first.as_str()) {
                    if !Node::KINDS.contains(&first.as_str()) {
                        return Err(A::Error::custom(format!(
                            "unknown key `{first}`: expected a node kind ({}) or the trees {}",
                            Node::KINDS.join(", "),
                            TREE_KEYS.join(" and ")
                        )));
                    }
                    return crate::rest_of_node(first, map).map(Config::cas_only);
                }
                let (mut cas, mut ac, mut exec) = (None, None, None);
                let mut key = Some(first);
                while let Some(k) = key {
                    let slot = match k.as_str() {
                        "content_addressable_storage" => &mut cas,
                        "action_cache" => &mut ac,
                        "execution" => &mut exec,
                        other => return Err(A::Error::unknown_field(other, TREE_KEYS)),
                    };
                    if slot.is_some() {
                        return Err(A::Error::custom(format!("`{k}` is given twice")));
                    }
                    *slot = Some(map.next_value::<Node>()?);
                    key = map.next_key()?;
                }
                let cas =
                    cas.ok_or_else(|| A::Error::missing_field("content_addressable_storage"))?;
                let config = Config::new(cas, ac);
                Ok(match exec {
                    Some(exec) => config.with_execution(exec),
                    None => config,
                })
            }
        }
        d.deserialize_map(V)
    }
}
