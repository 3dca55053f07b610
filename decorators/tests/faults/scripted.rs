//! A scripted ByteStream "server" without any network: each attempt follows
//! the next [`Plan`] (send N bytes, then fail, end, hang or send extra bytes),
//! so the resuming reader's logic can be tested exactly and quickly.

use blob_access::resource::Compressor;
use blob_access_decorators::resumable_grpc::{AttemptRequest, AttemptStream, Failure, ReadOpener};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// What happens after an attempt's bytes.
#[derive(Clone, Debug)]
pub enum Then {
    /// The stream fails with this.
    Fail(Failure),
    /// The stream ends cleanly (a truncation if bytes are missing).
    End,
    /// The stream never ends.
    Hang,
    /// The stream sends these bytes more, then ends.
    Extra(Bytes),
}

/// One attempt's behaviour.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Bytes sent before `then` (fewer if the request ends first).
    pub after: usize,
    pub then: Then,
    /// Serve from byte 0 whatever `read_offset` says.
    pub ignore_offset: bool,
}

impl Plan {
    pub fn cut(after: usize, then: Then) -> Self {
        Plan {
            after,
            then,
            ignore_offset: false,
        }
    }
}

/// See the module documentation. Attempts beyond the plans are healthy.
pub struct Scripted {
    blob: Bytes,
    chunk: usize,
    plans: Mutex<VecDeque<Plan>>,
    requests: Mutex<Vec<AttemptRequest>>,
    /// Messages handed to the reader, over all attempts.
    pub messages_polled: Arc<AtomicUsize>,
    /// Attempt streams dropped.
    pub dropped: Arc<AtomicUsize>,
}

impl Scripted {
    pub fn new(blob: impl Into<Bytes>, chunk: usize, plans: Vec<Plan>) -> Arc<Self> {
        Arc::new(Scripted {
            blob: blob.into(),
            chunk,
            plans: Mutex::new(plans.into()),
            requests: Mutex::new(Vec::new()),
            messages_polled: Arc::default(),
            dropped: Arc::default(),
        })
    }

    pub fn opener(self: &Arc<Self>) -> Arc<dyn ReadOpener> {
        let me = self.clone();
        Arc::new(move |r: AttemptRequest| me.open(r))
    }

    pub fn requests(&self) -> Vec<AttemptRequest> {
        self.requests.lock().unwrap().clone()
    }

    /// `(read_offset, read_limit)` of each attempt.
    pub fn offsets(&self) -> Vec<(u64, u64)> {
        self.requests()
            .iter()
            .map(|r| (r.offset, r.limit))
            .collect()
    }

    pub fn compressors(&self) -> Vec<Compressor> {
        self.requests().iter().map(|r| r.compressor).collect()
    }

    fn open(&self, r: AttemptRequest) -> AttemptStream {
        self.requests.lock().unwrap().push(r);
        let plan = self.plans.lock().unwrap().pop_front();
        let plan = plan.unwrap_or(Plan::cut(usize::MAX, Then::End));
        let len = self.blob.len();
        let start = if plan.ignore_offset {
            0
        } else {
            (r.offset as usize).min(len)
        };
        let mut end = if r.limit == 0 {
            len
        } else {
            (start + r.limit as usize).min(len)
        };
        end = end.min(start.saturating_add(plan.after));
        let mut items: Vec<Result<Bytes, Failure>> = (start..end)
            .step_by(self.chunk.max(1))
            .map(|i| Ok(self.blob.slice(i..(i + self.chunk).min(end))))
            .collect();
        let hang = matches!(plan.then, Then::Hang);
        match plan.then {
            Then::Fail(f) => items.push(Err(f)),
            Then::Extra(b) => items.push(Ok(b)),
            Then::End | Then::Hang => {}
        }
        let polled = self.messages_polled.clone();
        let body = futures::stream::iter(items).inspect(move |_| {
            polled.fetch_add(1, Ordering::SeqCst);
        });
        let body = if hang {
            body.chain(futures::stream::pending()).boxed()
        } else {
            body.boxed()
        };
        Tracked {
            inner: body,
            dropped: self.dropped.clone(),
        }
        .boxed()
    }
}

/// Counts its own drop, to show that dropping the reader drops the attempt.
struct Tracked {
    inner: AttemptStream,
    dropped: Arc<AtomicUsize>,
}

impl Stream for Tracked {
    type Item = Result<Bytes, Failure>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.poll_next_unpin(cx)
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

/// Deterministic blob content that differs at every offset modulo 251.
pub fn blob(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
        .collect::<Vec<u8>>()
        .into()
}
