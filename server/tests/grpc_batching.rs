//! The `grpc` node's coalescing of small gets and puts into batch calls,
//! against a real server over memory (counted through the node's metrics) and
//! against a fake CAS that answers batches wrongly.

mod server_support;

use blob_access::grpc::{GrpcBlobAccess, GrpcConfig, GrpcConnection};
use blob_access::memory::MemoryBlobAccess;
use blob_access::proto::content_addressable_storage_server::{
    ContentAddressableStorage, ContentAddressableStorageServer,
};
use blob_access::proto::*;
use blob_access::{util, BlobAccess, BlobStream, Code, Digest, Error, NodeMetrics, ReadRange};
use blob_access_server::ServerConfig;
use bytes::Bytes;
use futures::stream::BoxStream;
use server_support::*;
use std::sync::Arc;
use tonic::{Request, Response, Status};

fn node(url: &str, extra: serde_json::Value) -> GrpcBlobAccess {
    let mut cfg = serde_json::json!({
        "endpoint": url.replace("http://", "grpc://"),
        "connect_timeout": "2s",
    });
    cfg.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let cfg: GrpcConfig = serde_json::from_value(cfg).unwrap();
    GrpcBlobAccess::new(GrpcConnection::new("remote", &cfg).unwrap())
}

fn counter(ba: &dyn BlobAccess, name: &str) -> u64 {
    let mut m: Vec<NodeMetrics> = Vec::new();
    ba.metrics(&mut m);
    m[0].get(name).unwrap()
}

async fn read(ba: &dyn BlobAccess, d: &Digest) -> blob_access::Result<Bytes> {
    util::read_to_bytes(ba, d, ReadRange::FULL, 1 << 30).await
}

#[tokio::test]
async fn concurrent_small_gets_and_puts_share_batch_calls() {
    let server = start(ServerConfig::default()).await;
    let ba = node(&server.url, serde_json::json!({}));
    let blobs: Vec<(Bytes, Digest)> = (0..300).map(|i| blob(1000 + i, i as u64)).collect();
    let puts = blobs
        .iter()
        .map(|(data, d)| ba.put(d, util::once(data.clone())));
    for r in futures::future::join_all(puts).await {
        r.unwrap();
    }
    for (_, d) in &blobs {
        assert!(server.stored(d).await);
    }
    let updates = counter(&ba, "batch_updates");
    assert!((1..300).contains(&updates), "{updates} batch updates");

    let gets = blobs.iter().map(|(_, d)| read(&ba, d));
    for (r, (data, _)) in futures::future::join_all(gets)
        .await
        .into_iter()
        .zip(&blobs)
    {
        assert_eq!(&r.unwrap(), data);
    }
    let reads = counter(&ba, "batch_reads");
    assert!((1..300).contains(&reads), "{reads} batch reads");
    assert_eq!(counter(&ba, "bytestream_reads"), 0);
    assert_eq!(counter(&ba, "bytestream_writes"), 0);
}

#[tokio::test]
async fn blobs_above_the_batch_limit_go_through_bytestream() {
    let server = start(ServerConfig::default()).await;
    let ba = node(
        &server.url,
        serde_json::json!({"max_batch_size_bytes": "1KiB"}),
    );
    let (small, ds) = blob(1000, 1);
    let (large, dl) = blob(5000, 2);
    let (a, b) = futures::join!(
        ba.put(&ds, util::once(small.clone())),
        ba.put(&dl, util::once(large.clone()))
    );
    a.unwrap();
    b.unwrap();
    let (a, b) = futures::join!(read(&ba, &ds), read(&ba, &dl));
    assert_eq!(a.unwrap(), small);
    assert_eq!(b.unwrap(), large);
    assert_eq!(counter(&ba, "bytestream_writes"), 1);
    assert_eq!(counter(&ba, "bytestream_reads"), 1);
    assert_eq!(counter(&ba, "batch_updates"), 1);
    assert_eq!(counter(&ba, "batch_reads"), 1);
}

