//! Config files for blob-access: trees of nodes, each node a single key
//! naming a backend or decorator, e.g.
//!
//! ```yaml
//! existence_caching:
//!   ttl: 5m
//!   backend:
//!     grpc: {endpoint: "grpc://127.0.0.1:8980", instance_name: ""}
//! ```
//!
//! A file holds one tree (a CAS), or a CAS, an action cache and an execution
//! service as `content_addressable_storage:`, `action_cache:` and
//! `execution:` ([`Config`]). The same
//! node kinds serve in both where they make sense; the others are refused
//! when the file is loaded. YAML and JSON alike; errors name the path in the
//! tree, the line and the column.
//!
//! ```
//! use blob_access_config::{load_str, Format};
//! use blob_access::{action_cache::ActionResult, BlobAccess, BuildContext, Digest};
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let yaml = "
//! content_addressable_storage: {memory: {max_size_bytes: 64MiB}}
//! action_cache: {completeness_checking: {backend: {memory: {max_size_bytes: 1MiB}}}}
//! ";
//! let storage = load_str(yaml, Format::Yaml, "inline").unwrap().build(&BuildContext::root()).unwrap();
//! assert!(storage.cas.find_missing(&[]).await.unwrap().is_empty());
//! let ac = storage.action_cache.unwrap();
//! let action = Digest::of(b"an Action message");
//! ac.update_action_result(&action, &ActionResult::default()).await.unwrap();
//! assert_eq!(ac.get_action_result(&action).await.unwrap(), ActionResult::default());
//! # });
//! ```
//!
//! Adding a node kind is one file (its config struct implementing `BuildNode`
//! and `ChildNodes`) plus one line in the `nodes!` list below.

mod config;
mod load;
mod schema;

pub use config::Config;
pub use load::{load_file, load_str, ConfigError, Format};
pub use schema::json_schema;

use blob_access::{
    ActionCache, BlobAccess, BuildContext, BuildNode, ChildNodes, Execution, Result, Storage,
    StorageType,
};
use std::sync::Arc;

macro_rules! nodes {
    ($( $(#[$doc:meta])* $key:literal => $variant:ident($ty:ty) in [$($storage:ident),+], )*) => {
        /// A node of a config tree: one backend or decorator, named by its single key.
        #[derive(Clone, Debug, serde::Serialize, schemars::JsonSchema)]
        pub enum Node {
            $( $(#[$doc])* #[serde(rename = $key)] $variant($ty), )*
        }

        impl Node {
            /// The keys naming node kinds.
            pub const KINDS: &'static [&'static str] = &[$($key),*];

            /// The key naming this node's kind, e.g. `memory`.
            pub fn kind(&self) -> &'static str {
                match self { $( Node::$variant(_) => $key, )* }
            }

            /// Whether this kind of node makes sense in a tree of `storage`'s type.
            pub fn supports(&self, storage: StorageType) -> bool {
                match self { $( Node::$variant(_) => [$(StorageType::$storage),+].contains(&storage), )* }
            }

            /// The kinds that make sense in a tree of `storage`'s type.
            pub fn kinds_for(storage: StorageType) -> Vec<&'static str> {
                let mut kinds = Vec::new();
                $( if [$(StorageType::$storage),+].contains(&storage) { kinds.push($key); } )*
                kinds
            }

            /// The nodes right below this one, named by their field.
            pub fn child_nodes(&self) -> Vec<(String, &Node)> {
                match self { $( Node::$variant(c) => ChildNodes::<Node>::child_nodes(c), )* }
            }

            fn deserialize_kind<'de, A: serde::de::MapAccess<'de>>(
                kind: &str,
                map: &mut A,
            ) -> std::result::Result<Node, A::Error> {
                match kind {
                    $( $key => map.next_value().map(Node::$variant), )*
                    other => Err(serde::de::Error::unknown_variant(other, Self::KINDS)),
                }
            }
        }

        impl BuildNode for Node {
            fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn BlobAccess>> {
                let ctx = ctx.child(self.kind());
                self.refuse_unless(StorageType::Cas, &ctx)?;
                let built = match self { $( Node::$variant(c) => c.build(&ctx), )* };
                built.map(|node| ctx.instrument(node))
            }

            fn build_action_cache(&self, ctx: &BuildContext) -> Result<Arc<dyn ActionCache>> {
                let ctx = ctx.child(self.kind());
                self.refuse_unless(StorageType::ActionCache, &ctx)?;
                let built = match self { $( Node::$variant(c) => c.build_action_cache(&ctx), )* };
                built.map(|node| ctx.instrument_action_cache(node))
            }

            fn build_execution(&self, ctx: &BuildContext) -> Result<Arc<dyn Execution>> {
                let ctx = ctx.child(self.kind());
                self.refuse_unless(StorageType::Execution, &ctx)?;
                let built = match self { $( Node::$variant(c) => c.build_execution(&ctx), )* };
                built.map(|node| ctx.instrument_execution(node))
            }
        }
    };
}

impl Node {
    /// Checks that this node and every node below it make sense in a tree of
    /// `storage`'s type; `path` is where this node sits. Done before any build.
    pub fn check(
        &self,
        storage: StorageType,
        path: &str,
    ) -> std::result::Result<(), (String, String)> {
        let here = if path.is_empty() {
            self.kind().to_string()
        } else {
            format!("{path}.{}", self.kind())
        };
        if !self.supports(storage) {
            let message = format!(
                "`{}` cannot be part of a{} {} tree; the kinds there are {}",
                self.kind(),
                if storage == StorageType::Cas { "" } else { "n" },
                storage.key(),
                Node::kinds_for(storage).join(", ")
            );
            return Err((here, message));
        }
        for (field, child) in self.child_nodes() {
            child.check(storage, &format!("{here}.{field}"))?;
        }
        Ok(())
    }

    fn refuse_unless(&self, storage: StorageType, ctx: &BuildContext) -> Result<()> {
        if self.supports(storage) {
            return Ok(());
        }
        Err(blob_access::Error::invalid_argument(format!(
            "{}: `{}` cannot be part of a {} tree",
            ctx.path(),
            self.kind(),
            storage.key()
        )))
    }
}

/// A node is a map with exactly one key, in YAML and JSON alike (serde_yaml's
/// default would want YAML tags such as `!memory`, which no user writes).
impl<'de> serde::Deserialize<'de> for Node {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(
                    f,
                    "a map with a single key naming a node kind, one of {}",
                    Node::KINDS.join(", ")
                )
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Node, A::Error> {
                let kind = first_key(&mut map)?;
                rest_of_node(kind, map)
            }
        }
        d.deserialize_map(V)
    }
}

