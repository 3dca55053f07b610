//! Verification of blob data as it streams: the size in the digest and the hash
//! are checked on the fly, so no backend can hand a caller a wrong blob, and a
//! short stream is a truncation rather than a success.

use crate::util::failed;
use crate::{BlobStream, Digest, Error, ReadRange, Result};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

/// Wraps `inner` so that it yields exactly the bytes of `range` of `digest`.
///
/// For a full read the final chunk is held back until the hash matched, so a
/// consumer never receives a complete-looking wrong blob. A ranged read can only
/// be checked for length. Errors name `backend` and the digest.
pub fn verify(digest: &Digest, range: ReadRange, backend: &str, inner: BlobStream) -> BlobStream {
    let expected = match range_len(digest, range, backend) {
        Ok(n) => n,
        Err(e) => return failed(e),
    };
    Verifier {
        inner,
        digest: digest.clone(),
        backend: backend.to_string(),
        expected,
        seen: 0,
        hasher: range.is_full().then(|| digest.function().hasher()),
        held: None,
        done: false,
    }
    .boxed()
}

/// Bytes `range` covers in `digest`'s blob; OUT_OF_RANGE naming both otherwise.
fn range_len(digest: &Digest, range: ReadRange, backend: &str) -> Result<u64> {
    range
        .len_in(digest.size_bytes())
        .map_err(|e| e.with_backend(backend).with_digest(digest))
}

struct Verifier {
    inner: BlobStream,
    digest: Digest,
    backend: String,
    expected: u64,
    seen: u64,
    hasher: Option<crate::digest::Hasher>,
    /// The last chunk, released only once the stream ended cleanly.
    held: Option<Bytes>,
    done: bool,
}

impl Verifier {
    fn fail(&mut self, message: String) -> Poll<Option<Result<Bytes>>> {
        self.done = true;
        self.held = None;
        Poll::Ready(Some(Err(Error::data_loss(message)
            .with_backend(self.backend.clone())
            .with_digest(&self.digest))))
    }
}

impl Stream for Verifier {
    type Item = Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let item = ready!(this.inner.poll_next_unpin(cx));
            match item {
                Some(Ok(chunk)) if chunk.is_empty() => continue,
                Some(Ok(chunk)) => {
                    if this.held.is_some() || this.seen + chunk.len() as u64 > this.expected {
                        let got = this.seen + chunk.len() as u64;
                        let expected = this.expected;
                        return this.fail(format!(
                            "received at least {got} bytes, {expected} were expected"
                        ));
                    }
                    this.seen += chunk.len() as u64;
                    if let Some(h) = &mut this.hasher {
                        h.update(&chunk);
                    }
                    if this.seen < this.expected {
                        return Poll::Ready(Some(Ok(chunk)));
                    }
                    // Complete: check the hash before letting the last bytes out.
                    if let Some(h) = this.hasher.take() {
                        let got = h.finish_hex();
                        if got != this.digest.hash() {
                            let function = this.digest.function();
                            return this.fail(format!(
                                "content hashes to {got} under {function}, not to the requested hash"
                            ));
                        }
                    }
                    this.held = Some(chunk);
                }
                Some(Err(e)) => {
                    if this.held.is_some() {
                        // Everything arrived and checked out; a late error
                        // (e.g. a stream reset after the last message) loses nothing.
                        tracing::debug!(digest = %this.digest, error = %e, "error after a complete, verified read");
                        this.done = true;
                        return Poll::Ready(this.held.take().map(Ok));
                    }
                    this.done = true;
                    return Poll::Ready(Some(Err(e
                        .with_backend(this.backend.clone())
                        .with_digest(&this.digest))));
                }
                None => {
                    this.done = true;
                    if this.seen < this.expected {
                        let (seen, expected) = (this.seen, this.expected);
                        return this.fail(format!("stream ended after {seen} of {expected} bytes"));
                    }
                    if let Some(h) = this.hasher.take() {
                        // Only reached for an empty blob: no chunk was ever seen.
                        let got = h.finish_hex();
                        if got != this.digest.hash() {
                            let function = this.digest.function();
                            return this.fail(format!(
                                "content hashes to {got} under {function}, not to the requested hash"
                            ));
                        }
                    }
                    return Poll::Ready(this.held.take().map(Ok));
                }
            }
        }
    }
}

/// Wraps `full`, the whole blob, so that it yields only `range` of it, yet
/// verified: the full stream is hashed to the end and the last chunk of the
/// range is held back until it checked out. For stores where reading the
/// whole blob is cheap (local disk) and a ranged read must not skip the check.
pub fn verify_range_of_full(
    digest: &Digest,
    range: ReadRange,
    backend: &str,
    full: BlobStream,
) -> BlobStream {
    let inner = verify(digest, ReadRange::FULL, backend, full);
    if range.is_full() {
        return inner;
    }
    let len = match range_len(digest, range, backend) {
        Ok(n) => n,
        Err(e) => return failed(e),
    };
    RangeOfFull {
        inner,
        skip: range.offset,
        take: len,
        held: None,
    }
    .boxed()
}

