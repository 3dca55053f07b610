//! ByteStream Read with its data as [`Bytes`]: the same wire message as the
//! generated `ReadResponse` (field 10, `data`), but decoding splits the data
//! off tonic's receive buffer instead of copying it into a `Vec`, and a proxy
//! hands those same bytes to its own clients. At a GiB per second that copy
//! is a few percent of a proxy's CPU.
//!
//! ```
//! use blob_access::read_chunk::ReadChunk;
//! use blob_access::bytestream_proto::ReadResponse;
//! use prost::Message;
//! // Interchangeable on the wire with the generated type, both ways.
//! let wire = ReadResponse { data: b"abc".to_vec() }.encode_to_vec();
//! let chunk = ReadChunk::decode(&wire[..]).unwrap();
//! assert_eq!(&chunk.data[..], b"abc");
//! assert_eq!(chunk.encode_to_vec(), wire);
//! ```

use crate::bytestream_proto::ReadRequest;
use bytes::Bytes;
use http_body::Body;
use tonic::codec::Streaming;

/// The gRPC path of ByteStream Read.
pub const READ_PATH: &str = "/google.bytestream.ByteStream/Read";

/// `google.bytestream.ReadResponse` with `data` as [`Bytes`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReadChunk {
    #[prost(bytes = "bytes", tag = "10")]
    pub data: Bytes,
}

type StdError = Box<dyn std::error::Error + Send + Sync>;

/// Calls ByteStream Read on `service` (a channel, possibly layered) and
/// returns its messages as [`ReadChunk`]s, each at most `max_message` bytes.
pub async fn read<T>(
    service: T,
    request: tonic::Request<ReadRequest>,
    max_message: usize,
) -> Result<Streaming<ReadChunk>, tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    let mut grpc = tonic::client::Grpc::new(service).max_decoding_message_size(max_message);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unknown(format!("Service was not ready: {}", e.into())))?;
    let mut request = request;
    request.extensions_mut().insert(tonic::GrpcMethod::new(
        "google.bytestream.ByteStream",
        "Read",
    ));
    let path = http::uri::PathAndQuery::from_static(READ_PATH);
    let codec = tonic_prost::ProstCodec::<ReadRequest, ReadChunk>::default();
    Ok(grpc
        .server_streaming(request, path, codec)
        .await?
        .into_inner())
}
