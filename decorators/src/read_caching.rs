//! `read_caching`: a fast tier (local disk, memory) in front of a slow one.
//!
//! Build clients read the same inputs over and over, from a remote CAS that
//! is far away. `get` reads `fast`; on a miss it streams from `slow` to the
//! caller while writing the same chunks into `fast` (no whole-blob buffer;
//! `fast` verifies before the copy becomes visible).
//!
//! Choices:
//! - Only full reads are cached; a ranged miss is read from `slow` as is.
//! - Writing into `fast` never fails the caller's read: a failed or slow-to-
//!   start fast tier is logged and counted. It does slow the caller down when
//!   it writes slower than `slow` delivers (bounded buffer, no unbounded memory).
//! - A read's stream ends once the copy into `fast` is stored (or failed),
//!   so a short-lived process (`blob-access get`) leaves the blob cached.
//! - A caller that stops reading aborts the copy: `fast` sees a short upload
//!   and keeps nothing.
//! - Concurrent misses of one blob fetch it from `slow` once: the others wait
//!   for that copy and read it from `fast` (or from `slow`, if it failed).
//! - Any error from `fast` before its first byte counts as a miss, so a
//!   corrupted small blob (which `disk` reports as NOT_FOUND before releasing
//!   anything) is refetched transparently. A failure after bytes were handed
//!   out ends that read; the next one refetches.
//! - `find_missing` asks `slow`, the authority. `put` goes to `slow`, and also
//!   to `fast` with `write_through: true`.
//! - In an action cache tree ([`ReadCachingActionCache`]), a result missing
//!   from `fast` is read from `slow` and copied into `fast`; updates go to
//!   `slow`, then to `fast` too, so that `fast` never keeps a result this
//!   node replaced.
//!
//! ```
//! use blob_access::{memory::MemoryBlobAccess, util, BlobAccess, Digest, ReadRange};
//! use blob_access_decorators::read_caching::ReadCaching;
//! use std::sync::Arc;
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let fast = Arc::new(MemoryBlobAccess::new("fast", 1 << 20));
//! let slow = Arc::new(MemoryBlobAccess::new("slow", 1 << 20));
//! let digest = Digest::of(b"input");
//! slow.put(&digest, util::once("input".into())).await.unwrap();
//! let cache = ReadCaching::new("read_caching", fast.clone(), slow);
//! util::read_to_bytes(&cache, &digest, ReadRange::FULL, 1024).await.unwrap();
//! // The read left a copy in the fast tier.
//! assert!(fast.find_missing(&[digest]).await.unwrap().is_empty());
//! # });
//! ```

use blob_access::action_cache::{ActionCache, ActionResult};
use blob_access::node::Counters;
use blob_access::{
    BlobAccess, BlobStream, BuildContext, BuildNode, ChildNodes, Digest, NodeMetrics, ReadRange,
    Result,
};
use bytes::Bytes;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Config node `read_caching: {fast: <node>, slow: <node>, write_through: false}`.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadCachingConfig<N> {
    /// Where blobs are read first and copied to (e.g. `disk`).
    pub fast: Box<N>,
    /// The authority, read on a miss (e.g. a remote `resumable_grpc`).
    pub slow: Box<N>,
    /// Also write uploads into `fast`. Default false.
    #[serde(default)]
    pub write_through: bool,
}

impl<N: BuildNode> BuildNode for ReadCachingConfig<N> {
    fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn BlobAccess>> {
        let fast = self.fast.build(&ctx.child("fast"))?;
        let slow = self.slow.build(&ctx.child("slow"))?;
        let cache = ReadCaching::new(ctx.path(), fast, slow).write_through(self.write_through);
        Ok(Arc::new(cache))
    }

    fn build_action_cache(&self, ctx: &BuildContext) -> Result<Arc<dyn ActionCache>> {
        let fast = self.fast.build_action_cache(&ctx.child("fast"))?;
        let slow = self.slow.build_action_cache(&ctx.child("slow"))?;
        Ok(Arc::new(ReadCachingActionCache::new(
            ctx.path(),
            fast,
            slow,
        )))
    }
}

impl<N> ChildNodes<N> for ReadCachingConfig<N> {
    fn child_nodes(&self) -> Vec<(String, &N)> {
        vec![("fast".into(), &*self.fast), ("slow".into(), &*self.slow)]
    }
}

const COUNTERS: &[&str] = &[
    "hits",
    "misses",
    "coalesced",
    "fast_errors",
    "fast_put_failures",
];

/// Chunks buffered between the caller's stream and the write into `fast`.
const TEE_DEPTH: usize = 16;

