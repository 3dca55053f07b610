//! A real tonic ByteStream + Capabilities server on 127.0.0.1 over a
//! `MemoryBlobAccess`, whose Read attempts misbehave on demand: a status after
//! N bytes, a clean early end, `read_offset` ignored, a corrupted byte. It
//! serves `compressed-blobs/zstd/...` (a zstd frame per 16 KiB, with
//! `read_offset` in uncompressed bytes) when asked to advertise ZSTD.
//!
//! Writes are stored once complete and verified. With
//! [`Options::keep_partial_uploads`] the server commits what it received of
//! a cut upload (by uuid) and QueryWriteStatus reports it; otherwise
//! QueryWriteStatus answers UNIMPLEMENTED (as BuildGrid does). Write attempts
//! misbehave on demand ([`WriteFault`]) and are logged.

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use bazel_remote_apis::build::bazel::semver::SemVer;
use bazel_remote_apis::google::bytestream as bs;
use blob_access::memory::MemoryBlobAccess;
use blob_access::resource::{Compressor, ReadResource, WriteResource};
use blob_access::{BlobAccess, BlobStream, Code, Digest, ReadRange};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tonic::{Request, Response, Status};

/// How one Read attempt misbehaves. Byte counts are of what goes on the wire
/// (compressed bytes for a zstd read), so cuts can fall inside a zstd frame.
#[derive(Clone, Debug)]
pub enum Fault {
    /// After `after` bytes, fail with `code` (RESOURCE_EXHAUSTED carries a 10 ms RetryInfo).
    Status { after: u64, code: Code },
    /// After `after` bytes, end with status OK.
    EarlyEnd { after: u64 },
    /// Serve from byte 0 whatever `read_offset` says.
    IgnoreOffset,
    /// Flip the bits of the blob byte at this offset.
    Corrupt { at: u64 },
}

/// How one Write attempt misbehaves.
#[derive(Clone, Debug)]
pub enum WriteFault {
    /// After receiving `after` bytes in this attempt, fail with `code`.
    Status { after: u64, code: Code },
    /// Receive everything and store the blob, then fail with UNAVAILABLE
    /// (the response lost on the way back).
    StoreThenFail,
    /// Answer ALREADY_EXISTS at the first message.
    AlreadyExists,
}

/// One Write attempt as the server saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteAttempt {
    pub uuid: String,
    /// `write_offset` of its first message.
    pub first_offset: u64,
    /// Payload bytes received.
    pub received: u64,
}

/// Server-wide behaviour.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Advertise and serve ZSTD.
    pub zstd: bool,
    /// Answer compressed reads at a non-zero offset with UNIMPLEMENTED.
    pub refuse_zstd_offset: bool,
    /// Send up to 100 000 bytes past `read_limit`, then fail with INTERNAL
    /// (servers that send whole chunks and then complain).
    pub overrun_read_limit: bool,
    /// Answer a non-zero `read_limit` with this code (UNIMPLEMENTED, INVALID_ARGUMENT).
    pub refuse_read_limit: Option<Code>,
    /// Keep what a cut upload sent and report it through QueryWriteStatus.
    pub keep_partial_uploads: bool,
    /// Wait this long before taking each Write message (a slow server, so
    /// that a proxy's timed cut falls inside an upload).
    pub write_delay: Option<std::time::Duration>,
    /// A server whose view of a cut lags the client's: the first this many
    /// Writes of an upload that continue it (write_offset > 0) are refused
    /// with INVALID_ARGUMENT "Received out of order data", as a server that
    /// still has the cut stream attached and takes them for a new upload.
    pub lagging_refusals: u32,
}

#[derive(Default)]
struct Script {
    next: VecDeque<Option<Fault>>,
    always: Option<Fault>,
    requests: Vec<(String, i64, i64)>,
    writes_next: VecDeque<Option<WriteFault>>,
    writes_always: Option<WriteFault>,
    writes: Vec<WriteAttempt>,
    queries: u32,
    /// Resumed Writes refused so far, by uuid (see `lagging_refusals`).
    refused: std::collections::HashMap<String, u32>,
    /// Committed bytes of partial uploads, by uuid.
    uploads: std::collections::HashMap<String, Vec<u8>>,
}

