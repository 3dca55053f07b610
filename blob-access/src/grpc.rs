//! A REAPI client backend: the remote CAS a build tool already has. Small
//! blobs go through the batch calls (one round trip for many), large ones
//! stream through ByteStream. Every read is verified; a stream cut in the
//! middle is an error here (`resumable_grpc` is the node that resumes).

mod config;
mod connection;

pub use config::{Compression, FromEnv, FromFile, GrpcConfig, HeaderValue, Headers};
pub use connection::{Capabilities, GrpcConnection};

use crate::bytestream_proto::{ReadRequest, WriteRequest};
use crate::node::Counters;
use crate::proto::{
    batch_update_blobs_request, BatchReadBlobsRequest, BatchUpdateBlobsRequest,
    FindMissingBlobsRequest,
};
use crate::resource::{Compressor, ReadResource, WriteResource};
use crate::verify::verify;
use crate::{BlobAccess, BlobStream, Code, Digest, Error, NodeMetrics, ReadRange, Result};
use bytes::{Bytes, BytesMut};
use futures::future::Either;
use futures::{StreamExt, TryStreamExt};

/// Digests per FindMissingBlobs request, far below any server's message limit.
const FIND_MISSING_BATCH: usize = 10_000;

const COUNTERS: &[&str] = &[
    "gets",
    "puts",
    "find_missing",
    "bytes_read",
    "bytes_written",
    "errors",
];

/// See the module documentation.
pub struct GrpcBlobAccess {
    conn: GrpcConnection,
    counters: std::sync::Arc<Counters>,
}

impl GrpcBlobAccess {
    pub fn new(conn: GrpcConnection) -> Self {
        GrpcBlobAccess {
            conn,
            counters: std::sync::Arc::new(Counters::new(COUNTERS)),
        }
    }

    pub fn connection(&self) -> &GrpcConnection {
        &self.conn
    }

    fn fail(&self, e: impl Into<Error>, digest: Option<&Digest>) -> Error {
        self.counters.inc("errors");
        let e = e.into().with_backend(self.conn.name());
        match digest {
            Some(d) => e.with_digest(d),
            None => e,
        }
    }

    async fn batch_read(conn: GrpcConnection, digest: Digest) -> Result<Bytes> {
        let req = conn.request(BatchReadBlobsRequest {
            instance_name: conn.instance_name_for(&digest),
            digests: vec![digest.to_proto()],
            ..Default::default()
        });
        let resp = conn.cas_client().batch_read_blobs(req).await?.into_inner();
        let r = resp
            .responses
            .into_iter()
            .next()
            .ok_or_else(|| Error::internal("BatchReadBlobs answered without a response"))?;
        match r.status {
            Some(s) if s.code != 0 => Err(Error::new(Code::from(s.code), s.message)),
            _ => Ok(Bytes::from(r.data)),
        }
    }

    fn bytestream_read(conn: GrpcConnection, digest: Digest, range: ReadRange) -> BlobStream {
        futures::stream::once(async move {
            let instance = conn.instance_name_for(&digest);
            let resource = ReadResource::new(&instance, Compressor::Identity, digest);
            let req = conn.request(ReadRequest {
                resource_name: resource.to_string(),
                read_offset: range.offset as i64,
                read_limit: range.limit.unwrap_or(0) as i64,
            });
            let stream = conn.bytestream_client().read(req).await?.into_inner();
            Ok::<_, Error>(stream.map_ok(|m| Bytes::from(m.data)).map_err(Error::from))
        })
        .try_flatten()
        .boxed()
    }

