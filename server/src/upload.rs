//! The write half of ByteStream: the client's messages are checked (offsets,
//! resource name, finish_write), decompressed if need be, and fed through a
//! small channel into the backend's `put`, which runs in a task of its own.
//!
//! An upload lives in a [`Session`], not in the Write call: a Write cut
//! before `finish_write` (a reset, GOAWAY, a client gone, the idle limit)
//! leaves its session parked, its `put` still open with the bytes received
//! so far ([`super::parked`]). QueryWriteStatus then reports them, and a
//! Write of the same resource name at that offset goes on with them, also
//! while the old stream is still attached (the server has not noticed the
//! cut yet): the newer Write takes the session over and the older one stops.

use super::bytestream::invalid;
use super::cas::upload_status;
use super::zstd_stream::Decompressor;
use blob_access::bytestream_proto::WriteRequest;
use blob_access::resource::{Compressor, WriteResource};
use blob_access::{BlobAccess, BlobStream, Error};
use bytes::Bytes;
use futures::StreamExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, watch, Mutex};
use tonic::{Status, Streaming};

/// Upload chunks waiting for the backend; bounds a write's memory.
const UPLOAD_QUEUE: usize = 4;

/// Passes upload data to the backend one piece behind, so the last piece only
/// goes out once the client finished the write: an abandoned upload is never
/// complete, hence never stored.
struct Feed {
    tx: Option<mpsc::Sender<blob_access::Result<Bytes>>>,
    held: Option<Bytes>,
}

impl Feed {
    /// Queues `data`; false if the backend stopped reading.
    async fn send(&mut self, data: Bytes) -> bool {
        match (self.held.replace(data), &self.tx) {
            (Some(prev), Some(tx)) => tx.send(Ok(prev)).await.is_ok(),
            (None, Some(_)) => true,
            (_, None) => false,
        }
    }
    /// Releases the last piece and ends the data; false if the backend
    /// stopped reading.
    async fn finish(&mut self) -> bool {
        let sent = match (self.held.take(), &self.tx) {
            (Some(last), Some(tx)) => tx.send(Ok(last)).await.is_ok(),
            (None, Some(_)) => true,
            (_, None) => false,
        };
        self.tx = None;
        sent
    }
    /// Makes the backend discard the upload.
    async fn fail(&mut self, e: Error) {
        self.held = None;
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Err(e)).await;
        }
    }
}

/// The client's side of an upload: what it sent so far, decoded into the feed.
struct Pump {
    decoder: Option<Decompressor>,
    feed: Feed,
    /// Bytes received on the wire (compressed ones for zstd): the committed size.
    received: i64,
}

/// One upload: its `put` running in a task, and the pump feeding it.
pub(super) struct Session {
    pub(super) res: WriteResource,
    pump: Mutex<Pump>,
    /// The Write call feeding it; a newer one for the same name takes over.
    owner: AtomicU64,
    /// `Pump::received`, readable without waiting for the pump.
    received: AtomicU64,
    /// finish_write came: the put is storing the blob (or failing).
    finishing: std::sync::atomic::AtomicBool,
    /// The put's outcome once it ended.
    outcome: watch::Receiver<Option<Result<(), Error>>>,
}

impl Session {
    /// Starts the backend's put of `res`, fed by the session.
    pub(super) fn start(
        backend: Arc<dyn BlobAccess>,
        res: WriteResource,
    ) -> Result<Arc<Session>, Status> {
        let (tx, rx) = mpsc::channel(UPLOAD_QUEUE);
        let data: BlobStream = tokio_stream::wrappers::ReceiverStream::new(rx).boxed();
        let (done, outcome) = watch::channel(None);
        let digest = res.digest.clone();
        tokio::spawn(async move {
            let stored = backend.put(&digest, data).await;
            let _ = done.send(Some(stored));
        });
        let decoder = match res.compressor {
            Compressor::Identity => None,
            Compressor::Zstd => Some(Decompressor::new()?),
        };
        Ok(Arc::new(Session {
            res,
            pump: Mutex::new(Pump {
                decoder,
                feed: Feed {
                    tx: Some(tx),
                    held: None,
                },
                received: 0,
            }),
            owner: AtomicU64::new(0),
            received: AtomicU64::new(0),
            finishing: std::sync::atomic::AtomicBool::new(false),
            outcome,
        }))
    }

    /// Bytes committed so far (received on the wire).
    pub(super) async fn committed(&self) -> i64 {
        self.pump.lock().await.received
    }

    /// Where the upload stands for QueryWriteStatus: its bytes, or, once
    /// finish_write came, whether the blob was stored (waiting for the
    /// backend: a client told "all bytes" must find the blob when it reads).
    pub(super) async fn standing(&self) -> Result<i64, bool> {
        let received = self.committed().await;
        if !self.finishing.load(Ordering::SeqCst) {
            return Ok(received);
        }
        Err(self.outcome().await.is_ok())
    }

    /// Makes the session the Write call `owner`'s: an older one stops at
    /// its next message.
    pub(super) fn take_over(&self, owner: u64) {
        self.owner.store(owner, Ordering::SeqCst);
    }

    /// Whether finish_write came (the put is storing the blob, or failing).
    pub(super) fn finishing(&self) -> bool {
        self.finishing.load(Ordering::SeqCst)
    }

