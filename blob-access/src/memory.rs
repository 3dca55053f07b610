//! An in-memory CAS bounded by total size with least-recently-used eviction:
//! the embedded default of `serve`, a fast tier for tests, and a scratch cache.

use crate::action_cache::ActionCache;
pub use crate::action_cache::MemoryActionCache;
use crate::config_types::ByteSize;
use crate::node::Counters;
use crate::util::{chunked, failed, CHUNK_SIZE};
use crate::verify::verify;
use crate::{
    BlobAccess, BlobStream, BuildContext, BuildNode, Digest, Error, NodeMetrics, ReadRange, Result,
};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use lru::LruCache;
use std::sync::{Arc, Mutex};

/// Config node `memory: {max_size_bytes: 1GiB}`.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Total size of the blobs kept; the least recently used are evicted beyond it.
    pub max_size_bytes: ByteSize,
}

impl<N> crate::ChildNodes<N> for MemoryConfig {}

impl BuildNode for MemoryConfig {
    fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn BlobAccess>> {
        Ok(Arc::new(MemoryBlobAccess::new(
            ctx.path(),
            self.max_size_bytes.bytes(),
        )))
    }

    fn build_action_cache(&self, ctx: &BuildContext) -> Result<Arc<dyn ActionCache>> {
        Ok(Arc::new(MemoryActionCache::new(
            ctx.path(),
            self.max_size_bytes.bytes(),
        )))
    }
}

/// Values by digest in recency order, with their total cost; shared with the
/// in-memory action cache, whose small entries also cost their key and node.
pub(crate) struct Store {
    pub(crate) blobs: LruCache<Digest, Bytes>,
    pub(crate) size: u64,
    /// Bytes counted per entry beyond its value.
    overhead: u64,
}

impl Store {
    pub(crate) fn new(overhead: u64) -> Self {
        Store {
            blobs: LruCache::unbounded(),
            size: 0,
            overhead,
        }
    }

    /// What `data` costs stored.
    pub(crate) fn cost(&self, data: &Bytes) -> u64 {
        data.len() as u64 + self.overhead
    }

    /// Stores `data` under `key`, then evicts the least recently used values
    /// beyond `max_size`; returns how many were evicted.
    pub(crate) fn insert(&mut self, key: Digest, data: Bytes, max_size: u64) -> u64 {
        self.size += self.cost(&data);
        if let Some(old) = self.blobs.put(key, data) {
            self.size -= self.cost(&old);
        }
        let mut evicted = 0;
        while self.size > max_size {
            match self.blobs.pop_lru() {
                Some((_, old)) => {
                    self.size -= self.cost(&old);
                    evicted += 1;
                }
                None => break,
            }
        }
        evicted
    }
}

/// See the module documentation.
pub struct MemoryBlobAccess {
    name: String,
    max_size: u64,
    store: Arc<Mutex<Store>>,
    counters: Counters,
}

const COUNTERS: &[&str] = &["gets", "puts", "evictions", "bytes_read", "bytes_written"];

impl MemoryBlobAccess {
    /// `name` identifies this backend in errors and metrics.
    pub fn new(name: &str, max_size_bytes: u64) -> Self {
        MemoryBlobAccess {
            name: if name.is_empty() {
                "memory".into()
            } else {
                name.into()
            },
            max_size: max_size_bytes,
            store: Arc::new(Mutex::new(Store::new(0))),
            counters: Counters::new(COUNTERS),
        }
    }

    fn lookup(&self, digest: &Digest) -> Option<Bytes> {
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        // Content is the same whatever the instance: one copy serves them all.
        store.blobs.get(&digest.without_instance_name()).cloned()
    }

    /// Total bytes currently stored.
    pub fn size_bytes(&self) -> u64 {
        self.store.lock().unwrap_or_else(|p| p.into_inner()).size
    }
}

#[async_trait::async_trait]
impl BlobAccess for MemoryBlobAccess {
    fn get(&self, digest: &Digest, range: ReadRange) -> BlobStream {
        self.counters.inc("gets");
        let Some(data) = self.lookup(digest) else {
            let e = Error::not_found("blob not found")
                .with_backend(&self.name)
                .with_digest(digest);
            return failed(e);
        };
        let len = match range.len_in(data.len() as u64) {
            Ok(len) => len,
            Err(e) => {
                let e = e.with_backend(&self.name).with_digest(digest);
                return failed(e);
            }
        };
        self.counters.add("bytes_read", len);
        let start = range.offset as usize;
        // Stored blobs were verified on put; chunks are zero-copy slices.
        chunked(data.slice(start..start + len as usize), 4 * CHUNK_SIZE)
    }

