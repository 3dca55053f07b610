//! Uploads cut before `finish_write` are kept for the client to resume:
//! QueryWriteStatus reports their bytes and a Write at that offset goes on,
//! at any cut point, identity and zstd, also while the old stream is still
//! attached; other offsets are refused; the window and the bounds discard
//! them, and nothing half-written is ever stored.

mod server_support;

use blob_access::bytestream_proto::byte_stream_client::ByteStreamClient;
use blob_access::bytestream_proto::{QueryWriteStatusRequest, WriteRequest, WriteResponse};
use blob_access::resource::{Compressor, WriteResource};
use blob_access::{BlobAccess, Digest};
use blob_access_server::{ParkingLimits, ServerConfig};
use server_support::*;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::Code;

fn data(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            if (i / 4096) % 2 == 0 {
                x as u8
            } else {
                b'z'
            }
        })
        .collect()
}

/// An open Write: messages go out as `send` is called; `end` ends it.
struct Write {
    tx: Option<mpsc::Sender<WriteRequest>>,
    call: tokio::task::JoinHandle<Result<WriteResponse, tonic::Status>>,
    name: String,
}

impl Write {
    fn open(channel: &Channel, name: &str) -> Write {
        let (tx, rx) = mpsc::channel(16);
        let mut client = ByteStreamClient::new(channel.clone());
        let call = tokio::spawn(async move {
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
            client.write(stream).await.map(|r| r.into_inner())
        });
        Write {
            tx: Some(tx),
            call,
            name: name.into(),
        }
    }

    /// Sends `bytes[from..to]` in 64 KiB messages, the last with `finish`.
    async fn send(&mut self, bytes: &[u8], from: usize, to: usize, finish: bool) {
        let tx = self.tx.as_ref().expect("open");
        let mut at = from;
        loop {
            let end = (at + 65536).min(to);
            let last = end == to;
            let msg = WriteRequest {
                resource_name: self.name.clone(),
                write_offset: at as i64,
                finish_write: finish && last,
                data: bytes[at..end].to_vec(),
            };
            if tx.send(msg).await.is_err() {
                return; // The call ended (the server answered).
            }
            at = end;
            if last {
                return;
            }
        }
    }

    /// Ends the request stream cleanly, without finish_write.
    async fn end(mut self) -> Result<WriteResponse, tonic::Status> {
        self.tx = None;
        self.call.await.unwrap()
    }

    /// Resets the call (RST_STREAM), as a cut connection does.
    fn reset(self) {
        self.call.abort();
    }
}

async fn committed(channel: &Channel, name: &str) -> (i64, bool) {
    let r = ByteStreamClient::new(channel.clone())
        .query_write_status(QueryWriteStatusRequest {
            resource_name: name.into(),
        })
        .await
        .unwrap()
        .into_inner();
    (r.committed_size, r.complete)
}

