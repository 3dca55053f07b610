//! One attempt of a read, and what opens it: the seam between the resuming
//! reader and a transport (a tonic channel in production, scripted streams in
//! tests).

use super::retry::Failure;
use blob_access::resource::Compressor;
use bytes::Bytes;
use futures::stream::BoxStream;

/// The bytes of one attempt, already decompressed.
pub type AttemptStream = BoxStream<'static, std::result::Result<Bytes, Failure>>;

/// What one attempt asks the server for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttemptRequest {
    /// `read_offset`, in uncompressed bytes.
    pub offset: u64,
    /// `read_limit`, in uncompressed bytes; 0 means to the end of the blob.
    pub limit: u64,
    /// Ask for `compressed-blobs/zstd/...` (if the server supports it).
    pub compressor: Compressor,
    /// Go over a new connection: the one the last attempt used is not trusted.
    pub fresh_connection: bool,
}

/// Opens one ByteStream Read attempt of a given blob. The stream must be lazy
/// (no RPC before it is polled); failures to open are its first item.
pub trait ReadOpener: Send + Sync + 'static {
    fn open(&self, request: AttemptRequest) -> AttemptStream;
}

impl<F> ReadOpener for F
where
    F: Fn(AttemptRequest) -> AttemptStream + Send + Sync + 'static,
{
    fn open(&self, request: AttemptRequest) -> AttemptStream {
        self(request)
    }
}
