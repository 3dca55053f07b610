//! `serve` behind a load balancer: grpc.health.v1.Health answers SERVING while
//! up, without a token, and NOT_SERVING from the first moment of a graceful
//! shutdown, while calls still work during `--drain-delay`.

mod support;

use blob_access::proto::content_addressable_storage_client::ContentAddressableStorageClient;
use blob_access::proto::FindMissingBlobsRequest;
use std::time::{Duration, Instant};
use support::*;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const CAS: &str = "build.bazel.remote.execution.v2.ContentAddressableStorage";

async fn check(port: u16, service: &str) -> Result<ServingStatus, tonic::Code> {
    let mut h = HealthClient::new(channel(port).await);
    h.check(HealthCheckRequest {
        service: service.into(),
    })
    .await
    .map(|r| r.into_inner().status())
    .map_err(|s| s.code())
}

#[test]
fn health_is_serving_without_a_token_and_not_serving_from_the_first_moment_of_a_shutdown() {
    let token = format!("tok-{}", uuid::Uuid::new_v4().simple());
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("read {token}\n")).unwrap();
    let mut serve = Serve::start_with(
        None,
        &[
            "-vv",
            "--auth-tokens",
            tokens.to_str().unwrap(),
            "--drain-delay",
            "5s",
        ],
    );
    let port = serve.port;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        assert_eq!(check(port, "").await, Ok(ServingStatus::Serving));
        assert_eq!(check(port, CAS).await, Ok(ServingStatus::Serving));
        assert_eq!(
            check(port, "no.such.Service").await,
            Err(tonic::Code::NotFound)
        );

        // A balancer watching, on its own connection.
        let mut watcher = HealthClient::new(channel(port).await);
        let mut watch = watcher
            .watch(HealthCheckRequest { service: "".into() })
            .await
            .unwrap()
            .into_inner();
        let first = watch.message().await.unwrap().unwrap();
        assert_eq!(first.status(), ServingStatus::Serving);
        // A client with a connection open before the signal.
        let cas = ContentAddressableStorageClient::new(channel(port).await);
        let find_missing = |mut cas: ContentAddressableStorageClient<Channel>| {
            let token = token.clone();
            async move {
                let mut req = tonic::Request::new(FindMissingBlobsRequest::default());
                req.metadata_mut()
                    .insert("authorization", format!("Bearer {token}").parse().unwrap());
                cas.find_missing_blobs(req)
                    .await
                    .map(|_| ())
                    .map_err(|s| s.code())
            }
        };
        assert_eq!(find_missing(cas.clone()).await, Ok(()));

        let signalled = Instant::now();
        serve.signal("TERM");
        let next = tokio::time::timeout(Duration::from_secs(2), watch.message())
            .await
            .expect("no NOT_SERVING within 2 s of SIGTERM")
            .unwrap()
            .unwrap();
        assert_eq!(next.status(), ServingStatus::NotServing);
        // During the drain delay: new health checks say NOT_SERVING, calls still work.
        assert_eq!(check(port, "").await, Ok(ServingStatus::NotServing));
        assert_eq!(check(port, CAS).await, Ok(ServingStatus::NotServing));
        assert_eq!(find_missing(cas.clone()).await, Ok(()));
        assert!(signalled.elapsed() < Duration::from_secs(5));
        // Then the watch ends rather than holding the server for its grace period.
        let end = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .expect("the health watch did not end after the drain delay");
        assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
        drop((watch, watcher, cas));
    });
    let status = serve.wait();
    assert!(status.success(), "{status:?}");
    assert!(!serve.log().contains(&token), "{}", serve.log());
}

/// Without a drain delay, an open health watch sees NOT_SERVING and ends, and
/// does not hold the server open for its 30 s grace period.
#[test]
fn an_open_health_watch_does_not_hold_a_shutdown() {
    let mut serve = Serve::start(None);
    let port = serve.port;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut watch = rt.block_on(async {
        let mut watcher = HealthClient::new(channel(port).await);
        let mut watch = watcher
            .watch(HealthCheckRequest { service: "".into() })
            .await
            .unwrap()
            .into_inner();
        let first = watch.message().await.unwrap().unwrap();
        assert_eq!(first.status(), ServingStatus::Serving);
        watch
    });
    let signalled = Instant::now();
    serve.signal("TERM");
    rt.block_on(async {
        let next = watch.message().await.unwrap().unwrap();
        assert_eq!(next.status(), ServingStatus::NotServing);
        assert!(matches!(watch.message().await, Ok(None) | Err(_)));
    });
    let status = serve.wait();
    assert!(status.success(), "{status:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "{:?}",
        signalled.elapsed()
    );
}