struct RangeOfFull {
    inner: BlobStream,
    skip: u64,
    take: u64,
    held: Option<Bytes>,
}

impl Stream for RangeOfFull {
    type Item = Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            match ready!(this.inner.poll_next_unpin(cx)) {
                Some(Ok(mut chunk)) => {
                    let skip = this.skip.min(chunk.len() as u64);
                    this.skip -= skip;
                    let _ = chunk.split_to(skip as usize);
                    let take = this.take.min(chunk.len() as u64);
                    this.take -= take;
                    chunk.truncate(take as usize);
                    if chunk.is_empty() {
                        continue;
                    }
                    if let Some(prev) = this.held.replace(chunk) {
                        return Poll::Ready(Some(Ok(prev)));
                    }
                }
                Some(Err(e)) => {
                    this.held = None;
                    return Poll::Ready(Some(Err(e)));
                }
                None => return Poll::Ready(this.held.take().map(Ok)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Code;
    use futures::stream;

    fn chunks(parts: &[&'static [u8]]) -> BlobStream {
        let parts: Vec<_> = parts.iter().map(|p| Ok(Bytes::from_static(p))).collect();
        stream::iter(parts).boxed()
    }

    async fn collect(s: BlobStream) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut s = s;
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn passes_correct_data() {
        let d = Digest::of(b"hello world");
        let got = collect(verify(
            &d,
            ReadRange::FULL,
            "t",
            chunks(&[b"hello", b" ", b"world"]),
        ))
        .await
        .unwrap();
        assert_eq!(got, b"hello world");
        let empty = Digest::of(b"");
        assert!(collect(verify(&empty, ReadRange::FULL, "t", chunks(&[])))
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn rejects_wrong_short_and_long_data() {
        let d = Digest::of(b"hello");
        for parts in [
            &[&b"hellO"[..]][..],
            &[b"hell"],
            &[b"hello", b"!"],
            &[b"hello!"],
        ] {
            let mut s = verify(&d, ReadRange::FULL, "t", chunks(parts));
            let mut items = Vec::new();
            while let Some(i) = s.next().await {
                items.push(i);
            }
            let last = items.pop().unwrap();
            assert_eq!(last.unwrap_err().code(), Code::DataLoss, "{parts:?}");
            // The wrong blob never appears complete to the caller.
            let delivered: usize = items.iter().map(|i| i.as_ref().unwrap().len()).sum();
            assert!(delivered < 5, "{parts:?}");
        }
        let empty = Digest::of(b"");
        let err = collect(verify(&empty, ReadRange::FULL, "t", chunks(&[b"x"])))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::DataLoss);
        assert!(err.to_string().contains(empty.hash()), "{err}");
    }

    #[tokio::test]
    async fn ranged_reads_check_length() {
        let d = Digest::of(b"hello");
        let r = ReadRange::new(1, Some(3));
        assert_eq!(
            collect(verify(&d, r, "t", chunks(&[b"el", b"l"])))
                .await
                .unwrap(),
            b"ell"
        );
        assert!(collect(verify(&d, r, "t", chunks(&[b"el"]))).await.is_err());
        let past = collect(verify(&d, ReadRange::new(6, None), "t", chunks(&[]))).await;
        assert_eq!(past.unwrap_err().code(), Code::OutOfRange);
    }

    #[tokio::test]
    async fn range_of_full_is_verified_to_the_end() {
        let d = Digest::of(b"hello world");
        let range = ReadRange::new(3, Some(5));
        let parts = [&b"hel"[..], b"lo w", b"orld"];
        let got = collect(verify_range_of_full(&d, range, "t", chunks(&parts)))
            .await
            .unwrap();
        assert_eq!(got, b"lo wo");
        // A corruption outside the range still fails the ranged read, and the
        // range's bytes are never all delivered before the error.
        let bad = [&b"hel"[..], b"lo w", b"orlD"];
        let mut s = verify_range_of_full(&d, range, "t", chunks(&bad));
        let mut delivered = 0;
        let mut last = None;
        while let Some(i) = s.next().await {
            match i {
                Ok(c) => delivered += c.len(),
                Err(e) => last = Some(e),
            }
        }
        assert_eq!(last.unwrap().code(), Code::DataLoss);
        assert!(delivered < 5);
        let past_end = ReadRange::new(12, None);
        let err = collect(verify_range_of_full(&d, past_end, "t", chunks(&parts)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::OutOfRange);
    }
}
