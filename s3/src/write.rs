//! Uploads: a small blob is one PUT, a large one a multipart upload whose
//! parts go out a few at a time while the bytes arrive (a failed part is
//! retried alone by the client). The last part leaves only after the whole
//! blob hashed to its digest, and the upload is completed only then: a bad
//! or cut upload is aborted, also when the caller drops it half-way, so no
//! partial object is ever visible and none is left behind.

use crate::config::MAX_PART;
use crate::errors::{from_store, transient};
use blob_access::node::Counters;
use blob_access::{BlobStream, Code, Digest, Error, Result};
use blob_access_decorators::resumable_grpc::RetryPolicy;
use bytes::Bytes;
use futures::StreamExt;
use object_store::aws::AmazonS3;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{MultipartId, ObjectStoreExt, PutPayload};
use std::sync::{Arc, Mutex};
use tokio::task::{JoinError, JoinSet};

pub(crate) struct Upload<'a> {
    /// Retries failed requests itself (single PUTs, create, complete, abort).
    pub store: &'a Arc<AmazonS3>,
    /// Does not retry: parts are retried here, under [`PartBudget`].
    pub parts_store: &'a Arc<AmazonS3>,
    pub key: &'a Path,
    pub node: &'a str,
    pub digest: &'a Digest,
    pub part_size: u64,
    pub parts_in_flight: usize,
    pub policy: RetryPolicy,
    pub counters: &'a Arc<Counters>,
}

impl Upload<'_> {
    /// Stores the verified bytes of `data` (see the module documentation).
    pub(crate) async fn run(&self, mut data: BlobStream) -> Result<()> {
        if self.digest.size_bytes() <= self.part_size {
            let mut chunks = Vec::new();
            while let Some(c) = data.next().await {
                chunks.push(c?);
            }
            let payload = PutPayload::from_iter(chunks);
            self.store
                .put(self.key, payload)
                .await
                .map_err(|e| self.error(&e))?;
            self.counters.add("bytes_written", self.digest.size_bytes());
            return Ok(());
        }
        // S3 takes at most 10,000 parts: a larger blob gets larger parts.
        let size = self.digest.size_bytes();
        let part_size = self.part_size.max(size.div_ceil(MAX_PARTS));
        if part_size > MAX_PART {
            return Err(Error::invalid_argument(format!(
                "a blob of {size} bytes is larger than S3's {MAX_PARTS} parts of 5GiB"
            ))
            .with_backend(self.node)
            .with_digest(self.digest));
        }
        let id = self
            .store
            .create_multipart(self.key)
            .await
            .map_err(|e| self.error(&e))?;
        self.counters.inc("multipart_uploads");
        let mut guard = AbortOnDrop {
            store: self.store.clone(),
            key: self.key.clone(),
            id: Some(id.clone()),
            counters: self.counters.clone(),
        };
        let parts = match self.parts(&id, part_size, data).await {
            Ok(parts) => parts,
            Err(e) => {
                guard.abort().await;
                return Err(e);
            }
        };
        let completed = self.store.complete_multipart(self.key, &id, parts).await;
        if let Err(e) = completed {
            // A completion whose answer was cut is retried by the client and
            // then finds no upload: it did complete if the object is there.
            if !self.completed_after_all(&e).await {
                guard.abort().await;
                return Err(self.error(&e));
            }
        }
        guard.id = None;
        self.counters.add("bytes_written", self.digest.size_bytes());
        Ok(())
    }

    /// Sends the parts, a few at a time; returns their ids in order once all
    /// of them are stored.
    async fn parts(
        &self,
        id: &MultipartId,
        part_size: u64,
        mut data: BlobStream,
    ) -> Result<Vec<PartId>> {
        let budget = Arc::new(Mutex::new(PartBudget {
            policy: self.policy.clone(),
            limit: self.policy.max_attempts_without_progress * self.parts_in_flight as u32,
            in_a_row: 0,
            started: tokio::time::Instant::now(),
        }));
        // Each part in a task of its own, so that parts go on while the
        // caller's next bytes are awaited; dropping the set stops them.
        let mut in_flight: JoinSet<Result<(usize, PartId)>> = JoinSet::new();
        let mut done: Vec<(usize, PartId)> = Vec::new();
        let mut part: Vec<Bytes> = Vec::new();
        let mut part_len = 0u64;
        let mut sent = 0usize;
        let send = |part: Vec<Bytes>, idx: usize| {
            self.counters.inc("parts");
            self.send_part(id, idx, PutPayload::from_iter(part), budget.clone())
        };
        while let Some(chunk) = data.next().await {
            let mut chunk = chunk?;
            // A part that failed ends the upload now, not after all the bytes.
            while let Some(joined) = in_flight.try_join_next() {
                done.push(part_result(joined)?);
            }
            // Parts of exactly `part_size`: the usual layout for stores and tools.
            while part_len + chunk.len() as u64 >= part_size {
                let take = (part_size - part_len) as usize;
                part.push(chunk.split_to(take));
                while in_flight.len() >= self.parts_in_flight {
                    let joined = in_flight.join_next().await.expect("not empty");
                    done.push(part_result(joined)?);
                }
                in_flight.spawn(send(std::mem::take(&mut part), sent));
                sent += 1;
                part_len = 0;
            }
            part_len += chunk.len() as u64;
            if !chunk.is_empty() {
                part.push(chunk);
            }
        }
        if part_len > 0 {
            in_flight.spawn(send(part, sent));
        }
        while let Some(joined) = in_flight.join_next().await {
            done.push(part_result(joined)?);
        }
        done.sort_by_key(|(idx, _)| *idx);
        Ok(done.into_iter().map(|(_, p)| p).collect())
    }

    /// One part, sent again (alone) after a transient failure.
    fn send_part(
        &self,
        id: &MultipartId,
        idx: usize,
        payload: PutPayload,
        budget: Arc<Mutex<PartBudget>>,
    ) -> impl std::future::Future<Output = Result<(usize, PartId)>> + 'static {
        let (store, key, id) = (self.parts_store.clone(), self.key.clone(), id.clone());
        let (node, digest, counters) = (
            self.node.to_string(),
            self.digest.clone(),
            self.counters.clone(),
        );
        async move {
            loop {
                let e = match store.put_part(&key, &id, idx, payload.clone()).await {
                    Ok(part) => {
                        budget.lock().unwrap_or_else(|p| p.into_inner()).in_a_row = 0;
                        return Ok((idx, part));
                    }
                    Err(e) => e,
                };
                let err = from_store(&e, &node).with_digest(&digest);
                if !transient(&e) {
                    return Err(err);
                }
                let delay = budget
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .failed(idx, &err)
                    .map_err(|e| e.with_backend(node.clone()).with_digest(&digest))?;
                counters.inc("part_retries");
                tokio::time::sleep(delay).await;
            }
        }
    }

    async fn completed_after_all(&self, e: &object_store::Error) -> bool {
        if !matches!(e, object_store::Error::NotFound { .. }) {
            return false;
        }
        let head = self.store.head(self.key).await;
        matches!(head, Ok(meta) if meta.size == self.digest.size_bytes())
    }

    fn error(&self, e: &object_store::Error) -> Error {
        from_store(e, self.node).with_digest(self.digest)
    }
}

