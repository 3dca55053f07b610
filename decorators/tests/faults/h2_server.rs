//! A ByteStream server written directly on the `h2` crate, speaking gRPC
//! framing by hand, so that a Read can end the ways only HTTP/2 middleware
//! ends it: RST_STREAM with a chosen error code, GOAWAY with a chosen error
//! code, or a graceful GOAWAY followed by the connection closing mid-stream
//! (what an nginx reload with a short `worker_shutdown_timeout` does).

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use bazel_remote_apis::google::bytestream as bs;
use blob_access::resource::{Compressor, ReadResource};
use blob_access::Digest;
use bytes::{BufMut, Bytes, BytesMut};
use h2::server::SendResponse;
use h2::{Reason, SendStream};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

/// How one Read attempt ends, after `after` payload bytes (compressed bytes for zstd).
#[derive(Clone, Copy, Debug)]
pub enum H2Fault {
    Reset { after: u64, reason: Reason },
    GoAway { after: u64, reason: Reason },
    GoAwayThenClose { after: u64 },
}

#[derive(Default)]
struct State {
    blobs: HashMap<Digest, Bytes>,
    next: VecDeque<Option<H2Fault>>,
    always: Option<H2Fault>,
    reads: u64,
}

/// See the module documentation. Stops accepting when dropped.
pub struct H2Server {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for H2Server {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

enum Cmd {
    GoAway(Reason),
    Graceful,
    Close,
}

const CHUNK: usize = 64 * 1024;

impl H2Server {
    /// `zstd`: advertise ZSTD and serve compressed reads.
    pub async fn start(zstd: bool) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(serve_connection(socket, st.clone(), zstd));
            }
        });
        H2Server {
            addr,
            state,
            accept,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("grpc://{}", self.addr)
    }

    pub fn insert(&self, data: Bytes) -> Digest {
        let d = Digest::of(&data);
        self.state.lock().unwrap().blobs.insert(d.clone(), data);
        d
    }

    pub fn plan(&self, faults: impl IntoIterator<Item = Option<H2Fault>>) {
        self.state.lock().unwrap().next = faults.into_iter().collect();
    }

    pub fn always(&self, fault: Option<H2Fault>) {
        self.state.lock().unwrap().always = fault;
    }

    pub fn reads(&self) -> u64 {
        self.state.lock().unwrap().reads
    }
}

async fn serve_connection(socket: tokio::net::TcpStream, state: Arc<Mutex<State>>, zstd: bool) {
    let Ok(mut conn) = h2::server::handshake(socket).await else {
        return;
    };
    let (tx, mut rx) = unbounded_channel();
    loop {
        tokio::select! {
            req = conn.accept() => match req {
                Some(Ok((req, respond))) => {
                    tokio::spawn(handle(req, respond, state.clone(), tx.clone(), zstd));
                }
                _ => return,
            },
            Some(cmd) = rx.recv() => match cmd {
                Cmd::GoAway(reason) => conn.abrupt_shutdown(reason),
                Cmd::Graceful => conn.graceful_shutdown(),
                Cmd::Close => return,
            },
        }
    }
}

fn frame(msg: &impl prost::Message) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.encoded_len());
    b.put_u8(0);
    b.put_u32(msg.encoded_len() as u32);
    msg.encode(&mut b).unwrap();
    b.freeze()
}

fn grpc_status(code: tonic::Code, message: &str) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert("grpc-status", (code as i32).to_string().parse().unwrap());
    h.insert("grpc-message", message.replace(' ', "%20").parse().unwrap());
    h
}

async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), h2::Error> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let cap = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(cap) => cap?,
            None => return Err(h2::Error::from(Reason::CANCEL)),
        };
        let n = cap.min(data.len());
        send.send_data(data.split_to(n), false)?;
    }
    Ok(())
}

