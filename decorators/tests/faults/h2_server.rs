//! A ByteStream server written directly on the `h2` crate, speaking gRPC
//! framing by hand, so that a Read can end the ways only HTTP/2 middleware
//! ends it: RST_STREAM with a chosen error code, GOAWAY with a chosen error
//! code, or a graceful GOAWAY followed by the connection closing mid-stream
//! (what an nginx reload with a short `worker_shutdown_timeout` does), and
//! the endings of broken proxies: END_STREAM inside a gRPC message or without
//! trailers, trailers without `grpc-status`, an HTML error page.

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
    Reset {
        after: u64,
        reason: Reason,
    },
    GoAway {
        after: u64,
        reason: Reason,
    },
    GoAwayThenClose {
        after: u64,
    },
    /// END_STREAM without trailers, at or inside a gRPC message.
    EndStream {
        after: u64,
        within: Within,
    },
    /// Trailers that carry no `grpc-status`.
    TrailersWithoutStatus {
        after: u64,
    },
    /// No gRPC at all: an HTML page with this HTTP status (a proxy's 502, or
    /// a 200 from a misrouted web server).
    HtmlPage {
        status: u16,
    },
    /// END_STREAM inside a message after `after` bytes, and every connection
    /// open now doomed (see [`H2Server::drain`]): a proxy starting to drain.
    Drain {
        after: u64,
    },
    /// Nothing more after `after` bytes, the stream and connection left open
    /// (pings are still answered): a stuck upstream behind a proxy.
    Freeze {
        after: u64,
    },
}

/// Where an [`H2Fault::EndStream`] falls.
#[derive(Clone, Copy, Debug)]
pub enum Within {
    /// After the message holding payload byte `after`, cut there.
    Boundary,
    /// After this many bytes (1 to 4) of the next message's 5-byte prefix.
    Prefix(usize),
    /// Inside the payload of the message holding byte `after`.
    Payload,
}

impl H2Fault {
    fn after(&self) -> u64 {
        match *self {
            H2Fault::Reset { after, .. }
            | H2Fault::GoAway { after, .. }
            | H2Fault::GoAwayThenClose { after }
            | H2Fault::EndStream { after, .. }
            | H2Fault::TrailersWithoutStatus { after }
            | H2Fault::Freeze { after }
            | H2Fault::Drain { after } => after,
            H2Fault::HtmlPage { .. } => 0,
        }
    }
}

#[derive(Default)]
struct State {
    blobs: HashMap<Digest, Bytes>,
    next: VecDeque<Option<H2Fault>>,
    always: Option<H2Fault>,
    reads: u64,
    connections: u64,
    /// Connections numbered up to this reset every new stream at once (a
    /// draining proxy keeping them open); later connections work.
    doomed_upto: u64,
    /// New connections to close before the HTTP/2 handshake.
    refuse: u64,
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
const READ: &str = "/google.bytestream.ByteStream/Read";
/// Answered NOT_FOUND in a trailers-only response, as servers answer a miss.
const GET_ACTION_RESULT: &str = "/build.bazel.remote.execution.v2.ActionCache/GetActionResult";

impl H2Server {
    /// `zstd`: advertise ZSTD and serve compressed reads.
    pub async fn start(zstd: bool) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                {
                    let mut s = st.lock().unwrap();
                    if s.refuse > 0 {
                        s.refuse -= 1;
                        s.connections += 1;
                        continue;
                    }
                }
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

    /// Read (and GetActionResult) calls so far.
    pub fn reads(&self) -> u64 {
        self.state.lock().unwrap().reads
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.lock().unwrap().connections
    }

    /// Closes the next `n` new connections before the HTTP/2 handshake.
    pub fn refuse_connections(&self, n: u64) {
        self.state.lock().unwrap().refuse = n;
    }

