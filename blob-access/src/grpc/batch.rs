//! Coalescing of small gets and puts into BatchReadBlobs / BatchUpdateBlobs
//! calls. A build tool or `fetch-tree` asks for thousands of small blobs at
//! once; one round trip each would leave the link idle between them.
//!
//! No timer: a request is sent at once when fewer than `MAX_IN_FLIGHT`
//! batches are on the wire (so a lone request waits for nothing); otherwise
//! it joins the queue, and the next batch takes whatever queued meanwhile, up
//! to the server's `max_batch_total_size_bytes`.

use crate::{Error, Result};
use futures::future::BoxFuture;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Batches on the wire at once per node: one being answered while the next
/// fills. Measured on 10,000 files of 1-16 KiB over loopback (2 cores, best
/// of 5): 1, 2, 4, 8 in flight fetched in 0.82, 0.80, 0.87, 0.75 s and put
/// in 1.43, 1.00, 1.32, 1.16 s; more only splits the same work into
/// smaller batches.
pub(super) const MAX_IN_FLIGHT: usize = 2;

/// Room counted per blob for its digest and framing in a batch message.
pub(super) const PER_BLOB_OVERHEAD: u64 = 256;

/// Sends one batch; answers each item, in order.
pub(super) type SendBatch<I, O> =
    Arc<dyn Fn(Vec<I>) -> BoxFuture<'static, Vec<Result<O>>> + Send + Sync>;

struct Pending<I, O> {
    item: I,
    size: u64,
    answer: oneshot::Sender<Result<O>>,
}

struct State<I, O> {
    queue: VecDeque<Pending<I, O>>,
    in_flight: usize,
}

/// See the module documentation.
pub(super) struct Coalescer<I, O> {
    state: Mutex<State<I, O>>,
    send: SendBatch<I, O>,
}

impl<I: Send + 'static, O: Send + 'static> Coalescer<I, O> {
    pub(super) fn new(send: SendBatch<I, O>) -> Arc<Self> {
        Arc::new(Coalescer {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                in_flight: 0,
            }),
            send,
        })
    }

    /// Sends `item` (of `size` bytes) in a batch of at most `limit` bytes.
    pub(super) async fn call(self: &Arc<Self>, item: I, size: u64, limit: u64) -> Result<O> {
        let (answer, answered) = oneshot::channel();
        let start = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.queue.push_back(Pending { item, size, answer });
            let start = st.in_flight < MAX_IN_FLIGHT;
            if start {
                st.in_flight += 1;
            }
            start
        };
        if start {
            tokio::spawn(self.clone().drive(limit));
        }
        answered
            .await
            .unwrap_or_else(|_| Err(Error::internal("the batch of this blob was dropped")))
    }

    /// Sends batches until the queue is empty.
    async fn drive(self: Arc<Self>, limit: u64) {
        while let Some(batch) = self.next_batch(limit) {
            let (items, answers): (Vec<I>, Vec<_>) =
                batch.into_iter().map(|p| (p.item, p.answer)).unzip();
            let results = (self.send)(items).await;
            for (answer, result) in answers.into_iter().zip(results) {
                let _ = answer.send(result);
            }
        }
    }

    /// The next batch, or `None` (and one fewer in flight) when nothing waits.
    fn next_batch(&self, limit: u64) -> Option<Vec<Pending<I, O>>> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut batch = Vec::new();
        let mut total = 0u64;
        while let Some(p) = st.queue.front() {
            let cost = p.size + PER_BLOB_OVERHEAD;
            if !batch.is_empty() && total + cost > limit {
                break;
            }
            let p = st.queue.pop_front().expect("front exists");
            // A caller that gave up (dropped its get) needs no answer.
            if p.answer.is_closed() {
                continue;
            }
            total += cost;
            batch.push(p);
        }
        if batch.is_empty() {
            st.in_flight -= 1;
            return None;
        }
        Some(batch)
    }

    /// Batches on the wire now (for tests of the structure).
    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.state.lock().unwrap().in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A lone request is handed to the sender at once, alone: nothing is
    /// in flight, so it waits for no other.
    #[tokio::test]
    async fn lone_request_is_sent_immediately() {
        let sent = Arc::new(AtomicUsize::new(0));
        let s = sent.clone();
        let c: Arc<Coalescer<u32, u32>> = Coalescer::new(Arc::new(move |items: Vec<u32>| {
            s.fetch_add(1, Ordering::SeqCst);
            async move { items.into_iter().map(Ok).collect() }.boxed()
        }));
        let call = c.call(7, 10, 1000);
        futures::pin_mut!(call);
        assert!(futures::poll!(call.as_mut()).is_pending());
        // Queued and a batch started on the first poll: nothing waits for a window.
        assert_eq!(c.in_flight(), 1);
        assert_eq!(call.await.unwrap(), 7);
        assert_eq!(sent.load(Ordering::SeqCst), 1);
        tokio::task::yield_now().await;
        assert_eq!(c.in_flight(), 0);
    }

    /// While `MAX_IN_FLIGHT` batches are held on the wire, later requests
    /// queue and go together, split at the byte limit.
    #[tokio::test]
    async fn queued_requests_go_together_within_the_limit() {
        let (release, released) = tokio::sync::watch::channel(false);
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let s = sizes.clone();
        let c: Arc<Coalescer<u32, u32>> = Coalescer::new(Arc::new(move |items: Vec<u32>| {
            s.lock().unwrap().push(items.len());
            let mut released = released.clone();
            async move {
                let _ = released.wait_for(|r| *r).await;
                items.into_iter().map(Ok).collect()
            }
            .boxed()
        }));
        // Each item costs 100 + overhead; the limit holds 3 of them.
        let limit = 3 * (100 + PER_BLOB_OVERHEAD);
        let calls: Vec<_> = (0..MAX_IN_FLIGHT as u32 + 6)
            .map(|i| {
                let c = c.clone();
                tokio::spawn(async move { c.call(i, 100, limit).await })
            })
            .collect();
        while sizes.lock().unwrap().len() < MAX_IN_FLIGHT {
            tokio::task::yield_now().await;
        }
        release.send(true).unwrap();
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap().unwrap(), i as u32);
        }
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), MAX_IN_FLIGHT + 6);
        assert!(sizes.len() < MAX_IN_FLIGHT + 6, "{sizes:?}");
        assert!(sizes.iter().all(|&n| n <= 3), "{sizes:?}");
    }
}