    async fn put(&self, digest: &Digest, data: BlobStream) -> Result<()> {
        self.counters.inc("puts");
        let size = digest.size_bytes();
        if size > self.max_size {
            return Err(Error::resource_exhausted(format!(
                "blob is larger than this memory backend's {} byte limit",
                self.max_size
            ))
            .with_backend(&self.name)
            .with_digest(digest));
        }
        if self.lookup(digest).is_some() {
            // Already stored; still drain and check the upload so a bad one is reported.
            let mut s = verify(digest, ReadRange::FULL, &self.name, data);
            while let Some(c) = s.next().await {
                c?;
            }
            return Ok(());
        }
        // Memory follows the bytes that arrive, never the size a client
        // claims: an upload naming 40 GiB that sends one byte reserves nothing.
        let mut chunks = Vec::new();
        let mut s = verify(digest, ReadRange::FULL, &self.name, data);
        while let Some(c) = s.next().await {
            chunks.push(c?);
        }
        let blob = match <[Bytes; 1]>::try_from(chunks) {
            Ok([one]) => one,
            Err(chunks) => {
                let mut buf = BytesMut::with_capacity(size as usize);
                chunks.iter().for_each(|c| buf.extend_from_slice(c));
                buf.freeze()
            }
        };
        self.counters.add("bytes_written", size);
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let evicted = store.insert(digest.without_instance_name(), blob, self.max_size);
        self.counters.add("evictions", evicted);
        Ok(())
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        // `get` refreshes recency: a blob a build asks about is likely to be read.
        Ok(digests
            .iter()
            .filter(|d| store.blobs.get(&d.without_instance_name()).is_none())
            .cloned()
            .collect())
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        out.push(self.counters.snapshot(&self.name, "memory"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::{once, read_to_bytes};
    use crate::Code;

    async fn put(m: &MemoryBlobAccess, data: &'static [u8]) -> Digest {
        let d = Digest::of(data);
        m.put(&d, once(Bytes::from_static(data))).await.unwrap();
        d
    }

    #[tokio::test]
    async fn round_trip_and_missing() {
        let m = MemoryBlobAccess::new("m", 100);
        let a = put(&m, b"aaa").await;
        let b = Digest::of(b"b");
        assert_eq!(
            m.find_missing(&[a.clone(), b.clone()]).await.unwrap(),
            vec![b.clone()]
        );
        assert_eq!(
            &read_to_bytes(&m, &a, ReadRange::FULL, 10).await.unwrap()[..],
            b"aaa"
        );
        let err = read_to_bytes(&m, &b, ReadRange::FULL, 10)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        assert!(err.to_string().contains("\"m\"") && err.to_string().contains(b.hash()));
    }

    #[tokio::test]
    async fn rejects_bad_upload_and_keeps_nothing() {
        let m = MemoryBlobAccess::new("m", 100);
        let d = Digest::of(b"good");
        let err = m
            .put(&d, once(Bytes::from_static(b"evil")))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::DataLoss);
        assert_eq!(
            m.find_missing(std::slice::from_ref(&d)).await.unwrap(),
            vec![d]
        );
    }

    #[tokio::test]
    async fn a_claimed_size_reserves_no_memory() {
        // A client naming a 1 TiB blob and sending one byte: reserving the
        // claimed size up front aborts the process.
        let m = MemoryBlobAccess::new("m", 2 << 40);
        let hash = "ab".repeat(32);
        let d = Digest::new(crate::DigestFunction::Sha256, hash, 1 << 40).unwrap();
        let err = m.put(&d, once(Bytes::from_static(b"x"))).await.unwrap_err();
        assert_eq!(err.code(), Code::DataLoss, "{err}");
        assert_eq!(m.size_bytes(), 0);
    }

    #[tokio::test]
    async fn a_blob_sent_in_pieces_is_stored_whole() {
        let m = MemoryBlobAccess::new("m", 100);
        let d = Digest::of(b"in three pieces");
        let pieces = [&b"in "[..], b"three", b" pieces"].map(Bytes::from_static);
        let data = futures::stream::iter(pieces.map(Ok)).boxed();
        m.put(&d, data).await.unwrap();
        let got = read_to_bytes(&m, &d, ReadRange::FULL, 100).await.unwrap();
        assert_eq!(&got[..], b"in three pieces");
    }

    #[tokio::test]
    async fn evicts_least_recently_used() {
        let m = MemoryBlobAccess::new("m", 10);
        let a = put(&m, b"aaaa").await;
        let b = put(&m, b"bbbb").await;
        // Touch `a` so that `b` is the least recently used.
        assert!(m
            .find_missing(std::slice::from_ref(&a))
            .await
            .unwrap()
            .is_empty());
        let c = put(&m, b"cccc").await;
        assert_eq!(m.find_missing(&[a, b.clone(), c]).await.unwrap(), vec![b]);
        assert!(m.size_bytes() <= 10);
        let too_big = Digest::of(&[0u8; 11]);
        let err = m
            .put(&too_big, once(Bytes::from(vec![0u8; 11])))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
    }

    #[tokio::test]
    async fn concurrent_puts_and_gets() {
        let m = Arc::new(MemoryBlobAccess::new("m", 1 << 20));
        let tasks: Vec<_> = (0..32u8)
            .map(|i| {
                let m = m.clone();
                tokio::spawn(async move {
                    let data = Bytes::from(vec![i; 1000 + i as usize]);
                    let d = Digest::of(&data);
                    m.put(&d, once(data.clone())).await.unwrap();
                    assert_eq!(
                        read_to_bytes(&*m, &d, ReadRange::FULL, 1 << 20)
                            .await
                            .unwrap(),
                        data
                    );
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }
}
