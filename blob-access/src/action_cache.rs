//! The ActionCache: what a build tool asks before running an action ("was this
//! action run before, and what did it produce?"). Keys are action digests,
//! values `ActionResult` messages that name their outputs by digest in the CAS.
//!
//! Unlike a CAS, the value cannot be verified against its key: a stored result
//! is checked by parsing it, and `completeness_checking` checks that the blobs
//! it names exist before a client is told of a hit.
//!
//! Config trees build an action cache from the same node kinds as a CAS (see
//! [`BuildNode::build_action_cache`](crate::BuildNode::build_action_cache)).
//!
//! ```
//! use blob_access::action_cache::{ActionCache, ActionResult};
//! use blob_access::{memory::MemoryActionCache, Code, Digest};
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let ac = MemoryActionCache::new("memory", 1 << 20);
//! let action = Digest::of(b"an Action message");
//! assert_eq!(ac.get_action_result(&action).await.unwrap_err().code(), Code::NotFound);
//! let result = ActionResult { exit_code: 0, stdout_raw: b"ok".to_vec(), ..Default::default() };
//! ac.update_action_result(&action, &result).await.unwrap();
//! assert_eq!(ac.get_action_result(&action).await.unwrap(), result);
//! # });
//! ```

mod disk;
mod grpc;
mod memory;

pub use disk::DiskActionCache;
pub use grpc::GrpcActionCache;
pub use memory::MemoryActionCache;

use crate::{Digest, Error, NodeMetrics, Result};
use bytes::Bytes;
use prost::Message;

pub use crate::proto::ActionResult;

/// Storage of action results, keyed by the digest of their `Action`.
///
/// Implementations are used as `Arc<dyn ActionCache>` and shared between tasks.
#[async_trait::async_trait]
pub trait ActionCache: Send + Sync + 'static {
    /// The result stored for `action`; NOT_FOUND when there is none.
    async fn get_action_result(&self, action: &Digest) -> Result<ActionResult>;

    /// Stores `result` for `action`, replacing any earlier one.
    async fn update_action_result(&self, action: &Digest, result: &ActionResult) -> Result<()>;

    /// Whether updates can succeed; what a server advertises as
    /// `action_cache_update_capabilities.update_enabled`.
    async fn update_enabled(&self) -> bool {
        true
    }

    /// Appends the counters of this node and of the nodes below it.
    fn metrics(&self, _out: &mut Vec<NodeMetrics>) {}
}

/// Largest encoded `ActionResult` stored: real ones are a few KiB; this bounds
/// what one client can make a server keep and parse.
pub const MAX_ACTION_RESULT_SIZE: usize = 4 << 20;

/// The stored form of a result; RESOURCE_EXHAUSTED beyond [`MAX_ACTION_RESULT_SIZE`].
pub fn encode(action: &Digest, result: &ActionResult, backend: &str) -> Result<Bytes> {
    let len = result.encoded_len();
    if len > MAX_ACTION_RESULT_SIZE {
        return Err(Error::resource_exhausted(format!(
            "action result of {len} bytes exceeds the {MAX_ACTION_RESULT_SIZE} byte limit"
        ))
        .with_backend(backend)
        .with_digest(action));
    }
    Ok(result.encode_to_vec().into())
}

/// RESOURCE_EXHAUSTED for a result costing more than a whole store of
/// `max_size` (stored, it would evict every other result, then itself).
pub(crate) fn check_fits(action: &Digest, cost: u64, max_size: u64, backend: &str) -> Result<()> {
    if cost <= max_size {
        return Ok(());
    }
    Err(Error::resource_exhausted(format!(
        "action result costing {cost} bytes is larger than this action cache's {max_size} byte limit"
    ))
    .with_backend(backend)
    .with_digest(action))
}

/// Parses a stored result; DATA_LOSS naming the action if it does not parse.
pub fn decode(action: &Digest, data: &[u8], backend: &str) -> Result<ActionResult> {
    ActionResult::decode(data).map_err(|e| {
        Error::data_loss(format!("stored action result does not parse: {e}"))
            .with_backend(backend)
            .with_digest(action)
    })
}

/// NOT_FOUND for an action without a stored result.
pub fn not_found(action: &Digest, backend: &str) -> Error {
    Error::not_found("no action result")
        .with_backend(backend)
        .with_digest(action)
}