async fn handle(
    req: http::Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    state: Arc<Mutex<State>>,
    cmds: UnboundedSender<Cmd>,
    zstd: bool,
) {
    let path = req.uri().path().to_string();
    let mut body = req.into_body();
    let mut buf = BytesMut::new();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
    }
    let msg = buf.get(5..).unwrap_or_default();
    let head = http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let Ok(mut send) = respond.send_response(head, false) else {
        return;
    };
    let end = match path.as_str() {
        "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities" => {
            let compressors = if zstd {
                vec![reapi::compressor::Value::Zstd as i32]
            } else {
                vec![]
            };
            let caps = reapi::ServerCapabilities {
                cache_capabilities: Some(reapi::CacheCapabilities {
                    digest_functions: vec![reapi::digest_function::Value::Sha256 as i32],
                    supported_compressors: compressors,
                    ..Default::default()
                }),
                ..Default::default()
            };
            send_all(&mut send, frame(&caps))
                .await
                .map(|_| grpc_status(tonic::Code::Ok, ""))
        }
        "/google.bytestream.ByteStream/Read" => {
            let req = <bs::ReadRequest as prost::Message>::decode(msg).unwrap_or_default();
            match read(&mut send, req, &state, &cmds).await {
                Ok(Some(trailers)) => Ok(trailers),
                Ok(None) | Err(_) => return,
            }
        }
        _ => Ok(grpc_status(tonic::Code::Unimplemented, "no such method")),
    };
    if let Ok(trailers) = end {
        let _ = send.send_trailers(trailers);
    }
}

/// Streams the requested part of a blob with the attempt's fault; `None`
/// when the fault ended the stream.
async fn read(
    send: &mut SendStream<Bytes>,
    req: bs::ReadRequest,
    state: &Mutex<State>,
    cmds: &UnboundedSender<Cmd>,
) -> Result<Option<http::HeaderMap>, h2::Error> {
    let Ok(res) = ReadResource::parse(&req.resource_name) else {
        return Ok(Some(grpc_status(
            tonic::Code::InvalidArgument,
            "bad resource name",
        )));
    };
    let (blob, fault) = {
        let mut s = state.lock().unwrap();
        s.reads += 1;
        let always = s.always;
        (
            s.blobs.get(&res.digest).cloned(),
            s.next.pop_front().unwrap_or(always),
        )
    };
    let Some(blob) = blob else {
        return Ok(Some(grpc_status(tonic::Code::NotFound, "no such blob")));
    };
    let start = req.read_offset.max(0) as usize;
    if start > blob.len() {
        return Ok(Some(grpc_status(
            tonic::Code::OutOfRange,
            "offset past the end",
        )));
    }
    let end = match req.read_limit {
        l if l > 0 => (start + l as usize).min(blob.len()),
        _ => blob.len(),
    };
    let after = match fault {
        Some(
            H2Fault::Reset { after, .. }
            | H2Fault::GoAway { after, .. }
            | H2Fault::GoAwayThenClose { after },
        ) => after,
        None => u64::MAX,
    };
    let mut sent = 0u64;
    let mut closing: Option<tokio::time::Instant> = None;
    for pos in (start..end).step_by(CHUNK) {
        let piece = blob.slice(pos..(pos + CHUNK).min(end));
        let mut wire = match res.compressor {
            Compressor::Zstd => zstd::bulk::compress(&piece, 1).unwrap(),
            Compressor::Identity => piece.to_vec(),
        };
        let fire = closing.is_none() && sent + wire.len() as u64 >= after;
        if fire && !matches!(fault, Some(H2Fault::GoAwayThenClose { .. })) {
            wire.truncate((after - sent) as usize);
        }
        sent += wire.len() as u64;
        send_all(send, frame(&bs::ReadResponse { data: wire })).await?;
        if closing.is_some() {
            // Slow down so the connection closes in the middle of the stream.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if closing.is_some_and(|t| tokio::time::Instant::now() >= t) {
            let _ = cmds.send(Cmd::Close);
            return Ok(None);
        }
        if fire {
            match fire_fault(send, fault, cmds) {
                Some(t) => closing = Some(t),
                None => return Ok(None),
            }
        }
    }
    if closing.is_none() && sent >= after {
        // The fault point is the end of the data (e.g. an empty blob).
        if fire_fault(send, fault, cmds).is_none() {
            return Ok(None);
        }
    }
    Ok(Some(grpc_status(tonic::Code::Ok, "")))
}

/// Starts the fault: `None` if the stream is over, or the time at which a
/// gracefully closing connection is dropped.
fn fire_fault(
    send: &mut SendStream<Bytes>,
    fault: Option<H2Fault>,
    cmds: &UnboundedSender<Cmd>,
) -> Option<tokio::time::Instant> {
    match fault? {
        H2Fault::Reset { reason, .. } => send.send_reset(reason),
        H2Fault::GoAway { reason, .. } => {
            let _ = cmds.send(Cmd::GoAway(reason));
        }
        H2Fault::GoAwayThenClose { .. } => {
            let _ = cmds.send(Cmd::Graceful);
            return Some(tokio::time::Instant::now() + Duration::from_millis(8));
        }
    }
    None
}
