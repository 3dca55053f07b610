//! `resumable_grpc`: a REAPI backend whose reads survive killed streams.
//!
//! Proxies and load balancers (nginx, Envoy, cloud LBs) end long ByteStream
//! reads on reload (GOAWAY), at a maximum stream age or on idle timers. A
//! plain client then fails or starts again from byte 0, and a large blob may
//! never arrive. This node opens a new Read at `read_offset` = bytes already
//! delivered, as often as the retry budget allows, and verifies the digest
//! across all the attempts. Uploads cut the same ways are resumed at the
//! `committed_size` the server reports, or started again (`writer`).
//! Existence checks and small blobs go through a `grpc` node inside this one,
//! coalesced into batch calls that are retried when cut ([`unary`]). In an
//! action cache tree, calls are retried the same way
//! ([`ResumableGrpcActionCache`]); in an execution tree, a cut Execute
//! stream goes on with WaitExecution ([`ResumableGrpcExecution`]).

mod action_cache;
mod attempt;
mod budget;
mod cas_calls;
mod channels;
mod execution;
mod observe;
mod opener;
mod reader;
mod reads;
mod recheck;
mod retry;
mod unary;
mod writer;
mod zstd_decode;

pub use action_cache::ResumableGrpcActionCache;
pub use attempt::{AttemptRequest, AttemptStream, ReadOpener};
pub use channels::Channels;
pub use execution::{ResumableGrpcExecution, DEFAULT_EXECUTION_STALL_TIMEOUT};
pub use observe::{Observed, ObservingChannel};
pub use opener::ByteStreamOpener;
pub use reader::COUNTERS;
pub use reads::ResumableReads;
pub use retry::{
    classify, never_processed, Failure, Origin, RetryPolicy, Verdict, REFUSED_PER_ATTEMPT,
};
pub use writer::ResumableWrites;

use blob_access::action_cache::{ActionCache, GrpcActionCache};
use blob_access::config_types::{ByteSize, Duration};
use blob_access::grpc::{Compression, GrpcBlobAccess, GrpcConfig, GrpcConnection};
use blob_access::resource::Compressor;
use blob_access::{
    BlobAccess, BlobStream, BuildContext, BuildNode, ChildNodes, Code, Digest, NodeMetrics,
    ReadRange, Reopen, Result,
};
use cas_calls::RetryingCasCalls;
use futures::{FutureExt, StreamExt};
use std::sync::Arc;
use unary::UnaryRetry;

/// Config node `resumable_grpc: {grpc: {endpoint: ...}, max_attempts_without_progress: 5}`.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResumableGrpcConfig {
    /// The remote CAS, with the same fields as the `grpc` node.
    pub grpc: GrpcConfig,
    /// Consecutive attempts that deliver no byte before a read gives up; any
    /// progress resets the count. Default 5.
    #[serde(default = "default_max_attempts")]
    pub max_attempts_without_progress: u32,
    /// Wait after the first attempt without progress, doubled (with jitter)
    /// after each further one. Default 50ms.
    #[serde(default = "default_initial_backoff")]
    pub initial_backoff: Duration,
    /// Upper bound of that wait. Default 5s.
    #[serde(default = "default_max_backoff")]
    pub max_backoff: Duration,
    /// No new attempt is started later than this after a read began. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Duration>,
    /// An attempt that delivers no byte for this long is abandoned and the
    /// read resumed on a fresh connection (a black-holed path, a stuck
    /// upstream behind a proxy that still answers pings). Default 30s.
    #[serde(default = "default_stall_timeout")]
    pub stall_timeout: Duration,
    /// Bytes of an upload kept after sending, to go on from where the server
    /// says it stands after a cut. Further back, the source must be readable
    /// again (`put_reopenable`, e.g. `blob-access put` of a file) or the
    /// upload fails. Default 16MiB.
    #[serde(default = "default_replay_window")]
    pub write_replay_window: ByteSize,
    /// In an execution tree: an Execute or WaitExecution stream that brings
    /// no update for this long is resumed with WaitExecution on a fresh
    /// connection. Servers repeat an operation's state every minute or so
    /// while it runs, so a quiet long action is not cut. Default 5m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution_stall_timeout: Option<Duration>,
}

