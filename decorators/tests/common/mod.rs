//! Backends for decorator tests: a counting wrapper and small helpers.
#![allow(dead_code)]

pub mod ac;

use blob_access::memory::MemoryBlobAccess;
use blob_access::{BlobAccess, BlobStream, Digest, NodeMetrics, ReadRange, Result};
use bytes::Bytes;
use futures::StreamExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Wraps a backend and records the calls that reach it.
pub struct Counting {
    pub inner: Arc<dyn BlobAccess>,
    pub gets: AtomicUsize,
    pub puts: AtomicUsize,
    /// The digests of each find_missing call.
    pub asked: Mutex<Vec<Vec<Digest>>>,
}

impl Counting {
    pub fn new(inner: Arc<dyn BlobAccess>) -> Arc<Self> {
        Arc::new(Counting {
            inner,
            gets: AtomicUsize::new(0),
            puts: AtomicUsize::new(0),
            asked: Mutex::new(Vec::new()),
        })
    }
    pub fn memory() -> Arc<Self> {
        Self::new(Arc::new(MemoryBlobAccess::new("memory", 64 << 20)))
    }
    pub fn gets(&self) -> usize {
        self.gets.load(Ordering::SeqCst)
    }
    pub fn asked(&self) -> Vec<Vec<Digest>> {
        self.asked.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl BlobAccess for Counting {
    fn get(&self, digest: &Digest, range: ReadRange) -> BlobStream {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.inner.get(digest, range)
    }
    async fn put(&self, digest: &Digest, data: BlobStream) -> Result<()> {
        self.puts.fetch_add(1, Ordering::SeqCst);
        self.inner.put(digest, data).await
    }
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.asked.lock().unwrap().push(digests.to_vec());
        self.inner.find_missing(digests).await
    }
    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        self.inner.metrics(out)
    }
}

pub fn blob(text: &str) -> (Digest, Bytes) {
    let data = Bytes::copy_from_slice(text.as_bytes());
    (Digest::of(&data), data)
}

pub async fn put(b: &dyn BlobAccess, text: &str) -> Digest {
    let (d, data) = blob(text);
    b.put(&d, blob_access::util::once(data)).await.unwrap();
    d
}

pub async fn read(b: &dyn BlobAccess, d: &Digest) -> Result<Vec<u8>> {
    let mut s = b.get(d, ReadRange::FULL);
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c?);
    }
    Ok(out)
}

pub fn counter(b: &dyn BlobAccess, kind: &str, name: &str) -> u64 {
    let mut m = Vec::new();
    b.metrics(&mut m);
    m.iter()
        .find(|m| m.kind == kind)
        .and_then(|m| m.get(name))
        .unwrap_or_else(|| panic!("no counter {kind}.{name} in {m:?}"))
}
