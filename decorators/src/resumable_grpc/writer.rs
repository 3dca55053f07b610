//! Resuming uploads: one ByteStream Write made of as many attempts as it takes.
//!
//! A proxy that cuts a long upload leaves the client not knowing what the
//! server kept. After a cut, QueryWriteStatus on the same resource name (the
//! same upload uuid) tells: the next attempt continues at `committed_size`;
//! a server that keeps nothing of a cut upload, or has no QueryWriteStatus
//! (BuildGrid answers UNIMPLEMENTED), gets the upload again from byte 0; a
//! server that already has the blob (`committed_size` = size, `complete`,
//! ALREADY_EXISTS, or a response before the last byte) ends it successfully.
//! Failures are classified, budgeted and waited out as for reads; progress is
//! the server reporting more committed than before.
//!
//! The caller's bytes come once and memory must not grow with the blob, so
//! the writer holds a bounded replay window: the last `write_replay_window`
//! bytes it sent. A resumption point inside the window is served from it (a
//! blob no larger than the window can always start again). One before it
//! needs the bytes again: a source given through `put_reopenable` (the CLI's
//! files; Bazel keeps its files for the same reason) is opened and hashed
//! again from the start and sent from that point; a one-shot stream fails
//! with an error naming the window.
//!
//! Small blobs do not come here: the node sends them in coalesced
//! BatchUpdateBlobs calls, retried as a whole ([`super::cas_calls`]).

use super::budget::Budget;
use super::channels::Channels;
use super::observe::{Observed, ObservingChannel};
use super::retry::{Failure, Origin};
use blob_access::bytestream_proto::byte_stream_client::ByteStreamClient;
use blob_access::bytestream_proto::{QueryWriteStatusRequest, WriteRequest};
use blob_access::grpc::GrpcChannel;
use blob_access::grpc::GrpcConnection;
use blob_access::grpc::MAX_MESSAGE;
use blob_access::node::Counters;
use blob_access::resource::{Compressor, WriteResource};
use blob_access::verify::verify;
use blob_access::{BlobStream, Code, Digest, Error, ReadRange, Reopen, Result};
use bytes::Bytes;
use futures::StreamExt;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The caller's bytes: a verified stream, the window of those last sent, and
/// how to read them again if the source allows.
struct Source {
    name: String,
    digest: Digest,
    stream: BlobStream,
    reopen: Option<Reopen>,
    window: VecDeque<Bytes>,
    /// Offset of the window's first byte.
    start: u64,
    /// Bytes taken from the stream: the window's end.
    pulled: u64,
    held: u64,
    cap: u64,
}

impl Source {
    fn new(
        name: &str,
        digest: &Digest,
        data: BlobStream,
        reopen: Option<Reopen>,
        cap: u64,
    ) -> Self {
        Source {
            name: name.to_string(),
            digest: digest.clone(),
            stream: verify(digest, ReadRange::FULL, name, data),
            reopen,
            window: VecDeque::new(),
            start: 0,
            pulled: 0,
            held: 0,
            cap,
        }
    }

    /// The held chunks from `at` (within the window) to its end.
    fn replay(&self, at: u64) -> Vec<Bytes> {
        let mut pos = self.start;
        let mut out = Vec::new();
        for c in &self.window {
            let end = pos + c.len() as u64;
            if end > at {
                out.push(c.slice(at.saturating_sub(pos) as usize..));
            }
            pos = end;
        }
        out
    }

    /// The next new chunk, kept in the window (whose oldest chunks go once
    /// the rest still holds `cap` bytes).
    async fn next(&mut self) -> Option<Result<Bytes>> {
        let chunk = self.stream.next().await?;
        if let Ok(c) = &chunk {
            self.pulled += c.len() as u64;
            self.held += c.len() as u64;
            self.window.push_back(c.clone());
            while self
                .window
                .front()
                .is_some_and(|f| self.held - f.len() as u64 >= self.cap)
            {
                self.drop_front();
            }
        }
        Some(chunk)
    }

    fn drop_front(&mut self) {
        if let Some(f) = self.window.pop_front() {
            self.start += f.len() as u64;
            self.held -= f.len() as u64;
        }
    }

