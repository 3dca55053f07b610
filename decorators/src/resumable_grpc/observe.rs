//! What the server actually said: a `grpc-status` seen on the wire.
//!
//! tonic turns every way a call can end into a `Status`, and its code and
//! message do not tell an answer the server sent from one tonic made up (a
//! decode error, an unexpected EOF, a missing trailer, an HTTP status, an h2
//! or io error). So the channel is wrapped: a call that carries an
//! [`Observed`] in its request extensions gets it filled with the
//! `grpc-status` of the response headers (a trailers-only response) or of the
//! trailers, as they pass through. [`super::retry`] decides from that.
//!
//! The channels of a `GrpcConnection` turn a proxy's HTML error page into a
//! `grpc-status` mapped from its HTTP status (`blob_access::grpc::http_status`),
//! and [`ObservingChannel`] wraps such a channel, so it sees that made-up
//! status as if it came over the wire. The response carries a `Synthesized`
//! marker, and a marked response is not recorded: a proxy's 404 page during a
//! reload stays a transport failure to retry, not the server's UNIMPLEMENTED.

use blob_access::grpc::http_status::Synthesized;
use blob_access::Code;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

const NONE: i32 = -1;

/// The `grpc-status` the server sent on one call, if any. Cheap to clone; the
/// clones share the record.
#[derive(Clone, Debug)]
pub struct Observed(Arc<AtomicI32>);

impl Default for Observed {
    fn default() -> Self {
        Observed(Arc::new(AtomicI32::new(NONE)))
    }
}

impl Observed {
    /// The code of the `grpc-status` received, `None` if none arrived.
    pub fn sent(&self) -> Option<Code> {
        match self.0.load(Ordering::Acquire) {
            NONE => None,
            c => Some(Code::from_i32(c)),
        }
    }

    /// Attaches this record to a request, for [`ObservingChannel`] to fill.
    pub fn attach<T>(&self, request: &mut tonic::Request<T>) {
        request.extensions_mut().insert(self.clone());
    }

    fn record(&self, headers: &http::HeaderMap) {
        // tonic's own parser, so the code recorded is the one tonic reports.
        if let Some(status) = tonic::Status::from_header_map(headers) {
            self.0.store(status.code() as i32, Ordering::Release);
        }
    }
}

/// A gRPC channel (or any HTTP service) whose calls carrying an [`Observed`]
/// get it filled. Calls without one pass through untouched.
#[derive(Clone, Debug)]
pub struct ObservingChannel<S> {
    inner: S,
}

impl<S> ObservingChannel<S> {
    pub fn new(inner: S) -> Self {
        ObservingChannel { inner }
    }
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for ObservingChannel<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<ObservedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let observed = req.extensions().get::<Observed>().cloned();
        self.inner
            .call(req)
            .map(move |res| {
                res.map(|response| {
                    let synthesized = response.extensions().get::<Synthesized>().is_some();
                    if let (Some(o), false) = (&observed, synthesized) {
                        o.record(response.headers());
                    }
                    response.map(|inner| ObservedBody { inner, observed })
                })
            })
            .boxed()
    }
}

/// A response body that records the `grpc-status` of its trailers.
pub struct ObservedBody<B> {
    inner: B,
    observed: Option<Observed>,
}

impl<B> Body for ObservedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let (Some(Ok(frame)), Some(o)) = (&frame, &this.observed) {
            if let Some(trailers) = frame.trailers_ref() {
                o.record(trailers);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
