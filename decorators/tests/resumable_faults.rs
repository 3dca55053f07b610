//! Server-side faults over real TCP and HTTP/2: a tonic ByteStream server
//! that, per attempt, fails with each status code after N bytes, ends early,
//! ignores `read_offset` or corrupts a byte; blob sizes 0, 1, chunk - 1,
//! chunk + 1 and 100 MiB; identity and zstd. Every read returns verified bytes
//! or fails with a clear error after a bounded number of attempts.

mod faults;

use blob_access::{Code, Digest};
use blob_access_decorators::resumable_grpc::RetryPolicy;
use bytes::Bytes;
use faults::server::{Fault, FaultServer, Options};
use faults::{test_blob, Client};
use std::time::Duration;

const CHUNK: usize = 64 * 1024;
const SIZES: [usize; 4] = [0, 1, CHUNK - 1, CHUNK + 1];

fn policy() -> RetryPolicy {
    RetryPolicy {
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(20),
        ..RetryPolicy::default()
    }
}

struct Setup {
    server: FaultServer,
    client: Client,
    blobs: Vec<(Digest, Bytes)>,
}

async fn setup(zstd: bool, opts: Options, sizes: &[usize]) -> Setup {
    let server = FaultServer::start(Options { zstd, ..opts }).await;
    let client = Client::new(&server.endpoint(), zstd, policy());
    let mut blobs = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let data = test_blob(size, i as u64);
        blobs.push((server.insert(data.clone()).await, data));
    }
    Setup {
        server,
        client,
        blobs,
    }
}

/// Where a fault cuts a blob of `size` bytes: in the middle, in wire bytes
/// (a third of the size stays inside the compressed stream too).
fn cut(size: usize) -> u64 {
    (size / 3) as u64
}

#[tokio::test]
async fn retriable_statuses_and_early_ends_are_resumed() {
    for zstd in [false, true] {
        let s = setup(zstd, Options::default(), &SIZES).await;
        let retriable = [
            Code::Unavailable,
            Code::Cancelled,
            Code::DeadlineExceeded,
            Code::Aborted,
            Code::ResourceExhausted,
        ];
        let mut faults: Vec<Box<dyn Fn(u64) -> Fault>> =
            vec![Box::new(|after| Fault::EarlyEnd { after })];
        for code in retriable {
            faults.push(Box::new(move |after| Fault::Status { after, code }));
        }
        for make in faults {
            for (d, data) in &s.blobs {
                let fault = make(cut(data.len()));
                s.server.plan([Some(fault.clone()), Some(fault.clone())]);
                let before = s.server.requests().len();
                let res = s.client.read_all(d, data).await;
                assert!(
                    res.is_ok(),
                    "zstd {zstd}, {fault:?}, {} bytes: {res:?}",
                    data.len()
                );
                let requests = &s.server.requests()[before..];
                assert!(requests.len() <= 3, "{fault:?}: {requests:?}");
                let compressed = requests[0].0.contains("compressed-blobs/zstd/");
                assert_eq!(compressed, zstd, "{requests:?}");
                if !zstd && data.len() > 2 {
                    // Identity: the resumed reads start exactly after the bytes delivered.
                    let c = cut(data.len()) as i64;
                    let offsets: Vec<_> = requests.iter().map(|r| (r.1, r.2)).collect();
                    assert_eq!(offsets, vec![(0, 0), (c, 0), (2 * c, 0)], "{fault:?}");
                }
            }
        }
        assert!(s.client.counter("resumptions") > 0);
    }
}

