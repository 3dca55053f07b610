//! `existence_caching`: remembers which blobs the backend has.
//!
//! Build clients call FindMissingBlobs for every action's inputs, mostly
//! for blobs they asked about moments ago: it is the hottest call of a
//! build. Digests found present are remembered for `ttl`, and only the
//! others reach the backend. A get that comes back NOT_FOUND forgets the
//! digest at once, so the cache never keeps claiming a blob the backend lost.

use blob_access::config_types::Duration;
use blob_access::node::Counters;
use blob_access::{
    BlobAccess, BlobStream, BuildContext, BuildNode, ChildNodes, Digest, NodeMetrics, ReadRange,
    Result,
};
use futures::StreamExt;
use lru::LruCache;
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

/// Config node `existence_caching: {backend: <node>, ttl: 5m, max_entries: 1000000}`.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExistenceCachingConfig<N> {
    /// The node whose existence answers are cached.
    pub backend: Box<N>,
    /// How long a digest found present is trusted. Default 5m.
    #[serde(default = "default_ttl")]
    pub ttl: Duration,
    /// Digests remembered at most (about 100 bytes each); the least recently
    /// used are forgotten first. Default 1000000.
    #[serde(default = "default_max_entries")]
    pub max_entries: usize,
}

fn default_ttl() -> Duration {
    Duration::from_secs(300)
}
fn default_max_entries() -> usize {
    1_000_000
}

impl<N> ChildNodes<N> for ExistenceCachingConfig<N> {
    fn child_nodes(&self) -> Vec<(String, &N)> {
        vec![("backend".into(), &*self.backend)]
    }
}

impl<N: BuildNode> BuildNode for ExistenceCachingConfig<N> {
    fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn BlobAccess>> {
        let backend = self.backend.build(&ctx.child("backend"))?;
        let cache = ExistenceCaching::new(ctx.path(), backend, self.ttl.get(), self.max_entries);
        Ok(Arc::new(cache))
    }
}

const COUNTERS: &[&str] = &["hits", "misses", "not_found_evictions"];

/// See the module documentation.
pub struct ExistenceCaching {
    name: String,
    backend: Arc<dyn BlobAccess>,
    ttl: std::time::Duration,
    max_entries: usize,
    /// Digest -> when it was last found present.
    present: Arc<Mutex<LruCache<Digest, Instant>>>,
    counters: Arc<Counters>,
}

impl ExistenceCaching {
    pub fn new(
        name: &str,
        backend: Arc<dyn BlobAccess>,
        ttl: std::time::Duration,
        max_entries: usize,
    ) -> Self {
        ExistenceCaching {
            name: name.to_string(),
            backend,
            ttl,
            // Unbounded and trimmed by hand: a bounded LruCache would
            // allocate room for all `max_entries` up front.
            present: Arc::new(Mutex::new(LruCache::unbounded())),
            max_entries: max_entries.max(1),
            counters: Arc::new(Counters::new(COUNTERS)),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, LruCache<Digest, Instant>> {
        self.present.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mark_present<'a>(&self, digests: impl IntoIterator<Item = &'a Digest>) {
        let now = Instant::now();
        let mut cache = self.cache();
        for d in digests {
            cache.put(d.clone(), now);
            if cache.len() > self.max_entries {
                cache.pop_lru();
            }
        }
    }
}

#[async_trait::async_trait]
impl BlobAccess for ExistenceCaching {
    fn get(&self, digest: &Digest, range: ReadRange) -> BlobStream {
        let (present, counters, d) = (self.present.clone(), self.counters.clone(), digest.clone());
        self.backend
            .get(digest, range)
            .inspect(move |item| {
                if matches!(item, Err(e) if e.is_not_found()) {
                    let mut cache = present.lock().unwrap_or_else(|e| e.into_inner());
                    if cache.pop(&d).is_some() {
                        counters.inc("not_found_evictions");
                    }
                }
            })
            .boxed()
    }

    async fn put(&self, digest: &Digest, data: BlobStream) -> Result<()> {
        self.backend.put(digest, data).await?;
        self.mark_present([digest]);
        Ok(())
    }

    async fn put_reopenable(&self, digest: &Digest, open: blob_access::Reopen) -> Result<()> {
        self.backend.put_reopenable(digest, open).await?;
        self.mark_present([digest]);
        Ok(())
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let unknown: Vec<Digest> = {
            let mut cache = self.cache();
            let now = Instant::now();
            digests
                .iter()
                .filter(|d| match cache.get(*d) {
                    Some(seen) if now.duration_since(*seen) < self.ttl => false,
                    Some(_) => {
                        cache.pop(*d);
                        true
                    }
                    None => true,
                })
                .cloned()
                .collect()
        };
        self.counters
            .add("hits", (digests.len() - unknown.len()) as u64);
        self.counters.add("misses", unknown.len() as u64);
        if unknown.is_empty() {
            return Ok(Vec::new());
        }
        let missing = self.backend.find_missing(&unknown).await?;
        let missing_set: std::collections::HashSet<&Digest> = missing.iter().collect();
        self.mark_present(unknown.iter().filter(|d| !missing_set.contains(d)));
        Ok(missing)
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        out.push(self.counters.snapshot(&self.name, "existence_caching"));
        self.backend.metrics(out);
    }
}