/// See the module documentation.
pub struct ReadCaching {
    shared: Arc<Shared>,
    write_through: bool,
}

struct Shared {
    name: String,
    fast: Arc<dyn BlobAccess>,
    slow: Arc<dyn BlobAccess>,
    /// Blobs being copied into `fast`; receivers learn whether the copy landed.
    in_flight: Mutex<HashMap<Digest, watch::Receiver<Option<bool>>>>,
    counters: Counters,
}

enum Role {
    Leader(watch::Sender<Option<bool>>),
    Follower(watch::Receiver<Option<bool>>),
}

impl ReadCaching {
    pub fn new(name: &str, fast: Arc<dyn BlobAccess>, slow: Arc<dyn BlobAccess>) -> Self {
        ReadCaching {
            shared: Arc::new(Shared {
                name: name.to_string(),
                fast,
                slow,
                in_flight: Mutex::new(HashMap::new()),
                counters: Counters::new(COUNTERS),
            }),
            write_through: false,
        }
    }

    /// Also write uploads into `fast`.
    pub fn write_through(mut self, on: bool) -> Self {
        self.write_through = on;
        self
    }
}

impl Shared {
    /// The fast tier's stream if it yields a first byte (or a clean end).
    async fn try_fast(&self, digest: &Digest, range: ReadRange) -> Option<BlobStream> {
        let mut s = self.fast.get(digest, range);
        match s.next().await {
            None => Some(futures::stream::empty().boxed()),
            Some(Ok(first)) => Some(futures::stream::once(async { Ok(first) }).chain(s).boxed()),
            Some(Err(e)) => {
                if !e.is_not_found() {
                    self.counters.inc("fast_errors");
                    tracing::warn!(node = %self.name, digest = %digest, error = %e, "fast tier failed a read; reading slow");
                }
                None
            }
        }
    }

    async fn get(self: Arc<Self>, digest: Digest, range: ReadRange) -> BlobStream {
        if let Some(hit) = self.try_fast(&digest, range).await {
            self.counters.inc("hits");
            return hit;
        }
        self.counters.inc("misses");
        if !range.is_full() {
            return self.slow.get(&digest, range);
        }
        let role = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            match in_flight.get(&digest) {
                Some(rx) => Role::Follower(rx.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    in_flight.insert(digest.clone(), rx);
                    Role::Leader(tx)
                }
            }
        };
        match role {
            Role::Follower(mut rx) => {
                let landed = matches!(
                    rx.wait_for(Option::is_some).await.as_deref(),
                    Ok(Some(true))
                );
                if landed {
                    if let Some(hit) = self.try_fast(&digest, range).await {
                        self.counters.inc("coalesced");
                        return hit;
                    }
                }
                self.slow.get(&digest, range)
            }
            Role::Leader(tx) => {
                let data = self.slow.get(&digest, range);
                let this = self.clone();
                let key = digest.clone();
                tee_into_fast(&self, &digest, data, move |landed| {
                    let mut in_flight = this.in_flight.lock().unwrap_or_else(|p| p.into_inner());
                    in_flight.remove(&key);
                    let _ = tx.send(Some(landed));
                })
            }
        }
    }
}

/// Passes `data` through while a background task puts the same chunks into
/// `fast`; `done(stored)` is called when that put ends.
fn tee_into_fast(
    shared: &Arc<Shared>,
    digest: &Digest,
    data: BlobStream,
    done: impl FnOnce(bool) + Send + 'static,
) -> BlobStream {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes>>(TEE_DEPTH);
    // Whether the reader stopped before the end: then `fast` fails on a
    // short upload, which is expected and not the fast tier's fault.
    let abandoned = Arc::new(AtomicBool::new(false));
    let put = {
        let (shared, digest, abandoned) = (shared.clone(), digest.clone(), abandoned.clone());
        let copy = tokio_stream::wrappers::ReceiverStream::new(rx).boxed();
        tokio::spawn(async move {
            let result = shared.fast.put(&digest, copy).await;
            match &result {
                Err(e) if abandoned.load(Ordering::Acquire) => {
                    tracing::debug!(node = %shared.name, digest = %digest, error = %e, "read ended early; not cached");
                }
                Err(e) => {
                    shared.counters.inc("fast_put_failures");
                    tracing::warn!(node = %shared.name, digest = %digest, error = %e, "could not copy a blob into the fast tier");
                }
                Ok(()) => {}
            }
            done(result.is_ok());
        })
    };
    let copy = Copy {
        tx: Some(tx),
        abandoned,
        complete: false,
        put: Some(put),
    };
    futures::stream::unfold((data, copy), |(mut data, mut copy)| async move {
        let Some(item) = data.next().await else {
            copy.finish().await;
            return None;
        };
        if let Some(sender) = &copy.tx {
            // A closed channel means the fast tier gave up: keep serving.
            if sender.send(item.clone()).await.is_err() || item.is_err() {
                copy.tx = None;
            }
        }
        Some((item, (data, copy)))
    })
    .boxed()
}

