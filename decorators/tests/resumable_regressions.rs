//! The four bugs of the seed's Go prototype (see `../shared/seed/`), each as a
//! named regression test of the resuming reader, against a scripted server.

mod faults;

use blob_access::resource::Compressor;
use blob_access::{BlobStream, Digest, Error, ReadRange};
use blob_access_decorators::resumable_grpc::{Failure, ResumableReads, RetryPolicy};
use bytes::Bytes;
use faults::scripted::{blob, Plan, Scripted, Then};
use futures::StreamExt;

fn unavailable() -> Then {
    Then::Fail(Failure::transport(Error::unavailable(
        "stream reset by proxy",
    )))
}

fn reads() -> ResumableReads {
    ResumableReads::new("test", RetryPolicy::default())
}

async fn collect(mut s: BlobStream) -> (Vec<Bytes>, Option<Error>) {
    let mut chunks = Vec::new();
    while let Some(item) = s.next().await {
        match item {
            Ok(b) => chunks.push(b),
            Err(e) => return (chunks, Some(e)),
        }
    }
    (chunks, None)
}

fn counter(r: &ResumableReads, name: &str) -> u64 {
    let mut m = Vec::new();
    r.metrics(&mut m);
    m[0].get(name).unwrap()
}

/// b1: the prototype resumed after a read that had completed, asking for
/// bytes past the end. A completed read makes no further request, even when
/// the stream fails after its last byte or ends without a status.
#[tokio::test]
async fn b1_no_resume_after_a_completed_read() {
    let data = blob(1000);
    let d = Digest::of(&data);
    for then in [Then::End, unavailable()] {
        let server = Scripted::new(data.clone(), 100, vec![Plan::cut(1000, then.clone())]);
        let r = reads();
        let (chunks, err) =
            collect(r.get(server.opener(), &d, ReadRange::FULL, Compressor::Identity)).await;
        assert!(err.is_none(), "{then:?}: {err:?}");
        assert_eq!(chunks.concat(), data);
        assert_eq!(server.offsets(), vec![(0, 0)], "{then:?}");
        assert_eq!(counter(&r, "resumptions"), 0);
    }
    // The same for the last part of a ranged read that was resumed once.
    let server = Scripted::new(
        data.clone(),
        64,
        vec![Plan::cut(300, unavailable()), Plan::cut(200, unavailable())],
    );
    let range = ReadRange::new(100, Some(500));
    let (chunks, err) =
        collect(reads().get(server.opener(), &d, range, Compressor::Identity)).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(chunks.concat(), &data[100..600]);
    assert_eq!(server.offsets(), vec![(100, 500), (400, 200)]);
}

/// b2: the prototype assembled the blob from the resumed parts wrongly. Cuts
/// at awkward places (inside a message, at a message boundary, after one byte)
/// still give a byte-identical, verified blob, and each resumed request starts
/// exactly after the bytes delivered so far.
#[tokio::test]
async fn b2_blob_from_resumed_parts_is_byte_identical() {
    let data = blob(10_000);
    let d = Digest::of(&data);
    let cuts = [1usize, 127, 128, 129, 4000, 2];
    let plans = cuts.iter().map(|&n| Plan::cut(n, unavailable())).collect();
    let server = Scripted::new(data.clone(), 128, plans);
    let r = reads();
    let (chunks, err) =
        collect(r.get(server.opener(), &d, ReadRange::FULL, Compressor::Identity)).await;
    assert!(err.is_none(), "{err:?}");
    assert!(chunks.concat() == data, "assembled blob differs");
    let mut offset = 0u64;
    let mut expected = vec![(0, 0)];
    for n in cuts {
        offset += n as u64;
        expected.push((offset, 0));
    }
    assert_eq!(server.offsets(), expected);
    assert_eq!(counter(&r, "resumptions"), cuts.len() as u64);
    let rerequested: u64 = expected[1..].iter().map(|(o, _)| 10_000 - o).sum();
    assert_eq!(counter(&r, "bytes_rerequested"), rerequested);
}

/// b3: the prototype read only part of a recreated stream. Every message of a
/// recreated stream is consumed, however many there are.
#[tokio::test]
async fn b3_every_message_of_a_recreated_stream_is_consumed() {
    let data = blob(5000);
    let d = Digest::of(&data);
    // First attempt: 3 messages of 7 bytes, then a reset; then 2 more cuts;
    // the last attempt streams the remaining bytes as many 7-byte messages.
    let plans = vec![
        Plan::cut(21, unavailable()),
        Plan::cut(70, Then::End),
        Plan::cut(7, unavailable()),
    ];
    let server = Scripted::new(data.clone(), 7, plans);
    let (chunks, err) =
        collect(reads().get(server.opener(), &d, ReadRange::FULL, Compressor::Identity)).await;
    assert!(err.is_none(), "{err:?}");
    assert!(chunks.concat() == data);
    let last_attempt_messages = (5000 - 98usize).div_ceil(7);
    let all = (3 + 1) + 10 + (1 + 1) + last_attempt_messages;
    assert_eq!(
        server
            .messages_polled
            .load(std::sync::atomic::Ordering::SeqCst),
        all
    );
    assert_eq!(server.offsets(), vec![(0, 0), (21, 0), (91, 0), (98, 0)]);
}

/// b4: the prototype returned the whole buffer again when polled after its
/// end. After the last byte the stream ends exactly once; further polls yield
/// nothing and make no request.
#[tokio::test]
async fn b4_stream_ends_exactly_once() {
    for size in [0usize, 1, 300] {
        let data = blob(size);
        let d = Digest::of(&data);
        let server = Scripted::new(data.clone(), 64, vec![Plan::cut(size / 2, unavailable())]);
        let mut s = reads().get(server.opener(), &d, ReadRange::FULL, Compressor::Identity);
        let mut got = Vec::new();
        while let Some(item) = s.next().await {
            got.extend_from_slice(&item.unwrap());
        }
        assert_eq!(got, data);
        let requests = server.offsets().len();
        for _ in 0..3 {
            assert!(s.next().await.is_none(), "size {size}: data after the end");
        }
        assert_eq!(
            server.offsets().len(),
            requests,
            "size {size}: a request after the end"
        );
    }
}

/// The caller's cancellation: dropping the stream mid-read (here during an
/// attempt that hangs) drops the attempt; nothing is opened afterwards.
#[tokio::test(start_paused = true)]
async fn dropping_the_stream_stops_everything() {
    let data = blob(1000);
    let d = Digest::of(&data);
    let server = Scripted::new(data.clone(), 100, vec![Plan::cut(200, Then::Hang)]);
    let mut s = reads().get(server.opener(), &d, ReadRange::FULL, Compressor::Identity);
    assert_eq!(s.next().await.unwrap().unwrap().len(), 100);
    drop(s);
    assert_eq!(server.dropped.load(std::sync::atomic::Ordering::SeqCst), 1);
    // And during a backoff wait.
    let never = Then::Fail(Failure::server(Error::unavailable("down")));
    let server = Scripted::new(data.clone(), 100, vec![Plan::cut(0, never)]);
    let mut s = reads().get(server.opener(), &d, ReadRange::FULL, Compressor::Identity);
    let poll = tokio::time::timeout(std::time::Duration::from_millis(1), s.next()).await;
    assert!(
        poll.is_err(),
        "the read should be waiting before its second attempt"
    );
    drop(s);
    tokio::time::sleep(std::time::Duration::from_secs(60)).await;
    assert_eq!(server.offsets().len(), 1);
    assert_eq!(server.dropped.load(std::sync::atomic::Ordering::SeqCst), 1);
}
