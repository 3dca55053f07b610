//! Shared by the `server_*` tests: a server over a backend on a free loopback
//! port, plain generated tonic clients, and backends with faults on demand.
#![allow(dead_code)]

use blob_access::bytestream_proto::byte_stream_client::ByteStreamClient;
use blob_access::bytestream_proto::{ReadRequest, WriteRequest};
use blob_access::memory::MemoryBlobAccess;
use blob_access::proto::content_addressable_storage_client::ContentAddressableStorageClient;
use blob_access::{BlobAccess, BlobStream, Digest, Error, ReadRange, Result};
use blob_access_server::{serve_tcp, ServerConfig};
use bytes::Bytes;
use futures::StreamExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::Status;

pub struct TestServer {
    pub url: String,
    pub memory: Arc<MemoryBlobAccess>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<()>>,
}

/// A server over a fresh 1 GiB memory backend.
pub async fn start(cfg: ServerConfig) -> TestServer {
    let memory = Arc::new(MemoryBlobAccess::new("memory", 1 << 30));
    start_over(memory.clone(), memory, cfg).await
}

/// A server over `backend`; `memory` is what the test inspects.
pub async fn start_over(
    backend: impl Into<blob_access::Storage>,
    memory: Arc<MemoryBlobAccess>,
    cfg: ServerConfig,
) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stopped.await;
    };
    let task = tokio::spawn(serve_tcp(backend.into(), cfg, listener, shutdown));
    TestServer {
        url,
        memory,
        stop: Some(stop),
        task,
    }
}

impl TestServer {
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }
    pub async fn bytestream(&self) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.channel().await)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }
    pub async fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel().await)
    }
    /// What the server's Capabilities say of action result uploads.
    pub async fn update_enabled(&self) -> bool {
        use blob_access::proto::capabilities_client::CapabilitiesClient;
        let mut caps = CapabilitiesClient::new(self.channel().await);
        let caps = caps
            .get_capabilities(blob_access::proto::GetCapabilitiesRequest::default())
            .await
            .unwrap()
            .into_inner();
        caps.cache_capabilities
            .unwrap()
            .action_cache_update_capabilities
            .unwrap()
            .update_enabled
    }
    /// Sends the shutdown signal without waiting.
    pub fn signal_stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
    /// Signals shutdown and waits for `serve_tcp` to return.
    pub async fn stop(mut self) -> Result<()> {
        self.signal_stop();
        self.task.await.unwrap()
    }
    pub async fn stored(&self, d: &Digest) -> bool {
        let missing = self.memory.find_missing(std::slice::from_ref(d)).await;
        missing.unwrap().is_empty()
    }
}

/// `size` bytes of deterministic, somewhat compressible data and their digest.
pub fn blob(size: usize, seed: u64) -> (Bytes, Digest) {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let data: Vec<u8> = (0..size)
        .map(|i| {
            if i % 4 == 0 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
            }
            // Few distinct values: random, yet zstd still has something to do.
            b"abcdefgh"[(x >> ((i % 4) * 8)) as usize & 7]
        })
        .collect();
    let d = Digest::of(&data);
    (Bytes::from(data), d)
}

pub fn read_name(d: &Digest) -> String {
    format!("blobs/{}/{}", d.hash(), d.size_bytes())
}
pub fn write_name(d: &Digest) -> String {
    format!(
        "uploads/{}/blobs/{}/{}",
        uuid::Uuid::new_v4(),
        d.hash(),
        d.size_bytes()
    )
}

/// Write messages for `data`, `chunk` bytes each, the last with finish_write.
pub fn write_requests(name: &str, data: &[u8], chunk: usize) -> Vec<WriteRequest> {
    let mut reqs: Vec<WriteRequest> = data
        .chunks(chunk)
        .scan(0i64, |offset, c| {
            let r = WriteRequest {
                resource_name: name.to_string(),
                write_offset: *offset,
                finish_write: false,
                data: c.to_vec(),
            };
            *offset += c.len() as i64;
            Some(r)
        })
        .collect();
    if reqs.is_empty() {
        reqs.push(WriteRequest {
            resource_name: name.to_string(),
            ..Default::default()
        });
    }
    reqs.last_mut().unwrap().finish_write = true;
    reqs
}

pub async fn write(
    c: &mut ByteStreamClient<Channel>,
    reqs: Vec<WriteRequest>,
) -> std::result::Result<i64, Status> {
    Ok(c.write(futures::stream::iter(reqs))
        .await?
        .into_inner()
        .committed_size)
}

/// Reads into memory; returns the data and the sizes of the messages.
pub async fn read(
    c: &mut ByteStreamClient<Channel>,
    name: &str,
    offset: i64,
    limit: i64,
) -> std::result::Result<(Vec<u8>, Vec<usize>), Status> {
    let req = ReadRequest {
        resource_name: name.to_string(),
        read_offset: offset,
        read_limit: limit,
    };
    let mut s = c.read(req).await?.into_inner();
    let (mut data, mut sizes) = (Vec::new(), Vec::new());
    while let Some(m) = s.message().await? {
        sizes.push(m.data.len());
        data.extend_from_slice(&m.data);
    }
    Ok((data, sizes))
}

/// How a [`Faulty`] backend's reads misbehave.
#[derive(Clone, Copy)]
pub enum Fault {
    /// The first `n` bytes, then UNAVAILABLE.
    FailAfter(usize),
    /// The first `n` bytes, then nothing ever again.
    StallAfter(usize),
}

/// A memory backend whose reads fail as told, and which records when a read
/// stream is dropped.
pub struct Faulty {
    pub memory: Arc<MemoryBlobAccess>,
    pub fault: Fault,
    pub dropped: Arc<AtomicBool>,
}

struct DropFlag(Arc<AtomicBool>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl BlobAccess for Faulty {
    fn get(&self, digest: &Digest, range: ReadRange) -> BlobStream {
        let (n, fail) = match self.fault {
            Fault::FailAfter(n) => (n, true),
            Fault::StallAfter(n) => (n, false),
        };
        let flag = DropFlag(self.dropped.clone());
        let head = self.memory.get(digest, range).take(1).map(move |c| {
            let c = c?;
            Ok(c.slice(..n.min(c.len())))
        });
        let tail = futures::stream::once(async move {
            let _flag = flag;
            if fail {
                Err(Error::unavailable("injected failure"))
            } else {
                futures::future::pending().await
            }
        });
        head.chain(tail).boxed()
    }
    async fn put(&self, digest: &Digest, data: BlobStream) -> Result<()> {
        self.memory.put(digest, data).await
    }
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.memory.find_missing(digests).await
    }
}
