//! Which failures of one ByteStream Read attempt are worth another attempt, and
//! how long to wait before it.
//!
//! Proxies and load balancers end long streams in many ways: RST_STREAM,
//! GOAWAY, a TCP reset, an HTTP 502 answer, a stream that just stops. tonic
//! reports each as a `Status` whose code alone does not tell a broken transport
//! from a server's considered answer (both can be INTERNAL or UNKNOWN), so a
//! [`Failure`] also records where the failure came from: from the server only
//! when its `grpc-status` was seen on the wire ([`super::observe`]), never
//! guessed from tonic's message texts.

use blob_access::{Code, Error};
use rand::Rng;
use std::time::Duration;

/// Where a failure of one attempt came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A status the server (or a proxy speaking gRPC) sent in its trailers.
    Server,
    /// Synthesised by the client from a broken stream or connection: RST_STREAM,
    /// GOAWAY, a TCP reset or FIN, a missing `grpc-status`, an HTTP answer
    /// without one, a message cut short or undecodable, a stall.
    Transport,
    /// The stream ended with status OK before all the bytes arrived.
    Truncated,
}

/// Why one attempt of a read ended before delivering all its bytes.
#[derive(Clone, Debug)]
pub struct Failure {
    pub error: Error,
    pub origin: Origin,
    /// The attempt delivered nothing for the stall timeout (and was dropped).
    pub stalled: bool,
    /// The server never saw the call ([`never_processed`]).
    pub unprocessed: bool,
}

impl Failure {
    /// A status sent by the server.
    pub fn server(error: Error) -> Self {
        Failure {
            error,
            origin: Origin::Server,
            stalled: false,
            unprocessed: false,
        }
    }

    /// A failure of the stream or the connection under it.
    pub fn transport(error: Error) -> Self {
        Failure {
            error,
            origin: Origin::Transport,
            stalled: false,
            unprocessed: false,
        }
    }

    /// The attempt delivered no byte for `timeout` while its stream stayed open.
    pub fn stall(timeout: Duration) -> Self {
        let error = Error::unavailable(format!(
            "no byte for {timeout:?} (stall_timeout): the stream or its connection is stuck"
        ));
        Failure {
            stalled: true,
            ..Failure::transport(error)
        }
    }

    /// A clean end of stream after `got` of the `wanted` bytes of the attempt.
    pub fn truncated(got: u64, wanted: u64) -> Self {
        let error = Error::unavailable(format!(
            "stream ended cleanly after {got} of the {wanted} bytes requested"
        ));
        Failure {
            error,
            origin: Origin::Truncated,
            stalled: false,
            unprocessed: false,
        }
    }

    /// Classifies a status tonic returned for a call on which the server sent
    /// the `grpc-status` `sent` (see [`super::observe`]). It is the server's
    /// answer only if the server sent that very code, and not OK: anything
    /// else (no status, or OK with the body cut short) tonic made up from a
    /// broken stream, whatever its code and message say.
    pub fn from_status(status: tonic::Status, sent: Option<Code>) -> Self {
        let answered = sent.is_some_and(|c| c != Code::Ok && c == status.code());
        let unprocessed = !answered && never_processed(&status);
        let error = Error::from(status);
        if answered {
            Failure::server(error)
        } else {
            Failure {
                unprocessed,
                ..Failure::transport(error)
            }
        }
    }
}

/// Whether the server never saw a call that failed with `status`: its stream
/// was refused (REFUSED_STREAM), was past a graceful GOAWAY's last stream (a
/// proxy capping the requests of a connection, nginx `keepalive_requests`),
/// or never left a connection that closed first. Such a call is safe to make
/// again at once, and says nothing about the server.
pub fn never_processed(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            let reason = h2.reason();
            if reason == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && reason == Some(h2::Reason::NO_ERROR))
            {
                return true;
            }
        }
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_canceled())
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// Refused calls in a row allowed per attempt allowed without progress: a
/// build with hundreds of calls in flight sees most refused each time a
/// proxy's per-connection cap is reached, yet every round makes progress.
pub const REFUSED_PER_ATTEMPT: u32 = 10;

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Try again; not before the delay the server asked for, if any (RetryInfo).
    Retry { server_delay: Option<Duration> },
    /// Report the failure to the caller.
    Fatal,
}

/// The retry rule of the issue: transient transport and server conditions are
/// retried; answers about the request itself (NOT_FOUND, INVALID_ARGUMENT,
/// PERMISSION_DENIED, UNAUTHENTICATED, OUT_OF_RANGE, UNIMPLEMENTED,
/// FAILED_PRECONDITION, ...) are not.
///
/// Whatever the transport synthesised is retried, whatever code tonic gave it
/// (an HTML 404 page from a proxy becomes UNIMPLEMENTED): the attempt budget
/// bounds a transport that keeps failing.
///
/// CANCELLED and DEADLINE_EXCEEDED are retried: a cancellation by our own
/// caller is a dropped stream, which never gets here, and our own deadline is
/// checked separately by the reader.
pub fn classify(f: &Failure) -> Verdict {
    let retry = Verdict::Retry { server_delay: None };
    if matches!(f.origin, Origin::Truncated | Origin::Transport) {
        return retry;
    }
    match f.error.code() {
        Code::Unavailable | Code::Aborted | Code::Cancelled | Code::DeadlineExceeded => retry,
        Code::ResourceExhausted => Verdict::Retry {
            server_delay: f.error.retry_delay(),
        },
        _ => Verdict::Fatal,
    }
}

