//! The retry budget of one upload, shared by its ByteStream and batch paths:
//! the same rules as a read ([`super::retry`]), with progress being what the
//! server reports committed.

use super::retry::{classify, Failure, Origin, RetryPolicy, Verdict};
use blob_access::{Code, Error};
use std::time::Duration;
use tokio::time::Instant;

/// Counts the failed steps of one upload and decides what follows each.
pub struct Budget {
    policy: RetryPolicy,
    started: Instant,
    /// Failed steps since the last one that made progress.
    pub in_a_row: u32,
    /// Failed steps in all.
    pub failures: u32,
    transport_failed: bool,
    /// The next step goes over a new connection.
    pub fresh_connection: bool,
}

impl Budget {
    pub fn new(policy: RetryPolicy) -> Self {
        Budget {
            policy,
            started: Instant::now(),
            in_a_row: 0,
            failures: 0,
            transport_failed: false,
            fresh_connection: false,
        }
    }

    /// The server's answer to report as it is, if `f` is one not worth a retry.
    pub fn fatal(f: &Failure, what: &str) -> Option<Error> {
        (classify(f) == Verdict::Fatal).then(|| {
            let e = &f.error;
            Error::new(e.code(), format!("{} ({what})", e.message()))
        })
    }

    /// The wait before the next step after `f`, or the error to report: the
    /// server's own answer when not retriable, a give-up (naming the attempts
    /// and the last cause) when the budget or deadline is spent. `progress`:
    /// the server reported more committed than before.
    pub fn after(&mut self, f: &Failure, progress: bool, what: &str) -> Result<Duration, Error> {
        self.failures += 1;
        self.in_a_row = if progress { 0 } else { self.in_a_row + 1 };
        // As for reads: a second transport failure in a row without
        // progress, or a stall, distrusts the connection.
        let transport = f.origin == Origin::Transport;
        self.fresh_connection = f.stalled || (transport && !progress && self.transport_failed);
        self.transport_failed = transport;
        if let Some(e) = Budget::fatal(f, what) {
            return Err(e);
        }
        let server_delay = match classify(f) {
            Verdict::Retry { server_delay } => server_delay,
            Verdict::Fatal => None,
        };
        let give_up = |code: Code, why: String| {
            let e = &f.error;
            Err(Error::new(
                code,
                format!(
                    "gave up uploading after {} failed attempts: {why}; {what}; last cause: {:?}: {}",
                    self.failures,
                    e.code(),
                    e.message()
                ),
            ))
        };
        if self.in_a_row >= self.policy.max_attempts_without_progress {
            let why = format!("{} attempts in a row made no progress", self.in_a_row);
            return give_up(Code::Unavailable, why);
        }
        let delay = self
            .policy
            .backoff(self.in_a_row)
            .max(server_delay.unwrap_or_default());
        if let Some(limit) = self.policy.deadline {
            if self.started.elapsed() + delay >= limit {
                let why = format!("the retry deadline of {limit:?} has passed");
                return give_up(Code::DeadlineExceeded, why);
            }
        }
        Ok(delay)
    }
}