    /// Dooms the connections open now: every new stream on them is reset
    /// with INTERNAL_ERROR at once, while new connections work.
    pub fn drain(&self) {
        let mut s = self.state.lock().unwrap();
        s.doomed_upto = s.connections;
    }
}

async fn serve_connection(socket: tokio::net::TcpStream, state: Arc<Mutex<State>>, zstd: bool) {
    let Ok(mut conn) = h2::server::handshake(socket).await else {
        return;
    };
    let id = {
        let mut s = state.lock().unwrap();
        s.connections += 1;
        s.connections
    };
    let (tx, mut rx) = unbounded_channel();
    loop {
        tokio::select! {
            req = conn.accept() => match req {
                Some(Ok((req, mut respond))) => {
                    let doomed = {
                        let mut s = state.lock().unwrap();
                        let doomed = id <= s.doomed_upto;
                        s.reads += u64::from(doomed);
                        doomed
                    };
                    if doomed {
                        respond.send_reset(Reason::INTERNAL_ERROR);
                        continue;
                    }
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
    let faulty = [READ, GET_ACTION_RESULT].contains(&path.as_str());
    let fault = faulty.then(|| {
        let mut s = state.lock().unwrap();
        s.reads += 1;
        let always = s.always;
        s.next.pop_front().unwrap_or(always)
    });
    if let Some(Some(H2Fault::HtmlPage { status })) = fault {
        html_page(respond, status);
        return;
    }
    if path == GET_ACTION_RESULT {
        let mut head = http::Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        head.headers_mut()
            .extend(grpc_status(tonic::Code::NotFound, "no such action"));
        let _ = respond.send_response(head, true);
        return;
    }
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
        READ => {
            let req = <bs::ReadRequest as prost::Message>::decode(msg).unwrap_or_default();
            match read(&mut send, req, &state, fault.flatten(), &cmds).await {
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
    fault: Option<H2Fault>,
    cmds: &UnboundedSender<Cmd>,
) -> Result<Option<http::HeaderMap>, h2::Error> {
    let Ok(res) = ReadResource::parse(&req.resource_name) else {
        return Ok(Some(grpc_status(
            tonic::Code::InvalidArgument,
            "bad resource name",
        )));
    };
    let blob = state.lock().unwrap().blobs.get(&res.digest).cloned();
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
    let after = fault.map_or(u64::MAX, |f| f.after());
    let mut sent = 0u64;
    let mut closing: Option<tokio::time::Instant> = None;
    for pos in (start..end).step_by(CHUNK) {
        let piece = blob.slice(pos..(pos + CHUNK).min(end));
        let mut wire = match res.compressor {
            Compressor::Zstd => zstd::bulk::compress(&piece, 1).unwrap(),
            Compressor::Identity => piece.to_vec(),
        };
        let fire = closing.is_none() && sent + wire.len() as u64 >= after;
        if fire {
            if let Some(H2Fault::Freeze { .. }) = fault {
                wire.truncate((after - sent) as usize);
                send_all(send, frame(&bs::ReadResponse { data: wire })).await?;
                // Hold the stream open; the client gives up on it.
                std::future::pending::<()>().await;
                return Ok(None);
            }
            if let Some(H2Fault::EndStream { within, .. }) = fault {
                end_stream(send, wire, (after - sent) as usize, within).await?;
                return Ok(None);
            }
            if let Some(H2Fault::Drain { .. }) = fault {
                {
                    let mut s = state.lock().unwrap();
                    s.doomed_upto = s.connections;
                }
                end_stream(send, wire, (after - sent) as usize, Within::Payload).await?;
                return Ok(None);
            }
        }
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
        if let Some(H2Fault::EndStream { within, .. }) = fault {
            // A message the blob does not have: never decoded, so never delivered.
            end_stream(send, vec![0; 8], 0, within).await?;
            return Ok(None);
        }
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
        H2Fault::TrailersWithoutStatus { .. } => {
            let mut h = http::HeaderMap::new();
            h.insert("x-proxy", "gone".parse().unwrap());
            let _ = send.send_trailers(h);
        }
        H2Fault::EndStream { .. }
        | H2Fault::HtmlPage { .. }
        | H2Fault::Freeze { .. }
        | H2Fault::Drain { .. } => {}
    }
    None
}

/// Sends a message of `wire` cut as `within` says after `keep` of its data
/// bytes, then END_STREAM without trailers.
async fn end_stream(
    send: &mut SendStream<Bytes>,
    wire: Vec<u8>,
    keep: usize,
    within: Within,
) -> Result<(), h2::Error> {
    let keep = keep.min(wire.len());
    let head = frame(&bs::ReadResponse {
        data: wire[..keep].to_vec(),
    });
    let framed = frame(&bs::ReadResponse { data: wire });
    let cut = match within {
        // The message shortened to `keep` bytes, whole.
        Within::Boundary => head,
        Within::Prefix(k) => {
            if keep > 0 {
                send_all(send, head).await?;
            }
            framed.slice(..k.clamp(1, 4))
        }
        // The prefix and part of the encoded message, never all of it.
        Within::Payload => framed.slice(..(5 + keep).min(framed.len() - 1)),
    };
    send_all(send, cut).await?;
    send.send_data(Bytes::new(), true)
}

/// Answers with an HTML page and the given HTTP status, as a proxy does.
fn html_page(mut respond: SendResponse<Bytes>, status: u16) {
    let head = http::Response::builder()
        .status(status)
        .header("content-type", "text/html")
        .body(())
        .unwrap();
    if let Ok(mut send) = respond.send_response(head, false) {
        let page = format!("<html><body><h1>{status}</h1>upstream went away</body></html>");
        let _ = send.send_data(Bytes::from(page), true);
    }
}
