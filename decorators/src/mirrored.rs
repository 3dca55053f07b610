//! `mirrored`: two copies of every blob, on two backends.
//!
//! A storage server that dies (or is replaced with an empty one) must not
//! fail builds nor lose their outputs: every blob is kept on both sides, a
//! read is served by either, and a side that came back empty is refilled
//! from the other as clients ask for blobs.
//!
//! Choices:
//! - `put` streams the upload to both sides at once (no whole-blob buffer)
//!   and succeeds only when both stored it: a client is never told a blob is
//!   safe while it has one copy. The failure names the side that failed.
//! - `get` starts at one side, alternating, and falls back to the other when
//!   the first fails or lacks the blob before its first byte (a failure after
//!   bytes were handed out ends the read).
//! - A blob found on one side only is copied to the other in the background:
//!   a streamed get from one side into a put on the other, which verifies it.
//!   At most `max_concurrent_repairs` copies run at once and at most
//!   `max_pending_repairs` wait; beyond that a repair is dropped (counted),
//!   as the next read or `find_missing` of the blob queues it again. Copies
//!   still running when the node is dropped are aborted.
//! - `find_missing` asks both sides in parallel; a blob is missing only if
//!   both lack it, and one side lacking it is repaired. With one side down
//!   the other's answer is used (counted as `side_failures`), so that builds
//!   go on reading.
//! - In an action cache tree ([`MirroredActionCache`]) updates go to both;
//!   a result found on one side only is copied to the other before it is
//!   returned (results are small).

use blob_access::action_cache::{ActionCache, ActionResult};
use blob_access::node::Counters;
use blob_access::{
    util, BlobAccess, BlobStream, BuildContext, BuildNode, ChildNodes, Digest, Error, NodeMetrics,
    ReadRange, Result,
};
use futures::StreamExt;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Config node `mirrored: {backend_a: <node>, backend_b: <node>}`.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MirroredConfig<N> {
    /// One side.
    pub backend_a: Box<N>,
    /// The other side.
    pub backend_b: Box<N>,
    /// Background copies to the side that lacks a blob running at once. Default 8.
    #[serde(default = "default_concurrent")]
    pub max_concurrent_repairs: std::num::NonZeroUsize,
    /// Copies waiting for their turn; beyond, repairs are dropped (and asked
    /// again by the next read). Default 10000.
    #[serde(default = "default_pending")]
    pub max_pending_repairs: usize,
}

fn default_concurrent() -> std::num::NonZeroUsize {
    std::num::NonZeroUsize::new(8).expect("not zero")
}
fn default_pending() -> usize {
    10_000
}

impl<N> ChildNodes<N> for MirroredConfig<N> {
    fn child_nodes(&self) -> Vec<(String, &N)> {
        vec![
            ("backend_a".into(), &*self.backend_a),
            ("backend_b".into(), &*self.backend_b),
        ]
    }
}

impl<N: BuildNode> BuildNode for MirroredConfig<N> {
    fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn BlobAccess>> {
        let (ca, cb) = (ctx.child("backend_a"), ctx.child("backend_b"));
        let a = Side::new(self.backend_a.build(&ca)?, &ca);
        let b = Side::new(self.backend_b.build(&cb)?, &cb);
        let node = Mirrored::with_repair_limits(
            ctx.path(),
            a,
            b,
            self.max_concurrent_repairs.get(),
            self.max_pending_repairs,
        );
        Ok(Arc::new(node))
    }

    fn build_action_cache(&self, ctx: &BuildContext) -> Result<Arc<dyn ActionCache>> {
        let (ca, cb) = (ctx.child("backend_a"), ctx.child("backend_b"));
        let a = Side::new(self.backend_a.build_action_cache(&ca)?, &ca);
        let b = Side::new(self.backend_b.build_action_cache(&cb)?, &cb);
        Ok(Arc::new(MirroredActionCache::new(ctx.path(), a, b)))
    }
}

