//! The write half of ByteStream: the client's messages are checked (offsets,
//! resource name, finish_write), decompressed if need be, and fed through a
//! small channel into the backend's `put`, which runs side by side with them.

use super::bytestream::invalid;
use super::cas::upload_status;
use super::zstd_stream::Decompressor;
use blob_access::bytestream_proto::WriteRequest;
use blob_access::resource::{Compressor, WriteResource};
use blob_access::{BlobAccess, BlobStream, Error};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

/// Upload chunks waiting for the backend; bounds a write's memory.
const UPLOAD_QUEUE: usize = 4;

/// Passes upload data to the backend one piece behind, so the last piece only
/// goes out once the client finished the write: an abandoned upload is never
/// complete, hence never stored.
struct Feed {
    tx: mpsc::Sender<blob_access::Result<Bytes>>,
    held: Option<Bytes>,
}

impl Feed {
    /// Queues `data`; false if the backend stopped reading.
    async fn send(&mut self, data: Bytes) -> bool {
        match self.held.replace(data) {
            Some(prev) => self.tx.send(Ok(prev)).await.is_ok(),
            None => true,
        }
    }
    /// Releases the last piece; false if the backend stopped reading.
    async fn finish(&mut self) -> bool {
        match self.held.take() {
            Some(last) => self.tx.send(Ok(last)).await.is_ok(),
            None => true,
        }
    }
    /// Makes the backend discard the upload.
    async fn fail(&mut self, e: Error) {
        self.held = None;
        let _ = self.tx.send(Err(e)).await;
    }
}

/// Runs `put` and the pump feeding it side by side; returns the committed size.
pub(super) async fn upload(
    backend: &dyn BlobAccess,
    first: WriteRequest,
    rest: Streaming<WriteRequest>,
    res: &WriteResource,
) -> Result<i64, Status> {
    let (tx, rx) = mpsc::channel(UPLOAD_QUEUE);
    let data: BlobStream = tokio_stream::wrappers::ReceiverStream::new(rx).boxed();
    let put = backend.put(&res.digest, data);
    let pump = pump(first, rest, res, Feed { tx, held: None });
    tokio::pin!(put, pump);
    let mut pumped = None;
    let stored = loop {
        tokio::select! {
            r = &mut put => break r,
            r = &mut pump, if pumped.is_none() => pumped = Some(r),
        }
    };
    let early = early_committed_size(res);
    match (pumped, stored) {
        // A fault of the client's explains the failure best.
        (Some(Err(s)), _) => Err(s),
        (_, Err(e)) => Err(upload_status(e)),
        (Some(Ok(Some(received))), Ok(())) => Ok(match res.compressor {
            Compressor::Identity => res.digest.size_bytes() as i64,
            Compressor::Zstd => received,
        }),
        // The backend was satisfied before reading everything.
        (Some(Ok(None)) | None, Ok(())) => Ok(early),
    }
}

/// What REAPI says a write that ends early (the blob exists) commits.
pub(super) fn early_committed_size(res: &WriteResource) -> i64 {
    match res.compressor {
        Compressor::Identity => res.digest.size_bytes() as i64,
        Compressor::Zstd => -1,
    }
}

/// Feeds the client's messages to the backend. Returns the bytes received on the wire,
/// `None` if the backend stopped reading, or the client's fault (which is also
/// sent to the backend so that it discards the partial upload).
async fn pump(
    first: WriteRequest,
    mut rest: Streaming<WriteRequest>,
    res: &WriteResource,
    mut feed: Feed,
) -> Result<Option<i64>, Status> {
    let result = pump_messages(first, &mut rest, res, &mut feed).await;
    if let Err(s) = &result {
        feed.fail(Error::new(s.code(), s.message())).await;
    }
    result
}

async fn pump_messages(
    first: WriteRequest,
    rest: &mut Streaming<WriteRequest>,
    res: &WriteResource,
    feed: &mut Feed,
) -> Result<Option<i64>, Status> {
    let name = first.resource_name.clone();
    let mut decoder = match res.compressor {
        Compressor::Identity => None,
        Compressor::Zstd => Some(Decompressor::new()?),
    };
    let mut received: i64 = 0;
    let mut msg = first;
    loop {
        if !msg.resource_name.is_empty() && msg.resource_name != name {
            return Err(invalid(format!(
                "resource_name changed during the write from {name:?} to {:?}",
                msg.resource_name
            )));
        }
        if msg.write_offset != received {
            return Err(invalid(format!(
                "write_offset {} does not continue the {received} bytes received",
                msg.write_offset
            )));
        }
        received += msg.data.len() as i64;
        let data = Bytes::from(msg.data);
        let backend_reading = match (&mut decoder, data.is_empty()) {
            (_, true) => true,
            (None, false) => feed.send(data).await,
            (Some(d), false) => decompress_into(d, &data, feed).await?,
        };
        if !backend_reading {
            return Ok(None);
        }
        if msg.finish_write {
            if let Some(d) = &decoder {
                d.finish()?;
            }
            return Ok(feed.finish().await.then_some(received));
        }
        msg = rest
            .message()
            .await?
            .ok_or_else(|| invalid("the client ended the write without finish_write"))?;
    }
}

/// Decompresses `data` into `feed` in bounded pieces; false if the backend stopped reading.
async fn decompress_into(
    d: &mut Decompressor,
    data: &[u8],
    feed: &mut Feed,
) -> Result<bool, Status> {
    let mut rest = data;
    loop {
        let (used, out, more) = d.step(rest)?;
        rest = &rest[used..];
        if !out.is_empty() && !feed.send(out).await {
            return Ok(false);
        }
        if rest.is_empty() && !more {
            return Ok(true);
        }
    }
}
