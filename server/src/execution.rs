//! Execution (Execute, WaitExecution) and `google.longrunning.Operations`
//! over the server's execution tree, so that a build tool that executes
//! remotely can put `serve` in front of its cluster. Without a tree, both
//! answer UNIMPLEMENTED (and the capabilities say execution is disabled).
//!
//! Executing needs a token that may write where the action runs (its result
//! lands in the action cache); following and reading operations needs one
//! that may read; cancelling one needs one that may write.

use super::bytestream::until_killed;
use super::cas::parse_digest;
use super::{digest_function, Permission, Shared};
use bazel_remote_apis::google::protobuf::Empty;
use blob_access::execution::longrunning_proto::operations_server;
use blob_access::execution::longrunning_proto::{
    CancelOperationRequest, DeleteOperationRequest, GetOperationRequest, ListOperationsRequest,
    ListOperationsResponse, Operation, WaitOperationRequest,
};
use blob_access::execution::{ExecuteRequest, Execution};
use blob_access::proto::{execution_server, WaitExecutionRequest};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// How long WaitOperation waits when the request names no timeout.
const DEFAULT_WAIT_OPERATION: Duration = Duration::from_secs(60);

type OperationStream = BoxStream<'static, Result<Operation, Status>>;

fn tree(shared: &Shared) -> Result<&Arc<dyn Execution>, Status> {
    shared.execution.as_ref().ok_or_else(|| {
        Status::unimplemented(
            "this server does not execute; give it an `execution:` tree in its config",
        )
    })
}

/// A name to look an operation up by: not empty.
fn operation_name(name: &str) -> Result<&str, Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument("the operation name is empty"));
    }
    Ok(name)
}

pub(super) struct ExecutionService(pub(super) Shared);

impl ExecutionService {
    fn streamed(&self, stream: blob_access::execution::OperationStream) -> OperationStream {
        until_killed(stream.map_err(Status::from).boxed(), self.0.killed())
    }
}

#[tonic::async_trait]
impl execution_server::Execution for ExecutionService {
    type ExecuteStream = OperationStream;
    type WaitExecutionStream = OperationStream;

    async fn execute(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<OperationStream>, Status> {
        let tree = tree(&self.0)?;
        let (_, extensions, mut req) = request.into_parts();
        self.0
            .check_instance(&req.instance_name, &extensions, Permission::Write)?;
        let first = req.action_digest.as_ref().map(|d| d.hash.as_str());
        let function = digest_function(req.digest_function, first)?;
        // Named for the remote, which need not guess it again.
        req.digest_function = function.to_proto();
        parse_digest(function, req.action_digest.as_ref())
            .map_err(|s| Status::invalid_argument(format!("action_digest: {}", s.message())))?;
        Ok(Response::new(self.streamed(tree.execute(req))))
    }

    async fn wait_execution(
        &self,
        request: Request<WaitExecutionRequest>,
    ) -> Result<Response<OperationStream>, Status> {
        let tree = tree(&self.0)?;
        let name = operation_name(&request.get_ref().name)?;
        Ok(Response::new(self.streamed(tree.wait_execution(name))))
    }
}

pub(super) struct OperationsService(pub(super) Shared);

#[tonic::async_trait]
impl operations_server::Operations for OperationsService {
    async fn list_operations(
        &self,
        request: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        let tree = tree(&self.0)?;
        let (_, extensions, req) = request.into_parts();
        self.0
            .check_instance(&req.name, &extensions, Permission::Read)?;
        Ok(Response::new(tree.list_operations(req).await?))
    }

    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let tree = tree(&self.0)?;
        let name = operation_name(&request.get_ref().name)?;
        Ok(Response::new(tree.get_operation(name).await?))
    }

    async fn delete_operation(
        &self,
        _request: Request<DeleteOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        Err(Status::unimplemented(
            "operations are deleted by the server that runs them when they are done",
        ))
    }

    async fn cancel_operation(
        &self,
        request: Request<CancelOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        let tree = tree(&self.0)?;
        let name = operation_name(&request.get_ref().name)?;
        tree.cancel_operation(name).await?;
        Ok(Response::new(Empty {}))
    }

    /// The operation once done, or its latest state after the timeout.
    async fn wait_operation(
        &self,
        request: Request<WaitOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        let tree = tree(&self.0)?;
        let req = request.into_inner();
        let name = operation_name(&req.name)?;
        let timeout = req
            .timeout
            .filter(|t| t.seconds >= 0 && (0..1_000_000_000).contains(&t.nanos))
            .map(|t| Duration::new(t.seconds as u64, t.nanos as u32))
            .unwrap_or(DEFAULT_WAIT_OPERATION);
        let mut updates = tree.wait_execution(name);
        let mut latest = None;
        let waited = tokio::time::timeout(timeout, async {
            while let Some(op) = updates.next().await {
                let op = op?;
                let done = op.done;
                latest = Some(op);
                if done {
                    break;
                }
            }
            Ok::<_, blob_access::Error>(())
        })
        .await;
        if let Ok(Err(e)) = waited {
            return Err(e.into());
        }
        match latest {
            Some(op) => Ok(Response::new(op)),
            None => Ok(Response::new(tree.get_operation(name).await?)),
        }
    }
}