    /// Makes `at` the point the next attempt sends from. Bytes before it stay
    /// in the window while it has room: a server that later refuses to go on
    /// (see `lagging`) may need the upload again from 0. Returns whether the
    /// source was read again to get there.
    async fn seek(&mut self, at: u64) -> Result<bool> {
        if self.start <= at && at <= self.pulled {
            return Ok(false);
        }
        let Some(reopen) = self.reopen.clone() else {
            return Err(Error::unavailable(format!(
                "the upload must go on from byte {at}, but only bytes {}..{} are still held \
                 (write_replay_window {} bytes) and the source cannot be read again \
                 (a one-shot stream; put_reopenable takes a reopenable one)",
                self.start, self.pulled, self.cap
            )));
        };
        // Read and hash everything again; send from `at`.
        self.stream = verify(&self.digest, ReadRange::FULL, &self.name, reopen());
        self.window.clear();
        (self.start, self.pulled, self.held) = (0, 0, 0);
        while self.pulled < at {
            let Some(chunk) = self.stream.next().await else {
                return Err(Error::data_loss(format!(
                    "the source read again ended at byte {} before byte {at}",
                    self.pulled
                )));
            };
            let chunk = chunk?;
            let end = self.pulled + chunk.len() as u64;
            if end > at {
                let keep = chunk.slice((at - self.pulled) as usize..);
                self.held = keep.len() as u64;
                self.window.push_back(keep);
            }
            self.pulled = end;
        }
        self.start = at;
        Ok(true)
    }
}

/// Resumed writes refused in a row before one starts again at 0 under a new
/// upload name.
const LAGGING_REFUSALS: u32 = 3;

/// Whether `f`, the failure of a resumed write, may be a server whose view
/// of the cut lags the client's: it told us where to go on (QueryWriteStatus)
/// but has not yet noticed the old stream was cut, so it took the
/// continuation for a new upload and refused its offset (INVALID_ARGUMENT,
/// FAILED_PRECONDITION, ABORTED, OUT_OF_RANGE).
fn lagging(f: &Failure) -> bool {
    f.origin == Origin::Server
        && matches!(
            f.error.code(),
            Code::InvalidArgument | Code::FailedPrecondition | Code::Aborted | Code::OutOfRange
        )
}

/// How one Write attempt ended.
enum Outcome {
    /// The server has the blob.
    Done,
    /// The caller's data is bad (or cannot be read): never retried.
    Bad(Error),
    Failed(Failure),
}

/// What QueryWriteStatus said.
enum Standing {
    Complete,
    Committed(u64),
    /// The server cannot tell (UNIMPLEMENTED, NOT_FOUND, ...): start again at 0.
    Unknown(Error),
}

/// Resuming uploads of one node.
pub struct ResumableWrites {
    conn: GrpcConnection,
    channels: Arc<Channels>,
    policy: super::RetryPolicy,
    window: u64,
    counters: Arc<Counters>,
}

impl ResumableWrites {
    /// Writes through `channels` with `conn`'s instance name and headers;
    /// `window` bytes are held for resumptions; counters go to `counters`.
    pub fn new(
        conn: GrpcConnection,
        channels: Arc<Channels>,
        policy: super::RetryPolicy,
        window: u64,
        counters: Arc<Counters>,
    ) -> Self {
        ResumableWrites {
            conn,
            channels,
            policy,
            window: window.max(1),
            counters,
        }
    }

    fn channel(&self, budget: &Budget, used: &mut u64) -> GrpcChannel {
        let (n, ch) = if budget.fresh_connection {
            self.counters.inc("fresh_connections");
            self.channels.replace(*used)
        } else {
            self.channels.current()
        };
        *used = n;
        ch
    }

    /// Stores `data` (readable again through `reopen`, if given) as `digest`,
    /// a non-empty blob, through ByteStream Write.
    pub async fn put(
        &self,
        digest: &Digest,
        data: BlobStream,
        reopen: Option<Reopen>,
    ) -> Result<()> {
        self.counters.inc("writes");
        let result = self.bytestream(digest, data, reopen).await;
        result.map_err(|e| e.with_backend(self.conn.name()).with_digest(digest))
    }

