//! Re-chunking of a blob stream into ReadResponse-sized pieces: large chunks are
//! split (zero-copy) so no message exceeds the maximum, and runs of small chunks
//! that are already available are merged, so a backend yielding tiny chunks
//! does not turn into tiny gRPC messages. Nothing waits to fill a message: when
//! the source has nothing ready, what was gathered goes out.

use blob_access::{BlobStream, Result};
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use std::pin::Pin;
use std::task::{Context, Poll};

/// Chunks at least this large are passed on without being merged (or copied).
const MIN_MESSAGE: usize = 64 * 1024;

/// Wraps `inner` so that it yields chunks of at most `max` bytes (`max` > 0).
pub(super) fn rechunk(inner: BlobStream, max: usize) -> BlobStream {
    Rechunk {
        inner,
        max: max.max(1),
        min: MIN_MESSAGE.min(max.max(1)),
        big: None,
        buf: BytesMut::new(),
        error: None,
        done: false,
    }
    .boxed()
}

struct Rechunk {
    inner: BlobStream,
    max: usize,
    min: usize,
    /// The rest of a chunk being handed out in `max`-sized slices.
    big: Option<Bytes>,
    /// Small chunks being merged.
    buf: BytesMut,
    /// An error from `inner`, delivered after the bytes gathered before it.
    error: Option<blob_access::Error>,
    done: bool,
}

impl Rechunk {
    fn take_buf(&mut self) -> Poll<Option<Result<Bytes>>> {
        Poll::Ready(Some(Ok(self.buf.split().freeze())))
    }
}

impl Stream for Rechunk {
    type Item = Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(big) = &mut this.big {
                let part = big.split_to(big.len().min(this.max));
                if big.is_empty() {
                    this.big = None;
                }
                return Poll::Ready(Some(Ok(part)));
            }
            if this.done {
                if !this.buf.is_empty() {
                    return this.take_buf();
                }
                return Poll::Ready(this.error.take().map(Err));
            }
            match this.inner.poll_next_unpin(cx) {
                Poll::Pending if this.buf.is_empty() => return Poll::Pending,
                Poll::Pending => return this.take_buf(),
                Poll::Ready(None) => this.done = true,
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    this.error = Some(e);
                }
                Poll::Ready(Some(Ok(chunk))) => {
                    if this.buf.is_empty() && chunk.len() >= this.min {
                        this.big = Some(chunk);
                    } else if this.buf.len() + chunk.len() <= this.max {
                        this.buf.extend_from_slice(&chunk);
                        if this.buf.len() >= this.min {
                            return this.take_buf();
                        }
                    } else {
                        this.big = Some(chunk);
                        return this.take_buf();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blob_access::{Code, Error};
    use futures::stream;

    fn sizes(items: &[Result<Bytes>]) -> Vec<usize> {
        items.iter().map(|i| i.as_ref().unwrap().len()).collect()
    }

    async fn run(parts: Vec<Result<Bytes>>, max: usize) -> Vec<Result<Bytes>> {
        rechunk(stream::iter(parts).boxed(), max).collect().await
    }

    fn zeros(n: usize) -> Result<Bytes> {
        Ok(Bytes::from(vec![0u8; n]))
    }

    #[tokio::test]
    async fn splits_large_and_merges_small_chunks() {
        let out = run(vec![zeros(2_500_000)], 1 << 20).await;
        assert_eq!(sizes(&out), vec![1 << 20, 1 << 20, 2_500_000 - (2 << 20)]);
        let out = run((0..100).map(|_| zeros(1000)).collect(), 1 << 20).await;
        assert_eq!(sizes(&out), vec![66_000, 34_000]);
        // A large chunk after gathered small ones flushes them first.
        let out = run(vec![zeros(10), zeros(200_000)], 1 << 20).await;
        assert_eq!(sizes(&out), vec![200_010]);
        let out = run(vec![zeros(10), zeros(2_000_000)], 1 << 20).await;
        assert_eq!(sizes(&out), vec![10, 1 << 20, 2_000_000 - (1 << 20)]);
        assert!(run(vec![], 1 << 20).await.is_empty());
    }

    #[tokio::test]
    async fn keeps_bytes_in_order_and_delivers_errors_last() {
        let data: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let parts: Vec<_> = data
            .chunks(7_777)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let mut parts = parts;
        parts.push(Err(Error::unavailable("cut")));
        let out = run(parts, 100_000).await;
        let (last, good) = out.split_last().unwrap();
        assert_eq!(last.as_ref().unwrap_err().code(), Code::Unavailable);
        assert!(good.iter().all(|c| c.as_ref().unwrap().len() <= 100_000));
        let joined: Vec<u8> = good
            .iter()
            .flat_map(|c| c.as_ref().unwrap().to_vec())
            .collect();
        assert_eq!(joined, data);
    }
}
