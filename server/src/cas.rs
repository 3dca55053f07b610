//! ContentAddressableStorage: FindMissingBlobs and the batch calls, where every
//! blob gets its own status so one bad blob does not fail its neighbours.

use super::{digest_function, Permission, Shared};
use bazel_remote_apis::google::rpc;
use blob_access::proto::content_addressable_storage_server::ContentAddressableStorage;
use blob_access::proto::{
    batch_read_blobs_response, batch_update_blobs_request, batch_update_blobs_response, compressor,
    BatchReadBlobsRequest, BatchReadBlobsResponse, BatchUpdateBlobsRequest,
    BatchUpdateBlobsResponse, FindMissingBlobsRequest, FindMissingBlobsResponse,
    GetChunkMappingRequest, GetChunkMappingResponse, GetTreeRequest, GetTreeResponse,
    RegisterChunkMappingRequest, RegisterChunkMappingResponse, SpliceBlobRequest,
    SpliceBlobResponse, SplitBlobRequest, SplitBlobResponse,
};
use blob_access::{util, Code, Digest, DigestFunction, Error, ReadRange};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};

/// Blobs of one batch handled at the same time.
const BATCH_CONCURRENCY: usize = 16;

pub(super) struct Cas(pub(super) Shared);

pub(super) fn parse_digest(
    function: DigestFunction,
    d: Option<&blob_access::proto::Digest>,
) -> Result<Digest, Status> {
    let d = d.ok_or_else(|| Status::invalid_argument("a digest is missing"))?;
    Digest::from_proto(function, d)
        .map_err(|e| Status::invalid_argument(format!("digest {}/{}: {e}", d.hash, d.size_bytes)))
}

/// A request's digest, under the request's instance name (for the tree).
pub(super) fn parse_digest_in(
    instance_name: &str,
    function: DigestFunction,
    d: Option<&blob_access::proto::Digest>,
) -> Result<Digest, Status> {
    Ok(parse_digest(function, d)?.with_instance_name(instance_name))
}

/// REAPI reports a digest that does not match the uploaded data as INVALID_ARGUMENT;
/// backends call it DATA_LOSS.
pub(super) fn upload_status(e: Error) -> Status {
    let code = match e.code() {
        Code::DataLoss => Code::InvalidArgument,
        c => c,
    };
    Status::new(code, e.to_string())
}

fn rpc_status(result: Result<(), Status>) -> Option<rpc::Status> {
    let (code, message) = match result {
        Ok(()) => (Code::Ok, String::new()),
        Err(s) => (s.code(), s.message().to_string()),
    };
    Some(rpc::Status {
        code: code as i32,
        message,
        details: vec![],
    })
}

impl Cas {
    fn check_total(&self, total: u64, what: &str) -> Result<(), Status> {
        let max = self.0.cfg.max_batch_total_size_bytes;
        if total > max {
            return Err(Status::invalid_argument(format!(
                "{what} of {total} bytes exceeds max_batch_total_size_bytes ({max}); use ByteStream"
            )));
        }
        Ok(())
    }

    async fn update_one(
        &self,
        instance_name: &str,
        function: DigestFunction,
        r: batch_update_blobs_request::Request,
    ) -> Result<(), Status> {
        let digest = parse_digest_in(instance_name, function, r.digest.as_ref())?;
        let data = match compressor::Value::try_from(r.compressor) {
            Ok(compressor::Value::Identity) => Bytes::from(r.data),
            Ok(compressor::Value::Zstd) => {
                let size = digest.size_bytes();
                if size > self.0.cfg.max_message_size as u64 {
                    return Err(Status::invalid_argument(format!(
                        "blob {digest} is too large for a compressed batch upload; use ByteStream"
                    )));
                }
                let data = zstd::bulk::decompress(&r.data, size as usize).map_err(|e| {
                    Status::invalid_argument(format!(
                        "blob {digest}: data is not valid zstd of at most {size} bytes: {e}"
                    ))
                })?;
                Bytes::from(data)
            }
            _ => {
                return Err(Status::invalid_argument(format!(
                    "blob {digest}: compressor {} is not supported",
                    r.compressor
                )))
            }
        };
        self.0
            .backend
            .put(&digest, util::once(data))
            .await
            .map_err(upload_status)
    }

    async fn read_one(
        &self,
        instance_name: &str,
        function: DigestFunction,
        d: blob_access::proto::Digest,
    ) -> batch_read_blobs_response::Response {
        let result = match parse_digest_in(instance_name, function, Some(&d)) {
            Ok(digest) => {
                let size = digest.size_bytes() as usize;
                util::read_to_bytes(&*self.0.backend, &digest, ReadRange::FULL, size)
                    .await
                    .map_err(Status::from)
            }
            Err(s) => Err(s),
        };
        let (data, status) = match result {
            Ok(data) => (Vec::from(data), Ok(())),
            Err(s) => (Vec::new(), Err(s)),
        };
        batch_read_blobs_response::Response {
            digest: Some(d),
            data,
            compressor: compressor::Value::Identity as i32,
            status: rpc_status(status),
        }
    }
}

fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!("{what} is not implemented by this server"))
}

#[tonic::async_trait]
impl ContentAddressableStorage for Cas {
    async fn find_missing_blobs(
        &self,
        request: Request<FindMissingBlobsRequest>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        let (_, extensions, req) = request.into_parts();
        self.0
            .check_instance(&req.instance_name, &extensions, Permission::Read)?;
        let first = req.blob_digests.first().map(|d| d.hash.as_str());
        let function = digest_function(req.digest_function, first)?;
        let digests = req
            .blob_digests
            .iter()
            .map(|d| parse_digest_in(&req.instance_name, function, Some(d)))
            .collect::<Result<Vec<_>, _>>()?;
        let missing = self.0.backend.find_missing(&digests).await?;
        Ok(Response::new(FindMissingBlobsResponse {
            missing_blob_digests: missing.iter().map(Digest::to_proto).collect(),
        }))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<BatchUpdateBlobsRequest>,
    ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        let (_, extensions, req) = request.into_parts();
        self.0
            .check_instance(&req.instance_name, &extensions, Permission::Write)?;
        let first = req.requests.first().and_then(|r| r.digest.as_ref());
        let function = digest_function(req.digest_function, first.map(|d| d.hash.as_str()))?;
        // Blob sizes, not bytes on the wire: 40 KB of zstd can name 1 GiB.
        let total = req
            .requests
            .iter()
            .map(|r| {
                let size = r.digest.as_ref().map_or(0, |d| d.size_bytes.max(0) as u64);
                size.max(r.data.len() as u64)
            })
            .sum();
        self.check_total(total, "a batch update")?;
        let instance_name = &req.instance_name;
        let responses = futures::stream::iter(req.requests)
            .map(|r| async move {
                let digest = r.digest.clone();
                let status = self.update_one(instance_name, function, r).await;
                if let Err(s) = &status {
                    tracing::debug!(?digest, error = %s, "batch update of a blob failed");
                }
                batch_update_blobs_response::Response {
                    digest,
                    status: rpc_status(status),
                }
            })
            .buffered(BATCH_CONCURRENCY)
            .collect()
            .await;
        Ok(Response::new(BatchUpdateBlobsResponse { responses }))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Result<Response<BatchReadBlobsResponse>, Status> {
        let (_, extensions, req) = request.into_parts();
        self.0
            .check_instance(&req.instance_name, &extensions, Permission::Read)?;
        let first = req.digests.first().map(|d| d.hash.as_str());
        let function = digest_function(req.digest_function, first)?;
        let total = req.digests.iter().map(|d| d.size_bytes.max(0) as u64).sum();
        self.check_total(total, "a batch read")?;
        // Data is returned uncompressed, which REAPI always allows.
        let instance_name = &req.instance_name;
        let responses = futures::stream::iter(req.digests)
            .map(|d| self.read_one(instance_name, function, d))
            .buffered(BATCH_CONCURRENCY)
            .collect()
            .await;
        Ok(Response::new(BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream = BoxStream<'static, Result<GetTreeResponse, Status>>;

    async fn get_tree(
        &self,
        request: Request<GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        let (_, extensions, req) = request.into_parts();
        self.0
            .check_instance(&req.instance_name, &extensions, Permission::Read)?;
        let pages = super::get_tree::get_tree(self.0.clone(), req)?;
        Ok(Response::new(pages))
    }

    // Blob splitting and splicing are advertised as unsupported in the capabilities.

    async fn split_blob(
        &self,
        _request: Request<SplitBlobRequest>,
    ) -> Result<Response<SplitBlobResponse>, Status> {
        Err(unimplemented("SplitBlob"))
    }

    type GetChunkMappingStream = BoxStream<'static, Result<GetChunkMappingResponse, Status>>;

    async fn get_chunk_mapping(
        &self,
        _request: Request<GetChunkMappingRequest>,
    ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        Err(unimplemented("GetChunkMapping"))
    }

    async fn splice_blob(
        &self,
        _request: Request<SpliceBlobRequest>,
    ) -> Result<Response<SpliceBlobResponse>, Status> {
        Err(unimplemented("SpliceBlob"))
    }

    async fn register_chunk_mapping(
        &self,
        _request: Request<Streaming<RegisterChunkMappingRequest>>,
    ) -> Result<Response<RegisterChunkMappingResponse>, Status> {
        Err(unimplemented("RegisterChunkMapping"))
    }
}
