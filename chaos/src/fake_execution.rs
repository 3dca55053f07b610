//! An in-process REAPI Execution server whose actions take a set time and
//! whose quirks are chosen per test: how often it repeats an operation's
//! state, a status it answers Execute with, forgetting its operations (a
//! restart), holding a stream open after `done`. It counts what it was
//! asked, so tests can tell that an action ran exactly once. Put a
//! [`crate::Proxy`] in front of it to cut its streams.

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use bazel_remote_apis::google::longrunning::{self as lr, operations_server};
use bazel_remote_apis::google::protobuf::{Any, Empty};
use futures::stream::BoxStream;
use futures::StreamExt;
use prost::Message;
use reapi::execution_server::{self, ExecutionServer};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};

/// How the server behaves; the default runs each action for 1 s and repeats
/// its state every 100 ms.
#[derive(Clone, Debug)]
pub struct Behaviour {
    /// How long an action runs from its Execute.
    pub run_for: Duration,
    /// The state is sent again after this long without a change (a keepalive).
    pub repeat_every: Duration,
    /// Before the first message of an Execute stream.
    pub first_message_after: Duration,
    /// Execute answers this status at once (trailers-only), with these details.
    pub refuse_execute: Option<(tonic::Code, Vec<u8>)>,
    /// After `done`, the stream stays open (never ends by itself).
    pub hold_after_done: bool,
    /// Operation names are this and a number.
    pub name_prefix: String,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            run_for: Duration::from_secs(1),
            repeat_every: Duration::from_millis(100),
            first_message_after: Duration::ZERO,
            refuse_execute: None,
            hold_after_done: false,
            name_prefix: "operations/".into(),
        }
    }
}

/// What the server was asked.
#[derive(Default, Debug)]
pub struct Counts {
    pub executes: AtomicU64,
    pub waits: AtomicU64,
    pub get_operations: AtomicU64,
    pub cancels: AtomicU64,
}

impl Counts {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::SeqCst)
    }
}

struct Op {
    started: Instant,
    action: Option<reapi::Digest>,
    cancelled: bool,
}

#[derive(Clone)]
struct Service {
    behaviour: Arc<Mutex<Behaviour>>,
    ops: Arc<Mutex<HashMap<String, Op>>>,
    counts: Arc<Counts>,
    next: Arc<AtomicU64>,
}

/// See the module documentation. Stops when dropped.
pub struct FakeExecution {
    pub addr: SocketAddr,
    pub counts: Arc<Counts>,
    service: Service,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl FakeExecution {
    pub async fn start(behaviour: Behaviour) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let service = Service {
            behaviour: Arc::new(Mutex::new(behaviour)),
            ops: Arc::default(),
            counts: Arc::default(),
            next: Arc::default(),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let router = tonic::transport::Server::builder()
            .add_service(ExecutionServer::new(service.clone()))
            .add_service(operations_server::OperationsServer::new(service.clone()))
            .add_service(reapi::capabilities_server::CapabilitiesServer::new(
                service.clone(),
            ));
        tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            let _ = stopped.await;
        }));
        Ok(FakeExecution {
            addr,
            counts: service.counts.clone(),
            service,
            _stop: stop,
        })
    }

    pub fn endpoint(&self) -> String {
        format!("grpc://{}", self.addr)
    }

    /// Forgets every operation, as a server that restarted.
    pub fn forget(&self) {
        self.service.ops.lock().unwrap().clear();
    }

    pub fn set(&self, change: impl FnOnce(&mut Behaviour)) {
        change(&mut self.service.behaviour.lock().unwrap());
    }

    /// The operations ever created (one per action run).
    pub fn created(&self) -> u64 {
        self.service.next.load(Ordering::SeqCst)
    }
}

/// The result every action of this server produces.
pub fn result_of(name: &str) -> reapi::ActionResult {
    reapi::ActionResult {
        exit_code: 0,
        stdout_raw: format!("ran as {name}").into_bytes(),
        ..Default::default()
    }
}

impl Service {
    fn behaviour(&self) -> Behaviour {
        self.behaviour.lock().unwrap().clone()
    }

    /// The operation's state now, `None` if unknown.
    fn state(&self, name: &str) -> Option<lr::Operation> {
        let run_for = self.behaviour().run_for;
        let ops = self.ops.lock().unwrap();
        let op = ops.get(name)?;
        let done = op.cancelled || op.started.elapsed() >= run_for;
        let stage = if done {
            reapi::execution_stage::Value::Completed
        } else {
            reapi::execution_stage::Value::Executing
        };
        let metadata = reapi::ExecuteOperationMetadata {
            stage: stage as i32,
            action_digest: op.action.clone(),
            ..Default::default()
        };
        let result = done.then(|| {
            let response = reapi::ExecuteResponse {
                result: Some(result_of(name)),
                status: op
                    .cancelled
                    .then(|| bazel_remote_apis::google::rpc::Status {
                        code: tonic::Code::Cancelled as i32,
                        ..Default::default()
                    }),
                ..Default::default()
            };
            lr::operation::Result::Response(Any {
                type_url: "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteResponse"
                    .into(),
                value: response.encode_to_vec(),
            })
        });
        Some(lr::Operation {
            name: name.to_string(),
            metadata: Some(Any {
                type_url:
                    "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteOperationMetadata"
                        .into(),
                value: metadata.encode_to_vec(),
            }),
            done,
            result,
        })
    }