    async fn bytestream(
        &self,
        digest: &Digest,
        data: BlobStream,
        reopen: Option<Reopen>,
    ) -> Result<()> {
        let size = digest.size_bytes();
        let new_name = || {
            WriteResource::new(
                self.conn.instance_name(),
                Compressor::Identity,
                digest.clone(),
            )
            .to_string()
        };
        let mut resource = new_name();
        // Resumed attempts the server refused in a row (see `lagging`).
        let mut refusals = 0u32;
        let mut src = Source::new(self.conn.name(), digest, data, reopen, self.window);
        let mut budget = Budget::new(self.policy.clone());
        let (mut at, mut acked, mut attempts) = (0u64, 0u64, 0u32);
        let mut used = self.channels.current().0;
        loop {
            attempts += 1;
            let channel = self.channel(&budget, &mut used);
            let failure = match self.attempt(&mut src, &resource, at, size, channel).await {
                Outcome::Done => return Ok(()),
                Outcome::Bad(e) => return Err(e),
                Outcome::Failed(f) => f,
            };
            let what =
                |at: u64| format!("attempt {attempts} from write_offset {at}, {size} bytes in all");
            let failure = if at > 0 && lagging(&failure) {
                refusals += 1;
                self.counters.inc("write_refusals");
                if refusals > LAGGING_REFUSALS {
                    // The server keeps refusing where it told us to go on:
                    // a new upload, from 0.
                    tracing::info!(%digest, refusals, cause = %failure.error, "resumed writes refused; starting again at 0 under a new upload name");
                    refusals = 0;
                    resource = new_name();
                    // A new upload: its progress counts from 0, with a fresh budget.
                    acked = 0;
                    budget.in_a_row = 0;
                } else {
                    // Its view of the cut may lag ours: ask it again shortly.
                    tokio::time::sleep(self.policy.backoff(refusals)).await;
                }
                // Retried within the budget, not reported as the answer.
                Failure {
                    origin: Origin::Truncated,
                    ..failure
                }
            } else {
                failure
            };
            if let Some(e) = Budget::fatal(&failure, &what(at)) {
                return Err(e);
            }
            // Where does the server stand?
            let standing = loop {
                let channel = self.channel(&budget, &mut used);
                match self.query(channel, &resource, size).await {
                    Ok(s) => break s,
                    Err(qf) => {
                        let d = budget.after(
                            &qf,
                            false,
                            &format!("QueryWriteStatus after {}", what(at)),
                        )?;
                        tokio::time::sleep(d).await;
                    }
                }
            };
            let next = match standing {
                Standing::Complete => {
                    self.counters.inc("writes_found_complete");
                    return Ok(());
                }
                Standing::Committed(c) if c <= src.pulled => c,
                Standing::Committed(c) => {
                    tracing::warn!(%digest, committed = c, sent = src.pulled, "server reports more committed than was sent; starting again at 0");
                    0
                }
                Standing::Unknown(why) => {
                    tracing::debug!(%digest, cause = %why, "QueryWriteStatus cannot tell; starting again at 0");
                    0
                }
            };
            let progress = next > acked;
            acked = acked.max(next);
            if progress {
                refusals = 0;
            }
            let delay = budget.after(&failure, progress, &what(at))?;
            self.counters.inc("write_retries");
            self.counters.add("bytes_resent", src.pulled - next);
            if next == 0 {
                self.counters.inc("write_restarts");
            }
            if src.seek(next).await? {
                self.counters.inc("source_rereads");
            }
            tracing::info!(%digest, from = next, attempt = attempts + 1, delay_ms = delay.as_millis() as u64, cause = %failure.error, origin = ?failure.origin, "resuming ByteStream write");
            at = next;
            tokio::time::sleep(delay).await;
        }
    }

