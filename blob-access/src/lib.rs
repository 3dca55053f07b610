//! Read and write the content-addressed blobs of the Remote Execution API
//! through a tree of composable [`BlobAccess`] implementations.
//!
//! A backend (such as [`memory::MemoryBlobAccess`] or [`grpc::GrpcBlobAccess`])
//! stores blobs; a decorator wraps another `BlobAccess` and changes only the
//! calls it cares about. Trees are usually built from a config file by the
//! `blob-access-config` crate.
//!
//! ```
//! use blob_access::{BlobAccess, Digest, ReadRange, memory::MemoryBlobAccess, util};
//! use bytes::Bytes;
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let cas = MemoryBlobAccess::new("memory", 1 << 20);
//! let digest = Digest::of(b"hello");
//! cas.put(&digest, util::once(Bytes::from_static(b"hello"))).await.unwrap();
//! assert!(cas.find_missing(&[digest.clone()]).await.unwrap().is_empty());
//! let data = util::read_to_bytes(&cas, &digest, ReadRange::FULL, 1024).await.unwrap();
//! assert_eq!(&data[..], b"hello");
//! # });
//! ```

pub mod action_cache;
pub mod atomic_file;
pub mod config_types;
pub mod digest;
pub mod disk;
pub mod error;
pub mod execution;
pub mod grpc;
pub mod instance_name;
pub mod memory;
pub mod metrics;
pub mod node;
pub mod output;
pub mod read_chunk;
pub mod resource;
pub mod upload;
pub mod util;
pub mod verify;

pub use action_cache::ActionCache;
pub use digest::{Digest, DigestFunction};
pub use error::{Code, Error, Result};
pub use execution::Execution;
pub use node::{BuildContext, BuildNode, ChildNodes, NodeMetrics, StorageType};

use bytes::Bytes;
use futures::stream::BoxStream;
use std::sync::Arc;

/// Generated REAPI v2 types and stubs.
pub use bazel_remote_apis::build::bazel::remote::execution::v2 as proto;
/// Generated `google.bytestream` types and stubs.
pub use bazel_remote_apis::google::bytestream as bytestream_proto;

/// A stream of blob data. Any `Err` item means the whole transfer failed and
/// the bytes seen so far must be discarded.
pub type BlobStream = BoxStream<'static, Result<Bytes>>;

/// Opens a blob's bytes from the start, as often as called (e.g. a file):
/// the source of [`BlobAccess::put_reopenable`].
pub type Reopen = Arc<dyn Fn() -> BlobStream + Send + Sync>;

/// Which part of a blob to read: `limit: None` reads to the end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadRange {
    pub offset: u64,
    pub limit: Option<u64>,
}

impl ReadRange {
    /// The whole blob; the only range whose digest can be verified.
    pub const FULL: ReadRange = ReadRange {
        offset: 0,
        limit: None,
    };

    pub fn new(offset: u64, limit: Option<u64>) -> Self {
        ReadRange { offset, limit }
    }

    pub fn is_full(&self) -> bool {
        self.offset == 0 && self.limit.is_none()
    }

    /// Number of bytes this range covers in a blob of `size` bytes, or
    /// OUT_OF_RANGE if it starts past the end.
    pub fn len_in(&self, size: u64) -> Result<u64> {
        if self.offset > size {
            return Err(Error::new(
                Code::OutOfRange,
                format!(
                    "read offset {} is past the blob's {} bytes",
                    self.offset, size
                ),
            ));
        }
        let rest = size - self.offset;
        Ok(self.limit.map_or(rest, |l| l.min(rest)))
    }
}

/// A CAS and, for a build tool's remote cache, the action cache beside it,
/// and for remote execution the execution service: what a config file
/// builds and what a server serves (without an action cache or execution,
/// those services answer UNIMPLEMENTED).
#[derive(Clone)]
pub struct Storage {
    pub cas: Arc<dyn BlobAccess>,
    pub action_cache: Option<Arc<dyn ActionCache>>,
    pub execution: Option<Arc<dyn Execution>>,
}

impl Storage {
    pub fn new(cas: Arc<dyn BlobAccess>) -> Self {
        Storage {
            cas,
            action_cache: None,
            execution: None,
        }
    }
    pub fn with_action_cache(mut self, action_cache: Arc<dyn ActionCache>) -> Self {
        self.action_cache = Some(action_cache);
        self
    }
    pub fn with_execution(mut self, execution: Arc<dyn Execution>) -> Self {
        self.execution = Some(execution);
        self
    }
}

impl From<Arc<dyn BlobAccess>> for Storage {
    fn from(cas: Arc<dyn BlobAccess>) -> Self {
        Storage::new(cas)
    }
}

impl<T: BlobAccess> From<Arc<T>> for Storage {
    fn from(cas: Arc<T>) -> Self {
        Storage::new(cas)
    }
}

/// Storage of content-addressed blobs.
///
/// Implementations are used as `Arc<dyn BlobAccess>` and shared between tasks.
#[async_trait::async_trait]
pub trait BlobAccess: Send + Sync + 'static {
    /// Streams (part of) a blob. Nothing happens until the stream is polled;
    /// dropping it cancels the transfer. A full read ends successfully only
    /// after the size and digest were verified; otherwise the last item is an
    /// error (DATA_LOSS for bad content, NOT_FOUND for a missing blob).
    fn get(&self, digest: &Digest, range: ReadRange) -> BlobStream;

    /// Stores a blob. The data is verified against `digest` before the blob
    /// becomes visible; an error item in `data` aborts the write.
    async fn put(&self, digest: &Digest, data: BlobStream) -> Result<()>;

    /// Stores a blob whose bytes can be read again: each call of `open` gives
    /// them from the start. A node that retries uploads (`resumable_grpc`)
    /// reads them again when the server kept too little of a cut upload;
    /// every other node reads them once, as [`put`](Self::put) does.
    async fn put_reopenable(&self, digest: &Digest, open: Reopen) -> Result<()> {
        self.put(digest, open()).await
    }

    /// Returns the digests among `digests` that are not stored.
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>>;

    /// Appends the counters of this node and of the nodes below it.
    fn metrics(&self, _out: &mut Vec<NodeMetrics>) {}
}