    /// Updates of `name` until done: the state now, then on each change or
    /// every `repeat_every`.
    fn updates(&self, name: String, first_after: Duration) -> OpStream {
        let this = self.clone();
        futures::stream::unfold((true, false), move |(first, ended)| {
            let (this, name) = (this.clone(), name.clone());
            async move {
                if ended {
                    if this.behaviour().hold_after_done {
                        std::future::pending::<()>().await;
                    }
                    return None;
                }
                let b = this.behaviour();
                if first {
                    tokio::time::sleep(first_after).await;
                } else {
                    let left = {
                        let ops = this.ops.lock().unwrap();
                        ops.get(&name)
                            .map(|o| b.run_for.saturating_sub(o.started.elapsed()))
                    };
                    // The next change (completion) or the next repeat.
                    let wait = left.unwrap_or_default().min(b.repeat_every);
                    tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
                }
                match this.state(&name) {
                    Some(op) => {
                        let done = op.done;
                        Some((Ok(op), (false, done)))
                    }
                    None => Some((
                        Err(Status::not_found(format!("no operation {name}"))),
                        (false, true),
                    )),
                }
            }
        })
        .boxed()
    }
}

type OpStream = BoxStream<'static, Result<lr::Operation, Status>>;

#[tonic::async_trait]
impl execution_server::Execution for Service {
    type ExecuteStream = OpStream;
    type WaitExecutionStream = OpStream;

    async fn execute(
        &self,
        request: Request<reapi::ExecuteRequest>,
    ) -> Result<Response<OpStream>, Status> {
        self.counts.executes.fetch_add(1, Ordering::SeqCst);
        let b = self.behaviour();
        if let Some((code, details)) = b.refuse_execute {
            return Err(Status::with_details(
                code,
                "refused by the fake server",
                details.into(),
            ));
        }
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let name = format!("{}{n}", b.name_prefix);
        let op = Op {
            started: Instant::now(),
            action: request.into_inner().action_digest,
            cancelled: false,
        };
        self.ops.lock().unwrap().insert(name.clone(), op);
        Ok(Response::new(self.updates(name, b.first_message_after)))
    }

    async fn wait_execution(
        &self,
        request: Request<reapi::WaitExecutionRequest>,
    ) -> Result<Response<OpStream>, Status> {
        self.counts.waits.fetch_add(1, Ordering::SeqCst);
        let name = request.into_inner().name;
        if self.state(&name).is_none() {
            return Err(Status::not_found(format!("no operation {name}")));
        }
        Ok(Response::new(self.updates(name, Duration::ZERO)))
    }
}

#[tonic::async_trait]
impl operations_server::Operations for Service {
    async fn list_operations(
        &self,
        _request: Request<lr::ListOperationsRequest>,
    ) -> Result<Response<lr::ListOperationsResponse>, Status> {
        let names: Vec<String> = self.ops.lock().unwrap().keys().cloned().collect();
        let operations = names.iter().filter_map(|n| self.state(n)).collect();
        Ok(Response::new(lr::ListOperationsResponse {
            operations,
            ..Default::default()
        }))
    }

    async fn get_operation(
        &self,
        request: Request<lr::GetOperationRequest>,
    ) -> Result<Response<lr::Operation>, Status> {
        self.counts.get_operations.fetch_add(1, Ordering::SeqCst);
        let name = request.into_inner().name;
        self.state(&name)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no operation {name}")))
    }

    async fn delete_operation(
        &self,
        _request: Request<lr::DeleteOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        Err(Status::unimplemented("no DeleteOperation"))
    }

    async fn cancel_operation(
        &self,
        request: Request<lr::CancelOperationRequest>,
    ) -> Result<Response<Empty>, Status> {
        self.counts.cancels.fetch_add(1, Ordering::SeqCst);
        let name = request.into_inner().name;
        match self.ops.lock().unwrap().get_mut(&name) {
            Some(op) => op.cancelled = true,
            None => return Err(Status::not_found(format!("no operation {name}"))),
        }
        Ok(Response::new(Empty {}))
    }

    async fn wait_operation(
        &self,
        _request: Request<lr::WaitOperationRequest>,
    ) -> Result<Response<lr::Operation>, Status> {
        Err(Status::unimplemented("no WaitOperation"))
    }
}

#[tonic::async_trait]
impl reapi::capabilities_server::Capabilities for Service {
    async fn get_capabilities(
        &self,
        _request: Request<reapi::GetCapabilitiesRequest>,
    ) -> Result<Response<reapi::ServerCapabilities>, Status> {
        let sha256 = reapi::digest_function::Value::Sha256 as i32;
        Ok(Response::new(reapi::ServerCapabilities {
            execution_capabilities: Some(reapi::ExecutionCapabilities {
                digest_function: sha256,
                exec_enabled: true,
                execution_priority_capabilities: Some(reapi::PriorityCapabilities {
                    priorities: vec![reapi::priority_capabilities::PriorityRange {
                        min_priority: -10,
                        max_priority: 10,
                    }],
                }),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }
}
