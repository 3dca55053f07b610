//! Uploads through `resumable_grpc` that survive cuts, against the in-process
//! fault server: resumed at the `committed_size` QueryWriteStatus reports,
//! started again when the server cannot tell (UNIMPLEMENTED), ended at once
//! when the server already has the blob, bounded by the retry budget; the
//! plain `grpc` node fails on the same cut (the control).

mod faults;

use blob_access::grpc::{GrpcBlobAccess, GrpcConfig, GrpcConnection};
use blob_access::{BlobAccess, Code, Digest, Error, Reopen};
use blob_access_chaos::{Faults, Kill, Proxy};
use blob_access_decorators::resumable_grpc::{ResumableGrpcBlobAccess, RetryPolicy};
use faults::server::{FaultServer, Options, WriteFault};
use faults::test_blob;
use std::sync::Arc;
use std::time::Duration;

const MIB: usize = 1 << 20;

fn policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts_without_progress: max_attempts,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        ..Default::default()
    }
}

/// Every upload through ByteStream (the fault server has no batch calls).
fn config(endpoint: &str) -> GrpcConfig {
    let yaml = format!("{{endpoint: \"{endpoint}\", max_batch_size_bytes: 0}}");
    serde_yaml_ng::from_str(&yaml).unwrap()
}

fn node(endpoint: &str, policy: RetryPolicy, window: u64) -> ResumableGrpcBlobAccess {
    let conn = GrpcConnection::new("cas.resumable_grpc", &config(endpoint)).unwrap();
    ResumableGrpcBlobAccess::new(conn, policy).with_replay_window(window)
}

fn counter(node: &dyn BlobAccess, name: &str) -> u64 {
    let mut m = Vec::new();
    node.metrics(&mut m);
    m[0].get(name).unwrap()
}

/// The blob in 64 KiB chunks, as a file would come.
fn stream(blob: &bytes::Bytes) -> blob_access::BlobStream {
    blob_access::util::chunked(blob.clone(), 64 << 10)
}

async fn put(node: &dyn BlobAccess, blob: &bytes::Bytes) -> Result<Digest, Error> {
    let d = Digest::of(blob);
    node.put(&d, stream(blob)).await.map(|()| d)
}

async fn stored(server: &FaultServer, d: &Digest, blob: &[u8]) {
    let got =
        blob_access::util::read_to_bytes(&*server.cas, d, blob_access::ReadRange::FULL, usize::MAX)
            .await
            .unwrap();
    assert_eq!(&got[..], blob);
}

#[tokio::test]
async fn a_cut_upload_goes_on_at_the_committed_size_sending_each_byte_once() {
    let server = FaultServer::start(Options {
        keep_partial_uploads: true,
        ..Options::default()
    })
    .await;
    let blob = test_blob(8 * MIB, 1);
    let cut = |after| {
        Some(WriteFault::Status {
            after,
            code: Code::Unavailable,
        })
    };
    server.plan_writes([cut(3 * MIB as u64 + 7), cut(MIB as u64)]);
    let n = node(&server.endpoint(), policy(3), 16 << 20);
    let d = put(&n, &blob).await.unwrap();
    stored(&server, &d, &blob).await;
    let w = server.writes();
    assert_eq!(w.len(), 3, "{w:?}");
    assert!(w.iter().all(|a| a.uuid == w[0].uuid), "one upload: {w:?}");
    assert_eq!(w[0].first_offset, 0);
    assert_eq!(w[1].first_offset, 3 * MIB as u64 + 7);
    assert_eq!(w[2].first_offset, 4 * MIB as u64 + 7);
    let received: u64 = w.iter().map(|a| a.received).sum();
    assert_eq!(received, blob.len() as u64, "bytes sent twice: {w:?}");
    assert_eq!(server.queries(), 2);
    assert_eq!(counter(&n, "write_retries"), 2);
    assert_eq!(counter(&n, "write_restarts"), 0);
}

#[tokio::test]
async fn without_query_write_status_the_upload_starts_again_at_zero() {
    let server = FaultServer::start(Options::default()).await;
    let blob = test_blob(2 * MIB, 2);
    server.plan_writes([Some(WriteFault::Status {
        after: MIB as u64,
        code: Code::Unavailable,
    })]);
    let n = node(&server.endpoint(), policy(3), 16 << 20);
    let d = put(&n, &blob).await.unwrap();
    stored(&server, &d, &blob).await;
    let w = server.writes();
    assert_eq!(w.len(), 2, "{w:?}");
    assert_eq!((w[1].first_offset, w[1].received), (0, blob.len() as u64));
    assert_eq!(counter(&n, "write_restarts"), 1);
    assert_eq!(counter(&n, "source_rereads"), 0, "the window held it all");
}