/// The sending end of a copy into `fast`.
struct Copy {
    tx: Option<tokio::sync::mpsc::Sender<Result<Bytes>>>,
    abandoned: Arc<AtomicBool>,
    complete: bool,
    /// The task putting the copy into `fast` (dropping the handle does not stop it).
    put: Option<tokio::task::JoinHandle<()>>,
}

impl Copy {
    /// Closes the copy and waits until `fast` has stored (or rejected) it,
    /// so that when a read ends the blob is in `fast`: a CLI `get` that exits
    /// right after still leaves it cached.
    async fn finish(&mut self) {
        self.complete = true;
        self.tx = None;
        if let Some(put) = self.put.take() {
            let _ = put.await;
        }
    }
}

impl Drop for Copy {
    fn drop(&mut self) {
        // Runs before the fields are dropped: the flag is set before `tx`
        // closes the channel, so `fast` never sees the end of an abandoned
        // copy before the flag.
        if !self.complete {
            self.abandoned.store(true, Ordering::Release);
        }
    }
}

#[async_trait::async_trait]
impl BlobAccess for ReadCaching {
    fn get(&self, digest: &Digest, range: ReadRange) -> BlobStream {
        let shared = self.shared.clone();
        futures::stream::once(shared.get(digest.clone(), range))
            .flatten()
            .boxed()
    }

    async fn put(&self, digest: &Digest, data: BlobStream) -> Result<()> {
        let data = if self.write_through {
            tee_into_fast(&self.shared, digest, data, |_| {})
        } else {
            data
        };
        self.shared.slow.put(digest, data).await
    }

    async fn put_reopenable(&self, digest: &Digest, open: blob_access::Reopen) -> Result<()> {
        if self.write_through {
            // The copy into `fast` is made as the bytes pass: once.
            return self.put(digest, open()).await;
        }
        self.shared.slow.put_reopenable(digest, open).await
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.shared.slow.find_missing(digests).await
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        let s = &self.shared;
        out.push(s.counters.snapshot(&s.name, "read_caching"));
        s.fast.metrics(out);
        s.slow.metrics(out);
    }
}

/// `read_caching` in an action cache tree; see the module documentation.
pub struct ReadCachingActionCache {
    name: String,
    fast: Arc<dyn ActionCache>,
    slow: Arc<dyn ActionCache>,
    counters: Counters,
}

impl ReadCachingActionCache {
    pub fn new(name: &str, fast: Arc<dyn ActionCache>, slow: Arc<dyn ActionCache>) -> Self {
        ReadCachingActionCache {
            name: name.to_string(),
            fast,
            slow,
            counters: Counters::new(COUNTERS),
        }
    }

    async fn copy_to_fast(&self, action: &Digest, result: &ActionResult) {
        if let Err(e) = self.fast.update_action_result(action, result).await {
            self.counters.inc("fast_put_failures");
            tracing::warn!(node = %self.name, %action, error = %e, "copying an action result into the fast tier failed");
        }
    }
}

#[async_trait::async_trait]
impl ActionCache for ReadCachingActionCache {
    async fn get_action_result(&self, action: &Digest) -> Result<ActionResult> {
        match self.fast.get_action_result(action).await {
            Ok(result) => {
                self.counters.inc("hits");
                return Ok(result);
            }
            Err(e) if e.code() != blob_access::Code::NotFound => {
                self.counters.inc("fast_errors");
                tracing::warn!(node = %self.name, %action, error = %e, "fast tier failed; reading the slow one");
            }
            Err(_) => {}
        }
        self.counters.inc("misses");
        let result = self.slow.get_action_result(action).await?;
        self.copy_to_fast(action, &result).await;
        Ok(result)
    }

    async fn update_action_result(&self, action: &Digest, result: &ActionResult) -> Result<()> {
        self.slow.update_action_result(action, result).await?;
        self.copy_to_fast(action, result).await;
        Ok(())
    }

    async fn update_enabled(&self) -> bool {
        self.slow.update_enabled().await
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        out.push(self.counters.snapshot(&self.name, "read_caching"));
        self.fast.metrics(out);
        self.slow.metrics(out);
    }
}