/// Retry settings of a resuming read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Consecutive attempts that delivered no byte before the read gives up.
    pub max_attempts_without_progress: u32,
    /// Backoff after the first attempt without progress; doubled after each further one.
    pub initial_backoff: Duration,
    /// Upper bound of the backoff.
    pub max_backoff: Duration,
    /// No attempt is started (and no backoff waited) later than this after the read began.
    pub deadline: Option<Duration>,
    /// An attempt that delivers nothing for this long is abandoned (a stall).
    pub stall_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts_without_progress: 5,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            deadline: None,
            stall_timeout: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait before the next attempt after `in_a_row` consecutive attempts
    /// without progress (0 after an attempt that made progress: no wait).
    /// Exponential with "equal jitter": uniformly in `[b/2, b]` for the
    /// exponential value `b`, so concurrent readers cut by the same proxy
    /// restart spread out rather than in lockstep.
    pub fn backoff(&self, in_a_row: u32) -> Duration {
        if in_a_row == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32 << (in_a_row - 1).min(20);
        let base = self
            .initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff);
        let half = base / 2;
        half + rand::rng().random_range(Duration::ZERO..=base - half)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_verdict(code: Code, origin: Origin) -> Verdict {
        classify(&Failure {
            error: Error::new(code, "x"),
            origin,
            stalled: false,
            unprocessed: false,
        })
    }

    #[test]
    fn classification_follows_the_issue() {
        let retry = Verdict::Retry { server_delay: None };
        for code in [
            Code::Unavailable,
            Code::Aborted,
            Code::Cancelled,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
        ] {
            assert_eq!(code_verdict(code, Origin::Server), retry, "{code:?}");
        }
        for code in [
            Code::Internal,
            Code::Unknown,
            Code::NotFound,
            Code::InvalidArgument,
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::OutOfRange,
            Code::Unimplemented,
            Code::FailedPrecondition,
            Code::DataLoss,
        ] {
            assert_eq!(
                code_verdict(code, Origin::Server),
                Verdict::Fatal,
                "{code:?}"
            );
        }
        // Whatever code tonic gave a transport failure, it is retried.
        for code in [
            Code::Internal,
            Code::Unknown,
            Code::Unimplemented,
            Code::OutOfRange,
        ] {
            assert_eq!(code_verdict(code, Origin::Transport), retry, "{code:?}");
        }
        assert_eq!(classify(&Failure::truncated(1, 2)), retry);
    }

    #[test]
    fn retry_info_is_honoured() {
        let status = <tonic::Status as tonic_types::StatusExt>::with_error_details(
            Code::ResourceExhausted,
            "slow down",
            tonic_types::ErrorDetails::with_retry_info(Some(Duration::from_millis(1500))),
        );
        let f = Failure::from_status(status, Some(Code::ResourceExhausted));
        assert_eq!(f.origin, Origin::Server);
        assert_eq!(
            classify(&f),
            Verdict::Retry {
                server_delay: Some(Duration::from_millis(1500))
            }
        );
    }

    #[test]
    fn status_origin_is_what_the_server_sent() {
        let internal = || tonic::Status::internal("disk on fire");
        let server = Failure::from_status(internal(), Some(Code::Internal));
        assert_eq!(server.origin, Origin::Server);
        // The same status without a grpc-status on the wire: tonic made it up
        // (e.g. "Unexpected EOF decoding stream."), whatever its text says.
        for sent in [None, Some(Code::Ok), Some(Code::Unavailable)] {
            let f = Failure::from_status(internal(), sent);
            assert_eq!(f.origin, Origin::Transport, "{sent:?}");
        }
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let local = Failure::from_status(tonic::Status::from_error(Box::new(io)), None);
        assert_eq!(local.origin, Origin::Transport);
        assert!(local.error.message().contains("reset by peer"));
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let p = RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            ..RetryPolicy::default()
        };
        assert_eq!(p.backoff(0), Duration::ZERO);
        for (n, base) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (40, 1000),
        ] {
            let d = p.backoff(n).as_millis() as u64;
            assert!(base / 2 <= d && d <= base, "attempt {n}: {d} ms");
        }
        let samples: std::collections::HashSet<_> = (0..20).map(|_| p.backoff(3)).collect();
        assert!(samples.len() > 1, "no jitter");
    }
}