/// One side of a mirror: its backend and its path in the tree (named in errors).
pub struct Side<B: ?Sized> {
    pub backend: Arc<B>,
    pub path: String,
}

impl<B: ?Sized> Side<B> {
    pub fn new(backend: Arc<B>, ctx: &BuildContext) -> Self {
        Side::named(backend, ctx.path())
    }
    pub fn named(backend: Arc<B>, path: &str) -> Self {
        Side {
            backend,
            path: path.to_string(),
        }
    }
}

const COUNTERS: &[&str] = &[
    "fallbacks",
    "repairs_queued",
    "repairs_done",
    "repairs_failed",
    "repairs_dropped",
    "side_failures",
];

/// Chunks buffered between the caller's upload and each side's put.
const PUT_DEPTH: usize = 8;

/// See the module documentation.
pub struct Mirrored {
    shared: Arc<Shared>,
}

struct Shared {
    name: String,
    sides: [Side<dyn BlobAccess>; 2],
    next: AtomicUsize,
    counters: Counters,
    permits: Arc<Semaphore>,
    max_pending: usize,
    repairs: Mutex<Repairs>,
}

#[derive(Default)]
struct Repairs {
    /// (side copied to, blob) of the copies queued or running.
    pending: HashSet<(usize, Digest)>,
    tasks: JoinSet<()>,
}

impl Mirrored {
    /// A mirror with the default repair bounds (8 at once, 10000 queued).
    pub fn new(name: &str, a: Side<dyn BlobAccess>, b: Side<dyn BlobAccess>) -> Self {
        Self::with_repair_limits(name, a, b, default_concurrent().get(), default_pending())
    }

    /// A mirror running at most `concurrent` background copies at once (at
    /// least 1) with at most `pending` queued.
    pub fn with_repair_limits(
        name: &str,
        a: Side<dyn BlobAccess>,
        b: Side<dyn BlobAccess>,
        concurrent: usize,
        pending: usize,
    ) -> Self {
        Mirrored {
            shared: Arc::new(Shared {
                name: name.to_string(),
                sides: [a, b],
                next: AtomicUsize::new(0),
                counters: Counters::new(COUNTERS),
                permits: Arc::new(Semaphore::new(concurrent.max(1))),
                max_pending: pending,
                repairs: Mutex::default(),
            }),
        }
    }

    /// Background copies queued or running.
    pub fn repairs_in_flight(&self) -> usize {
        self.shared.lock_repairs().pending.len()
    }

