//! ByteStream Read and Write, streamed through the backend: a read is the
//! backend's `get` re-chunked (and compressed for `compressed-blobs/zstd`), a
//! write is fed into `put` as it arrives (see `upload`).
//! Dropping a read (the client cancelled) drops the backend stream with it.

use super::parked::Found;
use super::rechunk::rechunk;
use super::upload::{early_committed_size, feed, Fed, Session};
use super::zstd_stream;
use super::{status_shutting_down, Permission, Shared};
use blob_access::bytestream_proto::byte_stream_server;
use blob_access::bytestream_proto::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest,
    WriteResponse,
};
use blob_access::read_chunk::ReadChunk;
use blob_access::resource::{Compressor, ReadResource, WriteResource};
use blob_access::{BlobStream, Digest, ReadRange};
use futures::stream::BoxStream;
use futures::{Future, StreamExt, TryStreamExt};
use std::pin::Pin;
use tonic::{Request, Response, Status, Streaming};

type ReadStream = BoxStream<'static, Result<ReadResponse, Status>>;
pub(super) type ChunkStream = BoxStream<'static, Result<ReadChunk, Status>>;

pub(super) struct ByteStream(pub(super) Shared);

pub(super) fn invalid(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

/// The backend range of a read, checked the way REAPI asks.
fn read_range(req: &ReadRequest, res: &ReadResource) -> Result<ReadRange, Status> {
    // ByteStream: a negative read_offset is OUT_OF_RANGE, a negative read_limit "an error".
    if req.read_offset < 0 {
        return Err(Status::out_of_range(format!(
            "read_offset ({}) must not be negative",
            req.read_offset
        )));
    }
    if req.read_limit < 0 {
        return Err(invalid(format!(
            "read_limit ({}) must not be negative",
            req.read_limit
        )));
    }
    if res.compressor == Compressor::Zstd && req.read_limit != 0 {
        return Err(invalid("read_limit must be 0 for compressed-blobs reads"));
    }
    let (offset, size) = (req.read_offset as u64, res.digest.size_bytes());
    if offset > size {
        return Err(Status::out_of_range(format!(
            "read_offset {offset} is past the end of blob {} ({size} bytes)",
            res.digest
        )));
    }
    // A limit reaching the end is a full read, which backends verify.
    let limit = req.read_limit as u64;
    Ok(ReadRange::new(
        offset,
        (limit > 0 && limit < size - offset).then_some(limit),
    ))
}

/// Ends `messages` with UNAVAILABLE once `killed` resolves.
pub(super) fn until_killed<T: Send + 'static>(
    messages: futures::stream::BoxStream<'static, Result<T, Status>>,
    killed: impl Future<Output = ()> + Send + 'static,
) -> futures::stream::BoxStream<'static, Result<T, Status>> {
    let killed: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(killed);
    futures::stream::unfold(Some((messages, killed)), |state| async move {
        let (mut messages, mut killed) = state?;
        tokio::select! {
            biased;
            item = messages.next() => item.map(|i| (i, Some((messages, killed)))),
            () = &mut killed => Some((Err(status_shutting_down()), None)),
        }
    })
    .boxed()
}

impl ByteStream {
    /// Read, its messages holding the backend's bytes as they are (see
    /// `read_route`).
    pub(super) async fn read_chunks(
        &self,
        request: Request<ReadRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let (_, extensions, req) = request.into_parts();
        let mut res = ReadResource::parse(&req.resource_name).map_err(invalid)?;
        self.0
            .check_instance(&res.instance_name, &extensions, Permission::Read)?;
        res.digest = res.digest.with_instance_name(&res.instance_name);
        let range = read_range(&req, &res)?;
        tracing::debug!(resource = %req.resource_name, ?range, "read");
        let mut data = self.0.backend.get(&res.digest, range).peekable();
        // A missing blob (or an unreachable backend) fails the call itself
        // rather than a response stream that already began.
        tokio::select! {
            first = Pin::new(&mut data).peek() => {
                if let Some(Err(e)) = first {
                    return Err(e.clone().into());
                }
            }
            () = self.0.killed() => return Err(status_shutting_down()),
        }
        let mut data: BlobStream = data.boxed();
        if res.compressor == Compressor::Zstd {
            data = zstd_stream::compress(data, self.0.cfg.zstd_level);
        }
        let digest = res.digest.clone();
        let messages = rechunk(data, self.0.cfg.read_chunk_size).map(move |r| match r {
            Ok(data) => Ok(ReadChunk { data }),
            Err(e) => {
                tracing::debug!(%digest, error = %e, "read failed in the middle");
                Err(e.into())
            }
        });
        Ok(Response::new(until_killed(
            messages.boxed(),
            self.0.killed(),
        )))
    }

    async fn exists(&self, digest: &Digest) -> bool {
        match self
            .0
            .backend
            .find_missing(std::slice::from_ref(digest))
            .await
        {
            Ok(missing) => missing.is_empty(),
            Err(e) => {
                tracing::debug!(error = %e, "existence check before an upload failed");
                false
            }
        }
    }
}

#[tonic::async_trait]
impl byte_stream_server::ByteStream for ByteStream {
    type ReadStream = ReadStream;

