//! Prometheus metrics of a tree, labelled by each node's path in it
//! (`read_caching.slow.resumable_grpc`), so two nodes of one kind stay apart.
//!
//! - [`Instrumented`] wraps a node and records its calls, errors by code,
//!   bytes read and written, and latency. Trees built with a
//!   [`BuildContext`](crate::BuildContext) carrying [`CallMetrics`] get one
//!   around every node.
//! - [`NodeCounters`] exports, at each scrape, the counters nodes keep
//!   themselves (resumptions, cache hits...) as `blob_access_<kind>_<name>`.
//!
//! ```
//! use blob_access::metrics::{CallMetrics, NodeCounters};
//! use blob_access::{BlobAccess, BuildContext, memory::MemoryBlobAccess};
//! use prometheus_client::registry::Registry;
//! use std::sync::Arc;
//!
//! let mut registry = Registry::default();
//! let calls = CallMetrics::register(&mut registry);
//! let ctx = BuildContext::root().with_metrics(calls);
//! let cas = ctx.instrument(Arc::new(MemoryBlobAccess::new("memory", 1 << 20)));
//! registry.register_collector(Box::new(NodeCounters::new(cas.clone(), None)));
//! let mut text = String::new();
//! prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
//! assert!(text.contains("blob_access_memory_gets_total"));
//! ```

use crate::action_cache::{ActionCache, ActionResult};
use crate::execution::OperationStream;
use crate::{BlobAccess, BlobStream, Digest, NodeMetrics, ReadRange, Result};
use futures::{Stream, StreamExt};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Call {
    node: String,
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Failure {
    node: String,
    op: &'static str,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Transfer {
    node: String,
    direction: &'static str,
}

/// The families every [`Instrumented`] node records into.
#[derive(Debug)]
pub struct CallMetrics {
    calls: Family<Call, Counter>,
    errors: Family<Failure, Counter>,
    bytes: Family<Transfer, Counter>,
    seconds: Family<Call, Histogram>,
}

impl CallMetrics {
    /// Creates the families and registers them in `registry` under `blob_access_`.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = CallMetrics {
            calls: Family::default(),
            errors: Family::default(),
            bytes: Family::default(),
            // 1 ms to ~9 minutes: find_missing on loopback to a large blob's read.
            seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 4.0, 10))
            }),
        };
        let r = registry.sub_registry_with_prefix("blob_access");
        r.register(
            "calls",
            "Calls made to a node, by operation",
            m.calls.clone(),
        );
        r.register(
            "errors",
            "Calls of a node that failed, by operation and status code",
            m.errors.clone(),
        );
        r.register(
            "bytes",
            "Blob bytes that went through a node, by direction (read, written)",
            m.bytes.clone(),
        );
        r.register(
            "call_duration_seconds",
            "Duration of a node's calls; a get lasts until its stream ends",
            m.seconds.clone(),
        );
        Arc::new(m)
    }

    fn call(&self, node: &str, op: &'static str) -> Call {
        let call = Call {
            node: node.to_string(),
            op,
        };
        self.calls.get_or_create(&call).inc();
        call
    }

    fn finish(&self, call: &Call, start: Instant, error: Option<&crate::Error>) {
        self.seconds
            .get_or_create(call)
            .observe(start.elapsed().as_secs_f64());
        if let Some(e) = error {
            let failure = Failure {
                node: call.node.clone(),
                op: call.op,
                code: format!("{:?}", e.code()),
            };
            self.errors.get_or_create(&failure).inc();
        }
    }

    fn bytes(&self, node: &str, direction: &'static str) -> Counter {
        self.bytes.get_or_create_owned(&Transfer {
            node: node.to_string(),
            direction,
        })
    }
}

/// A node (`dyn BlobAccess` or `dyn ActionCache`) wrapped so that its calls
/// are recorded; otherwise transparent.
pub struct Instrumented<T: ?Sized> {
    inner: Arc<T>,
    node: String,
    metrics: Arc<CallMetrics>,
}

impl<T: ?Sized> Instrumented<T> {
    pub fn new(inner: Arc<T>, node: &str, metrics: Arc<CallMetrics>) -> Self {
        Instrumented {
            inner,
            node: node.to_string(),
            metrics,
        }
    }

    async fn record<R>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<R>>,
    ) -> Result<R> {
        let (recorded, start) = (self.metrics.call(&self.node, op), Instant::now());
        let result = call.await;
        self.metrics.finish(&recorded, start, result.as_ref().err());
        result
    }
}

/// The counter of a stream's bytes, and the bytes of an item.
type ByteCount<T> = (Counter, fn(&T) -> u64);

/// A stream that counts its bytes (if any) and records its call when it
/// ends, fails or is dropped (a cancelled call, recorded as CANCELLED).
struct Recorded<T> {
    inner: futures::stream::BoxStream<'static, Result<T>>,
    bytes: Option<ByteCount<T>>,
    call: Call,
    start: Instant,
    metrics: Arc<CallMetrics>,
    done: bool,
}

impl<T> Stream for Recorded<T> {
    type Item = Result<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = futures::ready!(self.inner.poll_next_unpin(cx));
        if !self.done {
            match &item {
                Some(Ok(item)) => {
                    if let Some((counter, len)) = &self.bytes {
                        counter.inc_by(len(item));
                    }
                }
                Some(Err(e)) => {
                    self.done = true;
                    self.metrics.finish(&self.call, self.start, Some(e));
                }
                None => {
                    self.done = true;
                    self.metrics.finish(&self.call, self.start, None);
                }
            }
        }
        Poll::Ready(item)
    }
}