/// S3's most parts in one upload.
const MAX_PARTS: u64 = 10_000;

/// The outcome of a part's task.
fn part_result<T>(joined: std::result::Result<Result<T>, JoinError>) -> Result<T> {
    joined.map_err(|e| Error::internal(format!("a part's task ended: {e}")))?
}

/// The retry budget of one upload's parts: a stored part is progress; the
/// upload gives up after `limit` failed part attempts in a row (the read
/// budget's attempts, per part in flight) or past the deadline.
struct PartBudget {
    policy: RetryPolicy,
    limit: u32,
    in_a_row: u32,
    started: tokio::time::Instant,
}

impl PartBudget {
    fn failed(&mut self, idx: usize, cause: &Error) -> Result<std::time::Duration> {
        self.in_a_row += 1;
        let give_up = |code: Code, why: String| {
            Error::new(
                code,
                format!(
                    "gave up uploading part {}: {why}; last cause: {}",
                    idx + 1,
                    cause.message()
                ),
            )
        };
        if self.in_a_row >= self.limit {
            let why = format!("{} part attempts in a row failed", self.in_a_row);
            return Err(give_up(Code::Unavailable, why));
        }
        let delay = self.policy.backoff(self.in_a_row);
        if let Some(limit) = self.policy.deadline {
            if self.started.elapsed() + delay >= limit {
                let why = format!("the retry deadline of {limit:?} has passed");
                return Err(give_up(Code::DeadlineExceeded, why));
            }
        }
        Ok(delay)
    }
}

/// Aborts a multipart upload that was neither completed nor aborted, e.g.
/// because the caller dropped the `put` (a client gone away).
struct AbortOnDrop {
    store: Arc<AmazonS3>,
    key: Path,
    id: Option<MultipartId>,
    counters: Arc<Counters>,
}

impl AbortOnDrop {
    fn take(&mut self) -> Option<impl std::future::Future<Output = ()> + 'static> {
        let id = self.id.take()?;
        self.counters.inc("aborted_uploads");
        let (store, key) = (self.store.clone(), self.key.clone());
        Some(async move {
            if let Err(e) = store.abort_multipart(&key, &id).await {
                tracing::warn!(error = %e, key = %key, "could not abort a multipart upload");
            }
        })
    }

    async fn abort(&mut self) {
        if let Some(abort) = self.take() {
            abort.await
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let (Some(abort), Ok(rt)) = (self.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(abort);
        }
    }
}
