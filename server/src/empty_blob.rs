//! "Servers MUST behave as though empty blobs are always available, even if
//! they have not been uploaded" (REAPI). Clients rely on it: Bazel and our own
//! `grpc` node never upload the empty blob, so another client reading it (bgd,
//! a `fetch-tree` of a tree with an empty file) would get NOT_FOUND from a tree
//! that only stores what it was sent. This wrapper, under every CAS call of
//! `serve`, answers for it whatever the tree behind holds.

use blob_access::{BlobAccess, BlobStream, Digest, NodeMetrics, ReadRange, Reopen, Result};
use futures::StreamExt;
use std::sync::Arc;

pub(super) struct EmptyBlobAlwaysPresent(pub(super) Arc<dyn BlobAccess>);

#[async_trait::async_trait]
impl BlobAccess for EmptyBlobAlwaysPresent {
    fn get(&self, digest: &Digest, range: ReadRange) -> BlobStream {
        if digest.is_empty_blob() && range.offset == 0 {
            return futures::stream::empty().boxed();
        }
        self.0.get(digest, range)
    }

    async fn put(&self, digest: &Digest, data: BlobStream) -> Result<()> {
        self.0.put(digest, data).await
    }

    async fn put_reopenable(&self, digest: &Digest, open: Reopen) -> Result<()> {
        self.0.put_reopenable(digest, open).await
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let asked: Vec<Digest> = digests
            .iter()
            .filter(|d| !d.is_empty_blob())
            .cloned()
            .collect();
        if asked.is_empty() {
            return Ok(Vec::new());
        }
        self.0.find_missing(&asked).await
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        self.0.metrics(out)
    }
}
