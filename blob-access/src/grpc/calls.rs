//! The unary CAS calls of the `grpc` node: FindMissingBlobs and the two batch
//! calls. They sit behind a trait so that `resumable_grpc` can hand the same
//! node a version that retries them when a proxy cuts the connection under
//! them, keeping the node's coalescing of small blobs into batches.

use super::GrpcConnection;
use crate::proto::{
    BatchReadBlobsRequest, BatchReadBlobsResponse, BatchUpdateBlobsRequest,
    BatchUpdateBlobsResponse, FindMissingBlobsRequest, FindMissingBlobsResponse,
};
use crate::Result;

/// How a `grpc` node makes its unary CAS calls. Each request message is
/// whole (the instance name set), so an implementation may send it again.
#[async_trait::async_trait]
pub trait CasCalls: Send + Sync {
    async fn find_missing_blobs(
        &self,
        req: FindMissingBlobsRequest,
    ) -> Result<FindMissingBlobsResponse>;
    async fn batch_read_blobs(&self, req: BatchReadBlobsRequest) -> Result<BatchReadBlobsResponse>;
    async fn batch_update_blobs(
        &self,
        req: BatchUpdateBlobsRequest,
    ) -> Result<BatchUpdateBlobsResponse>;
}

/// Each call made once, on the connection's channel: the plain `grpc` node.
pub struct CallsOnce(pub GrpcConnection);

#[async_trait::async_trait]
impl CasCalls for CallsOnce {
    async fn find_missing_blobs(
        &self,
        req: FindMissingBlobsRequest,
    ) -> Result<FindMissingBlobsResponse> {
        let req = self.0.request(req);
        let resp = self.0.cas_client().find_missing_blobs(req).await;
        once("FindMissingBlobs", resp)
    }

    async fn batch_read_blobs(&self, req: BatchReadBlobsRequest) -> Result<BatchReadBlobsResponse> {
        let req = self.0.request(req);
        once(
            "BatchReadBlobs",
            self.0.cas_client().batch_read_blobs(req).await,
        )
    }

    async fn batch_update_blobs(
        &self,
        req: BatchUpdateBlobsRequest,
    ) -> Result<BatchUpdateBlobsResponse> {
        let req = self.0.request(req);
        once(
            "BatchUpdateBlobs",
            self.0.cas_client().batch_update_blobs(req).await,
        )
    }
}

fn once<T>(what: &str, r: std::result::Result<tonic::Response<T>, tonic::Status>) -> Result<T> {
    r.map(tonic::Response::into_inner)
        .map_err(|s| crate::Error::from(s).in_call(what))
}
