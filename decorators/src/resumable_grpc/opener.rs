//! One ByteStream Read attempt over a tonic channel: the resource name (with
//! `compressed-blobs/zstd/` when the server takes it), `read_offset` and
//! `read_limit` in uncompressed bytes, the configured request headers, and
//! each failure classified for the retry rule by what the server sent.

use super::attempt::{AttemptRequest, AttemptStream, ReadOpener};
use super::channels::Channels;
use super::observe::{Observed, ObservingChannel};
use super::retry::Failure;
use super::zstd_decode::decompress;
use blob_access::bytestream_proto::ReadRequest;
use blob_access::grpc::MAX_MESSAGE;
use blob_access::read_chunk;
use blob_access::resource::{Compressor, ReadResource};
use blob_access::Digest;
use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, StreamExt, TryFutureExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

type Decorate = Arc<dyn Fn(ReadRequest) -> tonic::Request<ReadRequest> + Send + Sync>;

/// Opens ByteStream Read attempts of one blob through the node's channels.
///
/// Cheap to clone; each attempt is a new RPC on the current channel (which
/// reconnects by itself once its connection was killed), or on a new channel
/// when the attempt asks for a fresh connection.
#[derive(Clone)]
pub struct ByteStreamOpener {
    channels: Arc<Channels>,
    /// The number of the channel the last attempt of this read used.
    used: Arc<AtomicU64>,
    instance_name: String,
    digest: Digest,
    decorate: Decorate,
    zstd_supported: Shared<BoxFuture<'static, bool>>,
}

impl ByteStreamOpener {
    /// Attempts read `digest` under `instance_name`; without further settings
    /// requests carry no extra headers and zstd is assumed to be supported.
    pub fn new(channels: Arc<Channels>, instance_name: &str, digest: &Digest) -> Self {
        let used = Arc::new(AtomicU64::new(channels.current().0));
        ByteStreamOpener {
            channels,
            used,
            instance_name: instance_name.to_string(),
            digest: digest.clone(),
            decorate: Arc::new(tonic::Request::new),
            zstd_supported: futures::future::ready(true).boxed().shared(),
        }
    }

    /// Builds each request, e.g. to attach the configured headers.
    pub fn with_request(
        mut self,
        decorate: impl Fn(ReadRequest) -> tonic::Request<ReadRequest> + Send + Sync + 'static,
    ) -> Self {
        self.decorate = Arc::new(decorate);
        self
    }

    /// Whether the server takes zstd reads (e.g. from its cached capabilities);
    /// awaited only by attempts that would compress.
    pub fn with_zstd_support(mut self, supported: BoxFuture<'static, bool>) -> Self {
        self.zstd_supported = supported.shared();
        self
    }

    async fn attempt(self, r: AttemptRequest) -> Result<AttemptStream, Failure> {
        let compressor = match r.compressor {
            Compressor::Zstd if self.zstd_supported.clone().await => Compressor::Zstd,
            _ => Compressor::Identity,
        };
        let resource = ReadResource::new(&self.instance_name, compressor, self.digest.clone());
        let mut request = (self.decorate)(ReadRequest {
            resource_name: resource.to_string(),
            read_offset: r.offset as i64,
            read_limit: r.limit as i64,
        });
        let observed = Observed::default();
        observed.attach(&mut request);
        let (number, channel) = if r.fresh_connection {
            self.channels.replace(self.used.load(Ordering::Relaxed))
        } else {
            self.channels.current()
        };
        self.used.store(number, Ordering::Relaxed);
        let stream =
            match read_chunk::read(ObservingChannel::new(channel), request, MAX_MESSAGE).await {
                Ok(stream) => stream,
                Err(status) => return Err(Failure::from_status(status, observed.sent())),
            };
        let bytes = stream
            .map(move |m| {
                m.map(|m| m.data)
                    .map_err(|status| Failure::from_status(status, observed.sent()))
            })
            .boxed();
        Ok(match compressor {
            Compressor::Zstd => decompress(bytes),
            Compressor::Identity => bytes,
        })
    }
}

impl ReadOpener for ByteStreamOpener {
    fn open(&self, request: AttemptRequest) -> AttemptStream {
        self.clone().attempt(request).try_flatten_stream().boxed()
    }
}