    /// Required by the generated trait; the served route answers Read with
    /// `read_chunks` without this copy into a `Vec` (see `read_route`).
    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadStream>, Status> {
        let chunks = self.read_chunks(request).await?;
        Ok(chunks.map(|s| {
            s.map_ok(|c| ReadResponse {
                data: Vec::from(c.data),
            })
            .boxed()
        }))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        let _slot = self.0.uploads.acquire(request.remote_addr())?;
        let (_, extensions, mut stream) = request.into_parts();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| invalid("the write stream had no message"))?;
        let mut res = WriteResource::parse(&first.resource_name).map_err(invalid)?;
        self.0
            .check_instance(&res.instance_name, &extensions, Permission::Write)?;
        res.digest = res.digest.with_instance_name(&res.instance_name);
        tracing::debug!(resource = %first.resource_name, "write");
        // Uploading what is stored already would only cost time.
        if self.exists(&res.digest).await {
            let committed_size = early_committed_size(&res);
            return Ok(Response::new(WriteResponse { committed_size }));
        }
        // In a task of its own from here: a client that resets the stream
        // drops this call's future, and an upload taken over or started must
        // still be fed to a consistent point and kept (or removed), never
        // left half-way with no window to end it.
        let (uploads, name) = (self.0.uploads_kept.clone(), first.resource_name.clone());
        let (backend, killed) = (self.0.backend.clone(), self.0.killed());
        let task = tokio::spawn(async move {
            let owner = uploads.new_owner();
            let session = match uploads.find(&name, owner, first.write_offset).await {
                Found::Resume(session, committed) if first.write_offset as u64 == committed => {
                    session
                }
                Found::Resume(_, committed) => {
                    // Kept for the client's next try, which asks where it stands.
                    uploads.park(&name, owner).await;
                    return Err(invalid(format!(
                        "write_offset {} does not continue this upload, which has {committed} \
                         bytes (ask QueryWriteStatus)",
                        first.write_offset
                    )));
                }
                Found::Dropped => {
                    return Err(Status::resource_exhausted(
                        "this upload was cut and not kept: the server keeps a bounded number \
                         and size of cut uploads; start again at 0",
                    ))
                }
                Found::None if first.write_offset != 0 => {
                    return Err(invalid(format!(
                        "write_offset {} of an upload this server does not have (never \
                         begun, or not resumed within the window): start at 0",
                        first.write_offset
                    )))
                }
                Found::None => {
                    let session = Session::start(backend, res.clone())?;
                    uploads.add(&name, session.clone(), owner);
                    session
                }
            };
            let fed = tokio::select! {
                r = feed(&session, owner, first, &mut stream) => r,
                () = killed => {
                    uploads.remove(&name, owner);
                    session.discard("the server is shutting down").await;
                    return Err(status_shutting_down());
                }
            };
            match fed {
                Ok(Fed::Stored(committed_size)) => {
                    uploads.remove(&name, owner);
                    Ok(committed_size)
                }
                Ok(Fed::Cut(s)) => {
                    uploads.park(&name, owner).await;
                    Err(s)
                }
                Ok(Fed::TakenOver) => Err(Status::aborted(
                    "a newer write of the same upload took it over",
                )),
                Err(s) => {
                    uploads.remove(&name, owner);
                    tracing::debug!(digest = %res.digest, error = %s, "write failed");
                    Err(s)
                }
            }
        });
        let committed_size = task
            .await
            .map_err(|e| Status::internal(format!("the write's task failed: {e}")))??;
        Ok(Response::new(WriteResponse { committed_size }))
    }

    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let mut res = WriteResource::parse(&request.get_ref().resource_name).map_err(invalid)?;
        self.0
            .check_instance(&res.instance_name, request.extensions(), Permission::Read)?;
        res.digest = res.digest.with_instance_name(&res.instance_name);
        // Only a caller that may write the upload stops a stream still
        // attached (see `parked::Uploads::standing`).
        let may_write = self
            .0
            .check_instance(&res.instance_name, request.extensions(), Permission::Write)
            .is_ok();
        // An upload in progress or kept after a cut reports what it has; a
        // finished one, once the backend stored the blob (or failed to).
        match self
            .0
            .uploads_kept
            .standing(&request.get_ref().resource_name, may_write)
            .await
        {
            Some(Ok(committed_size)) => {
                return Ok(Response::new(QueryWriteStatusResponse {
                    committed_size,
                    complete: false,
                }))
            }
            Some(Err(stored)) if stored => {
                return Ok(Response::new(QueryWriteStatusResponse {
                    committed_size: early_committed_size(&res),
                    complete: true,
                }))
            }
            // Failed: the client starts again, as for an unknown upload.
            Some(Err(_)) | None => {}
        }
        // Otherwise it is complete (the blob is stored) or has to start again
        // at 0. An unknown upload is OK with 0, not the NOT_FOUND ByteStream
        // allows: Bazel's uploader fails the upload on any QueryWriteStatus
        // error but UNIMPLEMENTED, where 0 makes it resend.
        let missing = self
            .0
            .backend
            .find_missing(std::slice::from_ref(&res.digest))
            .await?;
        let complete = missing.is_empty();
        Ok(Response::new(QueryWriteStatusResponse {
            committed_size: if complete {
                early_committed_size(&res)
            } else {
                0
            },
            complete,
        }))
    }
}
