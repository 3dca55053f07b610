//! Remote execution: running an action on a cluster and following it as a
//! long-running operation. A build tool sends `Execute` and keeps that stream
//! open while the action runs, often for minutes: the longest-lived stream of
//! a build, and so the one proxies and load balancers cut most often. REAPI's
//! answer is `WaitExecution` on the operation's name; the `resumable_grpc`
//! node gives it, so that a caller sees one stream that never breaks.
//!
//! Config trees build an execution tree from the nodes that make sense there
//! (`grpc`, `resumable_grpc`, `demultiplexing`, `error_logging`; see
//! [`BuildNode::build_execution`](crate::BuildNode::build_execution)).
//!
//! ```no_run
//! use blob_access::execution::{Execution, ExecuteRequest};
//! use blob_access::{grpc, BuildContext, BuildNode, Digest};
//! use futures::StreamExt;
//! # async fn run() -> blob_access::Result<()> {
//! let cfg: grpc::GrpcConfig = serde_json::from_str(r#"{"endpoint": "grpc://127.0.0.1:8980"}"#).unwrap();
//! let exec = cfg.build_execution(&BuildContext::root())?;
//! let action = Digest::of(b"an Action message, stored in the CAS");
//! let mut updates = exec.execute(ExecuteRequest {
//!     action_digest: Some(action.to_proto()),
//!     ..Default::default()
//! });
//! while let Some(op) = updates.next().await {
//!     let op = op?;
//!     println!("{} done={}", op.name, op.done);
//! }
//! # Ok(()) }
//! ```

use crate::{Error, NodeMetrics, Result};
use futures::stream::BoxStream;
use prost::Message;

pub use crate::proto::{ExecuteRequest, ExecuteResponse, ExecutionCapabilities};
/// Generated `google.longrunning` types and stubs.
pub use bazel_remote_apis::google::longrunning as longrunning_proto;
pub use longrunning_proto::{ListOperationsRequest, ListOperationsResponse, Operation};

/// Updates of one operation, the last with `done: true`. An `Err` item ends
/// it: the operation's fate is then unknown to this stream.
pub type OperationStream = BoxStream<'static, Result<Operation>>;

/// The REAPI Execution service and the `google.longrunning.Operations` calls
/// on the operations it creates.
///
/// Implementations are used as `Arc<dyn Execution>` and shared between tasks.
#[async_trait::async_trait]
pub trait Execution: Send + Sync + 'static {
    /// Starts (or joins, if the server deduplicates) the execution of an
    /// action whose `Action`, `Command` and inputs are in the CAS.
    fn execute(&self, request: ExecuteRequest) -> OperationStream;

    /// Follows the operation `name` (from an earlier `execute`) until done.
    fn wait_execution(&self, name: &str) -> OperationStream;

    /// The operation's latest state, without waiting.
    async fn get_operation(&self, name: &str) -> Result<Operation>;

    /// Asks the server to cancel the operation (it may finish anyway).
    async fn cancel_operation(&self, name: &str) -> Result<()>;

    /// The operations the server lists under `request.name`; UNIMPLEMENTED
    /// where the server has no such listing.
    async fn list_operations(
        &self,
        _request: ListOperationsRequest,
    ) -> Result<ListOperationsResponse> {
        Err(Error::new(
            crate::Code::Unimplemented,
            "ListOperations is not supported here",
        ))
    }

    /// What the server says of its execution for `instance_name`; `None`
    /// when it does not execute.
    async fn capabilities(&self, instance_name: &str) -> Result<Option<ExecutionCapabilities>>;

    /// Appends the counters of this node and of the nodes below it.
    fn metrics(&self, _out: &mut Vec<NodeMetrics>) {}
}

/// The `ExecuteResponse` a done operation carries, if it carries one.
pub fn execute_response(op: &Operation) -> Option<ExecuteResponse> {
    match &op.result {
        Some(longrunning_proto::operation::Result::Response(any)) => {
            ExecuteResponse::decode(&any.value[..]).ok()
        }
        _ => None,
    }
}

/// The stage an operation's `ExecuteOperationMetadata` reports (e.g.
/// `EXECUTING`), for logs.
pub fn stage_of(op: &Operation) -> &'static str {
    use crate::proto::{execution_stage::Value, ExecuteOperationMetadata};
    let stage = op
        .metadata
        .as_ref()
        .and_then(|any| ExecuteOperationMetadata::decode(&any.value[..]).ok())
        .and_then(|m| Value::try_from(m.stage).ok());
    match stage {
        Some(Value::CacheCheck) => "CACHE_CHECK",
        Some(Value::Queued) => "QUEUED",
        Some(Value::Executing) => "EXECUTING",
        Some(Value::Completed) => "COMPLETED",
        Some(Value::Unknown) | None => "UNKNOWN",
    }
}
