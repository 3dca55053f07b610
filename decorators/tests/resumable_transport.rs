//! Transport faults, as middleware causes them: a TCP proxy that resets (RST)
//! or closes (FIN) connections after N bytes or T ms, and an HTTP/2 server that
//! ends streams with RST_STREAM or GOAWAY under several error codes. Sizes 0,
//! 1, chunk - 1, chunk + 1 and 100 MiB, identity and zstd. Every read returns
//! verified bytes or fails with a clear error in a bounded number of attempts.

mod faults;

use blob_access::{Code, Digest};
use blob_access_decorators::resumable_grpc::{RetryPolicy, REFUSED_PER_ATTEMPT};
use bytes::Bytes;
use faults::h2_server::{H2Fault, H2Server};
use faults::proxy::{Faults, Kill, Proxy};
use faults::server::{FaultServer, Options};
use faults::{test_blob, Client};
use h2::Reason;
use std::time::Duration;

const CHUNK: usize = 64 * 1024;
const SIZES: [usize; 4] = [0, 1, CHUNK - 1, CHUNK + 1];

fn policy() -> RetryPolicy {
    RetryPolicy {
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(100),
        ..RetryPolicy::default()
    }
}

async fn blobs(server: &FaultServer, sizes: &[usize]) -> Vec<(Digest, Bytes)> {
    let mut out = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let data = test_blob(size, 100 + i as u64);
        out.push((server.insert(data.clone()).await, data));
    }
    out
}

#[tokio::test]
async fn tcp_resets_and_closes_after_n_bytes_are_resumed() {
    for zstd in [false, true] {
        let server = FaultServer::start(Options {
            zstd,
            ..Options::default()
        })
        .await;
        let blobs = blobs(&server, &SIZES).await;
        let proxy = Proxy::start(server.addr, None).await.unwrap();
        for kill in [Kill::Rst, Kill::Fin] {
            for (d, data) in &blobs {
                // A new channel, so the read starts on a new connection: the
                // first two connections are killed once past the HTTP/2
                // preface and headers, inside the data.
                let client = Client::new(&proxy.endpoint(), zstd, policy());
                let kills = proxy.kills.load(std::sync::atomic::Ordering::Relaxed);
                let n = 300 + data.len() as u64 / 3;
                proxy.set(Some(Faults::bytes(kill, n).times(2)));
                let res = client.read_all(d, data).await;
                let case = format!("zstd {zstd}, {kill:?}, {} bytes", data.len());
                assert!(res.is_ok(), "{case}: {res:?}");
                if data.len() > CHUNK / 2 {
                    let killed = proxy.kills.load(std::sync::atomic::Ordering::Relaxed) - kills;
                    assert!(killed >= 1, "{case}: no connection was killed");
                    assert!(client.counter("resumptions") >= 1, "{case}");
                }
            }
        }
    }
}

#[tokio::test]
async fn a_proxy_killing_every_connection_is_given_up_on_after_the_budget() {
    let server = FaultServer::start(Options::default()).await;
    let blobs = blobs(&server, &[CHUNK + 1]).await;
    let (d, data) = &blobs[0];
    let proxy = Proxy::start(server.addr, Some(Faults::bytes(Kill::Rst, 0)))
        .await
        .unwrap();
    let client = Client::new(&proxy.endpoint(), false, policy());
    let err = client.read_all(d, data).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(err.to_string().contains("5 attempts in a row"), "{err}");
    assert_eq!(client.counter("give_ups"), 1);
}

/// 100 MiB while the proxy kills every connection after 150 ms (RST, then FIN),
/// or after 40 MiB where the machine is fast enough to move 100 MiB in less.
#[tokio::test]
async fn a_large_blob_survives_connections_killed_every_150ms() {
    for (zstd, kill) in [(false, Kill::Rst), (true, Kill::Fin)] {
        let server = FaultServer::start(Options {
            zstd,
            ..Options::default()
        })
        .await;
        let blobs = blobs(&server, &[100 << 20]).await;
        let (d, data) = &blobs[0];
        let proxy = Proxy::start(
            server.addr,
            Some(Faults {
                after_bytes: Some(40 << 20),
                ..Faults::time(kill, Duration::from_millis(150))
            }),
        )
        .await
        .unwrap();
        let client = Client::new(&proxy.endpoint(), zstd, policy());
        let started = std::time::Instant::now();
        client.read_all(d, data).await.unwrap();
        let kills = proxy.kills.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!(
            "100 MiB, zstd {zstd}, {kill:?} every 150 ms: {:?}, {kills} connections killed, {} resumptions",
            started.elapsed(),
            client.counter("resumptions")
        );
        assert!(client.counter("resumptions") >= 1);
    }
}

fn h2_faults(after: u64) -> Vec<H2Fault> {
    let mut v = vec![H2Fault::GoAwayThenClose { after }];
    for reason in [
        Reason::NO_ERROR,
        Reason::PROTOCOL_ERROR,
        Reason::INTERNAL_ERROR,
        Reason::FLOW_CONTROL_ERROR,
        Reason::REFUSED_STREAM,
        Reason::CANCEL,
        Reason::ENHANCE_YOUR_CALM,
    ] {
        v.push(H2Fault::Reset { after, reason });
    }
    for reason in [
        Reason::NO_ERROR,
        Reason::INTERNAL_ERROR,
        Reason::ENHANCE_YOUR_CALM,
    ] {
        v.push(H2Fault::GoAway { after, reason });
    }
    v
}

#[tokio::test]
async fn http2_resets_and_goaways_are_resumed() {
    for zstd in [false, true] {
        let server = H2Server::start(zstd).await;
        let client = Client::new(&server.endpoint(), zstd, policy());
        for (i, size) in SIZES.into_iter().chain([3 * CHUNK + 5]).enumerate() {
            let data = test_blob(size, 200 + i as u64);
            let d = server.insert(data.clone());
            for fault in h2_faults(size as u64 / 3) {
                server.plan([Some(fault), Some(fault)]);
                let before = server.reads();
                let res = client.read_all(&d, &data).await;
                assert!(res.is_ok(), "zstd {zstd}, {fault:?}, {size} bytes: {res:?}");
                assert!(
                    server.reads() - before <= 3,
                    "{fault:?}: {} reads",
                    server.reads() - before
                );
            }
        }
        assert!(
            client.counter("resumptions") > 20,
            "{}",
            client.counter("resumptions")
        );
    }
}

#[tokio::test]
async fn http2_faults_on_every_attempt_end_in_a_clear_error() {
    let server = H2Server::start(false).await;
    let client = Client::new(&server.endpoint(), false, policy());
    let data = test_blob(CHUNK + 1, 7);
    let d = server.insert(data.clone());
    // Not GoAwayThenClose: after its graceful GOAWAY a stream may still finish.
    for fault in h2_faults(0).into_iter().skip(1) {
        server.always(Some(fault));
        let before = server.reads();
        let err = client.read_all(&d, &data).await.unwrap_err();
        let reads = server.reads() - before;
        // Streams refused unprocessed have their own, larger, budget.
        let refused = matches!(
            fault,
            H2Fault::Reset {
                reason: Reason::REFUSED_STREAM,
                ..
            }
        );
        let most = if refused { 5 * REFUSED_PER_ATTEMPT } else { 5 };
        assert!(
            (1..=most as u64).contains(&reads),
            "{fault:?}: {reads} reads"
        );
        assert!(err.to_string().contains(d.hash()), "{err}");
        assert!(err.to_string().contains("gave up"), "{fault:?}: {err}");
    }
}
