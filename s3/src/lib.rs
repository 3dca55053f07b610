//! An `s3` node: the CAS and the action cache in a bucket of an
//! S3-compatible object store (AWS S3, Garage, MinIO, Ceph, R2, GCS through
//! its S3 interface), for a team that has outgrown one machine's disk.
//!
//! Built on [`object_store`] (Apache Arrow): signed requests, the AWS
//! credential chain, ranged GETs with `If-Match`, multipart uploads, and
//! retries of failed requests with backoff. On top of it this node adds what
//! a remote cache needs: reads resumed where a load balancer cut them
//! ([`read`]), uploads verified before they become visible and aborted
//! otherwise ([`write`]), `find_missing` as concurrent HEADs, and a bucket
//! checked when the tree is built. The key layout is in [`keys`].
//!
//! ```no_run
//! use blob_access::{BlobAccess, BuildContext, BuildNode, Digest, util};
//! use blob_access_s3::S3Config;
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let config = S3Config::new("build-cache")
//!     .with_endpoint("http://127.0.0.1:3900")
//!     .with_region("garage");
//! let cas = config.build(&BuildContext::root().child("s3")).unwrap();
//! let digest = util::put_file(&*cas, "big.iso".as_ref()).await.unwrap();
//! assert!(cas.find_missing(&[digest]).await.unwrap().is_empty());
//! # });
//! ```

mod action_cache;
mod config;
mod errors;
pub mod keys;
pub mod read;
mod startup;
pub mod write;

pub use action_cache::S3ActionCache;
use config::ClientUse;
pub use config::S3Config;

use blob_access::node::Counters;
use blob_access::util::failed;
use blob_access::verify::verify;
use blob_access::{BlobAccess, BlobStream, Digest, NodeMetrics, ReadRange, Result};
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3;
use object_store::ObjectStoreExt;
use std::sync::Arc;

const COUNTERS: &[&str] = &[
    "gets",
    "puts",
    "heads",
    "already_stored",
    "resumptions",
    "give_ups",
    "bytes_read",
    "bytes_written",
    "multipart_uploads",
    "parts",
    "part_retries",
    "aborted_uploads",
];

/// The CAS in a bucket (see the crate documentation).
pub struct S3BlobAccess {
    name: Arc<str>,
    reads: Arc<AmazonS3>,
    parts: Arc<AmazonS3>,
    writes: Arc<AmazonS3>,
    keys: keys::Keys,
    config: S3Config,
    counters: Arc<Counters>,
}

impl S3BlobAccess {
    /// A node named `name` (in errors and metrics); nothing is sent yet.
    pub fn new(name: &str, config: &S3Config) -> Result<Self> {
        let name: Arc<str> = if name.is_empty() {
            "s3".into()
        } else {
            name.into()
        };
        Ok(S3BlobAccess {
            reads: config.client(&name, ClientUse::Reads)?,
            parts: config.client(&name, ClientUse::Parts)?,
            writes: config.client(&name, ClientUse::Requests)?,
            keys: keys::Keys::new(&config.prefix),
            config: config.clone(),
            counters: Arc::new(Counters::new(COUNTERS)),
            name,
        })
    }

    /// Whether the object of `digest` is stored with the blob's size.
    async fn stored(&self, digest: &Digest) -> Result<bool> {
        self.counters.inc("heads");
        match self.writes.head(&self.keys.cas(digest)).await {
            Ok(meta) => Ok(meta.size == digest.size_bytes()),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(errors::from_store(&e, &self.name).with_digest(digest)),
        }
    }

    /// This node's counters, e.g. `resumptions`.
    pub fn counter(&self, name: &str) -> u64 {
        self.counters.get(name)
    }
}

#[async_trait::async_trait]
impl BlobAccess for S3BlobAccess {
    fn get(&self, digest: &Digest, range: ReadRange) -> BlobStream {
        self.counters.inc("gets");
        let len = match range.len_in(digest.size_bytes()) {
            Ok(len) => len,
            Err(e) => return failed(e.with_backend(self.name.to_string()).with_digest(digest)),
        };
        let raw = read::Read {
            store: self.reads.clone(),
            key: self.keys.cas(digest),
            node: self.name.clone(),
            digest: digest.clone(),
            next: range.offset,
            end: range.offset + len,
            policy: self.config.retry_policy(),
            counters: self.counters.clone(),
        }
        .into_stream();
        verify(digest, range, &self.name, raw)
    }

    async fn put(&self, digest: &Digest, data: BlobStream) -> Result<()> {
        self.counters.inc("puts");
        let verified = verify(digest, ReadRange::FULL, &self.name, data);
        if self.stored(digest).await? {
            // Not sent again; still drained and checked so a bad upload is reported.
            self.counters.inc("already_stored");
            return verified.try_for_each(|_| async { Ok(()) }).await;
        }
        write::Upload {
            store: &self.writes,
            parts_store: &self.parts,
            key: &self.keys.cas(digest),
            node: &self.name,
            digest,
            part_size: self.config.part_size.bytes(),
            parts_in_flight: self.config.parts_in_flight,
            policy: self.config.retry_policy(),
            counters: &self.counters,
        }
        .run(verified)
        .await
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let found: Vec<Result<Option<Digest>>> = futures::stream::iter(digests.to_vec())
            .map(|d| async move { Ok((!self.stored(&d).await?).then_some(d)) })
            .buffered(self.config.concurrent_heads)
            .collect()
            .await;
        found.into_iter().filter_map(Result::transpose).collect()
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        out.push(self.counters.snapshot(&self.name, "s3"));
    }
}
