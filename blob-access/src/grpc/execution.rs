//! A remote Execution service, on the same channel, instance name and
//! headers as the `grpc` node's CAS: `serve` forwards a build tool's
//! executions to its cluster. A stream cut in the middle fails here
//! (`resumable_grpc` is the node that goes on with WaitExecution).

use super::{GrpcChannel, GrpcConnection, MAX_MESSAGE};
use crate::execution::longrunning_proto::operations_client::OperationsClient;
use crate::execution::longrunning_proto::{
    CancelOperationRequest, GetOperationRequest, ListOperationsRequest, ListOperationsResponse,
    Operation,
};
use crate::execution::{ExecuteRequest, Execution, ExecutionCapabilities, OperationStream};
use crate::node::Counters;
use crate::proto::capabilities_client::CapabilitiesClient;
use crate::proto::execution_client::ExecutionClient;
use crate::proto::{GetCapabilitiesRequest, WaitExecutionRequest};
use crate::{Error, NodeMetrics, Result};
use futures::{StreamExt, TryStreamExt};
use std::sync::Arc;

const COUNTERS: &[&str] = &["executions", "waits", "operation_calls", "errors"];

/// How long a client's GetCapabilities waits for the remote's execution capabilities.
const CAPABILITIES_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// See the module documentation.
pub struct GrpcExecution {
    conn: GrpcConnection,
    counters: Arc<Counters>,
}

impl GrpcExecution {
    pub fn new(conn: GrpcConnection) -> Self {
        GrpcExecution {
            conn,
            counters: Arc::new(Counters::new(COUNTERS)),
        }
    }

    pub fn connection(&self) -> &GrpcConnection {
        &self.conn
    }

    /// The Execute request as sent: under the configured instance name
    /// (joined with the request's own), with the configured headers.
    pub fn execute_request(&self, mut req: ExecuteRequest) -> tonic::Request<ExecuteRequest> {
        req.instance_name =
            crate::instance_name::join(self.conn.instance_name(), &req.instance_name);
        self.conn.request(req)
    }

    /// The WaitExecution request of `name`, with the configured headers.
    pub fn wait_request(&self, name: &str) -> tonic::Request<WaitExecutionRequest> {
        self.conn
            .request(WaitExecutionRequest { name: name.into() })
    }

    /// `e` naming this node and the call.
    pub fn error(&self, e: impl Into<Error>, call: &str) -> Error {
        self.counters.inc("errors");
        e.into().with_backend(self.conn.name()).in_call(call)
    }

    /// The node's counters, for a node that makes these calls its own way.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    fn operations(&self) -> OperationsClient<GrpcChannel> {
        self.counters.inc("operation_calls");
        OperationsClient::new(self.conn.channel())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    fn stream(&self, call: &'static str, opened: OpenedStream) -> OperationStream {
        let (name, counters) = (self.conn.name().to_string(), self.counters.clone());
        futures::stream::once(opened)
            .try_flatten()
            .map_err(move |s: tonic::Status| {
                counters.inc("errors");
                Error::from(s).with_backend(name.clone()).in_call(call)
            })
            .boxed()
    }
}

type OpenedStream = futures::future::BoxFuture<
    'static,
    std::result::Result<tonic::Streaming<Operation>, tonic::Status>,
>;

/// An Execution client on `channel` (any tower service of the channel's kind).
pub fn execution_client<C>(channel: C) -> ExecutionClient<C>
where
    C: tonic::client::GrpcService<tonic::body::Body>,
    C::Error: Into<tonic::codegen::StdError>,
    C::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    <C::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    ExecutionClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

#[async_trait::async_trait]
impl Execution for GrpcExecution {
    fn execute(&self, request: ExecuteRequest) -> OperationStream {
        self.counters.inc("executions");
        let req = self.execute_request(request);
        let mut client = execution_client(self.conn.channel());
        let opened = Box::pin(async move { Ok(client.execute(req).await?.into_inner()) });
        self.stream("Execute", opened)
    }

    fn wait_execution(&self, name: &str) -> OperationStream {
        self.counters.inc("waits");
        let req = self.wait_request(name);
        let mut client = execution_client(self.conn.channel());
        let opened = Box::pin(async move { Ok(client.wait_execution(req).await?.into_inner()) });
        self.stream("WaitExecution", opened)
    }

    async fn get_operation(&self, name: &str) -> Result<Operation> {
        let req = self.conn.request(GetOperationRequest { name: name.into() });
        let answer = self.operations().get_operation(req).await;
        answer
            .map(tonic::Response::into_inner)
            .map_err(|s| self.error(s, "GetOperation"))
    }

    async fn cancel_operation(&self, name: &str) -> Result<()> {
        let req = self
            .conn
            .request(CancelOperationRequest { name: name.into() });
        let answer = self.operations().cancel_operation(req).await;
        answer
            .map(drop)
            .map_err(|s| self.error(s, "CancelOperation"))
    }

    async fn list_operations(
        &self,
        request: ListOperationsRequest,
    ) -> Result<ListOperationsResponse> {
        let req = self.conn.request(request);
        let answer = self.operations().list_operations(req).await;
        answer
            .map(tonic::Response::into_inner)
            .map_err(|s| self.error(s, "ListOperations"))
    }

    async fn capabilities(&self, instance_name: &str) -> Result<Option<ExecutionCapabilities>> {
        let mut client = CapabilitiesClient::new(self.conn.channel());
        let req = self.conn.request(GetCapabilitiesRequest {
            instance_name: crate::instance_name::join(self.conn.instance_name(), instance_name),
        });
        let asked = tokio::time::timeout(CAPABILITIES_WAIT, client.get_capabilities(req));
        let answer = asked.await.map_err(|_| {
            self.error(
                Error::unavailable(format!("no answer within {CAPABILITIES_WAIT:?}")),
                "GetCapabilities",
            )
        })?;
        let caps = answer.map_err(|s| self.error(s, "GetCapabilities"))?;
        Ok(caps
            .into_inner()
            .execution_capabilities
            .filter(|e| e.exec_enabled))
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        out.push(self.counters.snapshot(self.conn.name(), "grpc"));
    }
}