fn default_replay_window() -> ByteSize {
    ByteSize(DEFAULT_REPLAY_WINDOW)
}

/// Bytes held for upload resumptions: more than a server typically has
/// received but not yet committed (the HTTP/2 windows are 4 and 8 MiB).
pub const DEFAULT_REPLAY_WINDOW: u64 = 16 << 20;

/// HTTP/2 keepalive when the `grpc` settings name none: a dead connection is
/// noticed within about a minute even without a call waiting on it.
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

fn default_max_attempts() -> u32 {
    RetryPolicy::default().max_attempts_without_progress
}
fn default_initial_backoff() -> Duration {
    Duration(RetryPolicy::default().initial_backoff)
}
fn default_max_backoff() -> Duration {
    Duration(RetryPolicy::default().max_backoff)
}
fn default_stall_timeout() -> Duration {
    Duration(RetryPolicy::default().stall_timeout)
}

impl ResumableGrpcConfig {
    /// The retry settings of this node.
    pub fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts_without_progress: self.max_attempts_without_progress.max(1),
            initial_backoff: self.initial_backoff.get(),
            max_backoff: self.max_backoff.get(),
            deadline: self.deadline.map(Duration::get),
            stall_timeout: self.stall_timeout.get(),
        }
    }

    /// The `grpc` settings with keepalive on unless configured: pings while
    /// calls are active (idle pings only if asked for; servers count them as abuse).
    fn grpc_with_keepalive(&self) -> GrpcConfig {
        let mut g = self.grpc.clone();
        if g.keepalive_interval.is_none() {
            g.keepalive_interval = Some(Duration(KEEPALIVE_INTERVAL));
            g.keepalive_while_idle.get_or_insert(false);
        }
        g.keepalive_timeout
            .get_or_insert(Duration(KEEPALIVE_TIMEOUT));
        g
    }
}

impl BuildNode for ResumableGrpcConfig {
    fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn BlobAccess>> {
        let conn = GrpcConnection::new(ctx.path(), &self.grpc_with_keepalive())?;
        Ok(Arc::new(
            ResumableGrpcBlobAccess::new(conn, self.policy())
                .with_replay_window(self.write_replay_window.bytes()),
        ))
    }

    fn build_action_cache(&self, ctx: &BuildContext) -> Result<Arc<dyn ActionCache>> {
        let conn = GrpcConnection::new(ctx.path(), &self.grpc_with_keepalive())?;
        let plain = GrpcActionCache::new(conn);
        Ok(Arc::new(ResumableGrpcActionCache::new(
            plain,
            self.policy(),
        )))
    }

    fn build_execution(&self, ctx: &BuildContext) -> Result<Arc<dyn blob_access::Execution>> {
        let conn = GrpcConnection::new(ctx.path(), &self.grpc_with_keepalive())?;
        let stall = self
            .execution_stall_timeout
            .map_or(DEFAULT_EXECUTION_STALL_TIMEOUT, Duration::get);
        let policy = RetryPolicy {
            stall_timeout: stall,
            ..self.policy()
        };
        let plain = blob_access::grpc::GrpcExecution::new(conn);
        Ok(Arc::new(ResumableGrpcExecution::new(plain, policy)))
    }
}

impl<N> ChildNodes<N> for ResumableGrpcConfig {}

/// See the module documentation.
pub struct ResumableGrpcBlobAccess {
    /// FindMissingBlobs and small blobs in coalesced batch calls, retried.
    plain: Arc<GrpcBlobAccess>,
    reads: ResumableReads,
    writes: ResumableWrites,
    /// Reads and writes start on the shared channel and move to new ones as needed.
    channels: Arc<Channels>,
}

