//! The resuming reader: one continuous stream of a blob's bytes made of as
//! many ByteStream Read attempts as it takes.
//!
//! The seed's Go prototype resumed after a read that had completed (b1), built
//! the result wrongly from the parts (b2), dropped messages of a recreated
//! stream (b3) and handed the data out again on a further poll (b4). Here every
//! attempt is a stream that is polled to its end, the next attempt asks for
//! exactly the bytes not yet delivered, and a finished reader stays finished.
//!
//! The reader is a plain `Stream` state machine: no task is spawned, so
//! dropping it drops the attempt in flight (cancelling the RPC) and any wait.

use super::attempt::{AttemptRequest, AttemptStream, ReadOpener};
use super::retry::{classify, Failure, Origin, RetryPolicy, Verdict, REFUSED_PER_ATTEMPT};
use blob_access::node::Counters;
use blob_access::resource::Compressor;
use blob_access::{Code, Digest, Error, ReadRange, Result};
use bytes::Bytes;
use futures::{Future, Stream, StreamExt};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// Counters kept per node (read through `BlobAccess::metrics`).
pub const COUNTERS: &[&str] = &[
    "reads",
    "resumptions",
    "bytes_rerequested",
    "give_ups",
    "zstd_fallbacks",
    "offset_rechecks",
    "overruns_trimmed",
    "read_limit_fallbacks",
    "stalls",
    "fresh_connections",
    "writes",
    "write_retries",
    "write_restarts",
    "bytes_resent",
    "source_rereads",
    "writes_found_complete",
    "write_refusals",
    "retries",
    "refused_retries",
];

/// What one read shares with the layer above it (see `recheck`).
#[derive(Debug, Default)]
pub struct ReadShared {
    /// Resumptions so far.
    pub resumptions: AtomicU32,
    /// The reader passed on an error it did not make itself (a server's answer).
    pub passed_server_error: AtomicBool,
    /// Set by the reader when a zstd resume was refused: later reads of the node
    /// resume uncompressed at once.
    pub zstd_offset_refused: Arc<AtomicBool>,
    /// Set when the server refused a non-zero `read_limit`: later ranged reads
    /// of the node ask for everything from their offset and stop themselves.
    pub read_limit_refused: Arc<AtomicBool>,
}

enum State {
    Open,
    Streaming(AttemptStream),
    Waiting(Pin<Box<Sleep>>),
    Done,
}

/// See the module documentation. Yields the bytes of the range, or an error as
/// its last item. Bytes past the end of the range are yielded too (then the
/// reader stops), for the `blob_access::verify::verify` around it to reject.
pub struct ResumingReader {
    opener: Arc<dyn ReadOpener>,
    digest: Digest,
    offset: u64,
    /// Bytes the whole read must deliver.
    want: u64,
    limited: bool,
    compressor: Compressor,
    policy: RetryPolicy,
    counters: Arc<Counters>,
    shared: Arc<ReadShared>,
    delivered: u64,
    attempts: u32,
    in_a_row: u32,
    /// Attempts in a row the server never saw (refused streams).
    refused: u32,
    this_attempt: u64,
    started: Option<Instant>,
    /// Fires when the attempt in flight has delivered nothing for `stall_timeout`.
    stall: Pin<Box<Sleep>>,
    /// A byte was handed out: the stall clock restarts at the next poll, so
    /// time our caller takes (a slow consumer) never counts as a stall.
    handed_out: bool,
    /// The next attempt goes on a new connection.
    fresh_connection: bool,
    /// The last attempt failed on the transport.
    transport_failed: bool,
    state: State,
}

impl ResumingReader {
    /// A reader of `range` of `digest`; the range must lie within the blob
    /// (`verify` reports OUT_OF_RANGE before polling otherwise).
    pub fn new(
        opener: Arc<dyn ReadOpener>,
        digest: &Digest,
        range: ReadRange,
        compressor: Compressor,
        policy: RetryPolicy,
        counters: Arc<Counters>,
        shared: Arc<ReadShared>,
    ) -> Self {
        let want = range.len_in(digest.size_bytes()).unwrap_or(0);
        ResumingReader {
            opener,
            digest: digest.clone(),
            offset: range.offset,
            want,
            limited: range.limit.is_some(),
            compressor,
            policy,
            counters,
            shared,
            delivered: 0,
            attempts: 0,
            in_a_row: 0,
            refused: 0,
            this_attempt: 0,
            started: None,
            stall: Box::pin(tokio::time::sleep(Duration::ZERO)),
            handed_out: false,
            fresh_connection: false,
            transport_failed: false,
            state: State::Open,
        }
    }

