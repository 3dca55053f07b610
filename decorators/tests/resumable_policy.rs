//! The resuming reader's rules (issue 4, "Behaviour that must hold") against a
//! scripted server: what is asked for on resumption, the no-progress budget,
//! backoff only between attempts without progress, RetryInfo, the deadline,
//! non-retriable codes, excess bytes, servers ignoring read_offset, and the
//! zstd fallback. Time is virtual (`start_paused`), so waits cost nothing.

mod faults;

use blob_access::resource::Compressor;
use blob_access::{BlobStream, Code, Digest, Error, ReadRange};
use blob_access_decorators::resumable_grpc::{Failure, ResumableReads, RetryPolicy};
use bytes::Bytes;
use faults::scripted::{blob, Plan, Scripted, Then};
use futures::StreamExt;
use std::time::Duration;
use tokio::time::Instant;

fn fail(code: Code) -> Then {
    Then::Fail(Failure::server(Error::new(
        code,
        format!("injected {code:?}"),
    )))
}

fn policy(max: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts_without_progress: max,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
        deadline: None,
        stall_timeout: Duration::from_secs(30),
    }
}

async fn collect(mut s: BlobStream) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    while let Some(item) = s.next().await {
        out.extend_from_slice(&item?);
    }
    Ok(out)
}

async fn read(
    server: &std::sync::Arc<Scripted>,
    r: &ResumableReads,
    d: &Digest,
    range: ReadRange,
) -> Result<Vec<u8>, Error> {
    collect(r.get(server.opener(), d, range, Compressor::Identity)).await
}

fn counter(r: &ResumableReads, name: &str) -> u64 {
    let mut m = Vec::new();
    r.metrics(&mut m);
    m[0].get(name).unwrap()
}

#[tokio::test(start_paused = true)]
async fn ranged_reads_resume_with_the_remaining_limit() {
    let data = blob(1000);
    let d = Digest::of(&data);
    let plans = vec![
        Plan::cut(10, fail(Code::Unavailable)),
        Plan::cut(5, Then::End),
    ];
    let server = Scripted::new(data.clone(), 3, plans.clone());
    let got = read(
        &server,
        &ResumableReads::new("t", policy(3)),
        &d,
        ReadRange::new(100, Some(50)),
    )
    .await;
    assert_eq!(got.unwrap(), &data[100..150]);
    assert_eq!(server.offsets(), vec![(100, 50), (110, 40), (115, 35)]);
    // An open-ended range keeps read_limit 0.
    let server = Scripted::new(data.clone(), 3, plans);
    let got = read(
        &server,
        &ResumableReads::new("t", policy(3)),
        &d,
        ReadRange::new(900, None),
    )
    .await;
    assert_eq!(got.unwrap(), &data[900..]);
    assert_eq!(server.offsets(), vec![(900, 0), (910, 0), (915, 0)]);
}

