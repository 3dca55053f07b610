//! Issue 10, item 2: every way an HTTP/2 stream can end short, from the
//! in-process h2 fault server. END_STREAM inside a message's prefix, inside
//! its payload or on a boundary without trailers, trailers without
//! `grpc-status`, RST_STREAM and GOAWAY with several codes, an HTML page with
//! a 502/503/504 or a 200. Each is resumed to verified bytes when it happens
//! a few times; each on every attempt ends in a clear error within the
//! budget; and a read whose every attempt is cut still completes as long as
//! each attempt delivers bytes.

mod faults;

use blob_access_decorators::resumable_grpc::{RetryPolicy, REFUSED_PER_ATTEMPT};
use faults::h2_server::{H2Fault, H2Server, Within};
use faults::{test_blob, Client};
use h2::Reason;
use std::time::Duration;

const CHUNK: usize = 64 * 1024;

fn policy() -> RetryPolicy {
    RetryPolicy {
        initial_backoff: Duration::from_millis(2),
        max_backoff: Duration::from_millis(50),
        ..RetryPolicy::default()
    }
}

fn endings(after: u64) -> Vec<H2Fault> {
    let mut v = vec![
        H2Fault::EndStream {
            after,
            within: Within::Boundary,
        },
        H2Fault::EndStream {
            after,
            within: Within::Payload,
        },
        H2Fault::TrailersWithoutStatus { after },
    ];
    for k in 1..=4 {
        v.push(H2Fault::EndStream {
            after,
            within: Within::Prefix(k),
        });
    }
    for reason in [
        Reason::NO_ERROR,
        Reason::CANCEL,
        Reason::REFUSED_STREAM,
        Reason::INTERNAL_ERROR,
        Reason::ENHANCE_YOUR_CALM,
    ] {
        v.push(H2Fault::Reset { after, reason });
        v.push(H2Fault::GoAway { after, reason });
    }
    for status in [502, 503, 504, 200] {
        v.push(H2Fault::HtmlPage { status });
    }
    v
}

#[tokio::test]
async fn every_stream_ending_is_resumed_to_verified_bytes() {
    for zstd in [false, true] {
        let server = H2Server::start(zstd).await;
        let client = Client::new(&server.endpoint(), zstd, policy());
        for (i, size) in [0, 1, CHUNK - 1, CHUNK + 1, 3 * CHUNK + 5]
            .into_iter()
            .enumerate()
        {
            let data = test_blob(size, 300 + i as u64);
            let d = server.insert(data.clone());
            for fault in endings(size as u64 / 3) {
                server.plan([Some(fault), Some(fault)]);
                let before = server.reads();
                let res = client.read_all(&d, &data).await;
                assert!(res.is_ok(), "zstd {zstd}, {fault:?}, {size} bytes: {res:?}");
                let reads = server.reads() - before;
                assert!(reads <= 3, "{fault:?}, {size} bytes: {reads} reads");
            }
        }
        assert!(client.counter("resumptions") > 50);
    }
}

#[tokio::test]
async fn every_stream_ending_on_every_attempt_ends_in_a_clear_error() {
    let server = H2Server::start(false).await;
    let client = Client::new(&server.endpoint(), false, policy());
    let data = test_blob(CHUNK + 1, 7);
    let d = server.insert(data.clone());
    for fault in endings(0) {
        server.always(Some(fault));
        let before = server.reads();
        let err = client.read_all(&d, &data).await.unwrap_err();
        let reads = server.reads() - before;
        // A stream refused unprocessed says nothing of the server: such
        // attempts have their own, larger, budget.
        let refused = matches!(
            fault,
            H2Fault::Reset {
                reason: Reason::REFUSED_STREAM,
                ..
            }
        );
        let want = if refused { 5 * REFUSED_PER_ATTEMPT } else { 5 };
        assert_eq!(reads, want as u64, "{fault:?}: {reads} reads");
        let msg = err.to_string();
        assert!(msg.contains(d.hash()), "{msg}");
        assert!(
            msg.contains("gave up") && msg.contains(&format!("{want} attempts")),
            "{fault:?}: {msg}"
        );
    }
    assert_eq!(client.counter("give_ups"), endings(0).len() as u64);
}

/// Never a give-up while bytes still flow: every attempt is cut, inside a
/// message, after delivering one message; the read still completes.
#[tokio::test]
async fn a_read_cut_on_every_attempt_completes_while_bytes_flow() {
    for within in [Within::Payload, Within::Prefix(2), Within::Boundary] {
        let server = H2Server::start(false).await;
        let client = Client::new(&server.endpoint(), false, policy());
        let data = test_blob(12 * CHUNK + 3, 9);
        let d = server.insert(data.clone());
        server.always(Some(H2Fault::EndStream {
            after: CHUNK as u64 + 100,
            within,
        }));
        client.read_all(&d, &data).await.unwrap();
        assert!(server.reads() >= 7, "{within:?}: {} reads", server.reads());
        assert_eq!(client.counter("give_ups"), 0);
    }
}

