//! Uploads: a small blob is one PUT, a large one a multipart upload whose
//! parts go out a few at a time while the bytes arrive (a failed part is
//! retried alone by the client). The last part leaves only after the whole
//! blob hashed to its digest, and the upload is completed only then: a bad
//! or cut upload is aborted, also when the caller drops it half-way, so no
//! partial object is ever visible and none is left behind.

use crate::errors::from_store;
use blob_access::node::Counters;
use blob_access::{BlobStream, Digest, Error, Result};
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{MultipartUpload, ObjectStore, ObjectStoreExt, PutPayload};
use std::sync::Arc;

pub(crate) struct Upload<'a> {
    pub store: &'a Arc<dyn ObjectStore>,
    pub key: &'a Path,
    pub node: &'a str,
    pub digest: &'a Digest,
    pub part_size: u64,
    pub parts_in_flight: usize,
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
        let upload = self
            .store
            .put_multipart(self.key)
            .await
            .map_err(|e| self.error(&e))?;
        self.counters.inc("multipart_uploads");
        let mut guard = AbortOnDrop {
            upload: Some(upload),
            counters: self.counters.clone(),
        };
        match self.parts(&mut guard, data).await {
            Ok(()) => {
                let mut upload = guard.upload.take().expect("taken only here");
                upload.complete().await.map_err(|e| self.error(&e))?;
                self.counters.add("bytes_written", self.digest.size_bytes());
                Ok(())
            }
            Err(e) => {
                guard.abort().await;
                Err(e)
            }
        }
    }

    /// Sends the parts; returns once all of them are stored.
    async fn parts(&self, guard: &mut AbortOnDrop, mut data: BlobStream) -> Result<()> {
        let upload = guard.upload.as_mut().expect("set by the caller");
        let mut in_flight = FuturesUnordered::new();
        let mut part: Vec<Bytes> = Vec::new();
        let mut part_len = 0u64;
        loop {
            let chunk = data.next().await.transpose()?;
            let last = chunk.is_none();
            if let Some(mut chunk) = chunk {
                // Parts of exactly `part_size`: stores that check part sizes
                // (and ETag-of-parts tools) see the usual layout.
                while part_len + chunk.len() as u64 >= self.part_size {
                    let take = (self.part_size - part_len) as usize;
                    part.push(chunk.split_to(take));
                    while in_flight.len() >= self.parts_in_flight {
                        let done: Option<object_store::Result<()>> = in_flight.next().await;
                        done.expect("not empty").map_err(|e| self.error(&e))?;
                    }
                    in_flight.push(upload.put_part(PutPayload::from_iter(part.drain(..))));
                    self.counters.inc("parts");
                    part_len = 0;
                }
                part_len += chunk.len() as u64;
                if !chunk.is_empty() {
                    part.push(chunk);
                }
            }
            if last {
                break;
            }
        }
        if part_len > 0 {
            in_flight.push(upload.put_part(PutPayload::from_iter(part)));
            self.counters.inc("parts");
        }
        while let Some(done) = in_flight.next().await {
            done.map_err(|e| self.error(&e))?;
        }
        Ok(())
    }

    fn error(&self, e: &object_store::Error) -> Error {
        from_store(e, self.node).with_digest(self.digest)
    }
}

/// Aborts a multipart upload that was neither completed nor aborted, e.g.
/// because the caller dropped the `put` (a client gone away).
struct AbortOnDrop {
    upload: Option<Box<dyn MultipartUpload>>,
    counters: Arc<Counters>,
}

impl AbortOnDrop {
    async fn abort(&mut self) {
        if let Some(mut upload) = self.upload.take() {
            self.counters.inc("aborted_uploads");
            if let Err(e) = upload.abort().await {
                tracing::warn!(error = %e, "could not abort a multipart upload");
            }
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        let Some(mut upload) = self.upload.take() else {
            return;
        };
        self.counters.inc("aborted_uploads");
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = upload.abort().await {
                    tracing::warn!(error = %e, "could not abort a dropped multipart upload");
                }
            });
        }
    }
}