#[tokio::test]
async fn a_start_again_beyond_the_window_reads_a_reopenable_source_again() {
    let server = FaultServer::start(Options::default()).await;
    let blob = test_blob(2 * MIB, 3);
    let d = Digest::of(&blob);
    let cut = Some(WriteFault::Status {
        after: MIB as u64 + 5,
        code: Code::Unavailable,
    });
    let n = node(&server.endpoint(), policy(3), 256 << 10);

    // A one-shot stream: the start of the blob has left the window.
    server.plan_writes([cut.clone()]);
    let e = n.put(&d, stream(&blob)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    let text = e.to_string();
    for needle in [
        d.to_string().as_str(),
        "write_replay_window",
        "cannot be read again",
    ] {
        assert!(text.contains(needle), "{needle} missing: {text}");
    }
    assert_eq!(server.writes().len(), 1);

    // The same through put_reopenable: read again, the upload succeeds.
    server.plan_writes([cut]);
    let source = blob.clone();
    let reopen: Reopen = Arc::new(move || stream(&source));
    n.put_reopenable(&d, reopen).await.unwrap();
    stored(&server, &d, &blob).await;
    assert_eq!(counter(&n, "source_rereads"), 1);
}

#[tokio::test]
async fn a_server_that_kept_the_blob_ends_the_upload_without_resending() {
    let server = FaultServer::start(Options {
        keep_partial_uploads: true,
        ..Options::default()
    })
    .await;
    let blob = test_blob(MIB, 4);
    server.plan_writes([Some(WriteFault::StoreThenFail)]);
    let n = node(&server.endpoint(), policy(3), 16 << 20);
    let d = put(&n, &blob).await.unwrap();
    stored(&server, &d, &blob).await;
    assert_eq!(server.writes().len(), 1, "resent");
    assert_eq!(server.queries(), 1);
    assert_eq!(counter(&n, "writes_found_complete"), 1);
}

#[tokio::test]
async fn already_exists_is_success() {
    let server = FaultServer::start(Options::default()).await;
    let blob = test_blob(MIB, 5);
    server.insert(blob.clone()).await;
    server.plan_writes([Some(WriteFault::AlreadyExists)]);
    let n = node(&server.endpoint(), policy(3), 16 << 20);
    put(&n, &blob).await.unwrap();
    assert_eq!(server.writes().len(), 1);
    assert_eq!(server.queries(), 0);
}

#[tokio::test]
async fn attempts_without_progress_are_bounded_with_a_clear_error() {
    let server = FaultServer::start(Options::default()).await;
    let blob = test_blob(MIB, 6);
    server.always_writes(Some(WriteFault::Status {
        after: 1000,
        code: Code::Unavailable,
    }));
    let n = node(&server.endpoint(), policy(4), 16 << 20);
    let e = put(&n, &blob).await.unwrap_err();
    let text = e.to_string();
    assert_eq!(e.code(), Code::Unavailable, "{text}");
    let d = Digest::of(&blob).to_string();
    for needle in [
        d.as_str(),
        "4 attempts in a row",
        "cas.resumable_grpc",
        "injected",
    ] {
        assert!(text.contains(needle), "{needle} missing: {text}");
    }
    assert_eq!(server.writes().len(), 4);
}

#[tokio::test]
async fn progress_resets_the_budget() {
    let server = FaultServer::start(Options {
        keep_partial_uploads: true,
        ..Options::default()
    })
    .await;
    let blob = test_blob(MIB, 7);
    // Each attempt commits 100 000 more bytes: 11 attempts, budget 2.
    server.always_writes(Some(WriteFault::Status {
        after: 100_000,
        code: Code::Unavailable,
    }));
    let n = node(&server.endpoint(), policy(2), 16 << 20);
    let d = put(&n, &blob).await.unwrap();
    stored(&server, &d, &blob).await;
    assert_eq!(server.writes().len(), 11);
}

#[tokio::test]
async fn a_server_answer_about_the_request_is_not_retried() {
    let server = FaultServer::start(Options::default()).await;
    let blob = test_blob(MIB, 8);
    server.always_writes(Some(WriteFault::Status {
        after: 1000,
        code: Code::PermissionDenied,
    }));
    let n = node(&server.endpoint(), policy(4), 16 << 20);
    let e = put(&n, &blob).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert_eq!(server.writes().len(), 1);
}

#[tokio::test]
async fn bad_data_is_never_sent_to_completion() {
    let server = FaultServer::start(Options::default()).await;
    let blob = test_blob(MIB, 9);
    let wrong = Digest::of(b"something else but as long");
    let wrong = Digest::new(
        blob_access::DigestFunction::Sha256,
        wrong.hash(),
        blob.len() as u64,
    )
    .unwrap();
    let n = node(&server.endpoint(), policy(4), 16 << 20);
    let e = n.put(&wrong, stream(&blob)).await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e}");
    assert!(
        server
            .cas
            .find_missing(std::slice::from_ref(&wrong))
            .await
            .unwrap()
            == vec![wrong]
    );
    assert!(server.writes().len() <= 1);
}

