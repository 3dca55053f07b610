//! A GET whose body is cut (a load balancer's reset, an idle timer, a node
//! restarting) goes on with `Range: bytes=DELIVERED-` and `If-Match` on the
//! first answer's ETag, so the caller sees one stream, and never the bytes of
//! two different objects spliced together. Budget as in `resumable_grpc`:
//! any byte delivered resets it, attempts without progress are bounded,
//! stalls and an optional deadline end an attempt.

use crate::errors::{from_store, http_status, transient};
use blob_access::node::Counters;
use blob_access::{Code, Digest, Error, Result};
use blob_access_decorators::resumable_grpc::RetryPolicy;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore};
use std::sync::Arc;
use tokio::time::{timeout, Instant};

/// One read of `key`: bytes `next..end` of the object.
pub(crate) struct Read {
    pub store: Arc<dyn ObjectStore>,
    pub key: Path,
    pub node: Arc<str>,
    pub digest: Digest,
    pub next: u64,
    pub end: u64,
    pub policy: RetryPolicy,
    pub counters: Arc<Counters>,
}

struct State {
    read: Read,
    /// The ETag of the first answer; every later GET must match it.
    etag: Option<String>,
    body: Option<BoxStream<'static, object_store::Result<Bytes>>>,
    opened: bool,
    started: Instant,
    in_a_row: u32,
    failures: u32,
    progressed: bool,
    done: bool,
}

impl Read {
    /// The raw bytes (not yet verified: the caller wraps them in `verify`).
    pub(crate) fn into_stream(self) -> BoxStream<'static, Result<Bytes>> {
        let state = State {
            read: self,
            etag: None,
            body: None,
            opened: false,
            started: Instant::now(),
            in_a_row: 0,
            failures: 0,
            progressed: false,
            done: false,
        };
        futures::stream::unfold(state, |mut s| async move {
            if s.done {
                return None;
            }
            let item = s.next_chunk().await;
            s.done = !matches!(item, Some(Ok(_)));
            item.map(|i| (i, s))
        })
        .boxed()
    }
}

enum Step {
    Chunk(Bytes),
    /// The attempt failed in a way worth another one.
    Retry(Error),
}

impl State {
    async fn next_chunk(&mut self) -> Option<Result<Bytes>> {
        loop {
            let step = match self.step().await {
                Ok(Some(step)) => step,
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            };
            match step {
                Step::Chunk(c) => return Some(Ok(c)),
                Step::Retry(cause) => {
                    self.body = None;
                    if let Err(e) = self.wait_before_retry(cause).await {
                        self.read.counters.inc("give_ups");
                        return Some(Err(e));
                    }
                    self.read.counters.inc("resumptions");
                }
            }
        }
    }

    /// Opens the body if needed and takes one chunk from it.
    async fn step(&mut self) -> Result<Option<Step>> {
        let stall = self.read.policy.stall_timeout;
        if self.read.next >= self.read.end && self.opened {
            return Ok(None);
        }
        if self.body.is_none() {
            match timeout(stall, self.open()).await {
                Ok(Ok(None)) => return Ok(None),
                Ok(Ok(Some(body))) => self.body = Some(body),
                Ok(Err(step)) => return step.map(Some),
                Err(_) => return Ok(Some(Step::Retry(self.stalled("the answer")))),
            }
        }
        let body = self.body.as_mut().expect("opened above");
        let step = match timeout(stall, body.next()).await {
            Ok(Some(Ok(mut chunk))) => {
                let room = (self.read.end - self.read.next) as usize;
                chunk.truncate(room);
                self.read.next += chunk.len() as u64;
                self.progressed |= !chunk.is_empty();
                self.read.counters.add("bytes_read", chunk.len() as u64);
                Step::Chunk(chunk)
            }
            Ok(Some(Err(e))) => Step::Retry(from_store(&e, &self.read.node)),
            Ok(None) if self.read.next < self.read.end => Step::Retry(Error::unavailable(format!(
                "the response ended at byte {} of {}",
                self.read.next, self.read.end
            ))),
            Ok(None) => return Ok(None),
            Err(_) => Step::Retry(self.stalled("more bytes")),
        };
        Ok(Some(step))
    }

