//! What to say when a resumed read does not add up.
//!
//! A server (or proxy) that ignores `read_offset` answers a resumed Read with
//! the blob from byte 0, and the bytes pieced together are wrong. Verification
//! catches that (wrong hash, or more bytes than asked for), but the caller has
//! already seen part of the stream, so this read can only fail. Before failing
//! it makes one full attempt from offset 0 without resuming, only hashing the
//! bytes, to tell "this server mishandles resumption" from "the blob is corrupt
//! on the server", which is what the person reading the error needs to know.

use super::attempt::{AttemptRequest, ReadOpener};
use super::reader::ReadShared;
use blob_access::node::Counters;
use blob_access::resource::Compressor;
use blob_access::{BlobStream, Code, Digest, Error, Result};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, Stream, StreamExt};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

/// Wraps a verified full read; see the module documentation.
pub(crate) fn recheck_on_data_loss(
    verified: BlobStream,
    opener: Arc<dyn ReadOpener>,
    digest: &Digest,
    shared: Arc<ReadShared>,
    counters: Arc<Counters>,
) -> BlobStream {
    Recheck {
        state: State::Passing(verified),
        opener,
        digest: digest.clone(),
        shared,
        counters,
    }
    .boxed()
}

enum State {
    Passing(BlobStream),
    Checking(BoxFuture<'static, Error>),
    Done,
}

struct Recheck {
    state: State,
    opener: Arc<dyn ReadOpener>,
    digest: Digest,
    shared: Arc<ReadShared>,
    counters: Arc<Counters>,
}

impl Recheck {
    fn wants_check(&self, e: &Error) -> bool {
        e.code() == Code::DataLoss
            && self.shared.resumptions.load(Ordering::Relaxed) > 0
            && !self.shared.passed_server_error.load(Ordering::Relaxed)
    }
}

impl Stream for Recheck {
    type Item = Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match &mut this.state {
            State::Done => Poll::Ready(None),
            State::Checking(check) => {
                let e = ready!(check.poll_unpin(cx));
                this.state = State::Done;
                Poll::Ready(Some(Err(e)))
            }
            State::Passing(inner) => match ready!(inner.poll_next_unpin(cx)) {
                Some(Err(e)) if this.wants_check(&e) => {
                    this.counters.inc("offset_rechecks");
                    let resumptions = this.shared.resumptions.load(Ordering::Relaxed);
                    let check = full_read_check(this.opener.clone(), this.digest.clone());
                    this.state = State::Checking(
                        check
                            .map(move |verdict| explain(e, resumptions, verdict))
                            .boxed(),
                    );
                    self.poll_next(cx)
                }
                Some(Err(e)) => {
                    this.state = State::Done;
                    Poll::Ready(Some(Err(e)))
                }
                Some(Ok(b)) => Poll::Ready(Some(Ok(b))),
                None => {
                    this.state = State::Done;
                    Poll::Ready(None)
                }
            },
        }
    }
}

/// How the one full read from offset 0 turned out.
enum CheckVerdict {
    Verified,
    Mismatch(String),
    Failed(Error),
}

async fn full_read_check(opener: Arc<dyn ReadOpener>, digest: Digest) -> CheckVerdict {
    let mut stream = opener.open(AttemptRequest {
        offset: 0,
        limit: 0,
        compressor: Compressor::Identity,
        fresh_connection: false,
    });
    let mut hasher = digest.function().hasher();
    let mut seen = 0u64;
    while let Some(item) = stream.next().await {
        match item {
            Ok(chunk) => {
                seen += chunk.len() as u64;
                if seen > digest.size_bytes() {
                    return CheckVerdict::Mismatch(format!("sent more than {seen} bytes"));
                }
                hasher.update(&chunk);
            }
            Err(f) if seen == digest.size_bytes() => {
                tracing::debug!(digest = %digest, cause = %f.error, "error after the last byte");
                break;
            }
            Err(f) => return CheckVerdict::Failed(f.error),
        }
    }
    if seen < digest.size_bytes() {
        return CheckVerdict::Mismatch(format!("ended after {seen} bytes"));
    }
    let hash = hasher.finish_hex();
    if hash == digest.hash() {
        CheckVerdict::Verified
    } else {
        CheckVerdict::Mismatch(format!("hashes to {hash}"))
    }
}

fn explain(first: Error, resumptions: u32, verdict: CheckVerdict) -> Error {
    let detail = match verdict {
        CheckVerdict::Verified => "matches the digest: the server or a proxy seems to ignore \
             read_offset, so resumed reads cannot be trusted there"
            .to_string(),
        CheckVerdict::Mismatch(how) => {
            format!("does not match either ({how}): the blob is corrupt on the server")
        }
        CheckVerdict::Failed(e) => format!("failed too: {e}"),
    };
    tracing::warn!(digest = ?first.digest(), resumptions, %detail, "resumed read failed verification");
    let mut e = Error::data_loss(format!(
        "{}; the read had been resumed {resumptions} time(s), and one full read from \
         offset 0 without resuming {detail}",
        first.message()
    ));
    if let Some(b) = first.backend() {
        e = e.with_backend(b);
    }
    if let Some(d) = first.digest() {
        e = e.with_digest(d);
    }
    e
}