/// Connections killed by a proxy every 150 ms (the first three) during an
/// upload to a slow server: the plain node fails, `resumable_grpc` goes on
/// where the server stands.
#[tokio::test]
async fn a_proxy_cutting_connections_fails_plain_uploads_and_resumable_ones_go_on() {
    let server = FaultServer::start(Options {
        keep_partial_uploads: true,
        write_delay: Some(Duration::from_millis(4)),
        ..Options::default()
    })
    .await;
    let blob = test_blob(4 * MIB, 10);
    let d = Digest::of(&blob);
    let cut = Faults::time(Kill::Rst, Duration::from_millis(150));
    let proxy = Proxy::start(server.addr, Some(cut.times(1))).await.unwrap();

    let plain =
        GrpcBlobAccess::new(GrpcConnection::new("plain", &config(&proxy.endpoint())).unwrap());
    let e = plain.put(&d, stream(&blob)).await.unwrap_err();
    assert!(e.to_string().contains(&d.to_string()), "{e}");
    assert!(
        server
            .cas
            .find_missing(std::slice::from_ref(&d))
            .await
            .unwrap()
            == vec![d.clone()]
    );

    proxy.set(Some(cut.times(3)));
    let n = node(&proxy.endpoint(), policy(3), 16 << 20);
    n.put(&d, stream(&blob)).await.unwrap();
    stored(&server, &d, &blob).await;
    let resumed = server.writes().into_iter().skip(1).collect::<Vec<_>>();
    assert!(resumed.len() >= 2, "{resumed:?}");
    assert!(
        resumed[1..].iter().any(|a| a.first_offset > 0),
        "never continued: {resumed:?}"
    );
}

/// Decorators above `resumable_grpc` hand a reopenable source on, so a
/// restart beyond the window still reads it again (a one-shot `put` would fail).
#[tokio::test]
async fn decorators_pass_a_reopenable_source_down() {
    let server = FaultServer::start(Options::default()).await;
    let blob = test_blob(2 * MIB, 5);
    let d = Digest::of(&blob);
    let yaml = format!(
        r#"
error_logging:
  backend:
    existence_caching:
      backend:
        sharding:
          shards:
            - backend:
                demultiplexing:
                  instance_name_prefixes:
                    "":
                      backend:
                        read_caching:
                          fast: {{memory: {{max_size_bytes: 1MiB}}}}
                          slow:
                            resumable_grpc:
                              grpc: {{endpoint: "{}", max_batch_size_bytes: 0}}
                              max_attempts_without_progress: 3
                              initial_backoff: 1ms
                              write_replay_window: 256KiB
"#,
        server.endpoint()
    );
    let config =
        blob_access_config::load_str(&yaml, blob_access_config::Format::Yaml, "t").unwrap();
    let tree = config
        .build_cas(&blob_access::BuildContext::root())
        .unwrap();
    server.plan_writes([Some(WriteFault::Status {
        after: MIB as u64 + 5,
        code: Code::Unavailable,
    })]);
    let source = blob.clone();
    let reopen: Reopen = Arc::new(move || stream(&source));
    tree.put_reopenable(&d, reopen).await.unwrap();
    stored(&server, &d, &blob).await;
    assert_eq!(server.writes().len(), 2);
}

/// A server whose view of a cut lags ours (it refuses the continuation it
/// told us to send, as a new upload out of order): at lags of 1 to 3
/// refusals, the write asks QueryWriteStatus again and goes on from there;
/// a server that never catches up gets the upload from 0 under a new name.
/// Each way, the blob is stored whole.
#[tokio::test]
async fn resumed_writes_survive_servers_whose_view_of_the_cut_lags() {
    for lag in [1u32, 2, 3, 100] {
        let server = FaultServer::start(Options {
            keep_partial_uploads: true,
            lagging_refusals: lag,
            ..Options::default()
        })
        .await;
        let blob = test_blob(4 * MIB, lag as u64);
        server.plan_writes([Some(WriteFault::Status {
            after: MIB as u64,
            code: Code::Unavailable,
        })]);
        let n = node(&server.endpoint(), policy(5), 16 << 20);
        let d = put(&n, &blob)
            .await
            .unwrap_or_else(|e| panic!("lag {lag}: {e}"));
        stored(&server, &d, &blob).await;
        let refusals = counter(&n, "write_refusals");
        let restarts = counter(&n, "write_restarts");
        if lag <= 3 {
            assert_eq!((refusals, restarts), (lag as u64, 0), "lag {lag}");
        } else {
            // Three refused resumptions, then from 0 under a new name.
            assert_eq!(refusals, 4, "lag {lag}");
            assert!(restarts >= 1, "lag {lag}");
        }
    }
}
