//! FindMissingBlobs and the batch calls of `resumable_grpc`, retried by
//! [`super::unary`] rules. They are made by a plain `grpc` node inside this
//! one, which keeps coalescing small gets and puts into batches: a
//! `fetch-tree` or a build's outputs make a few dozen calls, not one per blob,
//! and each cut one is made again.

use super::observe::{Observed, ObservingChannel};
use super::unary::UnaryRetry;
use blob_access::grpc::GrpcChannel;
use blob_access::grpc::{CasCalls, GrpcConnection, MAX_MESSAGE};
use blob_access::proto::content_addressable_storage_client::ContentAddressableStorageClient;
use blob_access::proto::{
    BatchReadBlobsRequest, BatchReadBlobsResponse, BatchUpdateBlobsRequest,
    BatchUpdateBlobsResponse, FindMissingBlobsRequest, FindMissingBlobsResponse,
};
use blob_access::Result;
use std::sync::Arc;

type Client = ContentAddressableStorageClient<ObservingChannel<GrpcChannel>>;

/// See the module documentation.
pub struct RetryingCasCalls {
    pub conn: GrpcConnection,
    pub unary: Arc<UnaryRetry>,
}

impl RetryingCasCalls {
    /// A client on `channel` and the request `msg` (with the connection's
    /// headers), its record of the server's status attached.
    fn prepare<M>(
        &self,
        channel: GrpcChannel,
        observed: &Observed,
        msg: M,
    ) -> (Client, tonic::Request<M>) {
        let client = ContentAddressableStorageClient::new(ObservingChannel::new(channel))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let mut req = self.conn.request(msg);
        observed.attach(&mut req);
        (client, req)
    }
}

#[async_trait::async_trait]
impl CasCalls for RetryingCasCalls {
    async fn find_missing_blobs(
        &self,
        msg: FindMissingBlobsRequest,
    ) -> Result<FindMissingBlobsResponse> {
        let unary = &self.unary;
        unary
            .retrying("FindMissingBlobs", |channel, observed| {
                let (mut client, req) = self.prepare(channel, &observed, msg.clone());
                async move { Ok(client.find_missing_blobs(req).await?.into_inner()) }
            })
            .await
    }

    async fn batch_read_blobs(&self, msg: BatchReadBlobsRequest) -> Result<BatchReadBlobsResponse> {
        let unary = &self.unary;
        unary
            .retrying("BatchReadBlobs", |channel, observed| {
                let (mut client, req) = self.prepare(channel, &observed, msg.clone());
                async move { Ok(client.batch_read_blobs(req).await?.into_inner()) }
            })
            .await
    }

    async fn batch_update_blobs(
        &self,
        msg: BatchUpdateBlobsRequest,
    ) -> Result<BatchUpdateBlobsResponse> {
        let unary = &self.unary;
        unary
            .retrying("BatchUpdateBlobs", |channel, observed| {
                let (mut client, req) = self.prepare(channel, &observed, msg.clone());
                async move { Ok(client.batch_update_blobs(req).await?.into_inner()) }
            })
            .await
    }
}