    /// Waits until no background copy is queued or running (for tests and
    /// short-lived processes).
    pub async fn repairs_idle(&self) {
        while self.repairs_in_flight() > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Mirrored {
    fn drop(&mut self) {
        self.shared.lock_repairs().tasks.abort_all();
    }
}

impl Shared {
    fn lock_repairs(&self) -> std::sync::MutexGuard<'_, Repairs> {
        self.repairs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a copy of `digest` from side `from` to the other one.
    fn repair(self: &Arc<Self>, digest: &Digest, from: usize) {
        let to = 1 - from;
        let mut repairs = self.lock_repairs();
        while repairs.tasks.try_join_next().is_some() {}
        let key = (to, digest.clone());
        if repairs.pending.contains(&key) {
            return;
        }
        if repairs.pending.len() >= self.max_pending {
            self.counters.inc("repairs_dropped");
            return;
        }
        repairs.pending.insert(key.clone());
        self.counters.inc("repairs_queued");
        let shared = self.clone();
        repairs.tasks.spawn(async move {
            let result = match shared.permits.clone().acquire_owned().await {
                Ok(_permit) => {
                    let (src, dst) = (&shared.sides[from], &shared.sides[to]);
                    let data = src.backend.get(&key.1, ReadRange::FULL);
                    dst.backend.put(&key.1, data).await
                }
                Err(_) => Err(Error::internal("repair queue closed")),
            };
            match result {
                Ok(()) => shared.counters.inc("repairs_done"),
                Err(e) => {
                    shared.counters.inc("repairs_failed");
                    tracing::warn!(node = %shared.name, digest = %key.1, to = %shared.sides[to].path, error = %e, "could not copy a blob to the side that lacked it");
                }
            }
            shared.lock_repairs().pending.remove(&key);
        });
    }

    async fn get(self: Arc<Self>, digest: Digest, range: ReadRange) -> BlobStream {
        let first = self.next.fetch_add(1, Ordering::Relaxed) % 2;
        let e = match start(&self.sides[first], &digest, range).await {
            Ok(s) => return s,
            Err(e) => e,
        };
        self.counters.inc("fallbacks");
        if !e.is_not_found() {
            tracing::warn!(node = %self.name, %digest, error = %e, "one side failed a read; reading the other");
        }
        let other = 1 - first;
        match start(&self.sides[other], &digest, range).await {
            Ok(s) => {
                if e.is_not_found() {
                    self.repair(&digest, other);
                }
                s
            }
            // Missing only if both lack it; otherwise the failure says more.
            Err(e2) if e2.is_not_found() && !e.is_not_found() => util::failed(e),
            Err(e2) => util::failed(e2),
        }
    }
}

/// A side's stream if it yields a first byte (or a clean end), else its error.
async fn start(
    side: &Side<dyn BlobAccess>,
    digest: &Digest,
    range: ReadRange,
) -> Result<BlobStream> {
    let mut s = side.backend.get(digest, range);
    match s.next().await {
        None => Ok(futures::stream::empty().boxed()),
        Some(Ok(first)) => Ok(futures::stream::once(async { Ok(first) }).chain(s).boxed()),
        Some(Err(e)) => Err(e.with_backend(&side.path).with_digest(digest)),
    }
}

#[async_trait::async_trait]
impl BlobAccess for Mirrored {
    fn get(&self, digest: &Digest, range: ReadRange) -> BlobStream {
        let shared = self.shared.clone();
        futures::stream::once(shared.get(digest.clone(), range))
            .flatten()
            .boxed()
    }

    async fn put(&self, digest: &Digest, mut data: BlobStream) -> Result<()> {
        let [a, b] = &self.shared.sides;
        let (tx_a, rx_a) = tokio::sync::mpsc::channel(PUT_DEPTH);
        let (tx_b, rx_b) = tokio::sync::mpsc::channel(PUT_DEPTH);
        // Hands each chunk to both puts; a side whose put ended (failed)
        // stops receiving, the other goes on.
        let pump = async move {
            let mut senders = [Some(tx_a), Some(tx_b)];
            while let Some(item) = data.next().await {
                let failed = item.is_err();
                for slot in &mut senders {
                    if let Some(tx) = slot {
                        if tx.send(item.clone()).await.is_err() {
                            *slot = None;
                        }
                    }
                }
                if failed || senders.iter().all(Option::is_none) {
                    break;
                }
            }
        };
        let stream = |rx| tokio_stream::wrappers::ReceiverStream::new(rx).boxed();
        let ((), ra, rb) = tokio::join!(
            pump,
            a.backend.put(digest, stream(rx_a)),
            b.backend.put(digest, stream(rx_b))
        );
        let name =
            |e: Error, side: &Side<dyn BlobAccess>| e.with_backend(&side.path).with_digest(digest);
        match (ra, rb) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(e), Ok(())) => Err(name(e, a)),
            (Ok(()), Err(e)) => Err(name(e, b)),
            (Err(ea), Err(eb)) => {
                tracing::debug!(node = %self.shared.name, %digest, error = %eb, "the other side failed the write too");
                Err(name(ea, a))
            }
        }
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let s = &self.shared;
        let [a, b] = &s.sides;
        let (ra, rb) = futures::join!(
            a.backend.find_missing(digests),
            b.backend.find_missing(digests)
        );
        match (ra, rb) {
            (Ok(ma), Ok(mb)) => {
                let (sa, sb): (HashSet<&Digest>, HashSet<&Digest>) =
                    (ma.iter().collect(), mb.iter().collect());
                for d in sa.difference(&sb) {
                    s.repair(d, 1);
                }
                for d in sb.difference(&sa) {
                    s.repair(d, 0);
                }
                Ok(ma.iter().filter(|d| sb.contains(d)).cloned().collect())
            }
            (Ok(m), Err(e)) | (Err(e), Ok(m)) => {
                s.counters.inc("side_failures");
                tracing::warn!(node = %s.name, error = %e, "one side failed find_missing; answering from the other");
                Ok(m)
            }
            (Err(e), Err(_)) => Err(e.with_backend(&a.path)),
        }
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        let s = &self.shared;
        out.push(s.counters.snapshot(&s.name, "mirrored"));
        s.sides[0].backend.metrics(out);
        s.sides[1].backend.metrics(out);
    }
}

