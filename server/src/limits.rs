//! Limits against clients that hold resources without using them: a shared
//! server must not let one broken or hostile client starve the others.
//!
//! - A request body that sends nothing for [`ServerConfig::idle_timeout`] ends
//!   with DEADLINE_EXCEEDED (a "slowloris" client opening streams and keeping
//!   them silent, or an upload whose client hung): its upload is kept as a cut one (`parked`).
//! - A TCP connection that sends no byte for the same time after it was
//!   accepted is closed before HTTP/2 even starts.
//! - A connection runs at most [`ServerConfig::max_uploads_per_connection`]
//!   ByteStream writes at once; more get RESOURCE_EXHAUSTED.
//!
//! Message sizes, batch sizes and streams per connection are enforced where
//! they are configured (tonic's decoder refuses an oversized message from its
//! 5-byte prefix, before reading it).
//!
//! [`ServerConfig::idle_timeout`]: super::ServerConfig::idle_timeout
//! [`ServerConfig::max_uploads_per_connection`]: super::ServerConfig::max_uploads_per_connection

use bytes::Bytes;
use http_body::{Body, Frame};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Sleep;
use tonic::Status;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project_lite::pin_project! {
    /// A request body that fails once the client has sent nothing for
    /// `timeout` while the server waits for it. Only waiting counts: a server
    /// busy elsewhere finds what the client sent meanwhile in the buffer.
    pub(crate) struct IdleBody<B> {
        #[pin]
        inner: B,
        timeout: Duration,
        #[pin]
        sleep: Option<Sleep>,
    }
}

impl<B> Body for IdleBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                this.sleep.set(None);
                Poll::Ready(frame.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                if this.sleep.is_none() {
                    this.sleep.set(Some(tokio::time::sleep(*this.timeout)));
                }
                match this.sleep.as_pin_mut().map(|s| s.poll(cx)) {
                    Some(Poll::Ready(())) => {
                        Poll::Ready(Some(Err(Box::new(idle_status(*this.timeout)))))
                    }
                    _ => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn idle_status(timeout: Duration) -> Status {
    Status::deadline_exceeded(format!(
        "the client sent nothing for {} while the server waited for its request \
         (idle_timeout); a partial upload is kept for resuming",
        humantime::format_duration(timeout)
    ))
}

/// Wraps every request body in an [`IdleBody`].
#[derive(Clone, Debug)]
pub(crate) struct IdleLayer(pub(crate) Duration);

impl<S> tower::Layer<S> for IdleLayer {
    type Service = IdleService<S>;
    fn layer(&self, inner: S) -> IdleService<S> {
        IdleService {
            timeout: self.0,
            inner,
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct IdleService<S> {
    timeout: Duration,
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for IdleService<S>
where
    S: tower::Service<http::Request<IdleBody<B>>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> S::Future {
        let timeout = self.timeout;
        self.inner.call(request.map(|inner| IdleBody {
            inner,
            timeout,
            sleep: None,
        }))
    }
}

/// Uploads running per client connection (by its address), for
/// `max_uploads_per_connection`. Clients without an address (Unix sockets)
/// are not counted: they run on the server's own machine.
#[derive(Debug)]
pub(crate) struct UploadSlots {
    max: usize,
    running: Mutex<HashMap<SocketAddr, usize>>,
}

/// One running upload; the slot is freed when it is dropped.
pub(crate) struct UploadSlot {
    slots: Arc<UploadSlots>,
    peer: Option<SocketAddr>,
}

impl UploadSlots {
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(UploadSlots {
            max,
            running: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one more upload from `peer`, or RESOURCE_EXHAUSTED.
    pub(crate) fn acquire(
        self: &Arc<Self>,
        peer: Option<SocketAddr>,
    ) -> Result<UploadSlot, Status> {
        if let Some(addr) = peer {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            let n = running.entry(addr).or_insert(0);
            if *n >= self.max {
                return Err(Status::resource_exhausted(format!(
                    "this connection already runs {} uploads (max_uploads_per_connection); \
                     wait for one to finish or open another connection",
                    self.max
                )));
            }
            *n += 1;
        }
        Ok(UploadSlot {
            slots: self.clone(),
            peer,
        })
    }
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        if let Some(addr) = self.peer {
            let mut running = self.slots.running.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = running.get_mut(&addr) {
                *n -= 1;
                if *n == 0 {
                    running.remove(&addr);
                }
            }
        }
    }
}

/// Passes on accepted connections once they have sent a first byte, each
/// waiting on its own task for at most `timeout`, so that connections which
/// never speak are closed and hold up nobody.
pub(crate) fn speaking<IO>(
    accepted: impl futures::Stream<Item = std::io::Result<IO>> + Send + 'static,
    timeout: Duration,
) -> impl futures::Stream<Item = std::io::Result<IO>>
where
    IO: Readable + Send + 'static,
{
    use futures::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut accepted = std::pin::pin!(accepted);
        loop {
            let next = tokio::select! {
                () = tx.closed() => break,
                next = accepted.next() => next,
            };
            match next {
                None => break,
                Some(Err(e)) => {
                    if tx.send(Err(e)).await.is_err() {
                        break;
                    }
                }
                Some(Ok(io)) => {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(timeout, io.first_byte()).await {
                            Ok(Ok(())) => {
                                let _ = tx.send(Ok(io)).await;
                            }
                            Ok(Err(e)) => tracing::debug!("connection failed before speaking: {e}"),
                            Err(_) => tracing::debug!(
                                "closing a connection that sent nothing for {}",
                                humantime::format_duration(timeout)
                            ),
                        }
                    });
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A connection that can wait for its first byte without consuming it.
pub(crate) trait Readable {
    fn first_byte(&self) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
}

impl Readable for tokio::net::TcpStream {
    async fn first_byte(&self) -> std::io::Result<()> {
        let mut b = [0u8; 1];
        self.peek(&mut b).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test(start_paused = true)]
    async fn a_silent_body_fails_after_the_timeout_and_a_talking_one_does_not() {
        let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let body = IdleBody {
            inner: http_body_util::StreamBody::new(rx),
            timeout: Duration::from_secs(10),
            sleep: None,
        };
        let mut body = std::pin::pin!(body);
        let feeder = tokio::spawn(async move {
            use futures::SinkExt;
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(9)).await;
                tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
                    .await
                    .unwrap();
            }
            // Then silence, with the sender kept open.
            std::future::pending::<()>().await;
        });
        for _ in 0..3 {
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"x"));
        }
        let started = tokio::time::Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        let status = err.downcast::<Status>().unwrap();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(
            status.message().contains("sent nothing for 10s"),
            "{status:?}"
        );
        feeder.abort();
    }

    #[test]
    fn upload_slots_are_counted_per_connection_and_freed() {
        let slots = UploadSlots::new(2);
        let a: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:1001".parse().unwrap();
        let a1 = slots.acquire(Some(a)).unwrap();
        let _a2 = slots.acquire(Some(a)).unwrap();
        let refused = slots.acquire(Some(a)).err().unwrap();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        let _b1 = slots.acquire(Some(b)).unwrap();
        // No address: not counted.
        let _u: Vec<_> = (0..5).map(|_| slots.acquire(None).unwrap()).collect();
        drop(a1);
        let _a3 = slots.acquire(Some(a)).unwrap();
        drop((_a2, _a3, _b1));
        assert!(slots.running.lock().unwrap().is_empty());
    }
}