/// A memory backend whose reads and writes of one blob are refused.
struct Refusing {
    inner: Arc<MemoryBlobAccess>,
    refused: Digest,
}

#[async_trait::async_trait]
impl BlobAccess for Refusing {
    fn get(&self, digest: &Digest, range: ReadRange) -> BlobStream {
        if *digest == self.refused {
            return util::failed(Error::new(Code::PermissionDenied, "refused by the test"));
        }
        self.inner.get(digest, range)
    }
    async fn put(&self, digest: &Digest, data: BlobStream) -> blob_access::Result<()> {
        if *digest == self.refused {
            return Err(Error::new(Code::PermissionDenied, "refused by the test"));
        }
        self.inner.put(digest, data).await
    }
    async fn find_missing(&self, digests: &[Digest]) -> blob_access::Result<Vec<Digest>> {
        self.inner.find_missing(digests).await
    }
}

#[tokio::test]
async fn a_per_blob_error_in_a_batch_answers_only_that_blob() {
    let memory = Arc::new(MemoryBlobAccess::new("memory", 1 << 20));
    let (bad_data, bad) = blob(500, 99);
    let backend = Arc::new(Refusing {
        inner: memory.clone(),
        refused: bad.clone(),
    });
    let server = start_over(backend, memory, ServerConfig::default()).await;
    let ba = node(&server.url, serde_json::json!({}));
    let blobs: Vec<(Bytes, Digest)> = (0..50).map(|i| blob(600 + i, i as u64)).collect();
    let (_, absent) = blob(700, 1234);

    let mut puts: Vec<_> = blobs
        .iter()
        .map(|(data, d)| ba.put(d, util::once(data.clone())))
        .collect();
    puts.push(ba.put(&bad, util::once(bad_data)));
    let mut results = futures::future::join_all(puts).await;
    let refused = results.pop().unwrap().unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
    assert_eq!(refused.digest(), Some(&bad), "{refused}");
    for r in results {
        r.unwrap();
    }

    let mut gets: Vec<_> = blobs.iter().map(|(_, d)| read(&ba, d)).collect();
    gets.push(read(&ba, &bad));
    gets.push(read(&ba, &absent));
    let mut results = futures::future::join_all(gets).await;
    let missing = results.pop().unwrap().unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing}");
    assert!(missing.to_string().contains(absent.hash()), "{missing}");
    let refused = results.pop().unwrap().unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");
    assert!(refused.to_string().contains(bad.hash()), "{refused}");
    for (r, (data, _)) in results.into_iter().zip(&blobs) {
        assert_eq!(&r.unwrap(), data);
    }
    assert!(counter(&ba, "batch_reads") < 52);
}

/// How the fake CAS answers BatchReadBlobs.
#[derive(Clone, Copy)]
enum Answer {
    /// Leaves out the first blob asked for.
    DropFirst,
    /// Adds an answer for a blob nobody asked for.
    AddStranger,
    /// Answers with the wrong bytes for every blob.
    WrongBytes,
}

struct FakeCas(Answer);

fn unimplemented<T>() -> Result<T, Status> {
    Err(Status::unimplemented("not in this fake"))
}

