//! What a node of a config tree needs to become a `BlobAccess`, and the
//! counters each node exposes (read through the tree, e.g. for a metrics endpoint).

use crate::action_cache::ActionCache;
use crate::execution::Execution;
use crate::{BlobAccess, Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Which of a server's two trees a node is part of; it decides what a stored
/// value is checked against (CAS: its digest; action cache: parsing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageType {
    Cas,
    ActionCache,
    Execution,
}

impl StorageType {
    /// The config key of a tree of this type.
    pub fn key(self) -> &'static str {
        match self {
            StorageType::Cas => "content_addressable_storage",
            StorageType::ActionCache => "action_cache",
            StorageType::Execution => "execution",
        }
    }
}

/// Where a node sits in the tree, e.g. `read_caching.slow.grpc`; used in errors,
/// logs and metrics so that two nodes of the same kind can be told apart. An
/// action cache tree's context also holds the CAS it is served beside, for the
/// nodes that look into it (`completeness_checking`).
#[derive(Clone, Default)]
pub struct BuildContext {
    path: String,
    metrics: Option<Arc<crate::metrics::CallMetrics>>,
    cas: Option<Arc<dyn BlobAccess>>,
}

impl std::fmt::Debug for BuildContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildContext")
            .field("path", &self.path)
            .field("metrics", &self.metrics.is_some())
            .field("cas", &self.cas.is_some())
            .finish()
    }
}

impl BuildContext {
    pub fn root() -> Self {
        Self::default()
    }
    /// The context of a child node reached through `field`, then `kind`.
    pub fn child(&self, segment: &str) -> Self {
        let path = if self.path.is_empty() {
            segment.to_string()
        } else {
            format!("{}.{segment}", self.path)
        };
        BuildContext {
            path,
            ..self.clone()
        }
    }
    pub fn path(&self) -> &str {
        &self.path
    }
    /// Records the calls of every node built from this context (and its children).
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::CallMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }
    /// The CAS that action results built in this context refer to.
    pub fn with_cas(mut self, cas: Arc<dyn BlobAccess>) -> Self {
        self.cas = Some(cas);
        self
    }
    pub fn cas(&self) -> Option<&Arc<dyn BlobAccess>> {
        self.cas.as_ref()
    }
    /// `node` wrapped to record its calls under this context's path, if metrics are on.
    pub fn instrument(&self, node: Arc<dyn BlobAccess>) -> Arc<dyn BlobAccess> {
        self.wrap(node, |n| Arc::new(n))
    }
    /// An execution node wrapped like [`instrument`](Self::instrument) does.
    pub fn instrument_execution(&self, node: Arc<dyn Execution>) -> Arc<dyn Execution> {
        self.wrap(node, |n| Arc::new(n))
    }
    /// An action cache node wrapped like [`instrument`](Self::instrument) does.
    pub fn instrument_action_cache(&self, node: Arc<dyn ActionCache>) -> Arc<dyn ActionCache> {
        self.wrap(node, |n| Arc::new(n))
    }
    fn wrap<T: ?Sized>(
        &self,
        node: Arc<T>,
        boxed: impl FnOnce(crate::metrics::Instrumented<T>) -> Arc<T>,
    ) -> Arc<T> {
        match &self.metrics {
            Some(m) => boxed(crate::metrics::Instrumented::new(
                node,
                &self.path,
                m.clone(),
            )),
            None => node,
        }
    }
}

/// A config node that can build its `BlobAccess` (and its children's), and,
/// where that makes sense, its `ActionCache`.
pub trait BuildNode {
    fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn BlobAccess>>;

    /// The node as part of an action cache tree. Kinds that make no sense
    /// there keep this default, and `validate` refuses them before any build.
    fn build_action_cache(&self, ctx: &BuildContext) -> Result<Arc<dyn ActionCache>> {
        Err(Error::invalid_argument(format!(
            "node {:?} cannot be part of an action_cache tree",
            ctx.path()
        )))
    }

    /// The node as part of an execution tree, like
    /// [`build_action_cache`](Self::build_action_cache).
    fn build_execution(&self, ctx: &BuildContext) -> Result<Arc<dyn Execution>> {
        Err(Error::invalid_argument(format!(
            "node {:?} cannot be part of an execution tree",
            ctx.path()
        )))
    }
}

impl<T: BuildNode + ?Sized> BuildNode for Box<T> {
    fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn BlobAccess>> {
        (**self).build(ctx)
    }
    fn build_action_cache(&self, ctx: &BuildContext) -> Result<Arc<dyn ActionCache>> {
        (**self).build_action_cache(ctx)
    }
    fn build_execution(&self, ctx: &BuildContext) -> Result<Arc<dyn Execution>> {
        (**self).build_execution(ctx)
    }
}

/// The child nodes of a config node, named by their place below it (a field,
/// or e.g. `shards[2].backend` in a list), so that a tree can
/// be checked (e.g. for kinds its storage type refuses) without building it.
pub trait ChildNodes<N> {
    fn child_nodes(&self) -> Vec<(String, &N)> {
        Vec::new()
    }
}

/// A snapshot of one node's counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeMetrics {
    pub path: String,
    pub kind: &'static str,
    pub counters: Vec<(&'static str, u64)>,
}

impl NodeMetrics {
    pub fn get(&self, name: &str) -> Option<u64> {
        self.counters
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }
}

/// A named set of monotonic counters, cheap to bump from any task.
#[derive(Debug)]
pub struct Counters {
    names: &'static [&'static str],
    values: Vec<AtomicU64>,
}

impl Counters {
    pub fn new(names: &'static [&'static str]) -> Self {
        Counters {
            names,
            values: names.iter().map(|_| AtomicU64::new(0)).collect(),
        }
    }
    /// Adds `n` to counter `name` (declared in `new`).
    pub fn add(&self, name: &str, n: u64) {
        let i = self.names.iter().position(|x| *x == name);
        debug_assert!(i.is_some(), "undeclared counter {name}");
        if let Some(i) = i {
            self.values[i].fetch_add(n, Ordering::Relaxed);
        }
    }
    pub fn inc(&self, name: &str) {
        self.add(name, 1)
    }
    pub fn get(&self, name: &str) -> u64 {
        self.names
            .iter()
            .position(|x| *x == name)
            .map_or(0, |i| self.values[i].load(Ordering::Relaxed))
    }
    pub fn snapshot(&self, path: &str, kind: &'static str) -> NodeMetrics {
        NodeMetrics {
            path: path.to_string(),
            kind,
            counters: self
                .names
                .iter()
                .zip(&self.values)
                .map(|(n, v)| (*n, v.load(Ordering::Relaxed)))
                .collect(),
        }
    }
}
