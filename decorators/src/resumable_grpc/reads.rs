//! Resuming reads of one node, independent of how an attempt is opened: the
//! retry policy, the counters and what the node learnt about its server.

use super::attempt::ReadOpener;
use super::reader::{ReadShared, ResumingReader, COUNTERS};
use super::recheck::recheck_on_data_loss;
use super::retry::RetryPolicy;
use blob_access::node::Counters;
use blob_access::resource::Compressor;
use blob_access::verify::verify;
use blob_access::{BlobStream, Digest, NodeMetrics, ReadRange};
use futures::StreamExt;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Makes verified, resuming reads from attempts opened by any [`ReadOpener`].
///
/// ```
/// use blob_access::{Digest, ReadRange, resource::Compressor};
/// use blob_access_decorators::resumable_grpc::{ResumableReads, RetryPolicy, AttemptRequest, AttemptStream};
/// use bytes::Bytes;
/// use futures::StreamExt;
/// use std::sync::Arc;
///
/// let blob = Bytes::from_static(b"hello, world");
/// let digest = Digest::of(&blob);
/// // A server whose streams break after 5 bytes.
/// let opener = move |r: AttemptRequest| -> AttemptStream {
///     let start = r.offset as usize;
///     let end = (start + 5).min(blob.len());
///     futures::stream::iter([Ok(blob.slice(start..end))]).boxed()
/// };
/// let reads = ResumableReads::new("example", RetryPolicy::default());
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let mut s = reads.get(Arc::new(opener), &digest, ReadRange::FULL, Compressor::Identity);
/// let mut got = Vec::new();
/// while let Some(chunk) = s.next().await {
///     got.extend_from_slice(&chunk.unwrap());
/// }
/// assert_eq!(got, b"hello, world");
/// # });
/// let mut m = Vec::new();
/// reads.metrics(&mut m);
/// assert_eq!(m[0].get("resumptions"), Some(2));
/// ```
pub struct ResumableReads {
    name: String,
    policy: RetryPolicy,
    counters: Arc<Counters>,
    zstd_offset_refused: Arc<AtomicBool>,
    read_limit_refused: Arc<AtomicBool>,
}

impl ResumableReads {
    /// `name` identifies the node in errors and metrics.
    pub fn new(name: &str, policy: RetryPolicy) -> Self {
        ResumableReads {
            name: name.to_string(),
            policy,
            counters: Arc::new(Counters::new(COUNTERS)),
            zstd_offset_refused: Arc::new(AtomicBool::new(false)),
            read_limit_refused: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The node's counters, shared with its writes.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// The retry settings.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// A lazy read of `range` of `digest`, resumed through `opener` as needed
    /// and verified (size, and hash for a full read) across all attempts.
    pub fn get(
        &self,
        opener: Arc<dyn ReadOpener>,
        digest: &Digest,
        range: ReadRange,
        compressor: Compressor,
    ) -> BlobStream {
        let shared = Arc::new(ReadShared {
            zstd_offset_refused: self.zstd_offset_refused.clone(),
            read_limit_refused: self.read_limit_refused.clone(),
            ..ReadShared::default()
        });
        let reader = ResumingReader::new(
            opener.clone(),
            digest,
            range,
            compressor,
            self.policy.clone(),
            self.counters.clone(),
            shared.clone(),
        );
        let verified = verify(digest, range, &self.name, reader.boxed());
        if !range.is_full() {
            return verified;
        }
        recheck_on_data_loss(verified, opener, digest, shared, self.counters.clone())
    }

    /// Appends this node's counters: `reads`, `resumptions`, `bytes_rerequested`,
    /// `give_ups`, `zstd_fallbacks`, `offset_rechecks`, `overruns_trimmed` (ranged
    /// reads the server sent past `read_limit`), `read_limit_fallbacks`,
    /// `stalls`, `fresh_connections`, and those of uploads ([`super::ResumableWrites`]):
    /// `writes`, `write_retries`, `write_restarts` (from byte 0), `bytes_resent`,
    /// `source_rereads` and `writes_found_complete`.
    pub fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        out.push(self.counters.snapshot(&self.name, "resumable_grpc"));
    }
}
