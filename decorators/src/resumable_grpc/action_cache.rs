//! `resumable_grpc` in an action cache tree: GetActionResult and
//! UpdateActionResult forwarded to the remote, retried when the transport
//! fails (a proxy reloading between two of a build's thousand lookups), by
//! the same rules and budget as a read that makes no progress. Both calls are
//! idempotent, so a retry never does harm.

use super::{classify, Failure, RetryPolicy, Verdict};
use blob_access::action_cache::{ActionCache, ActionResult, GrpcActionCache};
use blob_access::node::Counters;
use blob_access::{Digest, NodeMetrics, Result};
use std::future::Future;
use std::time::Instant;

/// See the module documentation.
pub struct ResumableGrpcActionCache {
    plain: GrpcActionCache,
    policy: RetryPolicy,
    counters: Counters,
}

const COUNTERS: &[&str] = &["retries", "give_ups"];

impl ResumableGrpcActionCache {
    pub fn new(plain: GrpcActionCache, policy: RetryPolicy) -> Self {
        ResumableGrpcActionCache {
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

    async fn retrying<T, F, Fut>(&self, action: &Digest, mut call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, tonic::Status>>,
    {
        let started = Instant::now();
        let mut failed = 0u32;
        loop {
            let status = match call().await {
                Ok(v) => return Ok(v),
                Err(s) => s,
            };
            failed += 1;
            let failure = Failure::from_status(status);
            let delay = match classify(&failure) {
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
        let result = self.retrying(action, || self.plain.try_get(action)).await;
        self.plain.count(&result, "hits");
        result
    }

    async fn update_action_result(&self, action: &Digest, result: &ActionResult) -> Result<()> {
        let outcome = self
            .retrying(action, || self.plain.try_update(action, result))
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