#[tokio::test]
async fn non_retriable_statuses_fail_at_once_with_their_code() {
    let s = setup(false, Options::default(), &[CHUNK + 1]).await;
    let (d, data) = &s.blobs[0];
    for code in [
        Code::Internal,
        Code::Unknown,
        Code::NotFound,
        Code::InvalidArgument,
        Code::PermissionDenied,
        Code::Unauthenticated,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::FailedPrecondition,
    ] {
        s.server.plan([Some(Fault::Status { after: 1000, code })]);
        let before = s.server.requests().len();
        let err = s.client.read_all(d, data).await.unwrap_err();
        assert_eq!(err.code(), code);
        assert_eq!(
            s.server.requests().len(),
            before + 1,
            "{code:?} was retried"
        );
        let msg = err.to_string();
        assert!(msg.contains("injected") && msg.contains(d.hash()), "{msg}");
    }
    // A missing blob.
    let missing = Digest::of(b"not stored");
    let err = s
        .client
        .read_all(&missing, b"not stored")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn a_server_that_never_recovers_is_given_up_on_after_the_budget() {
    for zstd in [false, true] {
        let s = setup(zstd, Options::default(), &[CHUNK + 1]).await;
        let (d, data) = &s.blobs[0];
        s.server.always(Some(Fault::Status {
            after: 0,
            code: Code::Unavailable,
        }));
        let err = s.client.read_all(d, data).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert_eq!(s.server.requests().len(), 5);
        let msg = err.to_string();
        assert!(
            msg.contains("5 attempts in a row") && msg.contains("0 of 65537 bytes"),
            "{msg}"
        );
        assert_eq!(s.client.counter("give_ups"), 1);
    }
}

#[tokio::test]
async fn ignored_offsets_and_corrupt_bytes_never_pass_as_the_blob() {
    for zstd in [false, true] {
        let s = setup(zstd, Options::default(), &SIZES).await;
        for (d, data) in &s.blobs {
            let size = data.len();
            // A cut, then a resumption that the server answers from byte 0.
            s.server.plan([
                Some(Fault::Status {
                    after: cut(size),
                    code: Code::Unavailable,
                }),
                Some(Fault::IgnoreOffset),
            ]);
            let res = s.client.read_all(d, data).await;
            if size > 2 {
                let err = res.unwrap_err();
                assert_eq!(err.code(), Code::DataLoss, "{err}");
                assert!(
                    err.to_string().contains("ignore read_offset"),
                    "zstd {zstd}, {size}: {err}"
                );
                let last = s.server.requests().pop().unwrap();
                assert_eq!((last.1, last.2), (0, 0), "the full check read");
            } else {
                assert!(res.is_ok(), "{size}: {res:?}");
            }
            if size == 0 {
                continue;
            }
            s.server.plan([Some(Fault::Corrupt {
                at: size as u64 / 2,
            })]);
            let err = s.client.read_all(d, data).await.unwrap_err();
            assert_eq!(err.code(), Code::DataLoss, "{err}");
        }
    }
}

#[tokio::test]
async fn a_server_refusing_zstd_at_an_offset_is_read_uncompressed_from_there() {
    let opts = Options {
        refuse_zstd_offset: true,
        ..Options::default()
    };
    let s = setup(true, opts, &[CHUNK + 1]).await;
    let (d, data) = &s.blobs[0];
    s.server.plan([Some(Fault::Status {
        after: cut(data.len()),
        code: Code::Unavailable,
    })]);
    s.client.read_all(d, data).await.unwrap();
    let r = s.server.requests();
    assert_eq!(r.len(), 3, "{r:?}");
    assert!(r[0].0.contains("compressed-blobs/zstd/") && r[1].0.contains("compressed-blobs/zstd/"));
    assert!(
        r[2].0.starts_with("blobs/") && r[2].1 == r[1].1 && r[2].1 > 0,
        "{r:?}"
    );
    assert_eq!(s.client.counter("zstd_fallbacks"), 1);
}

/// 100 MiB, cut several times at odd places (inside messages, inside zstd
/// frames) by different faults, identity and zstd.
#[tokio::test]
async fn a_large_blob_survives_many_cuts() {
    const SIZE: usize = 100 << 20;
    for zstd in [false, true] {
        let s = setup(zstd, Options::default(), &[SIZE]).await;
        let (d, data) = &s.blobs[0];
        s.server.plan([
            Some(Fault::Status {
                after: 7_777_777,
                code: Code::Unavailable,
            }),
            Some(Fault::EarlyEnd { after: 13_000_001 }),
            Some(Fault::Status {
                after: 1,
                code: Code::ResourceExhausted,
            }),
            Some(Fault::Status {
                after: 0,
                code: Code::Aborted,
            }),
            Some(Fault::Status {
                after: 20 << 20,
                code: Code::Cancelled,
            }),
        ]);
        let started = std::time::Instant::now();
        s.client.read_all(d, data).await.unwrap();
        let r = s.server.requests();
        assert_eq!(r.len(), 6, "{r:?}");
        eprintln!("100 MiB, zstd {zstd}: 5 cuts, {:?}", started.elapsed());
        if !zstd {
            let offsets: Vec<i64> = r.iter().map(|r| r.1).collect();
            let expected = [
                0,
                7_777_777,
                20_777_778,
                20_777_779,
                20_777_779,
                20_777_779 + (20 << 20),
            ];
            assert_eq!(offsets, expected);
        }
    }
}