fn first_key<'de, A: serde::de::MapAccess<'de>>(
    map: &mut A,
) -> std::result::Result<String, A::Error> {
    map.next_key()?.ok_or_else(|| {
        serde::de::Error::custom(format!(
            "empty node: expected one key, one of {}",
            Node::KINDS.join(", ")
        ))
    })
}

/// The node whose kind is the map's first key, and no second key.
fn rest_of_node<'de, A: serde::de::MapAccess<'de>>(
    kind: String,
    mut map: A,
) -> std::result::Result<Node, A::Error> {
    let node = Node::deserialize_kind(&kind, &mut map)?;
    if let Some(extra) = map.next_key::<String>()? {
        return Err(serde::de::Error::custom(format!(
            "node `{kind}` has a second key `{extra}`; a node is a map with exactly one key"
        )));
    }
    Ok(node)
}

nodes! {
    /// An in-memory store bounded by size, evicting the least recently used entries.
    "memory" => Memory(blob_access::memory::MemoryConfig) in [Cas, ActionCache],
    /// A store in a local directory, bounded by size, surviving restarts.
    "disk" => Disk(blob_access::disk::DiskConfig) in [Cas, ActionCache],
    /// A bucket of an S3-compatible object store; reads cut mid-body resume with ranged GETs, large blobs go up as multipart uploads.
    "s3" => S3(blob_access_s3::S3Config) in [Cas, ActionCache],
    /// A remote REAPI server (CAS, ActionCache or Execution); a stream cut in the middle fails the call.
    "grpc" => Grpc(blob_access::grpc::GrpcConfig) in [Cas, ActionCache, Execution],
    /// A remote REAPI server whose reads resume at `read_offset` when a stream is cut, and whose executions resume with WaitExecution.
    "resumable_grpc" => ResumableGrpc(blob_access_decorators::resumable_grpc::ResumableGrpcConfig) in [Cas, ActionCache, Execution],
    /// Remembers for `ttl` the digests `find_missing` found present (CAS only).
    "existence_caching" => ExistenceCaching(blob_access_decorators::existence_caching::ExistenceCachingConfig<Node>) in [Cas],
    /// Reads a fast tier first; on a miss reads the slow one while copying into the fast.
    "read_caching" => ReadCaching(blob_access_decorators::read_caching::ReadCachingConfig<Node>) in [Cas, ActionCache],
    /// Logs every failed call with its operation, digest, node path, code and duration.
    "error_logging" => ErrorLogging(blob_access_decorators::error_logging::ErrorLoggingConfig<Node>) in [Cas, ActionCache, Execution],
    /// Spreads blobs over shards by weighted rendezvous hashing of their digest (action digest in an action cache).
    "sharding" => Sharding(blob_access_decorators::sharding::ShardingConfig<Node>) in [Cas, ActionCache],
    /// Keeps every blob on two backends: writes to both, reads from either, repairs the side that lacks one.
    "mirrored" => Mirrored(blob_access_decorators::mirrored::MirroredConfig<Node>) in [Cas, ActionCache],
    /// Serves an action result only if every blob it names is in the CAS (action cache only).
    "completeness_checking" => CompletenessChecking(blob_access_decorators::completeness_checking::CompletenessCheckingConfig<Node>) in [ActionCache],
    /// Routes each call by the longest instance-name prefix of its request to that prefix's backend.
    "demultiplexing" => Demultiplexing(blob_access_decorators::demultiplexing::DemultiplexingConfig<Node>) in [Cas, ActionCache, Execution],
}

/// Loads a config file and builds its trees.
pub fn build_file(path: &std::path::Path) -> std::result::Result<Storage, BuildError> {
    let config = load_file(path).map_err(BuildError::Config)?;
    config
        .build(&BuildContext::root())
        .map_err(BuildError::Build)
}

/// Why a config file did not yield its trees.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Config(ConfigError),
    #[error("{0}")]
    Build(blob_access::Error),
}