impl<T> Drop for Recorded<T> {
    fn drop(&mut self) {
        if !self.done {
            let cancelled = crate::Error::new(crate::Code::Cancelled, "");
            self.metrics
                .finish(&self.call, self.start, Some(&cancelled));
        }
    }
}

#[async_trait::async_trait]
impl BlobAccess for Instrumented<dyn BlobAccess> {
    fn get(&self, digest: &Digest, range: ReadRange) -> BlobStream {
        let call = self.metrics.call(&self.node, "get");
        Recorded {
            inner: self.inner.get(digest, range),
            bytes: Some((self.metrics.bytes(&self.node, "read"), |c| c.len() as u64)),
            call,
            start: Instant::now(),
            metrics: self.metrics.clone(),
            done: false,
        }
        .boxed()
    }

    async fn put(&self, digest: &Digest, data: BlobStream) -> Result<()> {
        let (call, start) = (self.metrics.call(&self.node, "put"), Instant::now());
        let written = self.metrics.bytes(&self.node, "written");
        let data = data
            .inspect(move |c| {
                if let Ok(c) = c {
                    written.inc_by(c.len() as u64);
                }
            })
            .boxed();
        let result = self.inner.put(digest, data).await;
        self.metrics.finish(&call, start, result.as_ref().err());
        result
    }

    async fn put_reopenable(&self, digest: &Digest, open: crate::Reopen) -> Result<()> {
        let (call, start) = (self.metrics.call(&self.node, "put"), Instant::now());
        let written = self.metrics.bytes(&self.node, "written");
        let counted: crate::Reopen = std::sync::Arc::new(move || {
            let written = written.clone();
            open()
                .inspect(move |c| {
                    if let Ok(c) = c {
                        written.inc_by(c.len() as u64);
                    }
                })
                .boxed()
        });
        let result = self.inner.put_reopenable(digest, counted).await;
        self.metrics.finish(&call, start, result.as_ref().err());
        result
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.record("find_missing", self.inner.find_missing(digests))
            .await
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        self.inner.metrics(out)
    }
}

#[async_trait::async_trait]
impl ActionCache for Instrumented<dyn ActionCache> {
    async fn get_action_result(&self, action: &Digest) -> Result<ActionResult> {
        self.record("get_action_result", self.inner.get_action_result(action))
            .await
    }

    async fn update_action_result(&self, action: &Digest, result: &ActionResult) -> Result<()> {
        let update = self.inner.update_action_result(action, result);
        self.record("update_action_result", update).await
    }

    async fn update_enabled(&self) -> bool {
        self.inner.update_enabled().await
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        self.inner.metrics(out)
    }
}

impl Instrumented<dyn crate::Execution> {
    fn recorded(&self, op: &'static str, inner: OperationStream) -> OperationStream {
        Recorded {
            inner,
            bytes: None,
            call: self.metrics.call(&self.node, op),
            start: Instant::now(),
            metrics: self.metrics.clone(),
            done: false,
        }
        .boxed()
    }
}

#[async_trait::async_trait]
impl crate::Execution for Instrumented<dyn crate::Execution> {
    fn execute(&self, request: crate::execution::ExecuteRequest) -> OperationStream {
        self.recorded("execute", self.inner.execute(request))
    }

    fn wait_execution(&self, name: &str) -> OperationStream {
        self.recorded("wait_execution", self.inner.wait_execution(name))
    }

    async fn get_operation(&self, name: &str) -> Result<crate::execution::Operation> {
        self.record("get_operation", self.inner.get_operation(name))
            .await
    }

    async fn cancel_operation(&self, name: &str) -> Result<()> {
        self.record("cancel_operation", self.inner.cancel_operation(name))
            .await
    }

    async fn list_operations(
        &self,
        request: crate::execution::ListOperationsRequest,
    ) -> Result<crate::execution::ListOperationsResponse> {
        self.record("list_operations", self.inner.list_operations(request))
            .await
    }

    async fn capabilities(
        &self,
        instance_name: &str,
    ) -> Result<Option<crate::execution::ExecutionCapabilities>> {
        self.inner.capabilities(instance_name).await
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        self.inner.metrics(out)
    }
}

/// Exports the counters of every node of a server's trees at each scrape.
pub struct NodeCounters {
    cas: Arc<dyn BlobAccess>,
    action_cache: Option<Arc<dyn ActionCache>>,
    execution: Option<Arc<dyn crate::Execution>>,
}

impl NodeCounters {
    pub fn new(cas: Arc<dyn BlobAccess>, action_cache: Option<Arc<dyn ActionCache>>) -> Self {
        NodeCounters {
            cas,
            action_cache,
            execution: None,
        }
    }

    /// Exports the execution tree's counters too.
    pub fn with_execution(mut self, execution: Option<Arc<dyn crate::Execution>>) -> Self {
        self.execution = execution;
        self
    }
}

impl std::fmt::Debug for NodeCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeCounters")
    }
}

impl Collector for NodeCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let mut nodes = Vec::new();
        self.cas.metrics(&mut nodes);
        if let Some(ac) = &self.action_cache {
            ac.metrics(&mut nodes);
        }
        if let Some(exec) = &self.execution {
            exec.metrics(&mut nodes);
        }
        // One family per (kind, counter), one sample per node.
        let mut families: BTreeMap<(&str, &str), Vec<(&str, u64)>> = BTreeMap::new();
        for n in &nodes {
            for (name, value) in &n.counters {
                families
                    .entry((n.kind, name))
                    .or_default()
                    .push((&n.path, *value));
            }
        }
        for ((kind, name), samples) in families {
            let family = format!("blob_access_{kind}_{name}");
            let help = format!("`{name}` counted by {kind} nodes");
            let mut metric = encoder.encode_descriptor(
                &family,
                &help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (node, value) in samples {
                let labels = [("node", node)];
                ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
