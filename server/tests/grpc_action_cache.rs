//! The `grpc` node in an action cache tree, against a real server: round
//! trips, the instance name, errors naming the node, whether updates are
//! enabled, and a server in front of it announcing what the remote allows.

mod server_support;

use blob_access::action_cache::{ActionCache, GrpcActionCache};
use blob_access::grpc::{GrpcConfig, GrpcConnection};
use blob_access::memory::{MemoryActionCache, MemoryBlobAccess};
use blob_access::proto::{ActionResult, OutputFile};
use blob_access::{Code, Digest, NodeMetrics, Storage};
use blob_access_server::ServerConfig;
use server_support::*;
use std::sync::Arc;

struct Remote {
    server: TestServer,
    results: Arc<MemoryActionCache>,
}

/// A server with a memory CAS and a memory action cache.
async fn remote(cfg: ServerConfig) -> Remote {
    let memory = Arc::new(MemoryBlobAccess::new("memory", 1 << 20));
    let results = Arc::new(MemoryActionCache::new("remote-ac", 1 << 20));
    let storage = Storage::new(memory.clone()).with_action_cache(results.clone());
    let server = start_over(storage, memory, cfg).await;
    Remote { server, results }
}

fn grpc_config(url: &str, instance_name: &str) -> GrpcConfig {
    // From text, as users write it: new optional fields need no change here.
    serde_json::from_value(serde_json::json!({
        "endpoint": url.replace("http://", "grpc://"),
        "instance_name": instance_name,
        "connect_timeout": "2s",
    }))
    .unwrap()
}

fn node(url: &str, instance_name: &str) -> GrpcActionCache {
    let conn = GrpcConnection::new("top.grpc", &grpc_config(url, instance_name)).unwrap();
    GrpcActionCache::new(conn)
}

fn a_result() -> ActionResult {
    ActionResult {
        output_files: vec![OutputFile {
            path: "out/a.o".into(),
            digest: Some(Digest::of(b"a.o").to_proto()),
            ..Default::default()
        }],
        exit_code: 1,
        stdout_raw: b"compiled".to_vec(),
        stderr_raw: b"warned".to_vec(),
        ..Default::default()
    }
}

fn counter(ac: &dyn ActionCache, name: &str) -> u64 {
    let mut m: Vec<NodeMetrics> = Vec::new();
    ac.metrics(&mut m);
    m.iter()
        .find(|m| m.kind == "grpc")
        .and_then(|m| m.get(name))
        .unwrap_or_else(|| panic!("no counter {name} in {m:?}"))
}

#[tokio::test]
async fn results_round_trip_through_the_remote() {
    let cfg = ServerConfig {
        instance_name: Some("main".into()),
        ..Default::default()
    };
    let r = remote(cfg).await;
    let ac = node(&r.server.url, "main");
    let action = Digest::of(b"Action");

    let err = ac.get_action_result(&action).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    assert_eq!(err.backend(), Some("top.grpc"), "{err}");
    assert_eq!(err.digest(), Some(&action), "{err}");

    ac.update_action_result(&action, &a_result()).await.unwrap();
    // Stored remotely, as sent, under the instance name the server was asked for
    // (`serve` keeps results per instance)...
    let remote_key = action.with_instance_name("main");
    assert_eq!(
        r.results.get_action_result(&remote_key).await.unwrap(),
        a_result()
    );
    // ...and read back through the node.
    assert_eq!(ac.get_action_result(&action).await.unwrap(), a_result());

    // Replaced remotely: the node has no copy of its own.
    let other = ActionResult {
        exit_code: 0,
        ..Default::default()
    };
    r.results
        .update_action_result(&remote_key, &other)
        .await
        .unwrap();
    assert_eq!(ac.get_action_result(&action).await.unwrap(), other);

    assert_eq!(counter(&ac, "hits"), 2);
    assert_eq!(counter(&ac, "misses"), 1);
    assert_eq!(counter(&ac, "updates"), 1);
    assert_eq!(counter(&ac, "errors"), 0);
    assert!(ac.update_enabled().await);
}

#[tokio::test]
async fn the_instance_name_is_sent_and_errors_keep_their_code() {
    let cfg = ServerConfig {
        instance_name: Some("main".into()),
        ..Default::default()
    };
    let r = remote(cfg).await;
    let action = Digest::of(b"Action");
    r.results
        .update_action_result(&action, &a_result())
        .await
        .unwrap();
    // The server serves "main" only: a node naming another instance is refused.
    let wrong = node(&r.server.url, "other");
    let err = wrong.get_action_result(&action).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("other"), "{err}");
    assert_eq!(err.backend(), Some("top.grpc"));
    let err = wrong
        .update_action_result(&action, &ActionResult::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert_eq!(counter(&wrong, "errors"), 2);
    // Nothing was replaced.
    assert_eq!(
        r.results.get_action_result(&action).await.unwrap(),
        a_result()
    );

    // Unreachable: UNAVAILABLE naming the node and the action.
    let r2 = remote(ServerConfig::default()).await;
    let url = r2.server.url.clone();
    r2.server.stop().await.unwrap();
    let gone = node(&url, "");
    let err = gone.get_action_result(&action).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert_eq!(err.digest(), Some(&action));
    assert_eq!(err.backend(), Some("top.grpc"));
    // Unknown, updates are assumed enabled (an update will tell).
    assert!(gone.update_enabled().await);
}

#[tokio::test]
async fn a_read_only_remote_disables_updates() {
    let cfg = ServerConfig {
        action_cache_read_only: true,
        ..Default::default()
    };
    let r = remote(cfg).await;
    let action = Digest::of(b"Action");
    r.results
        .update_action_result(&action, &a_result())
        .await
        .unwrap();
    let ac = node(&r.server.url, "");
    assert!(!ac.update_enabled().await);
    assert_eq!(ac.get_action_result(&action).await.unwrap(), a_result());
    let err = ac
        .update_action_result(&action, &ActionResult::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    let writable = remote(ServerConfig::default()).await;
    assert!(node(&writable.server.url, "").update_enabled().await);
}

#[tokio::test]
async fn a_server_in_front_announces_what_the_remote_allows() {
    let action = Digest::of(b"Action");
    for read_only in [true, false] {
        let cfg = ServerConfig {
            action_cache_read_only: read_only,
            ..Default::default()
        };
        let r = remote(cfg).await;
        r.results
            .update_action_result(&action, &a_result())
            .await
            .unwrap();
        // Our own server, writable itself, whose action cache is the remote's.
        let memory = Arc::new(MemoryBlobAccess::new("front", 1 << 20));
        let storage =
            Storage::new(memory.clone()).with_action_cache(Arc::new(node(&r.server.url, "")));
        let front = start_over(storage, memory, ServerConfig::default()).await;
        assert_eq!(
            front.update_enabled().await,
            !read_only,
            "read_only remote: {read_only}"
        );
        // Results are served through it either way.
        let front_ac = node(&front.url, "");
        assert_eq!(
            front_ac.get_action_result(&action).await.unwrap(),
            a_result()
        );
        let outcome = front_ac
            .update_action_result(&action, &ActionResult::default())
            .await;
        match read_only {
            true => assert_eq!(outcome.unwrap_err().code(), Code::PermissionDenied),
            false => {
                outcome.unwrap();
                let stored = r.results.get_action_result(&action).await.unwrap();
                assert_eq!(stored, ActionResult::default());
            }
        }
    }
}
