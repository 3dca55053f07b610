//! Decompresses a `compressed-blobs/zstd/...` attempt while it streams.
//!
//! Each attempt gets its own decoder: a resumed compressed read is a new zstd
//! stream starting at the resume offset, so no decoder state carries over. A
//! stream cut inside a frame simply yields fewer bytes; the reader counts the
//! decompressed bytes it delivered and resumes after the last of them.

use super::attempt::AttemptStream;
use super::retry::Failure;
use blob_access::Error;
use bytes::{Buf, Bytes};
use futures::{Stream, StreamExt};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use zstd::stream::raw::{Decoder, Operation};

/// Output pieces are at most this large, whatever the compression ratio.
const OUT_CHUNK: usize = 128 * 1024;

/// Wraps a stream of compressed bytes into one of decompressed bytes.
pub(crate) fn decompress(input: AttemptStream) -> AttemptStream {
    match Decoder::new() {
        Ok(decoder) => Decompress {
            input,
            decoder,
            pending: Bytes::new(),
            output_full: false,
            input_done: false,
            done: false,
        }
        .boxed(),
        Err(e) => futures::stream::once(async move {
            Err(Failure::server(Error::internal(format!(
                "cannot create a zstd decoder: {e}"
            ))))
        })
        .boxed(),
    }
}

struct Decompress {
    input: AttemptStream,
    decoder: Decoder<'static>,
    /// Compressed bytes received but not yet fed to the decoder.
    pending: Bytes,
    /// The last call filled the output buffer: the decoder may hold more.
    output_full: bool,
    input_done: bool,
    done: bool,
}

impl Decompress {
    /// Runs the decoder once; `Some` output if it produced any.
    fn step(&mut self) -> Result<Option<Bytes>, Failure> {
        let mut out = vec![0u8; OUT_CHUNK];
        let status = self
            .decoder
            .run_on_buffers(&self.pending, &mut out)
            .map_err(|e| {
                Failure::server(Error::data_loss(format!(
                    "the server's zstd stream does not decode: {e}"
                )))
            })?;
        self.pending.advance(status.bytes_read);
        self.output_full = status.bytes_written == OUT_CHUNK;
        Ok(match status.bytes_written {
            0 => None,
            n if n < OUT_CHUNK / 4 => Some(Bytes::copy_from_slice(&out[..n])),
            n => {
                out.truncate(n);
                Some(Bytes::from(out))
            }
        })
    }
}

impl Stream for Decompress {
    type Item = Result<Bytes, Failure>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if !this.pending.is_empty() || this.output_full {
                match this.step() {
                    Ok(Some(out)) => return Poll::Ready(Some(Ok(out))),
                    Ok(None) => continue,
                    Err(f) => {
                        this.done = true;
                        return Poll::Ready(Some(Err(f)));
                    }
                }
            }
            if this.input_done {
                this.done = true;
                return Poll::Ready(None);
            }
            match ready!(this.input.poll_next_unpin(cx)) {
                Some(Ok(chunk)) => this.pending = chunk,
                Some(Err(f)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(f)));
                }
                None => {
                    this.input_done = true;
                    // Let the decoder flush whatever it still holds.
                    this.output_full = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compressed_in_pieces(data: &[u8], piece: usize) -> AttemptStream {
        let z = zstd::encode_all(data, 3).unwrap();
        let parts: Vec<_> = z
            .chunks(piece)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        futures::stream::iter(parts).boxed()
    }

    async fn collect(mut s: AttemptStream) -> (Vec<u8>, Option<Failure>) {
        let mut out = Vec::new();
        while let Some(item) = s.next().await {
            match item {
                Ok(b) => out.extend_from_slice(&b),
                Err(f) => return (out, Some(f)),
            }
        }
        (out, None)
    }

    #[tokio::test]
    async fn decodes_across_piece_boundaries() {
        let data: Vec<u8> = (0..1_000_000u32)
            .map(|i| (i % 251) as u8 ^ (i >> 13) as u8)
            .collect();
        for piece in [1, 7, 4096, 1 << 20] {
            let (out, err) = collect(decompress(compressed_in_pieces(&data, piece))).await;
            assert!(err.is_none(), "piece {piece}");
            assert!(out == data, "piece {piece}");
        }
        let (out, err) = collect(decompress(compressed_in_pieces(b"", 3))).await;
        assert!(out.is_empty() && err.is_none());
    }

    #[tokio::test]
    async fn a_cut_stream_yields_a_prefix_and_garbage_an_error() {
        let data = vec![7u8; 3 * OUT_CHUNK];
        let z = zstd::encode_all(&data[..], 3).unwrap();
        let cut = futures::stream::iter(vec![Ok(Bytes::copy_from_slice(&z[..z.len() / 2]))]);
        let (out, err) = collect(decompress(cut.boxed())).await;
        assert!(err.is_none() && out.len() < data.len() && data.starts_with(&out));
        let junk = futures::stream::iter(vec![Ok(Bytes::from_static(b"not zstd at all"))]);
        let (_, err) = collect(decompress(junk.boxed())).await;
        assert_eq!(err.unwrap().error.code(), blob_access::Code::DataLoss);
    }
}