    fn next_request(&self) -> AttemptRequest {
        let remaining = self.want - self.delivered;
        if self.limited && remaining == 0 {
            // ByteStream has no way to ask for zero bytes but reading at the
            // end: an existence check that returns nothing.
            return AttemptRequest {
                offset: self.digest.size_bytes(),
                limit: 0,
                compressor: Compressor::Identity,
                fresh_connection: self.fresh_connection,
            };
        }
        let offset = self.offset + self.delivered;
        let refused = offset > 0 && self.shared.zstd_offset_refused.load(Ordering::Relaxed);
        let no_limit = self.shared.read_limit_refused.load(Ordering::Relaxed);
        AttemptRequest {
            offset,
            limit: if self.limited && !no_limit {
                remaining
            } else {
                0
            },
            compressor: if refused {
                Compressor::Identity
            } else {
                self.compressor
            },
            fresh_connection: self.fresh_connection,
        }
    }

    fn finish(&mut self, item: Option<Result<Bytes>>) -> Poll<Option<Result<Bytes>>> {
        self.state = State::Done;
        Poll::Ready(item)
    }

    fn fail(&mut self, error: Error) -> Poll<Option<Result<Bytes>>> {
        self.finish(Some(Err(error.with_digest(&self.digest))))
    }

    /// Decides what follows a failed attempt: the next state, or the error to report.
    fn after_failure(&mut self, f: Failure) -> std::result::Result<State, Error> {
        let progress = self.this_attempt > 0;
        // A refused attempt says nothing of the server: it spends its own,
        // larger, budget (see `REFUSED_PER_ATTEMPT`), not the one of failures.
        let refused = f.unprocessed && !progress;
        self.refused = if refused { self.refused + 1 } else { 0 };
        if !refused {
            self.in_a_row = if progress { 0 } else { self.in_a_row + 1 };
        }
        // One transport failure may be a connection killed under us (the
        // channel reconnects by itself). An attempt that then fails on the
        // transport before its first byte suggests a connection that stays
        // doomed (a draining proxy resetting new streams, a refused
        // connection): the next goes on a new one, costing the budget one
        // attempt. A stall is the same at once.
        let transport = f.origin == Origin::Transport;
        self.fresh_connection = f.stalled || (transport && !progress && self.transport_failed);
        self.transport_failed = transport;
        if self.fresh_connection {
            self.counters.inc("fresh_connections");
        }
        let context = format!(
            "attempt {} at read_offset {}, {} of {} bytes delivered",
            self.attempts,
            self.offset + self.delivered,
            self.delivered,
            self.want
        );
        let server_delay = match classify(&f) {
            Verdict::Retry { server_delay } => server_delay,
            Verdict::Fatal if self.limit_refused(&f, progress) => {
                self.shared
                    .read_limit_refused
                    .store(true, Ordering::Relaxed);
                self.counters.inc("read_limit_fallbacks");
                tracing::info!(digest = %self.digest, cause = %f.error, "server refused read_limit; reading on from the offset and stopping at the end of the range");
                return Ok(State::Open);
            }
            Verdict::Fatal if self.zstd_refused(&f, progress) => {
                self.compressor = Compressor::Identity;
                if self.offset + self.delivered > 0 {
                    self.shared
                        .zstd_offset_refused
                        .store(true, Ordering::Relaxed);
                }
                self.counters.inc("zstd_fallbacks");
                tracing::info!(digest = %self.digest, cause = %f.error, "server refused a zstd read at an offset; resuming uncompressed");
                return Ok(State::Open);
            }
            Verdict::Fatal => {
                self.shared
                    .passed_server_error
                    .store(true, Ordering::Relaxed);
                let e = &f.error;
                return Err(Error::new(e.code(), format!("{} ({context})", e.message())));
            }
        };
        // Every retriable cause is transient, so a give-up is UNAVAILABLE (or
        // DEADLINE_EXCEEDED for our own deadline) whatever the last cause was.
        let give_up = |code: Code, why: String| {
            self.counters.inc("give_ups");
            let e = &f.error;
            let cause = format!("{:?}: {}", e.code(), e.message());
            Err(Error::new(
                code,
                format!("gave up resuming: {why}; {context}; last cause: {cause}"),
            ))
        };
        if self.in_a_row >= self.policy.max_attempts_without_progress {
            let why = format!("{} attempts in a row delivered no byte", self.in_a_row);
            return give_up(Code::Unavailable, why);
        }
        if self.refused >= self.policy.max_attempts_without_progress * REFUSED_PER_ATTEMPT {
            let why = format!(
                "{} attempts in a row were refused unprocessed",
                self.refused
            );
            return give_up(Code::Unavailable, why);
        }
        let backoff = if refused { 1 } else { self.in_a_row };
        let delay = self
            .policy
            .backoff(backoff)
            .max(server_delay.unwrap_or_default());
        if let (Some(limit), Some(started)) = (self.policy.deadline, self.started) {
            if started.elapsed() + delay >= limit {
                let why = format!("the retry deadline of {limit:?} has passed");
                return give_up(Code::DeadlineExceeded, why);
            }
        }
        self.resumed(&f, delay);
        Ok(if delay.is_zero() {
            State::Open
        } else {
            State::Waiting(Box::pin(tokio::time::sleep(delay)))
        })
    }

