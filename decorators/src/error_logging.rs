//! `error_logging`: says which call failed, where in the tree, and why.
//!
//! When a build fails on "blob not found" or a dropped stream, the client's
//! own message rarely says which backend of a cache hierarchy answered, or
//! how long it tried. This node logs each failed call with the operation,
//! digest, the node's path in the tree, the status code and the duration,
//! and passes the error on unchanged. Levels per code are configurable; by
//! default NOT_FOUND (a cache miss) is `info` (`debug` in an action cache,
//! where most lookups of a cold build miss) and CANCELLED (a client that went
//! away) is `debug`, everything else `error`.

use blob_access::action_cache::{ActionCache, ActionResult};
use blob_access::execution::{
    ExecuteRequest, Execution, ExecutionCapabilities, ListOperationsRequest,
    ListOperationsResponse, Operation, OperationStream,
};
use blob_access::node::Counters;
use blob_access::{
    BlobAccess, BlobStream, BuildContext, BuildNode, ChildNodes, Code, Digest, Error, NodeMetrics,
    ReadRange, Result,
};
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

/// Config node `error_logging: {backend: <node>, levels: {not_found: info}}`.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorLoggingConfig<N> {
    /// The node whose failures are logged.
    pub backend: Box<N>,
    /// Log level per status code, e.g. `{not_found: "off", unavailable: "warn"}`;
    /// merged over the defaults (`not_found: info`, `cancelled: debug`).
    #[serde(default)]
    pub levels: BTreeMap<StatusCode, Level>,
    /// Level of the codes not listed in `levels`. Default `error`.
    #[serde(default = "default_level")]
    pub default_level: Level,
}

fn default_level() -> Level {
    Level::Error
}

/// A gRPC status code, as in the REAPI documentation but snake_case.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Deserialize,
    serde::Serialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum StatusCode {
    Cancelled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl StatusCode {
    fn of(code: Code) -> Option<Self> {
        use StatusCode as S;
        Some(match code {
            Code::Cancelled => S::Cancelled,
            Code::Unknown => S::Unknown,
            Code::InvalidArgument => S::InvalidArgument,
            Code::DeadlineExceeded => S::DeadlineExceeded,
            Code::NotFound => S::NotFound,
            Code::AlreadyExists => S::AlreadyExists,
            Code::PermissionDenied => S::PermissionDenied,
            Code::ResourceExhausted => S::ResourceExhausted,
            Code::FailedPrecondition => S::FailedPrecondition,
            Code::Aborted => S::Aborted,
            Code::OutOfRange => S::OutOfRange,
            Code::Unimplemented => S::Unimplemented,
            Code::Internal => S::Internal,
            Code::Unavailable => S::Unavailable,
            Code::DataLoss => S::DataLoss,
            Code::Unauthenticated => S::Unauthenticated,
            Code::Ok => return None,
        })
    }
}

/// Where a failure is logged; `off` drops it.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Off,
    Debug,
    Info,
    Warn,
    Error,
}

impl<N> ErrorLoggingConfig<N> {
    fn levels(&self) -> BTreeMap<StatusCode, Level> {
        let mut levels = BTreeMap::from([
            (StatusCode::NotFound, Level::Info),
            (StatusCode::Cancelled, Level::Debug),
        ]);
        levels.extend(self.levels.iter().map(|(k, v)| (*k, *v)));
        levels
    }
}

impl<N: BuildNode> BuildNode for ErrorLoggingConfig<N> {
    fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn BlobAccess>> {
        let backend = self.backend.build(&ctx.child("backend"))?;
        let node = ErrorLogging::new(ctx.path(), backend, self.levels(), self.default_level);
        Ok(Arc::new(node))
    }

    fn build_action_cache(&self, ctx: &BuildContext) -> Result<Arc<dyn ActionCache>> {
        let backend = self.backend.build_action_cache(&ctx.child("backend"))?;
        // A miss is the usual answer of an action cache (every action of a cold
        // build): debug, unless the config says otherwise.
        let mut levels = self.levels();
        if !self.levels.contains_key(&StatusCode::NotFound) {
            levels.insert(StatusCode::NotFound, Level::Debug);
        }
        let node = ErrorLogging::new(ctx.path(), backend, levels, self.default_level);
        Ok(Arc::new(node))
    }

    fn build_execution(&self, ctx: &BuildContext) -> Result<Arc<dyn Execution>> {
        let backend = self.backend.build_execution(&ctx.child("backend"))?;
        let node = ErrorLogging::new(ctx.path(), backend, self.levels(), self.default_level);
        Ok(Arc::new(node))
    }
}

impl<N> ChildNodes<N> for ErrorLoggingConfig<N> {
    fn child_nodes(&self) -> Vec<(String, &N)> {
        vec![("backend".into(), &*self.backend)]
    }
}

/// See the module documentation. `T` is `dyn BlobAccess` or `dyn ActionCache`.
pub struct ErrorLogging<T: ?Sized = dyn BlobAccess> {
    backend: Arc<T>,
    log: Arc<Logger>,
}

struct Logger {
    path: String,
    levels: BTreeMap<StatusCode, Level>,
    default_level: Level,
    counters: Counters,
}

impl Logger {
    fn log(&self, op: &str, digest: Option<&Digest>, started: Instant, e: &Error) {
        let digest = digest.map(|d| d.to_string()).unwrap_or_default();
        self.log_about(op, &digest, started, e)
    }