#[derive(Clone)]
struct Service {
    cas: Arc<MemoryBlobAccess>,
    script: Arc<Mutex<Script>>,
    opts: Options,
}

/// See the module documentation. Stops when dropped.
pub struct FaultServer {
    pub addr: SocketAddr,
    pub cas: Arc<MemoryBlobAccess>,
    script: Arc<Mutex<Script>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl FaultServer {
    pub async fn start(opts: Options) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cas = Arc::new(MemoryBlobAccess::new("fault-server", 1 << 40));
        let script = Arc::new(Mutex::new(Script::default()));
        let svc = Service {
            cas: cas.clone(),
            script: script.clone(),
            opts,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let router = tonic::transport::Server::builder()
            .add_service(bs::byte_stream_server::ByteStreamServer::new(svc.clone()))
            .add_service(reapi::capabilities_server::CapabilitiesServer::new(svc));
        tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            let _ = stopped.await;
        }));
        FaultServer {
            addr,
            cas,
            script,
            _stop: stop,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("grpc://{}", self.addr)
    }

    pub async fn insert(&self, data: Bytes) -> Digest {
        let d = Digest::of(&data);
        self.cas
            .put(&d, blob_access::util::once(data))
            .await
            .unwrap();
        d
    }

    /// Faults of the next attempts, in order (`None`: a healthy attempt),
    /// replacing what is left of the previous plan.
    pub fn plan(&self, faults: impl IntoIterator<Item = Option<Fault>>) {
        self.script.lock().unwrap().next = faults.into_iter().collect();
    }

    /// The fault of every attempt once the plan is used up.
    pub fn always(&self, fault: Option<Fault>) {
        self.script.lock().unwrap().always = fault;
    }

    /// Faults of the next Write attempts, in order.
    pub fn plan_writes(&self, faults: impl IntoIterator<Item = Option<WriteFault>>) {
        self.script.lock().unwrap().writes_next = faults.into_iter().collect();
    }

    /// The fault of every Write attempt once the plan is used up.
    pub fn always_writes(&self, fault: Option<WriteFault>) {
        self.script.lock().unwrap().writes_always = fault;
    }

    /// Each Write attempt so far.
    pub fn writes(&self) -> Vec<WriteAttempt> {
        self.script.lock().unwrap().writes.clone()
    }

    /// QueryWriteStatus calls so far.
    pub fn queries(&self) -> u32 {
        self.script.lock().unwrap().queries
    }

    /// `(resource_name, read_offset, read_limit)` of each Read so far.
    pub fn requests(&self) -> Vec<(String, i64, i64)> {
        self.script.lock().unwrap().requests.clone()
    }
}

fn status(code: Code) -> Status {
    let msg = format!("injected {code:?}");
    if code == Code::ResourceExhausted {
        let info =
            tonic_types::ErrorDetails::with_retry_info(Some(std::time::Duration::from_millis(10)));
        return <Status as tonic_types::StatusExt>::with_error_details(code, msg, info);
    }
    Status::new(code, msg)
}

#[tonic::async_trait]
impl bs::byte_stream_server::ByteStream for Service {
    type ReadStream = BoxStream<'static, Result<bs::ReadResponse, Status>>;