#[tokio::test(start_paused = true)]
async fn budget_counts_attempts_without_progress_and_progress_resets_it() {
    let data = blob(100);
    let d = Digest::of(&data);
    // Budget 2: every attempt delivers one byte, then fails: never gives up.
    let plans = (0..99)
        .map(|_| Plan::cut(1, fail(Code::Unavailable)))
        .collect();
    let server = Scripted::new(data.clone(), 10, plans);
    let r = ResumableReads::new("t", policy(2));
    let start = Instant::now();
    assert_eq!(read(&server, &r, &d, ReadRange::FULL).await.unwrap(), data);
    assert_eq!(server.offsets().len(), 100);
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "waited after attempts that made progress"
    );
    // Budget 3: 1 byte, then three attempts in a row with none: gives up.
    let plans = vec![
        Plan::cut(1, fail(Code::Unavailable)),
        Plan::cut(0, fail(Code::Unavailable)),
        Plan::cut(0, Then::End),
        Plan::cut(0, fail(Code::Aborted)),
    ];
    let server = Scripted::new(data.clone(), 10, plans);
    let r = ResumableReads::new("t", policy(3));
    let start = Instant::now();
    let err = read(&server, &r, &d, ReadRange::FULL).await.unwrap_err();
    assert_eq!(server.offsets().len(), 4);
    assert_eq!(err.code(), Code::Unavailable);
    let msg = err.to_string();
    for part in [
        "3 attempts in a row",
        "attempt 4",
        "1 of 100 bytes delivered",
        "last cause: Aborted: injected Aborted",
    ] {
        assert!(msg.contains(part), "{part:?} not in {msg}");
    }
    assert_eq!(counter(&r, "give_ups"), 1);
    // Backoff between the no-progress attempts: ~100 ms then ~200 ms, jittered down to half.
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(150) && waited <= Duration::from_millis(300),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_info_delay_is_honoured() {
    let data = blob(10);
    let d = Digest::of(&data);
    let busy = Error::resource_exhausted("busy").with_retry_delay(Some(Duration::from_secs(3)));
    let server = Scripted::new(
        data.clone(),
        10,
        vec![Plan::cut(0, Then::Fail(Failure::server(busy)))],
    );
    let start = Instant::now();
    assert_eq!(
        read(
            &server,
            &ResumableReads::new("t", policy(3)),
            &d,
            ReadRange::FULL
        )
        .await
        .unwrap(),
        data
    );
    assert!(
        start.elapsed() >= Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn the_deadline_stops_retrying() {
    let data = blob(10);
    let d = Digest::of(&data);
    let plans = (0..50)
        .map(|_| Plan::cut(0, fail(Code::Unavailable)))
        .collect();
    let server = Scripted::new(data.clone(), 10, plans);
    let p = RetryPolicy {
        deadline: Some(Duration::from_secs(2)),
        ..policy(1000)
    };
    let start = Instant::now();
    let err = read(&server, &ResumableReads::new("t", p), &d, ReadRange::FULL)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("deadline"), "{err}");
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(server.offsets().len() < 10, "{}", server.offsets().len());
}

#[tokio::test(start_paused = true)]
async fn non_retriable_codes_fail_at_once() {
    let data = blob(100);
    let d = Digest::of(&data);
    for code in [
        Code::NotFound,
        Code::InvalidArgument,
        Code::PermissionDenied,
        Code::Unauthenticated,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::FailedPrecondition,
        Code::Internal,
        Code::Unknown,
    ] {
        let server = Scripted::new(data.clone(), 10, vec![Plan::cut(30, fail(code))]);
        let err = read(
            &server,
            &ResumableReads::new("t", policy(5)),
            &d,
            ReadRange::FULL,
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), code);
        assert_eq!(server.offsets().len(), 1, "{code:?} was retried");
        assert!(
            err.to_string().contains("30 of 100 bytes delivered"),
            "{err}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn excess_bytes_are_an_error() {
    let data = blob(100);
    let d = Digest::of(&data);
    let server = Scripted::new(
        data.clone(),
        10,
        vec![Plan::cut(100, Then::Extra(Bytes::from_static(b"!")))],
    );
    let err = read(
        &server,
        &ResumableReads::new("t", policy(5)),
        &d,
        ReadRange::FULL,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss);
    assert!(err.to_string().contains("101 bytes"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_server_ignoring_read_offset_gives_data_loss_after_one_full_read() {
    let data = blob(1000);
    let d = Digest::of(&data);
    let restart = |after| Plan {
        after,
        then: fail(Code::Unavailable),
        ignore_offset: true,
    };
    // The resumed attempt restarts at byte 0 and is cut again before the end,
    // so no excess shows: only the digest tells.
    let plans = vec![Plan::cut(300, fail(Code::Unavailable)), restart(700)];
    let server = Scripted::new(data.clone(), 100, plans);
    let r = ResumableReads::new("t", policy(5));
    let err = read(&server, &r, &d, ReadRange::FULL).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss);
    assert!(err.to_string().contains("ignore read_offset"), "{err}");
    assert_eq!(server.offsets(), vec![(0, 0), (300, 0), (0, 0)]);
    assert_eq!(counter(&r, "offset_rechecks"), 1);
    // Restarting and running to the end: excess bytes, same diagnosis.
    let server = Scripted::new(
        data.clone(),
        100,
        vec![Plan::cut(300, fail(Code::Unavailable)), restart(5000)],
    );
    let err = read(&server, &r, &d, ReadRange::FULL).await.unwrap_err();
    assert!(err.to_string().contains("ignore read_offset"), "{err}");
    // A blob corrupt on the server is reported as such, after the same check.
    let mut bad = data.to_vec();
    bad[999] ^= 1;
    let server = Scripted::new(bad, 100, vec![Plan::cut(300, fail(Code::Unavailable))]);
    let err = read(&server, &r, &d, ReadRange::FULL).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss);
    assert!(err.to_string().contains("corrupt on the server"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_refused_zstd_resume_falls_back_to_identity() {
    let data = blob(1000);
    let d = Digest::of(&data);
    let plans = vec![
        Plan::cut(400, fail(Code::Unavailable)),
        Plan::cut(0, fail(Code::Unimplemented)),
    ];
    let server = Scripted::new(data.clone(), 100, plans);
    let r = ResumableReads::new("t", policy(5));
    let got = collect(r.get(server.opener(), &d, ReadRange::FULL, Compressor::Zstd)).await;
    assert_eq!(got.unwrap(), data);
    use Compressor::*;
    assert_eq!(server.compressors(), vec![Zstd, Zstd, Identity]);
    assert_eq!(server.offsets(), vec![(0, 0), (400, 0), (400, 0)]);
    assert_eq!(counter(&r, "zstd_fallbacks"), 1);
    // The node remembers: a later resume goes uncompressed at once.
    let server = Scripted::new(
        data.clone(),
        100,
        vec![Plan::cut(400, fail(Code::Unavailable))],
    );
    let got = collect(r.get(server.opener(), &d, ReadRange::FULL, Compressor::Zstd)).await;
    assert_eq!(got.unwrap(), data);
    assert_eq!(server.compressors(), vec![Zstd, Identity]);
}

/// A stall is time the server leaves the reader waiting, not time our own
/// caller takes between two polls (a slow consumer).
#[tokio::test(start_paused = true)]
async fn a_slow_consumer_is_no_stall_and_a_slow_server_is() {
    use blob_access_decorators::resumable_grpc::{AttemptRequest, AttemptStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let data = blob(1000);
    let d = Digest::of(&data);
    for (server_delay, stalls) in [(20u64, 0u64), (40, 1)] {
        let opened = Arc::new(AtomicUsize::new(0));
        let (blob_, opened_) = (data.clone(), opened.clone());
        // Each chunk of 100 bytes comes `server_delay` seconds after it is asked
        // for, on the first attempt only.
        let opener = move |r: AttemptRequest| -> AttemptStream {
            let first = opened_.fetch_add(1, Ordering::SeqCst) == 0;
            let delay = Duration::from_secs(if first { server_delay } else { 0 });
            let blob = blob_.clone();
            futures::stream::unfold(r.offset as usize, move |at| {
                let blob = blob.clone();
                async move {
                    if at >= blob.len() {
                        return None;
                    }
                    tokio::time::sleep(delay).await;
                    let end = (at + 100).min(blob.len());
                    Some((Ok(blob.slice(at..end)), end))
                }
            })
            .boxed()
        };
        let r = ResumableReads::new("t", policy(5));
        let mut s = r.get(Arc::new(opener), &d, ReadRange::FULL, Compressor::Identity);
        let mut got = Vec::new();
        while let Some(chunk) = s.next().await {
            got.extend_from_slice(&chunk.unwrap());
            // The caller takes its time with every chunk.
            tokio::time::sleep(Duration::from_secs(100)).await;
        }
        assert_eq!(got, data);
        assert_eq!(
            counter(&r, "stalls"),
            stalls,
            "server delay {server_delay}s"
        );
    }
}
