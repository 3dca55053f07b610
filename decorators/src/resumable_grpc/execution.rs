//! `resumable_grpc` in an execution tree: an Execute stream that survives
//! being cut.
//!
//! The Execute stream stays open while the action runs, often for minutes,
//! so it is the stream of a build that proxies cut most (GOAWAY on reload, a
//! maximum stream age, an idle timer). Most clients then fail the action or
//! run it again. REAPI's answer is WaitExecution on the operation's name:
//!
//! - a stream that ends without a status the server sent (a cut, GOAWAY, a
//!   proxy's page, a clean end before `done`, a stall) goes on with
//!   WaitExecution on the last operation name seen; cut before any name was
//!   seen, the same Execute is sent again;
//! - NOT_FOUND from WaitExecution (the server lost the operation, e.g. it
//!   restarted) sends the Execute again;
//! - a message with `done: true` ends it; nothing is resumed after;
//! - the budget is that of reads: progress is an Operation message, at most
//!   `max_attempts_without_progress` attempts in a row without one, no new
//!   attempt past `deadline`; but an execution is given up only once it also
//!   had no update for `execution_stall_timeout`: an action's minutes of
//!   work outlast a cluster that restarts (its port refusing connections for
//!   seconds), which would spend the attempts of a read in a second. The
//!   same limit ends an attempt without updates: servers send the state
//!   again every minute or so while an action runs, and one silent for
//!   longer is resumed, not failed.
//!
//! The caller sees one stream with one operation name throughout: an Execute
//! sent again after NOT_FOUND gets a new name from the server, and its
//! messages carry the first name; WaitExecution, GetOperation and
//! CancelOperation on that name reach the new operation.

use super::channels::Channels;
use super::observe::{Observed, ObservingChannel};
use super::retry::{classify, Failure, Origin, RetryPolicy, Verdict, REFUSED_PER_ATTEMPT};
use super::unary::{UnaryRetry, COUNTERS as UNARY_COUNTERS};
use blob_access::execution::longrunning_proto::operations_client::OperationsClient;
use blob_access::execution::longrunning_proto::{CancelOperationRequest, GetOperationRequest};
use blob_access::execution::{
    ExecuteRequest, Execution, ExecutionCapabilities, ListOperationsRequest,
    ListOperationsResponse, Operation, OperationStream,
};
use blob_access::grpc::{execution_client, GrpcChannel, GrpcExecution, MAX_MESSAGE};
use blob_access::node::Counters;
use blob_access::{Code, Error, NodeMetrics, Result};
use futures::StreamExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Counters of the resumed executions.
pub const COUNTERS: &[&str] = &[
    "executes",
    "resumptions",
    "executes_again",
    "stalls",
    "execution_give_ups",
];

/// Executes sent again, in one run, after the server lost the operation.
const MAX_EXECUTES_AGAIN: u32 = 3;

/// Names given to callers that now stand for another operation: far more
/// than run at once.
const ALIASES: usize = 100_000;

/// See the module documentation.
pub struct ResumableGrpcExecution {
    inner: Arc<Inner>,
}

struct Inner {
    plain: GrpcExecution,
    policy: RetryPolicy,
    channels: Arc<Channels>,
    counters: Counters,
    unary: UnaryRetry,
    /// The first name a caller saw -> the operation it stands for now.
    aliases: Mutex<lru::LruCache<String, String>>,
}

impl ResumableGrpcExecution {
    /// `policy.stall_timeout` is the execution stall limit.
    pub fn new(plain: GrpcExecution, policy: RetryPolicy) -> Self {
        let conn = plain.connection().clone();
        let fresh = conn.clone();
        let channels = Arc::new(Channels::new(conn.channel(), move || fresh.new_channel()));
        let unary = UnaryRetry {
            // Unary calls answer at once: the stall limit of reads.
            policy: RetryPolicy {
                stall_timeout: RetryPolicy::default().stall_timeout,
                ..policy.clone()
            },
            channels: channels.clone(),
            counters: Arc::new(Counters::new(UNARY_COUNTERS)),
        };
        let cap = std::num::NonZeroUsize::new(ALIASES).expect("not zero");
        ResumableGrpcExecution {
            inner: Arc::new(Inner {
                plain,
                policy,
                channels,
                counters: Counters::new(COUNTERS),
                unary,
                aliases: Mutex::new(lru::LruCache::new(cap)),
            }),
        }
    }
}