    /// One Write attempt from `at`: held bytes first, then new ones from the
    /// source. An attempt that gets no message out (and no answer) for the
    /// stall timeout is abandoned.
    async fn attempt(
        &self,
        src: &mut Source,
        resource: &str,
        at: u64,
        size: u64,
        channel: GrpcChannel,
    ) -> Outcome {
        let sent = AtomicU64::new(0);
        // A channel rather than a boxed stream: tonic's client-streaming
        // future is only `Send` for concrete stream types.
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteRequest>(2);
        let replay = src.replay(at);
        let pump = async {
            let mut out = Sender {
                tx,
                name: Some(resource.to_string()),
                pos: at,
                size,
                sent: &sent,
            };
            for chunk in replay {
                if !out.send(chunk).await {
                    return Ok(());
                }
            }
            while let Some(chunk) = src.next().await {
                if !out.send(chunk?).await {
                    return Ok(()); // The RPC ended early (e.g. the blob already existed).
                }
            }
            Ok::<_, Error>(())
        };
        let observed = Observed::default();
        let mut request = self
            .conn
            .request(tokio_stream::wrappers::ReceiverStream::new(rx));
        observed.attach(&mut request);
        let mut client = ByteStreamClient::new(ObservingChannel::new(channel))
            .max_encoding_message_size(MAX_MESSAGE)
            .max_decoding_message_size(MAX_MESSAGE);
        let write = client.write(request);
        let timeout = self.policy.stall_timeout;
        let (mut pump, mut write) = (std::pin::pin!(pump), std::pin::pin!(write));
        let stall = tokio::time::sleep(timeout);
        let mut stall = std::pin::pin!(stall);
        let (mut pumped, mut seen) = (false, 0);
        loop {
            tokio::select! {
                r = &mut pump, if !pumped => match r {
                    // Bad data: dropping `write` cancels the RPC before finish_write.
                    Err(e) => return Outcome::Bad(e),
                    Ok(()) => pumped = true,
                },
                r = &mut write => return match r {
                    Ok(resp) if resp.get_ref().committed_size == size as i64 => Outcome::Done,
                    Ok(resp) => Outcome::Failed(Failure::server(Error::data_loss(format!(
                        "server committed {} bytes of a {size} byte upload",
                        resp.get_ref().committed_size
                    )))),
                    Err(status) => {
                        let f = Failure::from_status(status, observed.sent());
                        if f.origin == super::Origin::Server && f.error.code() == Code::AlreadyExists {
                            Outcome::Done
                        } else {
                            Outcome::Failed(f)
                        }
                    }
                },
                () = &mut stall => {
                    let now = sent.load(Ordering::Relaxed);
                    if now == seen {
                        self.counters.inc("stalls");
                        return Outcome::Failed(Failure::stall(timeout));
                    }
                    seen = now;
                    stall.as_mut().reset(tokio::time::Instant::now() + timeout);
                }
            }
        }
    }

    async fn query(
        &self,
        channel: GrpcChannel,
        resource: &str,
        size: u64,
    ) -> std::result::Result<Standing, Failure> {
        let observed = Observed::default();
        let mut request = self.conn.request(QueryWriteStatusRequest {
            resource_name: resource.to_string(),
        });
        observed.attach(&mut request);
        let mut client = ByteStreamClient::new(ObservingChannel::new(channel));
        let timeout = self.policy.stall_timeout;
        let answer = tokio::time::timeout(timeout, client.query_write_status(request)).await;
        let status = match answer {
            Err(_) => return Err(Failure::stall(timeout)),
            Ok(Ok(r)) => {
                let r = r.into_inner();
                let committed = r.committed_size.max(0) as u64;
                return Ok(if r.complete || committed >= size {
                    Standing::Complete
                } else {
                    Standing::Committed(committed)
                });
            }
            Ok(Err(status)) => status,
        };
        let f = Failure::from_status(status, observed.sent());
        match (f.origin, f.error.code()) {
            (super::Origin::Server, Code::AlreadyExists) => Ok(Standing::Complete),
            (super::Origin::Server, _) if super::classify(&f) == super::Verdict::Fatal => {
                Ok(Standing::Unknown(f.error))
            }
            _ => Err(f),
        }
    }
}

/// Sends the WriteRequests of one attempt.
struct Sender<'a> {
    tx: tokio::sync::mpsc::Sender<WriteRequest>,
    name: Option<String>,
    pos: u64,
    size: u64,
    sent: &'a AtomicU64,
}

impl Sender<'_> {
    /// False once the RPC no longer takes messages.
    async fn send(&mut self, data: Bytes) -> bool {
        if data.is_empty() {
            return true;
        }
        let next = self.pos + data.len() as u64;
        let req = WriteRequest {
            resource_name: self.name.take().unwrap_or_default(),
            write_offset: self.pos as i64,
            finish_write: next == self.size,
            data: data.into(),
        };
        self.pos = next;
        let ok = self.tx.send(req).await.is_ok();
        self.sent.fetch_add(1, Ordering::Relaxed);
        ok
    }
}
