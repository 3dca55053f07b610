//! The ByteStream service with Read answered in [`ReadChunk`]s. The generated
//! server wants each message's data as a `Vec`, which for a proxy is a copy of
//! every byte it passes on (its upstream's bytes arrive as `Bytes`); Write and
//! QueryWriteStatus go to the generated server unchanged.

use super::bytestream::{ByteStream, ChunkStream};
use blob_access::bytestream_proto::byte_stream_server::ByteStreamServer;
use blob_access::bytestream_proto::ReadRequest;
use blob_access::read_chunk::{ReadChunk, READ_PATH};
use futures::future::BoxFuture;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::server::{Grpc, NamedService, ServerStreamingService};
use tonic::{Request, Response, Status};

#[derive(Clone)]
pub(super) struct ByteStreamService {
    inner: Arc<ByteStream>,
    generated: ByteStreamServer<ByteStream>,
    max_message: usize,
}

impl ByteStreamService {
    pub(super) fn new(inner: ByteStream, max_message: usize) -> Self {
        let inner = Arc::new(inner);
        let generated = ByteStreamServer::from_arc(inner.clone())
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message);
        ByteStreamService {
            inner,
            generated,
            max_message,
        }
    }
}

impl NamedService for ByteStreamService {
    const NAME: &'static str = <ByteStreamServer<ByteStream> as NamedService>::NAME;
}

impl tower::Service<http::Request<Body>> for ByteStreamService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != READ_PATH {
            return self.generated.call(request);
        }
        let read = Read(self.inner.clone());
        let max = Some(self.max_message);
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<ReadChunk, ReadRequest>::default();
            let mut grpc = Grpc::new(codec).apply_max_message_size_config(max, max);
            Ok(grpc.server_streaming(read, request).await)
        })
    }
}

struct Read(Arc<ByteStream>);

impl ServerStreamingService<ReadRequest> for Read {
    type Response = ReadChunk;
    type ResponseStream = ChunkStream;
    type Future = BoxFuture<'static, Result<Response<ChunkStream>, Status>>;

    fn call(&mut self, request: Request<ReadRequest>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.read_chunks(request).await })
    }
}
