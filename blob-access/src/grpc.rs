//! A REAPI client backend: the remote CAS a build tool already has. Small
//! blobs go through the batch calls (one round trip for many), large ones
//! stream through ByteStream. Every read is verified; a stream cut in the
//! middle is an error here (`resumable_grpc` is the node that resumes).

mod batch;
mod calls;
mod checks;
mod config;
mod connection;
mod credential_helper;
mod execution;
pub mod http_status;

pub use calls::{CallsOnce, CasCalls};
pub use config::{Compression, FromEnv, FromFile, GrpcConfig, HeaderValue, Headers};
pub use connection::{Capabilities, GrpcChannel, GrpcConnection, MAX_MESSAGE};
pub use execution::{execution_client, GrpcExecution};

use crate::bytestream_proto::{ReadRequest, WriteRequest};
use crate::node::Counters;
use crate::proto::{
    batch_update_blobs_request, BatchReadBlobsRequest, BatchUpdateBlobsRequest,
    FindMissingBlobsRequest,
};
use crate::resource::{Compressor, ReadResource, WriteResource};
use crate::verify::verify;
use crate::{BlobAccess, BlobStream, Code, Digest, Error, NodeMetrics, ReadRange, Result};
use batch::Coalescer;
use bytes::{Bytes, BytesMut};
use futures::future::Either;
use futures::{FutureExt, StreamExt, TryStreamExt};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// Digests per FindMissingBlobs request, far below any server's message limit.
const FIND_MISSING_BATCH: usize = 10_000;

const COUNTERS: &[&str] = &[
    "gets",
    "puts",
    "find_missing",
    "bytes_read",
    "bytes_written",
    "errors",
    "batch_reads",
    "batch_updates",
    "bytestream_reads",
    "bytestream_writes",
];

/// See the module documentation.
pub struct GrpcBlobAccess {
    conn: GrpcConnection,
    calls: Arc<dyn CasCalls>,
    counters: Arc<Counters>,
    /// Small full reads, coalesced into BatchReadBlobs calls.
    reads: Arc<Coalescer<Digest, Bytes>>,
    /// Small writes, coalesced into BatchUpdateBlobs calls.
    updates: Arc<Coalescer<(Digest, Bytes), ()>>,
    /// A small read the server refuses to batch goes through ByteStream here
    /// (else its UNIMPLEMENTED is the caller's to act on).
    read_fallback: bool,
}

impl GrpcBlobAccess {
    pub fn new(conn: GrpcConnection) -> Self {
        let calls = Arc::new(CallsOnce(conn.clone()));
        Self::with_calls(conn, calls)
    }

    /// A node whose unary CAS calls are made by `calls` (e.g. retried).
    pub fn with_calls(conn: GrpcConnection, calls: Arc<dyn CasCalls>) -> Self {
        let counters = Arc::new(Counters::new(COUNTERS));
        let (c, k, n) = (conn.clone(), calls.clone(), counters.clone());
        let reads = Coalescer::new(Arc::new(move |digests| {
            Self::read_batch(c.clone(), k.clone(), n.clone(), digests).boxed()
        }));
        let (c, k, n) = (conn.clone(), calls.clone(), counters.clone());
        let updates = Coalescer::new(Arc::new(move |blobs| {
            Self::update_batch(c.clone(), k.clone(), n.clone(), blobs).boxed()
        }));
        GrpcBlobAccess {
            conn,
            calls,
            counters,
            reads,
            updates,
            read_fallback: true,
        }
    }

