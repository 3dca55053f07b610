//! Serving on a Unix socket, and graceful shutdown with its grace period.

mod server_support;

use blob_access::bytestream_proto::byte_stream_client::ByteStreamClient;
use blob_access::bytestream_proto::ReadRequest;
use blob_access::memory::MemoryBlobAccess;
use blob_access::proto::capabilities_client::CapabilitiesClient;
use blob_access::proto::GetCapabilitiesRequest;
use blob_access::{util, BlobAccess, Code};
use blob_access_server::{serve_unix, ServerConfig};
use server_support::*;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

#[tokio::test]
async fn serves_on_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cas.sock");
    // A socket file left behind by a dead server is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let memory = Arc::new(MemoryBlobAccess::new("memory", 1 << 30));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_unix(
        memory.clone(),
        ServerConfig::default(),
        path.clone(),
        async {
            let _ = stopped.await;
        },
    ));
    let url = format!("unix:{}", path.display());
    let channel = loop {
        match tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
        {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    // A second server on the same, live, socket is refused.
    let second = serve_unix(memory.clone(), ServerConfig::default(), &path, async {}).await;
    assert!(second.unwrap_err().to_string().contains("cas.sock"));

    let mut bs = ByteStreamClient::new(channel.clone());
    let (data, d) = blob(3 << 20, 1);
    let committed = write(&mut bs, write_requests(&write_name(&d), &data, 1 << 20))
        .await
        .unwrap();
    assert_eq!(committed, data.len() as i64);
    let (got, _) = read(&mut bs, &read_name(&d), 5, 0).await.unwrap();
    assert!(got == data[5..]);
    let caps = CapabilitiesClient::new(channel)
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .unwrap();
    assert!(caps.into_inner().cache_capabilities.is_some());
    drop(bs);
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    assert!(!path.exists(), "socket file left behind");
}

#[tokio::test]
async fn a_file_that_is_not_a_socket_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("precious");
    std::fs::write(&path, "precious data").unwrap();
    let memory = Arc::new(MemoryBlobAccess::new("memory", 1 << 20));
    let err = serve_unix(memory, ServerConfig::default(), &path, async {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious data");
}

#[tokio::test]
async fn shutdown_lets_a_running_read_finish_and_refuses_new_connections() {
    let mut server = start(ServerConfig::default()).await;
    let (data, d) = blob(20 << 20, 2);
    server
        .memory
        .put(&d, util::once(data.clone()))
        .await
        .unwrap();
    let mut bs = server.bytestream().await;
    let req = ReadRequest {
        resource_name: read_name(&d),
        read_offset: 0,
        read_limit: 0,
    };
    let mut s = bs.read(req).await.unwrap().into_inner();
    let mut got = s.message().await.unwrap().unwrap().data;
    server.signal_stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Read the rest slowly: the server waits.
    while let Some(m) = s.message().await.unwrap() {
        got.extend_from_slice(&m.data);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(got == data, "got {} bytes", got.len());
    let url = server.url.clone();
    drop((s, bs));
    tokio::time::timeout(Duration::from_secs(10), server.stop())
        .await
        .unwrap()
        .unwrap();
    assert!(tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .is_err());
}

#[tokio::test]
async fn transfers_still_running_after_the_grace_period_are_ended() {
    let memory = Arc::new(MemoryBlobAccess::new("memory", 1 << 30));
    let (data, d) = blob(1 << 20, 3);
    memory.put(&d, util::once(data)).await.unwrap();
    let backend = Arc::new(Faulty {
        memory: memory.clone(),
        fault: Fault::StallAfter(1000),
        dropped: Arc::new(AtomicBool::new(false)),
    });
    let cfg = ServerConfig {
        shutdown_grace: Duration::from_millis(300),
        ..Default::default()
    };
    let mut server = start_over(backend, memory, cfg).await;
    let mut bs = server.bytestream().await;
    let req = ReadRequest {
        resource_name: read_name(&d),
        read_offset: 0,
        read_limit: 0,
    };
    let mut s = bs.read(req).await.unwrap().into_inner();
    assert_eq!(s.message().await.unwrap().unwrap().data.len(), 1000);
    let started = tokio::time::Instant::now();
    server.signal_stop();
    let next = tokio::time::timeout(Duration::from_secs(20), s.message()).await;
    let err = next.expect("the stalled read was not ended").unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(err.message().contains("shutting down"), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(250));
    tokio::time::timeout(Duration::from_secs(10), server.stop())
        .await
        .unwrap()
        .unwrap();
}