    /// Bytes received as of the last message taken.
    pub(super) fn received_hint(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    pub(super) fn owned_by(&self, owner: u64) -> bool {
        self.owner.load(Ordering::SeqCst) == owner
    }

    /// Finishes an upload whose every byte arrived though its finish_write
    /// did not (cut just before it; Bazel then asks QueryWriteStatus and has
    /// nothing left to send): the backend verifies and stores it. Returns
    /// whether it was such an upload. Identity only: the size of a zstd
    /// upload on the wire is not known.
    pub(super) async fn finish_if_whole(&self) -> bool {
        let mut pump = self.pump.lock().await;
        let whole = self.res.compressor == Compressor::Identity
            && pump.received == self.res.digest.size_bytes() as i64;
        if whole && !self.finishing.swap(true, Ordering::SeqCst) {
            pump.feed.finish().await;
        }
        whole
    }

    /// Ends the upload without storing anything.
    pub(super) async fn discard(&self, why: &str) {
        let e = Error::new(tonic::Code::Aborted, why.to_string());
        self.pump.lock().await.feed.fail(e).await;
    }

    /// The put's outcome, once it ended.
    async fn outcome(&self) -> Result<(), Error> {
        let mut outcome = self.outcome.clone();
        let ended = match outcome.wait_for(|o| o.is_some()).await {
            Ok(o) => o.clone().expect("waited for it"),
            Err(_) => Err(Error::internal("the upload's task ended without a result")),
        };
        ended
    }
}

/// How a Write call's feeding of a session ended.
pub(super) enum Fed {
    /// finish_write came and the backend stored the blob: the committed size.
    Stored(i64),
    /// The stream ended (or broke) before finish_write: the session may be parked.
    Cut(Status),
    /// A newer Write of the same upload took the session over.
    TakenOver,
}

/// Feeds `first` and the rest of the client's messages into `session` for
/// the Write call `owner`. A client's fault (a bad offset, bad zstd) or the
/// backend's failure is an `Err`, and the session is then discarded.
pub(super) async fn feed(
    session: &Session,
    owner: u64,
    first: WriteRequest,
    rest: &mut Streaming<WriteRequest>,
) -> Result<Fed, Status> {
    let name = first.resource_name.clone();
    let mut msg = first;
    loop {
        {
            let mut pump = session.pump.lock().await;
            if !session.owned_by(owner) {
                return Ok(Fed::TakenOver);
            }
            let finish = msg.finish_write;
            let taken = take(&mut pump, &name, msg).await;
            session
                .received
                .store(pump.received.max(0) as u64, Ordering::Relaxed);
            match taken {
                Ok(true) => {}
                // The backend stopped reading: it has the blob, or failed.
                Ok(false) => return ended(session, &session.res).await.map(Fed::Stored),
                Err(s) => {
                    pump.feed.fail(Error::new(s.code(), s.message())).await;
                    return Err(s);
                }
            }
            if finish {
                if let Some(d) = &pump.decoder {
                    if let Err(e) = d.finish() {
                        pump.feed.fail(e.clone()).await;
                        return Err(e.into());
                    }
                }
                session.finishing.store(true, Ordering::SeqCst);
                pump.feed.finish().await;
                let received = pump.received;
                drop(pump);
                session.outcome().await.map_err(upload_status)?;
                return Ok(Fed::Stored(match session.res.compressor {
                    Compressor::Identity => session.res.digest.size_bytes() as i64,
                    Compressor::Zstd => received,
                }));
            }
        }
        msg = match rest.message().await {
            Ok(Some(m)) => m,
            Ok(None) => {
                return Ok(Fed::Cut(invalid(
                    "the client ended the write without finish_write",
                )))
            }
            Err(s) => return Ok(Fed::Cut(s)),
        };
    }
}

/// What the backend's early end of reading means: stored (it had the blob)
/// or its failure.
async fn ended(session: &Session, res: &WriteResource) -> Result<i64, Status> {
    session.outcome().await.map_err(upload_status)?;
    Ok(early_committed_size(res))
}

/// Checks one message and feeds its data; false if the backend stopped reading.
async fn take(pump: &mut Pump, name: &str, msg: WriteRequest) -> Result<bool, Status> {
    if !msg.resource_name.is_empty() && msg.resource_name != name {
        return Err(invalid(format!(
            "resource_name changed during the write from {name:?} to {:?}",
            msg.resource_name
        )));
    }
    if msg.write_offset != pump.received {
        return Err(invalid(format!(
            "write_offset {} does not continue the {} bytes received",
            msg.write_offset, pump.received
        )));
    }
    pump.received += msg.data.len() as i64;
    let data = Bytes::from(msg.data);
    if data.is_empty() {
        return Ok(true);
    }
    match &mut pump.decoder {
        None => Ok(pump.feed.send(data).await),
        Some(d) => decompress_into(d, &data, &mut pump.feed).await,
    }
}

/// What REAPI says a write that ends early (the blob exists) commits.
pub(super) fn early_committed_size(res: &WriteResource) -> i64 {
    match res.compressor {
        Compressor::Identity => res.digest.size_bytes() as i64,
        Compressor::Zstd => -1,
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
