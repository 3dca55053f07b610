//! `resumable_grpc` in an action cache tree: GetActionResult and
//! UpdateActionResult forwarded to the remote, retried when the transport
//! fails (a proxy reloading between two of a build's thousand lookups), by
//! the same rules and budget as a read that makes no progress. Both calls are
//! idempotent, so a retry never does harm. A call without an answer for the
//! node's `stall_timeout` (a black-holed path) is abandoned and retried like a
//! cut one. As for reads, a stall or a second transport failure in a row
//! moves the calls to a fresh connection ([`super::Channels`]).

use super::channels::Channels;
use super::observe::{Observed, ObservingChannel};
use super::{classify, Failure, RetryPolicy, Verdict};
use blob_access::action_cache::{ActionCache, ActionResult, GrpcActionCache};
use blob_access::grpc::GrpcChannel;
use blob_access::node::Counters;
use blob_access::proto::action_cache_client::ActionCacheClient;
use blob_access::{Digest, NodeMetrics, Result};
use std::future::Future;
use std::time::Instant;

type Client = ActionCacheClient<ObservingChannel<GrpcChannel>>;

/// See the module documentation.
pub struct ResumableGrpcActionCache {
    plain: GrpcActionCache,
    policy: RetryPolicy,
    counters: Counters,
    channels: Channels,
}

const COUNTERS: &[&str] = &["retries", "give_ups", "fresh_connections"];

impl ResumableGrpcActionCache {
    pub fn new(plain: GrpcActionCache, policy: RetryPolicy) -> Self {
        let conn = plain.connection().clone();
        let fresh = conn.clone();
        ResumableGrpcActionCache {
            channels: Channels::new(conn.channel(), move || fresh.new_channel()),
            plain,
            policy,
            counters: Counters::new(COUNTERS),
        }
    }

    /// The last failure, saying how many attempts it ended.
    fn give_up(
        &self,
        last: blob_access::Error,
        attempts: u32,
        action: &Digest,
    ) -> blob_access::Error {
        self.counters.inc("give_ups");
        let message = format!("gave up after {attempts} attempts: {}", last.message());
        self.plain
            .error(blob_access::Error::new(last.code(), message), action)
    }

    /// A client whose calls record the status the server sent.
    fn client(&self, channel: GrpcChannel) -> Client {
        ActionCacheClient::new(ObservingChannel::new(channel))
            .max_decoding_message_size(blob_access::grpc::MAX_MESSAGE)
            .max_encoding_message_size(blob_access::grpc::MAX_MESSAGE)
    }

    /// Makes `call` (given a client and the record to attach to its request)
    /// until it succeeds, fails for good, or the budget is spent.
    async fn retrying<T, F, Fut>(&self, action: &Digest, mut call: F) -> Result<T>
    where
        F: FnMut(Client, Observed) -> Fut,
        Fut: Future<Output = std::result::Result<T, tonic::Status>>,
    {
        let started = Instant::now();
        let mut failed = 0u32;
        let (mut used, mut fresh, mut transport_failed) = (self.channels.current().0, false, false);
        loop {
            let (number, channel) = if fresh {
                self.counters.inc("fresh_connections");
                self.channels.replace(used)
            } else {
                self.channels.current()
            };
            used = number;
            let observed = Observed::default();
            let stall = self.policy.stall_timeout;
            let call = tokio::time::timeout(stall, call(self.client(channel), observed.clone()));
            let (status, stalled) = match call.await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(s)) => (s, false),
                // Made up here, so classified as a transport failure.
                Err(_) => (
                    tonic::Status::deadline_exceeded(format!(
                        "no answer within {stall:?} (stall_timeout)"
                    )),
                    true,
                ),
            };
            failed += 1;
            let failure = Failure::from_status(status, observed.sent());
            let transport = failure.origin == super::Origin::Transport;
            fresh = stalled || (transport && transport_failed);
            transport_failed = transport;
            let delay = match classify(&failure) {
                // For UpdateActionResult, RESOURCE_EXHAUSTED is a full or
                // refusing store: worth another try only when the server says when.
                Verdict::Retry { server_delay: None }
                    if failure.error.code() == blob_access::Code::ResourceExhausted =>
                {
                    return Err(self.plain.error(failure.error, action));
                }
                Verdict::Retry { server_delay }
                    if failed < self.policy.max_attempts_without_progress =>
                {
                    server_delay.unwrap_or_else(|| self.policy.backoff(failed))
                }
                Verdict::Retry { .. } => return Err(self.give_up(failure.error, failed, action)),
                Verdict::Fatal => return Err(self.plain.error(failure.error, action)),
            };
            // No wait that would end past the deadline, as for reads.
            let late = self
                .policy
                .deadline
                .is_some_and(|d| started.elapsed() + delay >= d);
            if late {
                return Err(self.give_up(failure.error, failed, action));
            }
            self.counters.inc("retries");
            tracing::debug!(%action, attempt = failed, error = %failure.error, ?delay, "retrying an action cache call");
            tokio::time::sleep(delay).await;
        }
    }
}

#[async_trait::async_trait]
impl ActionCache for ResumableGrpcActionCache {
    async fn get_action_result(&self, action: &Digest) -> Result<ActionResult> {
        let result = self
            .retrying(action, |mut client, observed| {
                let mut req = self.plain.get_request(action);
                observed.attach(&mut req);
                async move { Ok(client.get_action_result(req).await?.into_inner()) }
            })
            .await;
        self.plain.count(&result, "hits");
        result
    }

    async fn update_action_result(&self, action: &Digest, result: &ActionResult) -> Result<()> {
        let outcome = self
            .retrying(action, |mut client, observed| {
                let mut req = self.plain.update_request(action, result);
                observed.attach(&mut req);
                async move { client.update_action_result(req).await.map(|_| ()) }
            })
            .await;
        self.plain.count(&outcome, "updates");
        outcome
    }

    async fn update_enabled(&self) -> bool {
        self.plain.update_enabled().await
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        let name = self.plain.connection().name();
        out.push(self.counters.snapshot(name, "resumable_grpc"));
        self.plain.metrics(out);
    }
}