    async fn batch_update(conn: GrpcConnection, digest: Digest, data: BlobStream) -> Result<()> {
        let digest = &digest;
        let mut buf = BytesMut::with_capacity(digest.size_bytes() as usize);
        let mut s = verify(digest, ReadRange::FULL, conn.name(), data);
        while let Some(c) = s.next().await {
            buf.extend_from_slice(&c?);
        }
        let req = conn.request(BatchUpdateBlobsRequest {
            instance_name: conn.instance_name_for(digest),
            requests: vec![batch_update_blobs_request::Request {
                digest: Some(digest.to_proto()),
                data: buf.freeze().into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        let resp = conn
            .cas_client()
            .batch_update_blobs(req)
            .await?
            .into_inner();
        match resp.responses.into_iter().next().and_then(|r| r.status) {
            Some(s) if s.code != 0 => Err(Error::new(Code::from(s.code), s.message)),
            _ => Ok(()),
        }
    }

    /// Streams the upload; if the data turns out wrong, the RPC is cancelled
    /// before `finish_write`, so the server never commits it.
    async fn bytestream_write(
        conn: GrpcConnection,
        digest: Digest,
        data: BlobStream,
    ) -> Result<()> {
        let size = digest.size_bytes();
        let resource = WriteResource::new(
            &conn.instance_name_for(&digest),
            Compressor::Identity,
            digest.clone(),
        )
        .to_string();
        let mut verified = verify(&digest, ReadRange::FULL, conn.name(), data);
        // A channel rather than a boxed stream: tonic's client-streaming future
        // is only `Send` for concrete stream types.
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteRequest>(4);
        let pump = Box::pin(async move {
            let (mut offset, mut name) = (0u64, Some(resource));
            while let Some(chunk) = verified.next().await {
                let chunk = chunk?;
                let next = offset + chunk.len() as u64;
                let req = WriteRequest {
                    resource_name: name.take().unwrap_or_default(),
                    write_offset: offset as i64,
                    finish_write: next == size,
                    data: chunk.into(),
                };
                offset = next;
                if tx.send(req).await.is_err() {
                    break; // The RPC ended early (e.g. the blob already existed).
                }
            }
            Ok::<_, Error>(())
        });
        let mut client = conn.bytestream_client();
        let request = conn.request(tokio_stream::wrappers::ReceiverStream::new(rx));
        let write = Box::pin(async move { client.write(request).await });
        let resp = match futures::future::select(pump, write).await {
            // Bad data: dropping `write` cancels the RPC before finish_write.
            Either::Left((Err(e), _)) => return Err(e),
            Either::Left((Ok(()), write)) => write.await?.into_inner(),
            Either::Right((r, _)) => r?.into_inner(),
        };
        if resp.committed_size != size as i64 {
            return Err(Error::data_loss(format!(
                "server committed {} bytes of a {size} byte upload",
                resp.committed_size
            )));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl BlobAccess for GrpcBlobAccess {
    fn get(&self, digest: &Digest, range: ReadRange) -> BlobStream {
        self.counters.inc("gets");
        let (conn, d, counters) = (self.conn.clone(), digest.clone(), self.counters.clone());
        let raw = if digest.size_bytes() == 0 {
            // The empty blob needs no round trip.
            futures::stream::empty().boxed()
        } else {
            futures::stream::once(async move {
                let small =
                    range.is_full() && d.size_bytes() <= conn.batch_limit().await.unwrap_or(0);
                Ok::<_, Error>(if small {
                    futures::stream::once(Self::batch_read(conn, d)).boxed()
                } else {
                    Self::bytestream_read(conn, d, range)
                })
            })
            .try_flatten()
            .boxed()
        };
        let name = self.conn.name().to_string();
        verify(digest, range, &name, raw)
            .inspect(move |r| match r {
                Ok(c) => counters.add("bytes_read", c.len() as u64),
                Err(_) => counters.inc("errors"),
            })
            .boxed()
    }

    async fn put(&self, digest: &Digest, data: BlobStream) -> Result<()> {
        self.counters.inc("puts");
        let result = if digest.size_bytes() == 0 {
            // Servers treat the empty blob as always present; still check the input.
            let mut s = verify(digest, ReadRange::FULL, self.conn.name(), data);
            while let Some(c) = s.next().await {
                c?;
            }
            Ok(())
        } else if digest.size_bytes() <= self.conn.batch_limit().await.unwrap_or(0) {
            Self::batch_update(self.conn.clone(), digest.clone(), data).await
        } else {
            Self::bytestream_write(self.conn.clone(), digest.clone(), data).await
        };
        match result {
            Ok(()) => {
                self.counters.add("bytes_written", digest.size_bytes());
                Ok(())
            }
            Err(e) => Err(self.fail(e, Some(digest))),
        }
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.counters.inc("find_missing");
        // One request per instance name (`serve` gives all of a call's the same).
        let mut by_instance: Vec<(&str, Vec<&Digest>)> = Vec::new();
        for d in digests.iter().filter(|d| d.size_bytes() > 0) {
            match by_instance
                .iter_mut()
                .find(|(i, _)| *i == d.instance_name())
            {
                Some((_, ds)) => ds.push(d),
                None => by_instance.push((d.instance_name(), vec![d])),
            }
        }
        let mut missing = Vec::new();
        for (instance, wanted) in &by_instance {
            self.find_missing_of(instance, wanted, &mut missing).await?;
        }
        Ok(missing)
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        out.push(self.counters.snapshot(self.conn.name(), "grpc"));
    }
}

impl GrpcBlobAccess {
    /// Appends to `missing` those of `wanted` (all of `instance`) the server lacks.
    async fn find_missing_of(
        &self,
        instance: &str,
        wanted: &[&Digest],
        missing: &mut Vec<Digest>,
    ) -> Result<()> {
        let upstream = crate::instance_name::join(self.conn.instance_name(), instance);
        for batch in wanted.chunks(FIND_MISSING_BATCH) {
            let req = self.conn.request(FindMissingBlobsRequest {
                instance_name: upstream.clone(),
                blob_digests: batch.iter().map(|d| d.to_proto()).collect(),
                ..Default::default()
            });
            let resp = self
                .conn
                .cas_client()
                .find_missing_blobs(req)
                .await
                .map_err(|s| self.fail(s, None))?
                .into_inner();
            for d in resp.missing_blob_digests {
                let d = Digest::from_proto(crate::DigestFunction::Sha256, &d).map_err(|e| {
                    self.fail(
                        Error::internal(format!("server answered a bad digest: {e}")),
                        None,
                    )
                })?;
                missing.push(d.with_instance_name(instance));
            }
        }
        Ok(())
    }
}
