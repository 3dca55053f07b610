//! What a node of a config tree needs to become a `BlobAccess`, and the
//! counters each node exposes (read through the tree, e.g. for a metrics endpoint).

use crate::{BlobAccess, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Where a node sits in the tree, e.g. `read_caching.slow.grpc`; used in errors,
/// logs and metrics so that two nodes of the same kind can be told apart.
#[derive(Clone, Debug, Default)]
pub struct BuildContext {
    path: String,
    metrics: Option<Arc<crate::metrics::CallMetrics>>,
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
            metrics: self.metrics.clone(),
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
    /// `node` wrapped to record its calls under this context's path, if metrics are on.
    pub fn instrument(&self, node: Arc<dyn BlobAccess>) -> Arc<dyn BlobAccess> {
        match &self.metrics {
            Some(m) => Arc::new(crate::metrics::Instrumented::new(
                node,
                &self.path,
                m.clone(),
            )),
            None => node,
        }
    }
}

/// A config node that can build its `BlobAccess` (and its children's).
pub trait BuildNode {
    fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn BlobAccess>>;
}

impl<T: BuildNode + ?Sized> BuildNode for Box<T> {
    fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn BlobAccess>> {
        (**self).build(ctx)
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