/// `mirrored` in an action cache tree; see the module documentation.
pub struct MirroredActionCache {
    name: String,
    sides: [Side<dyn ActionCache>; 2],
    next: AtomicUsize,
    counters: Counters,
}

impl MirroredActionCache {
    pub fn new(name: &str, a: Side<dyn ActionCache>, b: Side<dyn ActionCache>) -> Self {
        MirroredActionCache {
            name: name.to_string(),
            sides: [a, b],
            next: AtomicUsize::new(0),
            counters: Counters::new(COUNTERS),
        }
    }

    async fn get_from(&self, side: usize, action: &Digest) -> Result<ActionResult> {
        let side = &self.sides[side];
        let r = side.backend.get_action_result(action).await;
        r.map_err(|e| e.with_backend(&side.path).with_digest(action))
    }
}

#[async_trait::async_trait]
impl ActionCache for MirroredActionCache {
    async fn get_action_result(&self, action: &Digest) -> Result<ActionResult> {
        let first = self.next.fetch_add(1, Ordering::Relaxed) % 2;
        let e = match self.get_from(first, action).await {
            Ok(r) => return Ok(r),
            Err(e) => e,
        };
        self.counters.inc("fallbacks");
        match self.get_from(1 - first, action).await {
            Ok(result) => {
                if e.is_not_found() {
                    self.counters.inc("repairs_queued");
                    let side = &self.sides[first];
                    match side.backend.update_action_result(action, &result).await {
                        Ok(()) => self.counters.inc("repairs_done"),
                        Err(e) => {
                            self.counters.inc("repairs_failed");
                            tracing::warn!(node = %self.name, %action, to = %side.path, error = %e, "could not copy an action result to the side that lacked it");
                        }
                    }
                }
                Ok(result)
            }
            Err(e2) if e2.is_not_found() && !e.is_not_found() => Err(e),
            Err(e2) => Err(e2),
        }
    }

    async fn update_action_result(&self, action: &Digest, result: &ActionResult) -> Result<()> {
        let [a, b] = &self.sides;
        let (ra, rb) = futures::join!(
            a.backend.update_action_result(action, result),
            b.backend.update_action_result(action, result)
        );
        let named = |r: Result<()>, side: &Side<dyn ActionCache>| {
            r.map_err(|e| e.with_backend(&side.path).with_digest(action))
        };
        named(ra, a)?;
        named(rb, b)
    }

    async fn update_enabled(&self) -> bool {
        let [a, b] = &self.sides;
        let (ea, eb) = futures::join!(a.backend.update_enabled(), b.backend.update_enabled());
        ea && eb
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        out.push(self.counters.snapshot(&self.name, "mirrored"));
        self.sides[0].backend.metrics(out);
        self.sides[1].backend.metrics(out);
    }
}