    async fn read(
        &self,
        req: Request<bs::ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let r = req.into_inner();
        let fault = {
            let mut s = self.script.lock().unwrap();
            s.requests
                .push((r.resource_name.clone(), r.read_offset, r.read_limit));
            let always = s.always.clone();
            s.next.pop_front().unwrap_or(always)
        };
        let res = ReadResource::parse(&r.resource_name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let zstd = res.compressor == Compressor::Zstd;
        if zstd && (!self.opts.zstd || (self.opts.refuse_zstd_offset && r.read_offset > 0)) {
            return Err(Status::unimplemented("compressed read not supported here"));
        }
        let ignore = matches!(fault, Some(Fault::IgnoreOffset));
        let offset = if ignore {
            0
        } else {
            r.read_offset.max(0) as u64
        };
        let mut limit = (r.read_limit > 0).then_some(r.read_limit as u64);
        if let (Some(code), Some(_)) = (self.opts.refuse_read_limit, limit) {
            return Err(Status::new(code, "read_limit is not supported"));
        }
        if offset > res.digest.size_bytes() {
            return Err(Status::out_of_range("read_offset past the end"));
        }
        let overrun = self.opts.overrun_read_limit && limit.is_some();
        if overrun {
            let size = res.digest.size_bytes();
            limit = limit.map(|l| (l + 100_000).min(size - offset));
        }
        let data = self.cas.get(&res.digest, ReadRange::new(offset, limit));
        let mut stream = faulty(data, offset, fault, zstd);
        if overrun {
            let complaint = Status::internal("sent more than read_limit");
            stream = stream
                .chain(futures::stream::iter([Err(complaint)]))
                .boxed();
        }
        Ok(Response::new(stream))
    }

    async fn write(
        &self,
        req: Request<tonic::Streaming<bs::WriteRequest>>,
    ) -> Result<Response<bs::WriteResponse>, Status> {
        let mut stream = req.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty Write"))?;
        let res = WriteResource::parse(&first.resource_name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let size = res.digest.size_bytes();
        let uuid = res.uuid.clone();
        // Bytes are committed as they arrive (in the upload's entry), so a
        // handler dropped with its connection leaves them behind.
        let (fault, attempt) = {
            let mut s = self.script.lock().unwrap();
            let always = s.writes_always.clone();
            let fault = s.writes_next.pop_front().unwrap_or(always);
            if !self.opts.keep_partial_uploads {
                s.uploads.remove(&uuid);
            }
            s.writes.push(WriteAttempt {
                uuid: uuid.clone(),
                first_offset: first.write_offset as u64,
                received: 0,
            });
            (fault, s.writes.len() - 1)
        };
        if matches!(fault, Some(WriteFault::AlreadyExists)) {
            return Err(Status::already_exists("injected ALREADY_EXISTS"));
        }
        if first.write_offset > 0 {
            let mut s = self.script.lock().unwrap();
            let refused = s.refused.entry(uuid.clone()).or_default();
            if *refused < self.opts.lagging_refusals {
                *refused += 1;
                return Err(Status::invalid_argument(format!(
                    "Received out of order data. Got {}, expected 0",
                    first.write_offset
                )));
            }
        }
        {
            let mut s = self.script.lock().unwrap();
            let buf = s.uploads.entry(uuid.clone()).or_default();
            if first.write_offset as usize > buf.len() {
                return Err(Status::invalid_argument(format!(
                    "write_offset {} but {} bytes committed",
                    first.write_offset,
                    buf.len()
                )));
            }
            buf.truncate(first.write_offset as usize);
        }
        let (mut received, mut msg, mut finished) = (0u64, Some(first), false);
        while let Some(m) = msg.take() {
            if let Some(d) = self.opts.write_delay {
                tokio::time::sleep(d).await;
            }
            let mut data = &m.data[..];
            let cut = match fault {
                Some(WriteFault::Status { after, code })
                    if received + data.len() as u64 > after =>
                {
                    data = &data[..(after - received) as usize];
                    Some(code)
                }
                _ => None,
            };
            received += data.len() as u64;
            {
                let mut s = self.script.lock().unwrap();
                s.writes[attempt].received = received;
                s.uploads
                    .entry(uuid.clone())
                    .or_default()
                    .extend_from_slice(data);
            }
            if let Some(code) = cut {
                return Err(status(code));
            }
            finished = m.finish_write;
            if finished {
                break;
            }
            msg = stream.message().await?;
        }
        if !finished {
            return Err(Status::invalid_argument("Write ended without finish_write"));
        }
        let buf = self
            .script
            .lock()
            .unwrap()
            .uploads
            .remove(&uuid)
            .unwrap_or_default();
        if buf.len() as u64 != size || Digest::of(&buf) != res.digest {
            return Err(Status::invalid_argument(
                "uploaded bytes do not match the digest",
            ));
        }
        self.cas
            .put(&res.digest, blob_access::util::once(buf.into()))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        if matches!(fault, Some(WriteFault::StoreThenFail)) {
            return Err(status(Code::Unavailable));
        }
        Ok(Response::new(bs::WriteResponse {
            committed_size: size as i64,
        }))
    }

    async fn query_write_status(
        &self,
        req: Request<bs::QueryWriteStatusRequest>,
    ) -> Result<Response<bs::QueryWriteStatusResponse>, Status> {
        self.script.lock().unwrap().queries += 1;
        if !self.opts.keep_partial_uploads {
            return Err(Status::unimplemented("QueryWriteStatus not implemented"));
        }
        let res = WriteResource::parse(&req.get_ref().resource_name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let stored = self
            .cas
            .find_missing(std::slice::from_ref(&res.digest))
            .await;
        if stored.is_ok_and(|m| m.is_empty()) {
            let size = res.digest.size_bytes() as i64;
            return Ok(Response::new(bs::QueryWriteStatusResponse {
                committed_size: size,
                complete: true,
            }));
        }
        let committed = self
            .script
            .lock()
            .unwrap()
            .uploads
            .get(&res.uuid)
            .map_or(0, |b| b.len());
        Ok(Response::new(bs::QueryWriteStatusResponse {
            committed_size: committed as i64,
            complete: false,
        }))
    }
}

#[tonic::async_trait]
impl reapi::capabilities_server::Capabilities for Service {
    async fn get_capabilities(
        &self,
        _: Request<reapi::GetCapabilitiesRequest>,
    ) -> Result<Response<reapi::ServerCapabilities>, Status> {
        let zstd = reapi::compressor::Value::Zstd as i32;
        Ok(Response::new(reapi::ServerCapabilities {
            cache_capabilities: Some(reapi::CacheCapabilities {
                digest_functions: vec![reapi::digest_function::Value::Sha256 as i32],
                max_batch_total_size_bytes: 4 << 20,
                supported_compressors: if self.opts.zstd { vec![zstd] } else { vec![] },
                ..Default::default()
            }),
            low_api_version: Some(SemVer {
                major: 2,
                ..Default::default()
            }),
            high_api_version: Some(SemVer {
                major: 2,
                minor: 3,
                ..Default::default()
            }),
            ..Default::default()
        }))
    }
}

struct Wire {
    data: BlobStream,
    pos: u64,
    sent: u64,
    fault: Option<Fault>,
    zstd: bool,
    done: bool,
}

/// The response stream of one attempt: `data` (starting at blob offset `pos`)
/// with `fault` applied, compressed if `zstd`.
fn faulty(
    data: BlobStream,
    pos: u64,
    fault: Option<Fault>,
    zstd: bool,
) -> BoxStream<'static, Result<bs::ReadResponse, Status>> {
    let w = Wire {
        data,
        pos,
        sent: 0,
        fault,
        zstd,
        done: false,
    };
    futures::stream::unfold(w, |mut w| async move {
        if w.done {
            return None;
        }
        let cut = match w.fault {
            Some(Fault::Status { after, code }) => Some((after, Some(code))),
            Some(Fault::EarlyEnd { after }) => Some((after, None)),
            _ => None,
        };
        if let Some((after, code)) = cut {
            if w.sent >= after {
                w.done = true;
                return code.map(|c| (Err(status(c)), w));
            }
        }
        let chunk = match w.data.next().await {
            None => {
                w.done = true;
                let end = cut.and_then(|(_, code)| code).map(|c| Err(status(c)));
                return end.map(|e| (e, w));
            }
            Some(Err(e)) => {
                w.done = true;
                return Some((Err(Status::from(e)), w));
            }
            Some(Ok(chunk)) => chunk,
        };
        let mut chunk = chunk.to_vec();
        if let Some(Fault::Corrupt { at }) = w.fault {
            if (w.pos..w.pos + chunk.len() as u64).contains(&at) {
                chunk[(at - w.pos) as usize] ^= 0xff;
            }
        }
        w.pos += chunk.len() as u64;
        let mut wire = if w.zstd {
            // A frame per 16 KiB, so that cuts leave complete frames behind.
            chunk
                .chunks(16 * 1024)
                .flat_map(|p| zstd::bulk::compress(p, 1).unwrap())
                .collect()
        } else {
            chunk
        };
        if let Some((after, _)) = cut {
            wire.truncate((after - w.sent).min(wire.len() as u64) as usize);
        }
        w.sent += wire.len() as u64;
        Some((Ok(bs::ReadResponse { data: wire }), w))
    })
    .boxed()
}
