//! Upload goodput of `resumable_grpc` through a Rust proxy that kills every
//! connection after 1 s, vs the same proxy without faults, in one run.
//! Printed, not asserted.
//!
//! The server is a small in-process ByteStream service that commits what it
//! receives and reports it through QueryWriteStatus, so cut uploads go on at
//! `committed_size` (`blob-access serve` and BuildGrid keep nothing of a cut
//! upload: there every retry starts again at 0).
//!
//! Run: `cargo bench --bench resumable_upload` (BLOB_MIB=256 for a quicker run).

mod common;

use bazel_remote_apis::google::bytestream as bs;
use blob_access::grpc::{GrpcConfig, GrpcConnection};
use blob_access::resource::WriteResource;
use blob_access::{BlobAccess, Digest};
use blob_access_chaos::{Faults, Kill, Proxy};
use blob_access_decorators::resumable_grpc::{ResumableGrpcBlobAccess, RetryPolicy};
use bytes::Bytes;
use common::*;
use sha2::Digest as _;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};

/// Committed bytes and their running hash, by upload uuid.
#[derive(Clone, Default)]
struct Uploads(Arc<Mutex<HashMap<String, (u64, sha2::Sha256)>>>);

#[tonic::async_trait]
impl bs::byte_stream_server::ByteStream for Uploads {
    type ReadStream = futures::stream::Empty<Result<bs::ReadResponse, Status>>;

    async fn read(
        &self,
        _: Request<bs::ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        Err(Status::unimplemented("write-only"))
    }

    async fn write(
        &self,
        req: Request<tonic::Streaming<bs::WriteRequest>>,
    ) -> Result<Response<bs::WriteResponse>, Status> {
        let mut stream = req.into_inner();
        let mut res = None;
        while let Some(m) = stream.message().await? {
            if res.is_none() {
                let r = WriteResource::parse(&m.resource_name)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                res = Some(r);
            }
            let r = res.as_ref().unwrap();
            let mut all = self.0.lock().unwrap();
            let entry = all.entry(r.uuid.clone()).or_default();
            if m.write_offset as u64 != entry.0 {
                return Err(Status::invalid_argument(
                    "write_offset is not the committed size",
                ));
            }
            entry.0 += m.data.len() as u64;
            entry.1.update(&m.data);
            if m.finish_write {
                let (size, hasher) = entry.clone();
                let hash = hex(&hasher.finalize());
                if size != r.digest.size_bytes() || hash != r.digest.hash() {
                    return Err(Status::invalid_argument("digest mismatch"));
                }
                return Ok(Response::new(bs::WriteResponse {
                    committed_size: size as i64,
                }));
            }
        }
        Err(Status::invalid_argument("no finish_write"))
    }

    async fn query_write_status(
        &self,
        req: Request<bs::QueryWriteStatusRequest>,
    ) -> Result<Response<bs::QueryWriteStatusResponse>, Status> {
        let r = WriteResource::parse(&req.get_ref().resource_name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let committed = self.0.lock().unwrap().get(&r.uuid).map_or(0, |e| e.0);
        Ok(Response::new(bs::QueryWriteStatusResponse {
            committed_size: committed as i64,
            complete: false,
        }))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn serve() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let svc = bs::byte_stream_server::ByteStreamServer::new(Uploads::default())
        .max_decoding_message_size(64 << 20);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming),
    );
    addr
}

fn node(endpoint: &str) -> ResumableGrpcBlobAccess {
    let json = serde_json::json!({"endpoint": endpoint, "max_batch_size_bytes": 0});
    let cfg: GrpcConfig = serde_json::from_value(json).unwrap();
    let policy = RetryPolicy {
        max_attempts_without_progress: 10,
        ..RetryPolicy::default()
    };
    ResumableGrpcBlobAccess::new(GrpcConnection::new("bench", &cfg).unwrap(), policy)
}

/// Seconds to upload `blob` through a fresh node (a fresh uuid each time).
async fn timed_put(endpoint: &str, blob: &Bytes) -> (f64, u64) {
    let n = node(endpoint);
    let d = Digest::of(blob);
    let start = Instant::now();
    n.put(&d, blob_access::util::chunked(blob.clone(), 64 << 10))
        .await
        .unwrap();
    let secs = start.elapsed().as_secs_f64();
    let mut m = Vec::new();
    n.metrics(&mut m);
    (secs, m[0].get("write_retries").unwrap_or(0))
}

fn main() {
    if listing_only() {
        return;
    }
    let mib = blob_mib();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let blob: Bytes = {
        use rand::{RngCore, SeedableRng};
        let mut v = vec![0u8; (mib << 20) as usize];
        rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut v);
        v.into()
    };
    let rate = |s: f64| mib as f64 / s;
    rt.block_on(async {
        let server = serve().await;
        let proxy = Proxy::start(server, None).await.unwrap();
        let endpoint = proxy.endpoint();
        let mut base = f64::MAX;
        for _ in 0..2 {
            base = base.min(timed_put(&endpoint, &blob).await.0);
        }
        println!("blob: {mib} MiB, same server and proxy, same run");
        println!("upload, no cuts (best of 2):   {base:.2}s {:.0} MiB/s", rate(base));
        proxy.set(Some(Faults::time(Kill::Rst, Duration::from_secs(1))));
        let kills = proxy.kills.load(std::sync::atomic::Ordering::Relaxed);
        let (secs, retries) = timed_put(&endpoint, &blob).await;
        let kills = proxy.kills.load(std::sync::atomic::Ordering::Relaxed) - kills;
        println!(
            "upload, cut every 1 s:         {secs:.2}s {:.0} MiB/s, {kills} connections killed, {retries} retries, goodput ratio {:.3}",
            rate(secs),
            base / secs
        );
    });
}
