//! `serve`'s limits against clients that hold resources without using them,
//! over real TCP and HTTP/2: silent streams (slowloris) and silent connections
//! are ended after `--idle-timeout` while other clients go on; a message
//! claiming 4 GiB is refused from its length prefix; one connection runs at
//! most `--max-uploads-per-connection` uploads; an upload that stops half-way
//! leaves nothing behind in a disk CAS.

mod support;

use blob_access::bytestream_proto::byte_stream_client::ByteStreamClient;
use blob_access::bytestream_proto::WriteRequest;
use blob_access::proto::content_addressable_storage_client::ContentAddressableStorageClient;
use blob_access::proto::{Digest, FindMissingBlobsRequest};
use bytes::Bytes;
use sha2::Digest as _;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::AsyncReadExt;
use tonic::Code;

const FIND_MISSING: &str =
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs";
const BATCH_UPDATE: &str =
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs";

fn digest_of(data: &[u8]) -> Digest {
    Digest {
        hash: hex::encode(sha2::Sha256::digest(data)),
        size_bytes: data.len() as i64,
    }
}

/// A call other clients make while the abusive ones hold their streams.
async fn find_missing_works(port: u16) {
    let mut cas = ContentAddressableStorageClient::new(channel(port).await);
    let d = digest_of(b"not there");
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        cas.find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![d.clone()],
            ..Default::default()
        }),
    )
    .await
    .expect("a well-behaved client was held up")
    .unwrap();
    assert_eq!(r.into_inner().missing_blob_digests, vec![d]);
}

/// A raw HTTP/2 connection, for what tonic clients never do.
async fn raw_h2(port: u16) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    send.ready().await.unwrap()
}

fn grpc_request(path: &str) -> http::Request<()> {
    http::Request::post(format!("http://127.0.0.1{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// A `grpc-message` value, percent-decoded as gRPC sends it.
fn grpc_message(value: &str) -> String {
    let mut out = Vec::new();
    let mut bytes = value.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hex: String = bytes.by_ref().take(2).map(char::from).collect();
                out.push(u8::from_str_radix(&hex, 16).unwrap());
            }
            b => out.push(b),
        }
    }
    String::from_utf8(out).unwrap()
}