impl Inner {
    /// The operation `name` stands for now.
    fn resolve(&self, name: &str) -> String {
        let mut aliases = self.aliases.lock().unwrap_or_else(|e| e.into_inner());
        aliases
            .get(name)
            .cloned()
            .unwrap_or_else(|| name.to_string())
    }

    fn alias(&self, shown: &str, now: &str) {
        let mut aliases = self.aliases.lock().unwrap_or_else(|e| e.into_inner());
        aliases.put(shown.to_string(), now.to_string());
    }

    fn operations(channel: GrpcChannel) -> OperationsClient<ObservingChannel<GrpcChannel>> {
        OperationsClient::new(ObservingChannel::new(channel))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// Opens one attempt: WaitExecution on `name`, or Execute without one.
    async fn open(
        &self,
        channel: GrpcChannel,
        request: Option<&ExecuteRequest>,
        name: Option<&str>,
        observed: &Observed,
    ) -> std::result::Result<tonic::Streaming<Operation>, tonic::Status> {
        let mut client = execution_client(ObservingChannel::new(channel));
        match (name, request) {
            (Some(name), _) => {
                let mut req = self.plain.wait_request(name);
                observed.attach(&mut req);
                Ok(client.wait_execution(req).await?.into_inner())
            }
            (None, Some(request)) => {
                let mut req = self.plain.execute_request(request.clone());
                observed.attach(&mut req);
                Ok(client.execute(req).await?.into_inner())
            }
            (None, None) => Err(tonic::Status::internal("neither a name nor a request")),
        }
    }
}

/// Where one resumed execution stands.
struct Run {
    inner: Arc<Inner>,
    /// What to send again when the operation is lost; `None` when the
    /// caller only waits on a name.
    request: Option<ExecuteRequest>,
    /// The operation now followed, once a message named it.
    name: Option<String>,
    /// The name the caller saw first; every message carries it.
    shown: Option<String>,
    stream: Option<(tonic::Streaming<Operation>, Observed)>,
    started: Instant,
    /// When the last Operation message came (or the run started).
    last_update: Instant,
    in_a_row: u32,
    failures: u32,
    /// Executes sent again after the server lost the operation.
    executes_again: u32,
    /// Attempts the server never saw (refused streams), in a row.
    refused: u32,
    transport_failed: bool,
    fresh_connection: bool,
    channel: u64,
    done: bool,
}

impl Run {
    fn call(&self) -> &'static str {
        if self.name.is_some() {
            "WaitExecution"
        } else {
            "Execute"
        }
    }

    /// The next message for the caller, resuming as needed; `None` after `done`.
    async fn next(&mut self) -> Option<Result<Operation>> {
        if self.done {
            return None;
        }
        loop {
            let failure = match self.attempt().await {
                Ok(mut op) => {
                    self.in_a_row = 0;
                    self.refused = 0;
                    self.last_update = Instant::now();
                    if !op.name.is_empty() {
                        match &self.shown {
                            None => self.shown = Some(op.name.clone()),
                            Some(shown) if *shown != op.name => {
                                self.inner.alias(shown, &op.name);
                            }
                            Some(_) => {}
                        }
                        self.name = Some(op.name.clone());
                    }
                    if let Some(shown) = &self.shown {
                        op.name = shown.clone();
                    }
                    if op.done {
                        self.done = true;
                        self.stream = None;
                    }
                    return Some(Ok(op));
                }
                Err(f) => f,
            };
            self.stream = None;
            if let Err(e) = self.after(failure).await {
                self.done = true;
                return Some(Err(e.with_backend(self.inner.plain.connection().name())));
            }
        }
    }