impl ResumableGrpcBlobAccess {
    pub fn new(conn: GrpcConnection, policy: RetryPolicy) -> Self {
        let fresh = conn.clone();
        let channels = Arc::new(Channels::new(conn.channel(), move || fresh.new_channel()));
        let reads = ResumableReads::new(conn.name(), policy.clone());
        let unary = Arc::new(UnaryRetry {
            policy: policy.clone(),
            channels: channels.clone(),
            counters: reads.counters(),
        });
        let calls = Arc::new(RetryingCasCalls {
            conn: conn.clone(),
            unary,
        });
        let writes = ResumableWrites::new(
            conn.clone(),
            channels.clone(),
            policy,
            DEFAULT_REPLAY_WINDOW,
            reads.counters(),
        );
        ResumableGrpcBlobAccess {
            reads,
            writes,
            channels,
            plain: Arc::new(GrpcBlobAccess::with_calls(conn, calls).without_read_fallback()),
        }
    }

    /// Holds `bytes` of each upload for resumptions (see `write_replay_window`).
    pub fn with_replay_window(mut self, bytes: u64) -> Self {
        let conn = self.plain.connection().clone();
        let policy = self.reads.policy().clone();
        self.writes = ResumableWrites::new(
            conn,
            self.channels.clone(),
            policy,
            bytes,
            self.reads.counters(),
        );
        self
    }

    async fn write(&self, digest: &Digest, data: BlobStream, reopen: Option<Reopen>) -> Result<()> {
        if digest.size_bytes() == 0 {
            // Nothing to retry; the plain node checks the input.
            return self.plain.put(digest, data).await;
        }
        let conn = self.plain.connection();
        conn.check_digest_function(digest.function())
            .await
            .map_err(|e| e.with_digest(digest))?;
        if digest.size_bytes() <= conn.batch_limit().await.unwrap_or(0) {
            return self.plain.put(digest, data).await;
        }
        self.writes.put(digest, data, reopen).await
    }
}

#[async_trait::async_trait]
impl BlobAccess for ResumableGrpcBlobAccess {
    fn get(&self, digest: &Digest, range: ReadRange) -> BlobStream {
        if digest.size_bytes() == 0 {
            // The empty blob needs no round trip.
            return self.plain.get(digest, range);
        }
        let conn = self.plain.connection().clone();
        let caps = conn.capabilities();
        let request_conn = conn.clone();
        let opener = ByteStreamOpener::new(
            self.channels.clone(),
            &conn.instance_name_for(digest),
            digest,
        )
        .with_request(move |r| request_conn.request(r))
        .with_zstd_support(caps.map(|c| c.is_ok_and(|c| c.zstd)).boxed());
        let compressor = match conn.compression() {
            Compression::Zstd => Compressor::Zstd,
            Compression::None => Compressor::Identity,
        };
        let resuming = self.reads.get(Arc::new(opener), digest, range, compressor);
        // A small whole blob goes in a batch with others, retried as a whole.
        let (plain, digest) = (self.plain.clone(), digest.clone());
        futures::stream::once(async move {
            if let Err(e) = conn.check_digest_function(digest.function()).await {
                return blob_access::util::failed(e.with_digest(&digest));
            }
            let limit = conn.batch_limit().await.unwrap_or(0);
            if !(range.is_full() && digest.size_bytes() <= limit) {
                return resuming;
            }
            // A server without batch calls (UNIMPLEMENTED): through ByteStream, resuming.
            let mut small = plain.get(&digest, range).peekable();
            match std::pin::Pin::new(&mut small).peek().await {
                Some(Err(e)) if e.code() == Code::Unimplemented => resuming,
                _ => small.boxed(),
            }
        })
        .flatten()
        .boxed()
    }

    async fn put(&self, digest: &Digest, data: BlobStream) -> Result<()> {
        self.write(digest, data, None).await
    }

    async fn put_reopenable(&self, digest: &Digest, open: Reopen) -> Result<()> {
        self.write(digest, open(), Some(open)).await
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.plain.find_missing(digests).await
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        self.reads.metrics(out);
        self.plain.metrics(out);
    }
}