/// GOAWAY naming a last-stream-id below ours (our stream was never
/// processed: the connection then closes) or above it (our stream may
/// finish), with several codes, written by a proxy between the frames.
#[tokio::test]
async fn goaway_below_and_above_our_stream_is_survived() {
    use faults::frame_proxy::{FrameProxy, GoAway};
    use faults::server::{FaultServer, Options};
    for zstd in [false, true] {
        let server = FaultServer::start(Options {
            zstd,
            ..Options::default()
        })
        .await;
        let proxy = FrameProxy::start(server.addr).await;
        for (i, size) in [1, CHUNK + 1, 5 * CHUNK + 7].into_iter().enumerate() {
            let data = test_blob(size, 400 + i as u64);
            let d = server.insert(data.clone()).await;
            for delta in [-2i64, -100, 2, 1 << 20] {
                for code in [0u32, 2, 11] {
                    let g = GoAway {
                        after: size as u64 / 3,
                        last_stream_delta: delta,
                        code,
                    };
                    proxy.plan([g, g]);
                    // A new channel: the read starts on a new connection.
                    let client = Client::new(&proxy.endpoint(), zstd, policy());
                    let before = server.requests().len();
                    let res = client.read_all(&d, &data).await;
                    assert!(res.is_ok(), "zstd {zstd}, {g:?}, {size} bytes: {res:?}");
                    let reads = server.requests().len() - before;
                    assert!(reads <= 3, "{g:?}, {size} bytes: {reads} reads");
                }
            }
        }
    }
}

/// The ActionCache calls of `resumable_grpc` classify the same way: an HTML
/// page from a proxy is retried, the server's trailers-only NOT_FOUND is an
/// answer (a miss, not retried).
#[tokio::test]
async fn action_cache_calls_retry_proxy_pages_and_take_the_servers_answer() {
    use blob_access::{BuildContext, Code, Digest};
    let server = H2Server::start(false).await;
    let yaml = format!(
        "content_addressable_storage: {{memory: {{max_size_bytes: 1MiB}}}}\naction_cache:\n  resumable_grpc:\n    grpc: {{endpoint: \"{}\"}}\n    initial_backoff: 1ms\n",
        server.endpoint()
    );
    let config =
        blob_access_config::load_str(&yaml, blob_access_config::Format::Yaml, "t").unwrap();
    let storage = config.build(&BuildContext::root()).unwrap();
    let ac = storage.action_cache.unwrap();
    let action = Digest::of(b"an action");
    server.plan([
        Some(H2Fault::HtmlPage { status: 503 }),
        Some(H2Fault::HtmlPage { status: 200 }),
    ]);
    let err = ac.get_action_result(&action).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    assert_eq!(server.reads(), 3);
    // A proxy page every time: given up after the budget, naming the action.
    server.always(Some(H2Fault::HtmlPage { status: 502 }));
    let err = ac.get_action_result(&action).await.unwrap_err();
    assert_ne!(err.code(), Code::NotFound, "{err}");
    assert!(err.to_string().contains(action.hash()), "{err}");
    assert_eq!(server.reads(), 3 + 5);
}

/// A proxy's error page on every attempt of a `resumable_grpc` read: the
/// channel maps its HTTP status to a gRPC code and message, but that status
/// is not the server's, so even a 404 (UNIMPLEMENTED) or a 200 web page is
/// retried as a transport failure until the budget is spent, and the read ends
/// UNAVAILABLE with the mapped status as its last cause.
#[tokio::test]
async fn a_proxy_page_on_every_attempt_is_retried_and_named_in_the_give_up() {
    use blob_access::{util, BuildContext, Code, ReadRange};
    let server = H2Server::start(false).await;
    let yaml = format!(
        // Batches off: the blob goes through ByteStream, which this server has.
        "content_addressable_storage:\n  resumable_grpc:\n    grpc: {{endpoint: \"{}\", max_batch_size_bytes: 1KiB}}\n    initial_backoff: 1ms\n",
        server.endpoint()
    );
    let config =
        blob_access_config::load_str(&yaml, blob_access_config::Format::Yaml, "t").unwrap();
    let cas = config.build(&BuildContext::root()).unwrap().cas;
    let data = test_blob(CHUNK + 1, 11);
    let d = server.insert(data.clone());
    for (status, cause) in [
        (
            502,
            "Unavailable: HTTP 502 Bad Gateway from the server or a proxy",
        ),
        (
            404,
            "Unimplemented: HTTP 404 Not Found from the server or a proxy",
        ),
        (
            200,
            "Unknown: HTTP 200 with content-type \"text/html\", not gRPC",
        ),
    ] {
        server.always(Some(H2Fault::HtmlPage { status }));
        let before = server.reads();
        let err = util::read_to_bytes(&*cas, &d, ReadRange::FULL, 1 << 20)
            .await
            .unwrap_err();
        assert_eq!(server.reads() - before, 5, "{status}: {err}");
        assert_eq!(err.code(), Code::Unavailable, "{status}: {err}");
        let msg = err.to_string();
        assert!(
            msg.contains("gave up") && msg.contains(cause),
            "{status}: {msg}"
        );
    }
}

/// A ByteStream-only server (batch calls UNIMPLEMENTED, as this fault server
/// answers): small blobs still arrive, through ByteStream, for both the plain
/// `grpc` node and `resumable_grpc`, and later reads skip the batch call.
#[tokio::test]
async fn a_server_without_batch_calls_gets_small_blobs_through_bytestream() {
    use blob_access::{util, BuildContext, ReadRange};
    let server = H2Server::start(false).await;
    for node in ["grpc", "resumable_grpc: {grpc"] {
        let close = if node == "grpc" { "" } else { "}" };
        let yaml = format!("{node}: {{endpoint: \"{}\"}}{close}", server.endpoint());
        let config =
            blob_access_config::load_str(&yaml, blob_access_config::Format::Yaml, "t").unwrap();
        let cas = config.build_cas(&BuildContext::root()).unwrap();
        for seed in 0..3 {
            let data = test_blob(1000 + seed as usize, 40 + seed);
            let d = server.insert(data.clone());
            let before = server.reads();
            let got = util::read_to_bytes(&*cas, &d, ReadRange::FULL, 1 << 20)
                .await
                .unwrap_or_else(|e| panic!("{node}: {e}"));
            assert!(got == data, "{node}");
            assert_eq!(server.reads() - before, 1, "{node}: one ByteStream read");
        }
    }
}