    /// A GET of what is still missing; `Ok(None)` for an empty range of an
    /// object that exists. `Err(Ok(step))` is a retry, `Err(Err(e))` final.
    async fn open(
        &mut self,
    ) -> std::result::Result<Option<BoxStream<'static, object_store::Result<Bytes>>>, Result<Step>>
    {
        let r = &self.read;
        let empty = r.next >= r.end;
        let options = GetOptions {
            range: (!empty).then_some(GetRange::Bounded(r.next..r.end)),
            if_match: self.etag.clone(),
            head: empty,
            ..GetOptions::default()
        };
        let got = match r.store.get_opts(&r.key, options).await {
            Ok(got) => got,
            Err(e) => return Err(self.refused(e)),
        };
        if !self.opened {
            self.opened = true;
            let (stored, size) = (got.meta.size, r.digest.size_bytes());
            if stored != size {
                return Err(Err(self.error(
                    Code::DataLoss,
                    format!("the stored object holds {stored} bytes, the blob has {size}"),
                )));
            }
            self.etag = got.meta.e_tag.clone();
        }
        if empty {
            return Ok(None);
        }
        Ok(Some(got.into_stream()))
    }

    /// What a refused GET means: NOT_FOUND for a missing object (the first
    /// time), DATA_LOSS if the object changed under a resumed read, a retry
    /// for a transient condition.
    fn refused(&self, e: object_store::Error) -> Result<Step> {
        if self.opened && matches!(e, object_store::Error::Precondition { .. }) {
            return Err(self.error(
                Code::DataLoss,
                format!(
                    "the object changed (ETag no longer {}) after {} bytes were delivered",
                    self.etag.as_deref().unwrap_or("?"),
                    self.read.next
                ),
            ));
        }
        if http_status(&e) == Some(416) {
            // The range starts past the stored object's end.
            return Err(self.error(
                Code::DataLoss,
                format!(
                    "the stored object ends before byte {} of the blob's {}",
                    self.read.next,
                    self.read.digest.size_bytes()
                ),
            ));
        }
        if self.opened && matches!(e, object_store::Error::NotFound { .. }) {
            return Err(self.error(
                Code::DataLoss,
                format!("the object disappeared after {} bytes", self.read.next),
            ));
        }
        let err = from_store(&e, &self.read.node).with_digest(&self.read.digest);
        if transient(&e) {
            Ok(Step::Retry(err))
        } else {
            Err(err)
        }
    }

    fn stalled(&self, what: &str) -> Error {
        Error::unavailable(format!(
            "no {what} for {:?} (stall timeout)",
            self.read.policy.stall_timeout
        ))
    }

    fn error(&self, code: Code, message: String) -> Error {
        Error::new(code, message)
            .with_backend(self.read.node.to_string())
            .with_digest(&self.read.digest)
    }

    /// Counts the failed attempt and waits before the next, or gives up.
    async fn wait_before_retry(&mut self, cause: Error) -> Result<()> {
        self.failures += 1;
        self.in_a_row = if std::mem::take(&mut self.progressed) {
            0
        } else {
            self.in_a_row + 1
        };
        let policy = &self.read.policy;
        let give_up = |code: Code, why: String| {
            self.error(
                code,
                format!(
                    "gave up reading after {} failed attempts: {why}; last cause: {}",
                    self.failures,
                    cause.message()
                ),
            )
        };
        if self.in_a_row >= policy.max_attempts_without_progress {
            let why = format!("{} attempts in a row made no progress", self.in_a_row);
            return Err(give_up(Code::Unavailable, why));
        }
        let delay = policy.backoff(self.in_a_row);
        if let Some(limit) = policy.deadline {
            if self.started.elapsed() + delay >= limit {
                let why = format!("the retry deadline of {limit:?} has passed");
                return Err(give_up(Code::DeadlineExceeded, why));
            }
        }
        tracing::debug!(node = %self.read.node, digest = %self.read.digest, at = self.read.next, cause = %cause, ?delay, "resuming a cut read");
        tokio::time::sleep(delay).await;
        Ok(())
    }
}