    /// A server that cannot serve a compressed read (typically one at an
    /// offset) says so before sending anything; the read goes on uncompressed.
    fn zstd_refused(&self, f: &Failure, progress: bool) -> bool {
        self.next_request().compressor == Compressor::Zstd
            && !progress
            && matches!(
                f.error.code(),
                Code::InvalidArgument
                    | Code::OutOfRange
                    | Code::Unimplemented
                    | Code::FailedPrecondition
            )
    }

    /// A server that does not take a non-zero `read_limit` says so before
    /// sending anything; the range is then read without one (and trimmed).
    fn limit_refused(&self, f: &Failure, progress: bool) -> bool {
        let request = self.next_request();
        request.limit > 0
            && request.compressor == Compressor::Identity
            && !progress
            && matches!(f.error.code(), Code::InvalidArgument | Code::Unimplemented)
    }

    fn resumed(&mut self, f: &Failure, delay: Duration) {
        let next = self.next_request();
        self.shared.resumptions.fetch_add(1, Ordering::Relaxed);
        self.counters.inc("resumptions");
        self.counters
            .add("bytes_rerequested", self.want - self.delivered);
        tracing::info!(
            digest = %self.digest,
            offset = next.offset,
            attempt = self.attempts + 1,
            delay_ms = delay.as_millis() as u64,
            cause = %f.error,
            origin = ?f.origin,
            "resuming ByteStream read"
        );
    }
}

impl Stream for ResumingReader {
    type Item = Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if std::mem::take(&mut this.handed_out) {
            let timeout = this.policy.stall_timeout;
            this.stall.as_mut().reset(Instant::now() + timeout);
        }
        loop {
            match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Waiting(sleep) => {
                    ready!(sleep.as_mut().poll(cx));
                    this.state = State::Open;
                }
                State::Open => {
                    if this.attempts == 0 {
                        this.started = Some(Instant::now());
                        this.counters.inc("reads");
                    }
                    this.attempts += 1;
                    this.this_attempt = 0;
                    this.state = State::Streaming(this.opener.open(this.next_request()));
                    this.fresh_connection = false;
                    let timeout = this.policy.stall_timeout;
                    this.stall.as_mut().reset(Instant::now() + timeout);
                }
                State::Streaming(stream) => {
                    let polled = match stream.poll_next_unpin(cx) {
                        Poll::Pending => match this.stall.as_mut().poll(cx) {
                            Poll::Pending => return Poll::Pending,
                            Poll::Ready(()) => {
                                let timeout = this.policy.stall_timeout;
                                this.counters.inc("stalls");
                                Some(Err(Failure::stall(timeout)))
                            }
                        },
                        Poll::Ready(item) => {
                            let timeout = this.policy.stall_timeout;
                            this.stall.as_mut().reset(Instant::now() + timeout);
                            item
                        }
                    };
                    let failure = match polled {
                        Some(Ok(chunk)) if chunk.is_empty() => continue,
                        Some(Ok(mut chunk)) => {
                            let remaining = this.want - this.delivered;
                            if this.limited && chunk.len() as u64 >= remaining {
                                // A ranged read is complete once it holds its
                                // bytes: what the server sends or says after
                                // (whole chunks past read_limit, an error of
                                // its own) does not matter.
                                if chunk.len() as u64 > remaining {
                                    this.counters.inc("overruns_trimmed");
                                    chunk.truncate(remaining as usize);
                                }
                                this.delivered = this.want;
                                this.this_attempt += remaining;
                                return this.finish(Some(Ok(chunk)));
                            }
                            let len = chunk.len() as u64;
                            if this.delivered + len > this.want {
                                // Passed on, not dropped: the verifier around the
                                // reader fails the read with DATA_LOSS on them.
                                tracing::warn!(
                                    digest = %this.digest,
                                    attempt = this.attempts,
                                    received = this.delivered + len,
                                    expected = this.want,
                                    "server sent more bytes than asked for"
                                );
                                return this.finish(Some(Ok(chunk)));
                            }
                            this.delivered += len;
                            this.this_attempt += len;
                            this.handed_out = true;
                            return Poll::Ready(Some(Ok(chunk)));
                        }
                        // Everything arrived; an error on the way out loses nothing.
                        _ if this.delivered == this.want => return this.finish(None),
                        Some(Err(f)) => f,
                        None => {
                            let asked = this.want - (this.delivered - this.this_attempt);
                            Failure::truncated(this.this_attempt, asked)
                        }
                    };
                    match this.after_failure(failure) {
                        Ok(next) => this.state = next,
                        Err(e) => return this.fail(e),
                    }
                }
            }
        }
    }
}