    /// One message from the current attempt, opening one if there is none.
    async fn attempt(&mut self) -> std::result::Result<Operation, Failure> {
        let stall = self.inner.policy.stall_timeout;
        if self.stream.is_none() {
            let (number, channel) = if self.fresh_connection {
                self.fresh_connection = false;
                self.inner.channels.replace(self.channel)
            } else {
                self.inner.channels.current()
            };
            self.channel = number;
            let observed = Observed::default();
            let opening = self.inner.open(
                channel,
                self.request.as_ref(),
                self.name.as_deref(),
                &observed,
            );
            let opened = match tokio::time::timeout(stall, opening).await {
                Ok(Ok(s)) => s,
                Ok(Err(status)) => return Err(Failure::from_status(status, observed.sent())),
                Err(_) => return Err(Failure::stall(stall)),
            };
            self.stream = Some((opened, observed));
        }
        let (stream, observed) = self.stream.as_mut().expect("opened above");
        match tokio::time::timeout(stall, stream.message()).await {
            Ok(Ok(Some(op))) => Ok(op),
            Ok(Ok(None)) => Err(Failure {
                origin: Origin::Truncated,
                ..Failure::transport(Error::unavailable(
                    "the stream ended before the operation was done",
                ))
            }),
            Ok(Err(status)) => Err(Failure::from_status(status, observed.sent())),
            Err(_) => Err(Failure::stall(stall)),
        }
    }