#[tonic::async_trait]
impl ContentAddressableStorage for FakeCas {
    async fn find_missing_blobs(
        &self,
        _: Request<FindMissingBlobsRequest>,
    ) -> Result<Response<FindMissingBlobsResponse>, Status> {
        unimplemented()
    }
    async fn batch_update_blobs(
        &self,
        _: Request<BatchUpdateBlobsRequest>,
    ) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        unimplemented()
    }
    async fn batch_read_blobs(
        &self,
        request: Request<BatchReadBlobsRequest>,
    ) -> Result<Response<BatchReadBlobsResponse>, Status> {
        let asked = request.into_inner().digests;
        let answer =
            |d: &blob_access::proto::Digest, data: Vec<u8>| batch_read_blobs_response::Response {
                digest: Some(d.clone()),
                data,
                ..Default::default()
            };
        // The blobs of this fake are `blob(size, 7)`.
        let real = |d: &blob_access::proto::Digest| blob(d.size_bytes as usize, 7).0.to_vec();
        let mut responses: Vec<_> = match self.0 {
            Answer::DropFirst => asked.iter().skip(1).map(|d| answer(d, real(d))).collect(),
            Answer::AddStranger => asked.iter().map(|d| answer(d, real(d))).collect(),
            Answer::WrongBytes => asked
                .iter()
                .map(|d| answer(d, vec![b'x'; d.size_bytes as usize]))
                .collect(),
        };
        if let Answer::AddStranger = self.0 {
            let (data, d) = blob(10, 8);
            responses.push(answer(&d.to_proto(), data.to_vec()));
        }
        Ok(Response::new(BatchReadBlobsResponse { responses }))
    }
    type GetTreeStream = BoxStream<'static, Result<GetTreeResponse, Status>>;
    async fn get_tree(
        &self,
        _: Request<GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        unimplemented()
    }
    async fn split_blob(
        &self,
        _: Request<SplitBlobRequest>,
    ) -> Result<Response<SplitBlobResponse>, Status> {
        unimplemented()
    }
    type GetChunkMappingStream = BoxStream<'static, Result<GetChunkMappingResponse, Status>>;
    async fn get_chunk_mapping(
        &self,
        _: Request<GetChunkMappingRequest>,
    ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        unimplemented()
    }
    async fn splice_blob(
        &self,
        _: Request<SpliceBlobRequest>,
    ) -> Result<Response<SpliceBlobResponse>, Status> {
        unimplemented()
    }
    async fn register_chunk_mapping(
        &self,
        _: Request<tonic::Streaming<RegisterChunkMappingRequest>>,
    ) -> Result<Response<RegisterChunkMappingResponse>, Status> {
        unimplemented()
    }
}

/// A fake CAS on a free port (no Capabilities service: the node uses defaults).
async fn fake(answer: Answer) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ContentAddressableStorageServer::new(FakeCas(answer)))
            .serve_with_incoming(incoming),
    );
    url
}

/// Reads three blobs of the fake at once (one batch when the first goes alone).
async fn read_three(answer: Answer) -> Vec<blob_access::Result<Bytes>> {
    let ba = node(&fake(answer).await, serde_json::json!({}));
    let digests: Vec<Digest> = [100, 200, 300].iter().map(|&n| blob(n, 7).1).collect();
    futures::future::join_all(digests.iter().map(|d| read(&ba, d))).await
}

#[tokio::test]
async fn a_blob_left_out_of_a_batch_answer_is_an_error_for_that_blob() {
    let results = read_three(Answer::DropFirst).await;
    let e = results[0].as_ref().unwrap_err();
    assert!(e.to_string().contains("without this blob"), "{e}");
    assert_eq!(e.digest(), Some(&blob(100, 7).1), "{e}");
    // The others, which the fake answered correctly when asked along with it,
    // are fine, unless they were the first of their own batch.
    for r in &results[1..] {
        if let Err(e) = r {
            assert!(e.to_string().contains("without this blob"), "{e}");
        }
    }
}

#[tokio::test]
async fn an_answer_for_a_blob_not_asked_for_rejects_the_response() {
    for r in read_three(Answer::AddStranger).await {
        let e = r.unwrap_err();
        assert!(e.to_string().contains("not asked for"), "{e}");
        assert_eq!(e.code(), Code::Internal, "{e}");
    }
}

#[tokio::test]
async fn wrong_bytes_in_a_batch_answer_never_reach_the_caller() {
    for r in read_three(Answer::WrongBytes).await {
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::DataLoss, "{e}");
    }
}
