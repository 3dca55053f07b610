//! zstd on the fly for `compressed-blobs/zstd` transfers: reads are compressed
//! chunk by chunk as they stream from the backend, uploads are decompressed in
//! bounded pieces, so neither side ever holds a whole blob (a small compressed
//! message that inflates to gigabytes still comes out in small pieces).

use blob_access::{BlobStream, Error, Result};
use bytes::Bytes;
use futures::StreamExt;
use zstd::stream::raw::{Decoder, Encoder, InBuffer, Operation, OutBuffer};

/// Size of the pieces decompressed data is produced in.
const OUT_CHUNK: usize = 256 * 1024;

fn compress_error(e: std::io::Error) -> Error {
    Error::internal(format!("zstd compression failed: {e}"))
}

/// Compresses `input` into one zstd frame, yielding output as it is produced.
/// An error in `input` ends the output with that error.
pub(super) fn compress(input: BlobStream, level: i32) -> BlobStream {
    let encoder = match Encoder::new(level) {
        Ok(e) => e,
        Err(e) => return blob_access::util::failed(compress_error(e)),
    };
    futures::stream::unfold(Some((input, encoder)), |state| async move {
        let (mut input, mut encoder) = state?;
        loop {
            match input.next().await {
                Some(Ok(chunk)) => match compress_chunk(&mut encoder, &chunk) {
                    Ok(out) if out.is_empty() => continue,
                    Ok(out) => return Some((Ok(out), Some((input, encoder)))),
                    Err(e) => return Some((Err(e), None)),
                },
                Some(Err(e)) => return Some((Err(e), None)),
                None => return Some((finish(&mut encoder), None)),
            }
        }
    })
    .boxed()
}

fn compress_chunk(encoder: &mut Encoder<'static>, chunk: &[u8]) -> Result<Bytes> {
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(chunk.len()));
    let mut input = InBuffer::around(chunk);
    while input.pos < chunk.len() {
        if out.len() == out.capacity() {
            out.reserve(OUT_CHUNK);
        }
        let pos = out.len();
        let mut output = OutBuffer::around_pos(&mut out, pos);
        encoder
            .run(&mut input, &mut output)
            .map_err(compress_error)?;
    }
    Ok(Bytes::from(out))
}

fn finish(encoder: &mut Encoder<'static>) -> Result<Bytes> {
    let mut out = Vec::with_capacity(OUT_CHUNK);
    loop {
        if out.len() == out.capacity() {
            out.reserve(OUT_CHUNK);
        }
        let pos = out.len();
        let mut output = OutBuffer::around_pos(&mut out, pos);
        if encoder.finish(&mut output, true).map_err(compress_error)? == 0 {
            return Ok(Bytes::from(out));
        }
    }
}

/// Decompresses an upload arriving in pieces.
pub(super) struct Decompressor {
    decoder: Decoder<'static>,
    fed: bool,
    /// Whether the input so far ends exactly at the end of a frame.
    at_frame_end: bool,
}

fn bad_upload(e: impl std::fmt::Display) -> Error {
    Error::invalid_argument(format!("uploaded data is not valid zstd: {e}"))
}

impl Decompressor {
    pub(super) fn new() -> Result<Self> {
        Ok(Decompressor {
            decoder: Decoder::new().map_err(bad_upload)?,
            fed: false,
            at_frame_end: true,
        })
    }

    /// Decompresses from `input` at most one output piece. Returns how many input
    /// bytes were used, the output, and whether more output may be pending (call
    /// again, with the rest of the input or an empty slice, until it is not and
    /// the input is used up).
    pub(super) fn step(&mut self, input: &[u8]) -> Result<(usize, Bytes, bool)> {
        let mut out = Vec::with_capacity(OUT_CHUNK);
        let mut inb = InBuffer::around(input);
        let hint = {
            let mut output = OutBuffer::around(&mut out);
            self.decoder
                .run(&mut inb, &mut output)
                .map_err(bad_upload)?
        };
        self.fed |= !input.is_empty();
        // An idle call (nothing in, nothing out) says nothing about the frame.
        if inb.pos > 0 || !out.is_empty() {
            self.at_frame_end = hint == 0;
        }
        let full = out.len() == out.capacity();
        if inb.pos == 0 && out.is_empty() && !input.is_empty() {
            return Err(bad_upload("the decoder made no progress"));
        }
        Ok((inb.pos, Bytes::from(out), full))
    }

    /// Checks that the upload did not stop in the middle of a frame.
    pub(super) fn finish(&self) -> Result<()> {
        if self.fed && !self.at_frame_end {
            return Err(bad_upload("the data ends in the middle of a frame"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::stream;

    async fn decompress_all(compressed: &[u8], piece: usize) -> Result<Vec<u8>> {
        let mut d = Decompressor::new()?;
        let mut out = Vec::new();
        for part in compressed.chunks(piece) {
            let mut rest = part;
            loop {
                let (used, chunk, more) = d.step(rest)?;
                assert!(chunk.len() <= OUT_CHUNK);
                out.extend_from_slice(&chunk);
                rest = &rest[used..];
                if rest.is_empty() && !more {
                    break;
                }
            }
        }
        d.finish()?;
        Ok(out)
    }

    #[tokio::test]
    async fn round_trip_in_pieces() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let parts: Vec<_> = data
            .chunks(100_000)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let compressed: Vec<Result<Bytes>> =
            compress(stream::iter(parts).boxed(), 1).collect().await;
        let compressed: Vec<u8> = compressed
            .into_iter()
            .flat_map(|c| c.unwrap().to_vec())
            .collect();
        assert!(compressed.len() < data.len() / 10);
        assert_eq!(zstd::decode_all(&compressed[..]).unwrap(), data);
        assert_eq!(decompress_all(&compressed, 1000).await.unwrap(), data);
        // A bomb: 64 MiB of zeros from a tiny input still comes out in small pieces.
        let bomb = zstd::encode_all(&vec![0u8; 64 << 20][..], 3).unwrap();
        assert_eq!(
            decompress_all(&bomb, 1 << 20).await.unwrap().len(),
            64 << 20
        );
    }

    #[tokio::test]
    async fn empty_input_is_a_valid_frame_and_errors_pass_through() {
        let out: Vec<Result<Bytes>> = compress(stream::iter(vec![]).boxed(), 1).collect().await;
        let frame: Vec<u8> = out.into_iter().flat_map(|c| c.unwrap().to_vec()).collect();
        assert!(zstd::decode_all(&frame[..]).unwrap().is_empty());
        let items = vec![
            Ok(Bytes::from_static(b"abc")),
            Err(Error::unavailable("cut")),
        ];
        let out: Vec<Result<Bytes>> = compress(stream::iter(items).boxed(), 1).collect().await;
        assert_eq!(
            out.last().unwrap().as_ref().unwrap_err().code(),
            blob_access::Code::Unavailable
        );
    }

    #[tokio::test]
    async fn rejects_garbage_and_truncation() {
        assert!(decompress_all(b"this is not zstd", 4).await.is_err());
        let frame = zstd::encode_all(&[7u8; 100_000][..], 3).unwrap();
        let err = decompress_all(&frame[..frame.len() - 3], 10)
            .await
            .unwrap_err();
        assert_eq!(err.code(), blob_access::Code::InvalidArgument);
    }
}