    /// A small read whose batch call the server answers UNIMPLEMENTED fails
    /// with that code instead of going through this node's ByteStream read
    /// (`resumable_grpc` reads it its own way). Later reads see a batch
    /// limit of 0 either way.
    pub fn without_read_fallback(mut self) -> Self {
        self.read_fallback = false;
        self
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

    /// BatchReadBlobs for `digests`, one call per instance name and digest function among them;
    /// answers each, in order. The bytes are verified by `get`, as any other read.
    async fn read_batch(
        conn: GrpcConnection,
        calls: Arc<dyn CasCalls>,
        counters: Arc<Counters>,
        digests: Vec<Digest>,
    ) -> Vec<Result<Bytes>> {
        let groups = by_call(digests.iter().cloned());
        if groups.len() == 1 {
            return Self::read_batch_of_one_instance(conn, &*calls, counters, digests).await;
        }
        let calls = groups.into_values().map(|group| {
            let (conn, calls, counters) = (conn.clone(), calls.clone(), counters.clone());
            async move {
                let results =
                    Self::read_batch_of_one_instance(conn, &*calls, counters, group.clone()).await;
                group.into_iter().zip(results).collect::<Vec<_>>()
            }
        });
        let found: HashMap<Digest, Result<Bytes>> = futures::future::join_all(calls)
            .await
            .into_iter()
            .flatten()
            .collect();
        digests.iter().map(|d| found[d].clone()).collect()
    }

    async fn read_batch_of_one_instance(
        conn: GrpcConnection,
        calls: &dyn CasCalls,
        counters: Arc<Counters>,
        digests: Vec<Digest>,
    ) -> Vec<Result<Bytes>> {
        counters.inc("batch_reads");
        let unique = distinct(digests.iter());
        let req = BatchReadBlobsRequest {
            instance_name: conn.instance_name_for(&digests[0]),
            digests: unique.iter().map(|d| d.to_proto()).collect(),
            digest_function: digests[0].function().to_proto(),
            ..Default::default()
        };
        let answered = match calls.batch_read_blobs(req).await {
            Ok(r) => r.responses.into_iter().map(|r| {
                let result = match (status_result(r.status), r.compressor) {
                    (Ok(()), 0) => Ok(Bytes::from(r.data)),
                    (Ok(()), c) => Err(Error::internal(format!(
                        "the server answered with compressor {c}, which was not asked for"
                    ))),
                    (Err(e), _) => Err(e),
                };
                (r.digest, result)
            }),
            Err(e) => return vec![Err(e); digests.len()],
        };
        let found = match match_responses(&unique, answered, "BatchReadBlobs") {
            Ok(found) => found,
            Err(e) => return vec![Err(e.with_backend(conn.name())); digests.len()],
        };
        let named = |e: &Error, d| e.clone().with_backend(conn.name()).with_digest(d);
        digests
            .iter()
            .map(|d| found[d].as_ref().cloned().map_err(|e| named(e, d)))
            .collect()
    }

    fn bytestream_read(
        conn: GrpcConnection,
        counters: Arc<Counters>,
        digest: Digest,
        range: ReadRange,
    ) -> BlobStream {
        counters.inc("bytestream_reads");
        futures::stream::once(async move {
            let instance = conn.instance_name_for(&digest);
            let resource = ReadResource::new(&instance, Compressor::Identity, digest);
            let req = conn.request(ReadRequest {
                resource_name: resource.to_string(),
                read_offset: range.offset as i64,
                read_limit: range.limit.unwrap_or(0) as i64,
            });
            let stream = conn.read_chunks(req).await?;
            Ok::<_, Error>(stream.map_ok(|m| m.data).map_err(Error::from))
        })
        .try_flatten()
        .boxed()
    }

    /// Reads a small blob into memory (verified) and sends it in a batch.
    async fn batch_update(&self, digest: &Digest, data: BlobStream, limit: u64) -> Result<()> {
        let mut buf = BytesMut::with_capacity(digest.size_bytes() as usize);
        let mut s = verify(digest, ReadRange::FULL, self.conn.name(), data);
        while let Some(c) = s.next().await {
            buf.extend_from_slice(&c?);
        }
        let (size, data) = (digest.size_bytes(), buf.freeze());
        let sent = self
            .updates
            .call((digest.clone(), data.clone()), size, limit);
        match sent.await {
            // A server without batch calls: this blob too through ByteStream.
            Err(e) if self.conn.note_batch_failure(&e) => {
                let (conn, digest) = (self.conn.clone(), digest.clone());
                Self::bytestream_write(conn, digest, crate::util::once(data)).await
            }
            r => r,
        }
    }

    /// BatchUpdateBlobs for `blobs`, one call per instance name and digest function among them;
    /// answers each, in order.
    async fn update_batch(
        conn: GrpcConnection,
        calls: Arc<dyn CasCalls>,
        counters: Arc<Counters>,
        blobs: Vec<(Digest, Bytes)>,
    ) -> Vec<Result<()>> {
        let groups = by_call(blobs.iter().map(|(d, _)| d.clone()));
        if groups.len() == 1 {
            return Self::update_batch_of_one_instance(conn, &*calls, counters, blobs).await;
        }
        let mut parts: BTreeMap<CallKey, Vec<(Digest, Bytes)>> = BTreeMap::new();
        for (d, data) in &blobs {
            parts
                .entry(call_key(d))
                .or_default()
                .push((d.clone(), data.clone()));
        }
        let calls = parts.into_values().map(|part| {
            let (conn, calls, counters) = (conn.clone(), calls.clone(), counters.clone());
            async move {
                let digests: Vec<Digest> = part.iter().map(|(d, _)| d.clone()).collect();
                let results =
                    Self::update_batch_of_one_instance(conn, &*calls, counters, part).await;
                digests.into_iter().zip(results).collect::<Vec<_>>()
            }
        });
        let found: HashMap<Digest, Result<()>> = futures::future::join_all(calls)
            .await
            .into_iter()
            .flatten()
            .collect();
        blobs.iter().map(|(d, _)| found[d].clone()).collect()
    }

    async fn update_batch_of_one_instance(
        conn: GrpcConnection,
        calls: &dyn CasCalls,
        counters: Arc<Counters>,
        blobs: Vec<(Digest, Bytes)>,
    ) -> Vec<Result<()>> {
        counters.inc("batch_updates");
        let mut seen = HashSet::new();
        let requests = blobs
            .iter()
            .filter(|(d, _)| seen.insert(d))
            .map(|(d, data)| batch_update_blobs_request::Request {
                digest: Some(d.to_proto()),
                data: data.clone().into(),
                ..Default::default()
            })
            .collect();
        let unique = distinct(blobs.iter().map(|(d, _)| d));
        let req = BatchUpdateBlobsRequest {
            instance_name: conn.instance_name_for(&blobs[0].0),
            requests,
            digest_function: blobs[0].0.function().to_proto(),
        };
        let answered = match calls.batch_update_blobs(req).await {
            Ok(r) => r
                .responses
                .into_iter()
                .map(|r| match status_result(r.status) {
                    // Some servers say so of a blob they had: it is stored.
                    Err(e) if e.code() == Code::AlreadyExists => (r.digest, Ok(())),
                    result => (r.digest, result),
                }),
            Err(e) => return vec![Err(e); blobs.len()],
        };
        let found = match match_responses(&unique, answered, "BatchUpdateBlobs") {
            Ok(found) => found,
            Err(e) => return vec![Err(e); blobs.len()],
        };
        blobs.iter().map(|(d, _)| found[d].clone()).collect()
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
        let (reads, fallback) = (self.reads.clone(), self.read_fallback);
        let raw = if digest.size_bytes() == 0 {
            // The empty blob needs no round trip.
            futures::stream::empty().boxed()
        } else {
            let c = counters.clone();
            futures::stream::once(async move {
                conn.check_digest_function(d.function()).await?;
                let limit = conn.batch_limit().await.unwrap_or(0);
                let size = d.size_bytes();
                Ok::<_, Error>(if range.is_full() && size <= limit {
                    let read = async move {
                        match reads.call(d.clone(), size, limit).await {
                            // A server without batch calls: this blob too through ByteStream.
                            Err(e) if conn.note_batch_failure(&e) && fallback => {
                                Self::bytestream_read(conn, c, d, range)
                            }
                            r => futures::stream::once(async { r }).boxed(),
                        }
                    };
                    futures::stream::once(read).flatten().boxed()
                } else {
                    Self::bytestream_read(conn, c, d, range)
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
        } else if let Err(e) = self.conn.check_digest_function(digest.function()).await {
            Err(e)
        } else {
            let limit = self.conn.batch_limit().await.unwrap_or(0);
            if digest.size_bytes() <= limit {
                self.batch_update(digest, data, limit).await
            } else {
                self.counters.inc("bytestream_writes");
                Self::bytestream_write(self.conn.clone(), digest.clone(), data).await
            }
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
        // One request per instance name and digest function (`serve` gives
        // all of a call's the same).
        let mut groups: Vec<(CallKey, Vec<&Digest>)> = Vec::new();
        for d in digests.iter().filter(|d| d.size_bytes() > 0) {
            let key = call_key(d);
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, ds)) => ds.push(d),
                None => groups.push((key, vec![d])),
            }
        }
        let mut missing = Vec::new();
        for ((instance, function), wanted) in &groups {
            let first = wanted[0];
            let refused = self.conn.check_digest_function(*function).await;
            refused.map_err(|e| e.with_digest(first))?;
            self.find_missing_of(instance, *function, wanted, &mut missing)
                .await?;
        }
        Ok(missing)
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        out.push(self.counters.snapshot(self.conn.name(), "grpc"));
    }
}

impl GrpcBlobAccess {
    /// Appends to `missing` those of `wanted` (all of `instance` and
    /// `function`) the server lacks.
    async fn find_missing_of(
        &self,
        instance: &str,
        function: crate::DigestFunction,
        wanted: &[&Digest],
        missing: &mut Vec<Digest>,
    ) -> Result<()> {
        let upstream = crate::instance_name::join(self.conn.instance_name(), instance);
        for batch in wanted.chunks(FIND_MISSING_BATCH) {
            let req = FindMissingBlobsRequest {
                instance_name: upstream.clone(),
                blob_digests: batch.iter().map(|d| d.to_proto()).collect(),
                digest_function: function.to_proto(),
            };
            let resp = self
                .calls
                .find_missing_blobs(req)
                .await
                .map_err(|e| self.fail(e, None))?;
            for d in resp.missing_blob_digests {
                let d = Digest::from_proto(function, &d).map_err(|e| {
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

/// What one batch call has in common: an instance name and a digest function.
type CallKey = (String, crate::DigestFunction);

fn call_key(d: &Digest) -> CallKey {
    (d.instance_name().to_string(), d.function())
}

/// Digests by their call: a batch call names one instance and one function.
fn by_call(digests: impl Iterator<Item = Digest>) -> BTreeMap<CallKey, Vec<Digest>> {
    let mut groups: BTreeMap<CallKey, Vec<Digest>> = BTreeMap::new();
    for d in digests {
        groups.entry(call_key(&d)).or_default().push(d);
    }
    groups
}

/// The distinct digests of `digests`, in order.
fn distinct<'a>(digests: impl Iterator<Item = &'a Digest>) -> Vec<Digest> {
    let mut seen = HashSet::new();
    digests.filter(|d| seen.insert(*d)).cloned().collect()
}

/// A per-blob status of a batch response.
fn status_result(status: Option<bazel_remote_apis::google::rpc::Status>) -> Result<()> {
    match status {
        Some(s) if s.code != 0 => Err(Error::new(Code::from(s.code), s.message)),
        _ => Ok(()),
    }
}

/// Pairs the per-blob answers of a batch call with the blobs asked for. An
/// answer for a blob not asked for (or twice for one) rejects the whole
/// response; a blob left unanswered is an error for that blob.
fn match_responses<T>(
    asked: &[Digest],
    answered: impl Iterator<Item = (Option<crate::proto::Digest>, Result<T>)>,
    call: &str,
) -> Result<HashMap<Digest, Result<T>>> {
    let asked_set: HashSet<&Digest> = asked.iter().collect();
    // Answers name blobs without their instance and function: those of the call.
    let instance = asked.first().map_or("", |d| d.instance_name());
    let function = asked.first().map(|d| d.function()).unwrap_or_default();
    let mut found = HashMap::with_capacity(asked.len());
    for (digest, result) in answered {
        let d = digest
            .as_ref()
            .and_then(|d| Digest::from_proto(function, d).ok())
            .map(|d| d.with_instance_name(instance));
        match d {
            Some(d) if asked_set.contains(&d) && !found.contains_key(&d) => {
                found.insert(d, result);
            }
            _ => {
                let shown = digest.map_or("no digest".into(), |d| {
                    format!("{}/{}", d.hash, d.size_bytes)
                });
                return Err(Error::internal(format!(
                    "{call} answered for {shown}, which was not asked for (or twice): response rejected"
                )));
            }
        }
    }
    for d in asked {
        found.entry(d.clone()).or_insert_with(|| {
            Err(Error::internal(format!(
                "{call} answered without this blob"
            )))
        });
    }
    Ok(found)
}