    /// Decides what follows a failed attempt and waits for it; the error to
    /// report if nothing does.
    async fn after(&mut self, f: Failure) -> Result<()> {
        let counters = &self.inner.counters;
        if f.stalled {
            counters.inc("stalls");
        }
        // The server lost the operation (a restart): run the action again.
        let lost = f.origin == Origin::Server && f.error.code() == Code::NotFound;
        if lost && self.name.is_some() && self.request.is_some() {
            // Bounded: replicas behind a balancer that share no operations
            // would otherwise run the action again at every cut.
            self.executes_again += 1;
            if self.executes_again > MAX_EXECUTES_AGAIN {
                return Err(f.error.in_call(
                    "WaitExecution (the server lost the operation each time it was executed again)",
                ));
            }
            counters.inc("executes_again");
            tracing::info!(backend = %self.inner.plain.connection().name(), operation = ?self.name, "the server lost the operation; executing the action again");
            self.name = None;
            tokio::time::sleep(self.inner.policy.backoff(self.executes_again)).await;
            return Ok(());
        }
        if f.unprocessed {
            // Never reached the server (a refused stream): after a pause, on
            // a budget of their own, as unary calls do.
            self.refused += 1;
            let cap = self.inner.policy.max_attempts_without_progress * REFUSED_PER_ATTEMPT;
            if self.refused < cap {
                tokio::time::sleep(self.inner.policy.backoff(1)).await;
                return Ok(());
            }
        }
        self.failures += 1;
        self.in_a_row += 1;
        let transport = f.origin != Origin::Server;
        self.fresh_connection = f.stalled || (transport && self.transport_failed);
        self.transport_failed = transport;
        let call = self.call();
        let server_delay = match classify(&f) {
            // The server's own answer about the action (FAILED_PRECONDITION
            // for missing inputs, INVALID_ARGUMENT, PERMISSION_DENIED...):
            // passed on as it is, details and all, for the client to act on.
            Verdict::Fatal => return Err(f.error.in_call(call)),
            Verdict::Retry { server_delay } => server_delay,
        };
        let give_up = |code: Code, why: String| {
            counters.inc("execution_give_ups");
            let e = &f.error;
            Err(Error::new(
                code,
                format!(
                    "gave up on the execution after {} failed attempts: {why}; last cause: {}: {:?}: {}",
                    self.failures,
                    call,
                    e.code(),
                    e.message()
                ),
            ))
        };
        let policy = &self.inner.policy;
        let quiet = self.last_update.elapsed();
        if self.in_a_row >= policy.max_attempts_without_progress && quiet >= policy.stall_timeout {
            return give_up(
                Code::Unavailable,
                format!(
                    "{} attempts in a row brought no operation update, none for {quiet:?}",
                    self.in_a_row
                ),
            );
        }
        let delay = policy
            .backoff(self.in_a_row)
            .max(server_delay.unwrap_or_default());
        if let Some(limit) = policy.deadline {
            if self.started.elapsed() + delay >= limit {
                return give_up(
                    Code::DeadlineExceeded,
                    format!("the retry deadline of {limit:?} has passed"),
                );
            }
        }
        counters.inc("resumptions");
        tracing::debug!(backend = %self.inner.plain.connection().name(), operation = ?self.name, error = %f.error, ?delay, "resuming an execution");
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

impl ResumableGrpcExecution {
    fn run(&self, request: Option<ExecuteRequest>, name: Option<String>) -> OperationStream {
        let run = Run {
            inner: self.inner.clone(),
            request,
            shown: name.clone(),
            name: name.map(|n| self.inner.resolve(&n)),
            stream: None,
            started: Instant::now(),
            last_update: Instant::now(),
            in_a_row: 0,
            failures: 0,
            executes_again: 0,
            refused: 0,
            transport_failed: false,
            fresh_connection: false,
            channel: 0,
            done: false,
        };
        futures::stream::unfold(run, |mut run| async move {
            run.next().await.map(|item| (item, run))
        })
        .boxed()
    }
}

#[async_trait::async_trait]
impl Execution for ResumableGrpcExecution {
    fn execute(&self, request: ExecuteRequest) -> OperationStream {
        self.inner.counters.inc("executes");
        self.run(Some(request), None)
    }

    fn wait_execution(&self, name: &str) -> OperationStream {
        // Without the Execute request, a lost operation cannot be run again:
        // its NOT_FOUND goes to the caller, who has the request.
        self.run(None, Some(name.to_string()))
    }

    async fn get_operation(&self, name: &str) -> Result<Operation> {
        let target = self.inner.resolve(name);
        let mut op = self
            .inner
            .unary
            .retrying("GetOperation", |channel, observed| {
                let mut req = self.inner.plain.connection().request(GetOperationRequest {
                    name: target.clone(),
                });
                observed.attach(&mut req);
                async move {
                    Ok(Inner::operations(channel)
                        .get_operation(req)
                        .await?
                        .into_inner())
                }
            })
            .await
            .map_err(|e| e.with_backend(self.inner.plain.connection().name()))?;
        op.name = name.to_string();
        Ok(op)
    }

    async fn cancel_operation(&self, name: &str) -> Result<()> {
        let target = self.inner.resolve(name);
        self.inner
            .unary
            .retrying("CancelOperation", |channel, observed| {
                let mut req = self
                    .inner
                    .plain
                    .connection()
                    .request(CancelOperationRequest {
                        name: target.clone(),
                    });
                observed.attach(&mut req);
                async move {
                    Inner::operations(channel)
                        .cancel_operation(req)
                        .await
                        .map(drop)
                }
            })
            .await
            .map_err(|e| e.with_backend(self.inner.plain.connection().name()))
    }

    async fn list_operations(
        &self,
        request: ListOperationsRequest,
    ) -> Result<ListOperationsResponse> {
        self.inner.plain.list_operations(request).await
    }

    async fn capabilities(&self, instance_name: &str) -> Result<Option<ExecutionCapabilities>> {
        self.inner.plain.capabilities(instance_name).await
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        let name = self.inner.plain.connection().name();
        out.push(self.inner.counters.snapshot(name, "resumable_grpc"));
        out.push(self.inner.unary.counters.snapshot(name, "resumable_grpc"));
        self.inner.plain.metrics(out);
    }
}

/// The stall limit of executions when the config names none: longer than
/// the pause between any server's updates of a running action.
pub const DEFAULT_EXECUTION_STALL_TIMEOUT: Duration = Duration::from_secs(300);