/// The grpc-status of a response: from its headers (trailers-only) or its trailers.
async fn grpc_status(response: h2::client::ResponseFuture) -> (i32, String) {
    let response = response.await.unwrap();
    let field =
        |h: &http::HeaderMap, name: &str| h.get(name).map(|v| grpc_message(v.to_str().unwrap()));
    if let Some(code) = field(response.headers(), "grpc-status") {
        let message = field(response.headers(), "grpc-message").unwrap_or_default();
        return (code.parse().unwrap(), message);
    }
    let mut body = response.into_body();
    while let Some(data) = body.data().await {
        let _ = data.unwrap();
    }
    let trailers = body.trailers().await.unwrap().expect("no trailers");
    let message = field(&trailers, "grpc-message").unwrap_or_default();
    (
        field(&trailers, "grpc-status").unwrap().parse().unwrap(),
        message,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_streams_and_connections_are_ended_while_others_go_on() {
    let serve = Serve::start_with(None, &["--idle-timeout", "2s", "-v"]);
    let port = serve.port;
    // 3 connections x 20 streams that send their headers and then nothing,
    // half of them unary calls, half uploads.
    let mut silent = Vec::new();
    for _ in 0..3 {
        let mut h2 = raw_h2(port).await;
        for i in 0..20 {
            let path = if i % 2 == 0 {
                FIND_MISSING
            } else {
                "/google.bytestream.ByteStream/Write"
            };
            let (response, stream) = h2.send_request(grpc_request(path), false).unwrap();
            silent.push((response, stream));
            h2 = h2.ready().await.unwrap();
        }
    }
    // A connection that never even starts HTTP/2.
    let mut mute = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let started = Instant::now();
    find_missing_works(port).await;

    for (response, _stream) in silent {
        let (code, message) = tokio::time::timeout(Duration::from_secs(15), grpc_status(response))
            .await
            .expect("a silent stream was never ended");
        assert_eq!(code, Code::DeadlineExceeded as i32, "{message}");
        assert!(message.contains("sent nothing for 2s"), "{message}");
    }
    let ended = started.elapsed();
    assert!(ended >= Duration::from_secs(2), "ended after {ended:?}");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(15), mute.read(&mut buf))
        .await
        .expect("a connection that sent nothing was kept open");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    find_missing_works(port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_claiming_4_gib_is_refused_from_its_prefix() {
    let serve = Serve::start(None);
    let port = serve.port;
    let rss_before = rss_kib(serve.pid());
    let mut h2 = raw_h2(port).await;
    let (response, mut stream) = h2.send_request(grpc_request(BATCH_UPDATE), false).unwrap();
    // Uncompressed, 4 GiB - 1 bytes long, then the first MiB of it, and the
    // stream kept open as if the rest were coming.
    let mut prefix = vec![0u8, 0xff, 0xff, 0xff, 0xff];
    prefix.extend(std::iter::repeat_n(7u8, 1 << 20));
    stream.send_data(Bytes::from(prefix), false).unwrap();
    let (code, message) = tokio::time::timeout(Duration::from_secs(10), grpc_status(response))
        .await
        .expect("the server went on reading a 4 GiB message");
    assert_eq!(code, Code::OutOfRange as i32, "{message}");
    assert!(message.contains("too large"), "{message}");
    find_missing_works(port).await;
    // A message over --max-message-size sent whole is refused the same way.
    h2 = h2.ready().await.unwrap();
    let (response, mut stream) = h2.send_request(grpc_request(BATCH_UPDATE), false).unwrap();
    let len: u32 = 17 << 20;
    let mut whole = vec![0u8];
    whole.extend(len.to_be_bytes());
    whole.resize(5 + len as usize, 0);
    let _ = stream.send_data(Bytes::from(whole), true);
    let (code, _) = grpc_status(response).await;
    assert_eq!(code, Code::OutOfRange as i32);
    let rss_after = rss_kib(serve.pid());
    assert!(
        rss_after < rss_before + 64 * 1024,
        "serve grew from {rss_before} KiB to {rss_after} KiB"
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// An upload whose stream stays open after `first` bytes of a 1 MiB blob.
fn hanging_upload(
    first: usize,
) -> (
    tokio::sync::mpsc::Sender<WriteRequest>,
    tokio_stream::wrappers::ReceiverStream<WriteRequest>,
    Digest,
) {
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let data = [data, uuid::Uuid::new_v4().as_bytes().to_vec()].concat();
    let digest = digest_of(&data);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.try_send(WriteRequest {
        resource_name: format!(
            "uploads/{}/blobs/{}/{}",
            uuid::Uuid::new_v4(),
            digest.hash,
            digest.size_bytes
        ),
        write_offset: 0,
        finish_write: false,
        data: data[..first].to_vec(),
    })
    .unwrap();
    (tx, tokio_stream::wrappers::ReceiverStream::new(rx), digest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_runs_at_most_max_uploads() {
    let serve = Serve::start_with(None, &["--max-uploads-per-connection", "2"]);
    let one_connection = channel(serve.port).await;
    let mut running = Vec::new();
    for _ in 0..2 {
        let (tx, rx, _) = hanging_upload(1000);
        let mut bs = ByteStreamClient::new(one_connection.clone());
        running.push((tx, tokio::spawn(async move { bs.write(rx).await })));
    }
    // Let both start on the server before the third arrives.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_tx, rx, _) = hanging_upload(1000);
    let refused = ByteStreamClient::new(one_connection.clone())
        .write(rx)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("max_uploads_per_connection"));
    // Another connection is not limited by this one's uploads.
    let (tx, rx, _) = hanging_upload(1000);
    drop(tx);
    let other = ByteStreamClient::new(channel(serve.port).await)
        .write(rx)
        .await
        .unwrap_err();
    assert_ne!(other.code(), Code::ResourceExhausted, "{other:?}");
    // Once one ends, the connection may start another.
    let (tx, task) = running.pop().unwrap();
    drop(tx);
    let _ = task.await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (tx, rx, _) = hanging_upload(1000);
    drop(tx);
    let again = ByteStreamClient::new(one_connection)
        .write(rx)
        .await
        .unwrap_err();
    assert_ne!(again.code(), Code::ResourceExhausted, "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_stopped_half_way_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let cas = dir.path().join("cas");
    let config = dir.path().join("disk.yaml");
    std::fs::write(
        &config,
        format!("disk: {{path: {}, max_size_bytes: 64MiB}}\n", cas.display()),
    )
    .unwrap();
    // Uploads cut half-way are kept for the resume window, then discarded.
    let serve = Serve::start_with(
        Some(&config),
        &["--idle-timeout", "1s", "--upload-resume-window", "1s"],
    );
    // One client goes silent half-way, another cancels half-way.
    let (silent_tx, rx, silent) = hanging_upload(512 << 10);
    let mut bs = ByteStreamClient::new(channel(serve.port).await);
    let silent_err = tokio::time::timeout(Duration::from_secs(15), bs.write(rx))
        .await
        .expect("a silent upload was kept waiting")
        .unwrap_err();
    assert_eq!(silent_err.code(), Code::DeadlineExceeded, "{silent_err:?}");
    let (cancel_tx, rx, cancelled) = hanging_upload(512 << 10);
    let mut bs = ByteStreamClient::new(channel(serve.port).await);
    let call = tokio::spawn(async move { bs.write(rx).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    call.abort();
    drop((silent_tx, cancel_tx));
    // Past the window (and the disk store's removal of its temp files).
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let mut cas_client = ContentAddressableStorageClient::new(channel(serve.port).await);
    let missing = cas_client
        .find_missing_blobs(FindMissingBlobsRequest {
            blob_digests: vec![silent.clone(), cancelled.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests;
    assert_eq!(missing, vec![silent, cancelled]);
    let mut left = Vec::new();
    for entry in walk(&cas) {
        left.push(entry.display().to_string());
    }
    assert!(left.is_empty(), "files left in the CAS: {left:?}");
}

/// Every file under `dir` (none if it does not exist).
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().unwrap().is_dir() {
                todo.push(e.path());
            } else {
                files.push(e.path());
            }
        }
    }
    files
}

#[test]
fn limits_that_cannot_work_are_refused_naming_the_flag() {
    let out = cli(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--max-message-size",
        "4MiB",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--max-message-size (4194304) must exceed --max-batch-size"),
        "{err}"
    );
    let out = cli(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--max-batch-size",
        "lots",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--max-batch-size") && err.contains("\"lots\" is not a size"),
        "{err}"
    );
    // Zero would serve nothing (every connection closed, every call or upload
    // refused). A socket that cannot be bound ends a serve that wrongly starts.
    for (flag, zero) in [
        ("--idle-timeout", "0s"),
        ("--max-concurrent-streams", "0"),
        ("--max-uploads-per-connection", "0"),
        ("--max-message-size", "0"),
    ] {
        let out = cli(&[
            "serve",
            "--listen",
            "unix:/nonexistent/dir/sock",
            flag,
            zero,
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {zero}: {err}");
        assert!(
            err.contains(flag) && err.contains("must be more than 0"),
            "{err}"
        );
    }
}
