//! A TCP proxy on 127.0.0.1 that kills connections the way middleware does:
//! after N bytes towards the client or after T, it either resets both sides
//! (RST, through SO_LINGER 0) or closes them (FIN). Used by `blob-access demo`,
//! the benchmarks and the fault-injection tests to cut streams on demand.
//! [`fake_execution`] is an Execution server whose quirks tests choose.
//!
//! ```
//! use blob_access_chaos::{Faults, Kill, Proxy};
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let upstream = "127.0.0.1:1".parse().unwrap();
//! let every_100ms = Faults::time(Kill::Rst, std::time::Duration::from_millis(100));
//! let proxy = Proxy::start(upstream, Some(every_100ms)).await.unwrap();
//! assert!(proxy.endpoint().starts_with("grpc://127.0.0.1:"));
//! # });
//! ```

pub mod fake_execution;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How a connection is killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kill {
    Rst,
    Fin,
}

/// When each new connection is killed; the first trigger reached wins.
#[derive(Clone, Copy, Debug)]
pub struct Faults {
    pub kill: Kill,
    /// Bytes forwarded to the client before the kill.
    pub after_bytes: Option<u64>,
    /// Time after the connection was accepted.
    pub after_time: Option<Duration>,
    /// How many connections to kill (later ones are left alone).
    pub times: u64,
}

impl Faults {
    /// Kill every connection after `bytes` towards the client.
    pub fn bytes(kill: Kill, bytes: u64) -> Self {
        Faults {
            kill,
            after_bytes: Some(bytes),
            after_time: None,
            times: u64::MAX,
        }
    }
    /// Kill every connection after `time`.
    pub fn time(kill: Kill, time: Duration) -> Self {
        Faults {
            kill,
            after_bytes: None,
            after_time: Some(time),
            times: u64::MAX,
        }
    }
    /// Only the next `n` connections.
    pub fn times(self, n: u64) -> Self {
        Faults { times: n, ..self }
    }
}

/// See the module documentation. Stops accepting when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    faults: Arc<Mutex<Option<Faults>>>,
    pub connections: Arc<AtomicU64>,
    pub kills: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Proxy {
    /// Listens on a free loopback port and forwards each connection to `upstream`.
    pub async fn start(upstream: SocketAddr, faults: Option<Faults>) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let faults = Arc::new(Mutex::new(faults));
        let (connections, kills) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (f, c, k) = (faults.clone(), connections.clone(), kills.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::Relaxed);
                let plan = {
                    let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
                    let plan = *f;
                    match f.as_mut() {
                        Some(p) if p.times > 1 => p.times -= 1,
                        Some(_) => *f = None,
                        None => {}
                    }
                    plan
                };
                let k = k.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        if pipe(client, server, plan).await {
                            k.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        Ok(Proxy {
            addr,
            faults,
            connections,
            kills,
            accept,
        })
    }

    pub fn endpoint(&self) -> String {
        format!("grpc://{}", self.addr)
    }

    /// Changes the faults of connections accepted from now on.
    pub fn set(&self, faults: Option<Faults>) {
        *self.faults.lock().unwrap_or_else(|e| e.into_inner()) = faults;
    }
}

/// Forwards both ways until either side closes or the fault fires; true if it fired.
async fn pipe(mut client: TcpStream, mut server: TcpStream, plan: Option<Faults>) -> bool {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let budget = plan.and_then(|p| p.after_bytes).unwrap_or(u64::MAX);
    let deadline = plan
        .and_then(|p| p.after_time)
        .map(|t| tokio::time::Instant::now() + t);
    let timer = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(timer);
    let (mut up, mut down) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    let mut sent = 0u64;
    let fired = loop {
        tokio::select! {
            n = client.read(&mut up) => match n {
                Ok(0) | Err(_) => break false,
                Ok(n) => if server.write_all(&up[..n]).await.is_err() { break false },
            },
            n = server.read(&mut down) => match n {
                Ok(0) | Err(_) => break false,
                Ok(n) => {
                    let n = (n as u64).min(budget - sent) as usize;
                    if client.write_all(&down[..n]).await.is_err() { break false }
                    sent += n as u64;
                    if sent >= budget { break true }
                }
            },
            _ = &mut timer => break true,
        }
    };
    if fired && plan.map(|p| p.kill) == Some(Kill::Rst) {
        let _ = client.set_zero_linger();
        let _ = server.set_zero_linger();
    } else {
        let _ = client.shutdown().await;
        let _ = server.shutdown().await;
    }
    fired
}