    /// Logs a failed call about `digest` (a blob, an action or an operation's name).
    fn log_about(&self, op: &str, digest: &str, started: Instant, e: &Error) {
        self.counters.inc("errors");
        let level = StatusCode::of(e.code())
            .and_then(|c| self.levels.get(&c).copied())
            .unwrap_or(self.default_level);
        let ms = started.elapsed().as_millis() as u64;
        let code = format!("{:?}", e.code());
        macro_rules! emit {
            ($lvl:ident) => {
                tracing::$lvl!(node = %self.path, op, digest, code, duration_ms = ms, error = %e, "blob access failed")
            };
        }
        match level {
            Level::Off => {}
            Level::Debug => emit!(debug),
            Level::Info => emit!(info),
            Level::Warn => emit!(warn),
            Level::Error => emit!(error),
        }
    }
}

impl<T: ?Sized> ErrorLogging<T> {
    /// `levels` maps codes to levels; others use `default_level`.
    pub fn new(
        path: &str,
        backend: Arc<T>,
        levels: BTreeMap<StatusCode, Level>,
        default_level: Level,
    ) -> Self {
        let log = Logger {
            path: path.to_string(),
            levels,
            default_level,
            counters: Counters::new(&["errors"]),
        };
        ErrorLogging {
            backend,
            log: Arc::new(log),
        }
    }
}

#[async_trait::async_trait]
impl BlobAccess for ErrorLogging<dyn BlobAccess> {
    fn get(&self, digest: &Digest, range: ReadRange) -> BlobStream {
        let (log, d, backend) = (self.log.clone(), digest.clone(), self.backend.clone());
        // The clock starts at the first poll: the stream is lazy.
        futures::stream::once(async move {
            let started = Instant::now();
            backend.get(&d, range).inspect(move |item| {
                if let Err(e) = item {
                    log.log("get", Some(&d), started, e);
                }
            })
        })
        .flatten()
        .boxed()
    }

    async fn put(&self, digest: &Digest, data: BlobStream) -> Result<()> {
        let started = Instant::now();
        let result = self.backend.put(digest, data).await;
        if let Err(e) = &result {
            self.log.log("put", Some(digest), started, e);
        }
        result
    }

    async fn put_reopenable(&self, digest: &Digest, open: blob_access::Reopen) -> Result<()> {
        let started = Instant::now();
        let result = self.backend.put_reopenable(digest, open).await;
        if let Err(e) = &result {
            self.log.log("put", Some(digest), started, e);
        }
        result
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let started = Instant::now();
        let result = self.backend.find_missing(digests).await;
        if let Err(e) = &result {
            self.log.log("find_missing", None, started, e);
        }
        result
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        out.push(self.log.counters.snapshot(&self.log.path, "error_logging"));
        self.backend.metrics(out);
    }
}

#[async_trait::async_trait]
impl ActionCache for ErrorLogging<dyn ActionCache> {
    async fn get_action_result(&self, action: &Digest) -> Result<ActionResult> {
        let started = Instant::now();
        let result = self.backend.get_action_result(action).await;
        if let Err(e) = &result {
            self.log.log("get_action_result", Some(action), started, e);
        }
        result
    }

    async fn update_action_result(&self, action: &Digest, result: &ActionResult) -> Result<()> {
        let started = Instant::now();
        let outcome = self.backend.update_action_result(action, result).await;
        if let Err(e) = &outcome {
            self.log
                .log("update_action_result", Some(action), started, e);
        }
        outcome
    }

    async fn update_enabled(&self) -> bool {
        self.backend.update_enabled().await
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        out.push(self.log.counters.snapshot(&self.log.path, "error_logging"));
        self.backend.metrics(out);
    }
}

impl ErrorLogging<dyn Execution> {
    /// `stream`, its failure logged as `op` about `about`.
    fn logged(&self, op: &'static str, about: String, stream: OperationStream) -> OperationStream {
        let (log, started) = (self.log.clone(), Instant::now());
        stream
            .inspect(move |item| {
                if let Err(e) = item {
                    log.log_about(op, &about, started, e);
                }
            })
            .boxed()
    }

    /// `result`, its failure logged as `op` about `about`.
    fn checked<T>(&self, op: &str, about: &str, started: Instant, result: Result<T>) -> Result<T> {
        if let Err(e) = &result {
            self.log.log_about(op, about, started, e);
        }
        result
    }
}

#[async_trait::async_trait]
impl Execution for ErrorLogging<dyn Execution> {
    fn execute(&self, request: ExecuteRequest) -> OperationStream {
        let action = request
            .action_digest
            .as_ref()
            .map(|d| format!("{}/{}", d.hash, d.size_bytes))
            .unwrap_or_default();
        self.logged("execute", action, self.backend.execute(request))
    }

    fn wait_execution(&self, name: &str) -> OperationStream {
        let stream = self.backend.wait_execution(name);
        self.logged("wait_execution", name.to_string(), stream)
    }

    async fn get_operation(&self, name: &str) -> Result<Operation> {
        let started = Instant::now();
        let result = self.backend.get_operation(name).await;
        self.checked("get_operation", name, started, result)
    }

    async fn cancel_operation(&self, name: &str) -> Result<()> {
        let started = Instant::now();
        let result = self.backend.cancel_operation(name).await;
        self.checked("cancel_operation", name, started, result)
    }

    async fn list_operations(
        &self,
        request: ListOperationsRequest,
    ) -> Result<ListOperationsResponse> {
        let (started, about) = (Instant::now(), request.name.clone());
        let result = self.backend.list_operations(request).await;
        self.checked("list_operations", &about, started, result)
    }

    async fn capabilities(&self, instance_name: &str) -> Result<Option<ExecutionCapabilities>> {
        let started = Instant::now();
        let result = self.backend.capabilities(instance_name).await;
        self.checked("capabilities", instance_name, started, result)
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        out.push(self.log.counters.snapshot(&self.log.path, "error_logging"));
        self.backend.metrics(out);
    }
}