/// Lets the server take what was sent on an attached stream. Asking
/// QueryWriteStatus instead would stop the stream where it stands.
/// A fresh upload's resource name for `digest` (identity, default instance).
fn upload_name(digest: &Digest) -> String {
    WriteResource::new("", Compressor::Identity, digest.clone()).to_string()
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

fn cfg(window: Duration) -> ServerConfig {
    ServerConfig {
        cut_uploads: ParkingLimits {
            window,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Cut at many points, by a clean end and by a reset, identity and zstd: the
/// upload goes on from the committed size and the blob is stored whole.
#[tokio::test]
async fn cut_uploads_resume_at_every_cut_point() {
    let server = start(cfg(Duration::from_secs(60))).await;
    let channel = server.channel().await;
    let size = 700_000;
    for (i, cut) in [1usize, 65535, 65536, 65537, 300_001, 699_999]
        .into_iter()
        .enumerate()
    {
        for zstd in [false, true] {
            let blob = data(size, (i * 2 + zstd as usize) as u32);
            let digest = Digest::of(&blob);
            let wire = if zstd {
                zstd::encode_all(&blob[..], 3).unwrap()
            } else {
                blob.clone()
            };
            let cut = cut.min(wire.len() - 1);
            let compressor = if zstd {
                Compressor::Zstd
            } else {
                Compressor::Identity
            };
            let name = WriteResource::new("", compressor, digest.clone()).to_string();
            let mut w = Write::open(&channel, &name);
            w.send(&wire, 0, cut, false).await;
            if i % 2 == 0 {
                let e = w.end().await.unwrap_err();
                assert_eq!(e.code(), Code::InvalidArgument, "{e}");
            } else {
                settle().await;
                w.reset();
                settle().await;
            }
            // What the server took is what a resuming client goes on from.
            let (at, complete) = committed(&channel, &name).await;
            assert!(!complete && at <= cut as i64, "cut {cut}: {at}");
            let cut = at as usize;
            assert!(
                server
                    .memory
                    .find_missing(std::slice::from_ref(&digest))
                    .await
                    .unwrap()
                    .len()
                    == 1
            );
            let mut w = Write::open(&channel, &name);
            w.send(&wire, cut, wire.len(), true).await;
            let r = w.end().await.unwrap();
            let want = if zstd { wire.len() as i64 } else { size as i64 };
            assert_eq!(r.committed_size, want, "cut {cut} zstd {zstd}");
            assert!(server
                .memory
                .find_missing(&[digest])
                .await
                .unwrap()
                .is_empty());
            assert_eq!(
                committed(&channel, &name).await,
                (if zstd { -1 } else { size as i64 }, true)
            );
        }
    }
}

/// A continuation that arrives while the old stream is still attached (the
/// server has not seen the cut) takes the upload over; the old stream is
/// dropped. Offsets other than the committed size are refused, and the
/// upload stays resumable.
#[tokio::test]
async fn a_continuation_takes_over_a_stream_still_attached() {
    let server = start(cfg(Duration::from_secs(60))).await;
    let channel = server.channel().await;
    let blob = data(500_000, 7);
    let digest = Digest::of(&blob);
    let name = upload_name(&digest);
    let mut old = Write::open(&channel, &name);
    old.send(&blob, 0, 200_000, false).await;
    settle().await;

    let mut wrong = Write::open(&channel, &name);
    wrong.send(&blob, 100_000, 150_000, false).await;
    let e = wrong.end().await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("200000"), "{e}");
    let mut new = Write::open(&channel, &name);
    new.send(&blob, 200_000, blob.len(), true).await;
    assert_eq!(new.end().await.unwrap().committed_size, blob.len() as i64);
    // The old stream, still attached, is told it lost the upload.
    old.send(&blob, 200_000, 210_000, false).await;
    let e = old.end().await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e}");
    assert!(server
        .memory
        .find_missing(&[digest])
        .await
        .unwrap()
        .is_empty());
}

/// Past the window, a cut upload is discarded: nothing stored, its bytes
/// gone, a continuation refused; a zero window keeps nothing.
#[tokio::test]
async fn the_window_discards_cut_uploads() {
    for window in [Duration::from_millis(300), Duration::ZERO] {
        let server = start(cfg(window)).await;
        let channel = server.channel().await;
        let blob = data(300_000, 9);
        let digest = Digest::of(&blob);
        let name = upload_name(&digest);
        let mut w = Write::open(&channel, &name);
        w.send(&blob, 0, 100_000, false).await;
        let _ = w.end().await;
        tokio::time::sleep(window + Duration::from_millis(200)).await;
        assert_eq!(committed(&channel, &name).await, (0, false));
        let mut w = Write::open(&channel, &name);
        w.send(&blob, 100_000, blob.len(), true).await;
        let e = w.end().await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert!(e.message().contains("start at 0"), "{e}");
        assert_eq!(
            server.memory.find_missing(&[digest]).await.unwrap().len(),
            1
        );
    }
}

/// Past the bounds of kept uploads, a cut upload is discarded and its
/// continuation gets RESOURCE_EXHAUSTED; those within them resume.
#[tokio::test]
async fn past_the_bounds_cut_uploads_are_refused_with_resource_exhausted() {
    let server = start(ServerConfig {
        cut_uploads: ParkingLimits {
            window: Duration::from_secs(60),
            max_uploads: 2,
            max_bytes: 1 << 30,
        },
        ..Default::default()
    })
    .await;
    let channel = server.channel().await;
    let mut names = Vec::new();
    for i in 0..3 {
        let blob = data(200_000, 20 + i);
        let digest = Digest::of(&blob);
        let name = upload_name(&digest);
        let mut w = Write::open(&channel, &name);
        w.send(&blob, 0, 50_000, false).await;
        let _ = w.end().await;
        names.push((name, blob));
    }
    for (i, (name, blob)) in names.iter().enumerate() {
        let mut w = Write::open(&channel, name);
        w.send(blob, 50_000, blob.len(), true).await;
        match (i, w.end().await) {
            (0 | 1, r) => assert!(r.is_ok(), "{i}: {r:?}"),
            (_, r) => assert_eq!(r.unwrap_err().code(), Code::ResourceExhausted),
        }
    }
    // Started again at 0 under the same name, the dropped one goes through.
    let (name, blob) = &names[2];
    let mut w = Write::open(&channel, name);
    w.send(blob, 0, blob.len(), true).await;
    assert_eq!(w.end().await.unwrap().committed_size, blob.len() as i64);
}

/// A Write at 0 of an upload kept after a cut starts it again (a client
/// that does not resume): what was kept is discarded, the new bytes stored.
#[tokio::test]
async fn a_write_at_zero_starts_a_kept_upload_again() {
    let server = start(cfg(Duration::from_secs(60))).await;
    let channel = server.channel().await;
    let blob = data(300_000, 31);
    let digest = Digest::of(&blob);
    let name = upload_name(&digest);
    let mut w = Write::open(&channel, &name);
    w.send(&blob, 0, 120_000, false).await;
    let _ = w.end().await;
    assert_eq!(committed(&channel, &name).await, (120_000, false));
    let mut w = Write::open(&channel, &name);
    w.send(&blob, 0, blob.len(), true).await;
    assert_eq!(w.end().await.unwrap().committed_size, blob.len() as i64);
    assert!(server
        .memory
        .find_missing(std::slice::from_ref(&digest))
        .await
        .unwrap()
        .is_empty());
}

/// QueryWriteStatus while the old stream is still attached (the server has
/// not seen the cut, and may hold messages it has not taken yet): its answer
/// holds, as the old stream is stopped there, so the Write at that offset
/// goes on.
#[tokio::test]
async fn query_write_status_stops_a_stream_still_attached_at_its_answer() {
    let server = start(cfg(Duration::from_secs(60))).await;
    let channel = server.channel().await;
    let blob = data(400_000, 11);
    let digest = Digest::of(&blob);
    let name = upload_name(&digest);
    let mut old = Write::open(&channel, &name);
    old.send(&blob, 0, 100_000, false).await;
    settle().await;
    let (at, complete) = committed(&channel, &name).await;
    assert_eq!((at, complete), (100_000, false));
    // What the old stream sends after the answer is not taken.
    old.send(&blob, 100_000, 200_000, false).await;
    let e = old.end().await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e}");
    assert_eq!(committed(&channel, &name).await, (100_000, false));
    let mut new = Write::open(&channel, &name);
    new.send(&blob, 100_000, blob.len(), true).await;
    assert_eq!(new.end().await.unwrap().committed_size, blob.len() as i64);
    assert!(server
        .memory
        .find_missing(std::slice::from_ref(&digest))
        .await
        .unwrap()
        .is_empty());
}

/// Cut after its last byte but before finish_write: QueryWriteStatus
/// finishes the upload (the backend verifies it) and reports it complete, as
/// a client that has nothing left to send needs.
#[tokio::test]
async fn an_upload_cut_after_its_last_byte_is_complete() {
    let server = start(cfg(Duration::from_secs(60))).await;
    let channel = server.channel().await;
    let blob = data(200_000, 41);
    let digest = Digest::of(&blob);
    let name = upload_name(&digest);
    let mut w = Write::open(&channel, &name);
    w.send(&blob, 0, blob.len(), false).await;
    let _ = w.end().await;
    assert_eq!(committed(&channel, &name).await, (blob.len() as i64, true));
    assert!(server
        .memory
        .find_missing(std::slice::from_ref(&digest))
        .await
        .unwrap()
        .is_empty());
}
