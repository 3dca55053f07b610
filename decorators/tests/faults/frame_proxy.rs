//! A TCP proxy that reads the HTTP/2 frames going to the client and, on a
//! connection with a fault, writes a GOAWAY of its own once `after` bytes of
//! DATA have passed, naming a last-stream-id below or above the stream those
//! bytes belong to. The `h2` server API cannot choose that id; a middlebox
//! (or a buggy server) can. After a GOAWAY below the stream, the connection is
//! closed shortly after, as the server that sent it would.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One connection's injected GOAWAY.
#[derive(Clone, Copy, Debug)]
pub struct GoAway {
    /// DATA payload bytes (any stream) passed on before the GOAWAY.
    pub after: u64,
    /// The last-stream-id relative to the stream of the DATA frame that
    /// reached `after`: negative is below it (the stream was not processed).
    pub last_stream_delta: i64,
    /// The GOAWAY's error code (0 = NO_ERROR, 2 = INTERNAL_ERROR, 11 = ENHANCE_YOUR_CALM).
    pub code: u32,
}

/// See the module documentation. Stops accepting when dropped.
pub struct FrameProxy {
    pub addr: SocketAddr,
    plan: Arc<Mutex<VecDeque<GoAway>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for FrameProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl FrameProxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let plan = Arc::new(Mutex::new(VecDeque::new()));
        let p = plan.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let fault = p.lock().unwrap().pop_front();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        pipe(client, server, fault).await;
                    }
                });
            }
        });
        FrameProxy { addr, plan, accept }
    }

    pub fn endpoint(&self) -> String {
        format!("grpc://{}", self.addr)
    }

    /// The GOAWAYs of the next connections, one each.
    pub fn plan(&self, faults: impl IntoIterator<Item = GoAway>) {
        *self.plan.lock().unwrap() = faults.into_iter().collect();
    }
}

fn goaway_frame(last_stream_id: u32, code: u32) -> [u8; 17] {
    let mut f = [0u8; 17];
    f[2] = 8; // payload length
    f[3] = 0x7; // GOAWAY, no flags, stream 0
    f[9..13].copy_from_slice(&(last_stream_id & 0x7fff_ffff).to_be_bytes());
    f[13..17].copy_from_slice(&code.to_be_bytes());
    f
}

async fn pipe(mut client: TcpStream, mut server: TcpStream, fault: Option<GoAway>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut up, mut down) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    let mut pending: Vec<u8> = Vec::new();
    let mut data_bytes = 0u64;
    let mut fault = fault;
    let mut closing = false;
    loop {
        tokio::select! {
            n = client.read(&mut up) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => if server.write_all(&up[..n]).await.is_err() { break },
            },
            n = server.read(&mut down) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    pending.extend_from_slice(&down[..n]);
                    // Forward whole frames only, so a GOAWAY goes between two.
                    let mut out = Vec::new();
                    while pending.len() >= 9 {
                        let len = u32::from_be_bytes([0, pending[0], pending[1], pending[2]]) as usize;
                        if pending.len() < 9 + len {
                            break;
                        }
                        let kind = pending[3];
                        let sid = u32::from_be_bytes([pending[5], pending[6], pending[7], pending[8]]) & 0x7fff_ffff;
                        out.extend(pending.drain(..9 + len));
                        if kind == 0 && sid != 0 {
                            data_bytes += len as u64;
                            if let Some(g) = fault.filter(|g| data_bytes >= g.after) {
                                let last = (sid as i64 + g.last_stream_delta).max(0) as u32;
                                out.extend_from_slice(&goaway_frame(last, g.code));
                                closing = g.last_stream_delta < 0;
                                fault = None;
                            }
                            if closing {
                                break;
                            }
                        }
                    }
                    if client.write_all(&out).await.is_err() { break }
                    if closing {
                        // Nothing more for the refused stream; then the close.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        break;
                    }
                }
            },
        }
    }
    let _ = client.shutdown().await;
    let _ = server.shutdown().await;
}
