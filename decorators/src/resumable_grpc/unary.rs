//! Unary calls (GetActionResult, UpdateActionResult, FindMissingBlobs and the
//! batch calls) retried when the transport fails: a proxy reloading between
//! two of a build's thousand lookups cuts one of them, and the build should
//! not notice. All these calls are idempotent, so a retry never does harm.
//! The rules and budget are those of a read that makes no progress. A call
//! without an answer for `stall_timeout` (a black-holed path) is abandoned and
//! retried like a cut one; a stall or a second transport failure in a row
//! moves the calls to a fresh connection ([`super::Channels`]).
//!
//! A call the server never processed does not spend that budget: a proxy
//! that caps the requests of a connection (nginx `keepalive_requests`) sends
//! GOAWAY and refuses the streams past it, and a build with hundreds of calls
//! in flight sees most of them refused at once, every time the cap is reached.
//! Those are retried on their own, larger, budget.

use super::channels::Channels;
use super::observe::Observed;
use super::retry::REFUSED_PER_ATTEMPT;
use super::{classify, Failure, Origin, RetryPolicy, Verdict};
use blob_access::grpc::GrpcChannel;
use blob_access::node::Counters;
use blob_access::{Code, Error, Result};
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

/// Counters of [`UnaryRetry`].
pub const COUNTERS: &[&str] = &[
    "retries",
    "refused_retries",
    "give_ups",
    "fresh_connections",
];

/// Retries unary calls; shared by the calls of one node.
pub struct UnaryRetry {
    pub policy: RetryPolicy,
    pub channels: Arc<Channels>,
    pub counters: Arc<Counters>,
}

impl UnaryRetry {
    /// Makes `call` (given the channel to use and the record to attach to its
    /// request) until it succeeds, fails for good, or the budget is spent;
    /// `what` names the call in logs and in a give-up.
    pub async fn retrying<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T>
    where
        F: FnMut(GrpcChannel, Observed) -> Fut,
        Fut: Future<Output = std::result::Result<T, tonic::Status>>,
    {
        let started = Instant::now();
        let (mut failed, mut refused) = (0u32, 0u32);
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
            let call = tokio::time::timeout(stall, call(channel, observed.clone()));
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
            let failure = Failure::from_status(status, observed.sent());
            let transport = failure.origin == Origin::Transport;
            let delay = if failure.unprocessed {
                refused += 1;
                let cap = self.policy.max_attempts_without_progress * REFUSED_PER_ATTEMPT;
                if refused >= cap {
                    return Err(self.give_up(what, failure.error, failed + refused));
                }
                self.counters.inc("refused_retries");
                // The connection is going away; the channel makes a new one.
                self.policy.backoff(1)
            } else {
                failed += 1;
                fresh = stalled || (transport && transport_failed);
                transport_failed = transport;
                match classify(&failure) {
                    // RESOURCE_EXHAUSTED of a whole call is a full or refusing
                    // store: worth another try only when the server says when.
                    Verdict::Retry { server_delay: None }
                        if failure.error.code() == Code::ResourceExhausted =>
                    {
                        return Err(failure.error.in_call(what));
                    }
                    Verdict::Retry { server_delay }
                        if failed < self.policy.max_attempts_without_progress =>
                    {
                        server_delay.unwrap_or_else(|| self.policy.backoff(failed))
                    }
                    Verdict::Retry { .. } => {
                        return Err(self.give_up(what, failure.error, failed + refused))
                    }
                    Verdict::Fatal => return Err(failure.error.in_call(what)),
                }
            };
            // No wait that would end past the deadline, as for reads.
            let late = self
                .policy
                .deadline
                .is_some_and(|d| started.elapsed() + delay >= d);
            if late {
                return Err(self.give_up(what, failure.error, failed + refused));
            }
            self.counters.inc("retries");
            tracing::debug!(call = what, failed, refused, error = %failure.error, ?delay, "retrying a call");
            tokio::time::sleep(delay).await;
        }
    }

    /// The last failure, saying which call it ended and after how many attempts.
    fn give_up(&self, what: &str, last: Error, attempts: u32) -> Error {
        self.counters.inc("give_ups");
        let message = format!("gave up after {attempts} attempts: {}", last.message());
        Error::new(last.code(), message).in_call(what)
    }
}
