//! Remote execution through `serve`: Execution and Operations forwarded to
//! the `execution:` tree, capabilities merged, tokens checked, operations
//! followed to the backend that created them, and Execute streams resumed
//! when a proxy between serve and the cluster cuts them. The cluster here is
//! an in-process Execution server with chosen quirks; a real one (BuildGrid
//! with Bazel) is in `bazel_execution.rs`.

mod support;

use blob_access::execution::longrunning_proto::operations_client::OperationsClient;
use blob_access::execution::longrunning_proto::{CancelOperationRequest, GetOperationRequest};
use blob_access::execution::{ExecuteRequest, Operation};
use blob_access::proto::capabilities_client::CapabilitiesClient;
use blob_access::proto::execution_client::ExecutionClient;
use blob_access::proto::{GetCapabilitiesRequest, WaitExecutionRequest};
use blob_access_chaos::fake_execution::{Behaviour, Counts, FakeExecution};
use blob_access_chaos::{Faults, Kill, Proxy};
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::*;
use tonic::transport::Channel;
use tonic::Code;

fn config(dir: &Path, execution: &str) -> PathBuf {
    let path = dir.join("serve.yaml");
    let yaml = format!(
        "content_addressable_storage: {{memory: {{max_size_bytes: 64MiB}}}}\n\
         action_cache: {{memory: {{max_size_bytes: 1MiB}}}}\n\
         execution:\n{execution}"
    );
    std::fs::write(&path, yaml).unwrap();
    path
}

fn request(instance: &str, seed: &str) -> ExecuteRequest {
    ExecuteRequest {
        instance_name: instance.into(),
        action_digest: Some(blob_access::Digest::of(seed.as_bytes()).to_proto()),
        ..Default::default()
    }
}

async fn channel(port: u16) -> Channel {
    Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Every Operation of a stream, and its final status if it failed.
async fn drain(
    stream: Result<tonic::Response<tonic::Streaming<Operation>>, tonic::Status>,
) -> (Vec<Operation>, Option<tonic::Status>) {
    let mut stream = match stream {
        Ok(s) => s.into_inner(),
        Err(s) => return (Vec::new(), Some(s)),
    };
    let mut ops = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(30), stream.message()).await {
            Ok(Ok(Some(op))) => ops.push(op),
            Ok(Ok(None)) => return (ops, None),
            Ok(Err(s)) => return (ops, Some(s)),
            Err(_) => panic!("no message in 30 s after {ops:?}"),
        }
    }
}

fn n(c: &std::sync::atomic::AtomicU64) -> u64 {
    Counts::get(c)
}

/// Execute, WaitExecution, GetOperation and CancelOperation reach the
/// remote through serve; capabilities carry the remote's execution ones.
#[tokio::test(flavor = "multi_thread")]
async fn serve_forwards_executions_and_operations() {
    let remote = FakeExecution::start(Behaviour {
        run_for: Duration::from_millis(300),
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let exec = format!("  grpc: {{endpoint: \"{}\"}}\n", remote.endpoint());
    let serve = Serve::start(Some(&config(dir.path(), &exec)));
    let ch = channel(serve.port).await;
    let mut client = ExecutionClient::new(ch.clone());

    let (ops, end) = drain(client.execute(request("", "forwarded")).await).await;
    assert!(end.is_none(), "{end:?}");
    assert!(ops.last().unwrap().done);
    let name = ops[0].name.clone();
    let (waited, end) = drain(
        client
            .wait_execution(WaitExecutionRequest { name: name.clone() })
            .await,
    )
    .await;
    assert!(end.is_none() && waited.last().unwrap().done, "{end:?}");
    let mut operations = OperationsClient::new(ch.clone());
    let got = operations
        .get_operation(GetOperationRequest { name: name.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(got.done && got.name == name);
    operations
        .cancel_operation(CancelOperationRequest { name: name.clone() })
        .await
        .unwrap();
    assert_eq!(
        (
            n(&remote.counts.executes),
            n(&remote.counts.waits),
            n(&remote.counts.get_operations),
            n(&remote.counts.cancels)
        ),
        (1, 1, 1, 1)
    );
    // Unknown names: the remote's NOT_FOUND; an empty one never leaves serve.
    let e = operations
        .get_operation(GetOperationRequest {
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let (_, end) = drain(
        client
            .wait_execution(WaitExecutionRequest {
                name: String::new(),
            })
            .await,
    )
    .await;
    assert_eq!(end.map(|s| s.code()), Some(Code::InvalidArgument));

    let caps = CapabilitiesClient::new(ch)
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let exec = caps.execution_capabilities.expect("execution capabilities");
    assert!(exec.exec_enabled);
    assert_eq!(
        exec.digest_function,
        blob_access::DigestFunction::Sha256.to_proto()
    );
    assert!(
        exec.execution_priority_capabilities.is_some(),
        "the remote's own were dropped"
    );
    assert!(caps.cache_capabilities.is_some());
}

/// Without an execution tree: UNIMPLEMENTED, and the capabilities say so.
#[tokio::test(flavor = "multi_thread")]
async fn without_an_execution_tree_execution_is_unimplemented_and_disabled() {
    let serve = Serve::start(None);
    let ch = channel(serve.port).await;
    let (_, end) = drain(
        ExecutionClient::new(ch.clone())
            .execute(request("", "x"))
            .await,
    )
    .await;
    let end = end.expect("refused");
    assert_eq!(end.code(), Code::Unimplemented);
    assert!(end.message().contains("execution:"), "{end}");
    let caps = CapabilitiesClient::new(ch)
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(!caps.execution_capabilities.unwrap_or_default().exec_enabled);
}

/// A proxy between serve and the cluster cuts every connection each 200 ms
/// while actions run 1.5 s: through `resumable_grpc` the client of serve
/// sees one unbroken stream with one name, and each action runs once.
#[tokio::test(flavor = "multi_thread")]
async fn executions_through_a_cutting_proxy_run_once_and_never_break() {
    let remote = FakeExecution::start(Behaviour {
        run_for: Duration::from_millis(1500),
        ..Default::default()
    })
    .await
    .unwrap();
    let cuts = Faults::time(Kill::Rst, Duration::from_millis(200));
    let proxy = Proxy::start(remote.addr, Some(cuts)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let exec = format!(
        "  resumable_grpc: {{grpc: {{endpoint: \"{}\"}}, initial_backoff: 10ms}}\n",
        proxy.endpoint()
    );
    let serve = Serve::start(Some(&config(dir.path(), &exec)));
    let ch = channel(serve.port).await;
    let runs = (0..3).map(|i| {
        let mut client = ExecutionClient::new(ch.clone());
        async move { drain(client.execute(request("", &format!("action {i}"))).await).await }
    });
    for (ops, end) in futures::future::join_all(runs).await {
        assert!(end.is_none(), "{end:?}");
        assert!(ops.last().unwrap().done);
        assert!(ops.iter().all(|o| o.name == ops[0].name), "names changed");
    }
    assert_eq!(remote.created(), 3, "an action ran again");
    assert!(
        n(&remote.counts.waits) >= 3,
        "never cut: {}",
        n(&remote.counts.waits)
    );
}

/// `demultiplexing` sends Execute by instance name, and WaitExecution,
/// GetOperation and CancelOperation (which name only the operation) to the
/// backend that created it, also after serve restarted and forgot.
#[tokio::test(flavor = "multi_thread")]
async fn operations_reach_the_backend_that_created_them() {
    let start = |prefix: &str| {
        FakeExecution::start(Behaviour {
            run_for: Duration::from_millis(200),
            name_prefix: prefix.into(),
            ..Default::default()
        })
    };
    let (a, b) = (
        start("a-ops/").await.unwrap(),
        start("b-ops/").await.unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let exec = format!(
        "  demultiplexing:\n    instance_name_prefixes:\n      \
         team-a: {{backend: {{grpc: {{endpoint: \"{}\"}}}}}}\n      \
         team-b: {{backend: {{grpc: {{endpoint: \"{}\"}}}}, instance_name_prefix: remote-b}}\n",
        a.endpoint(),
        b.endpoint()
    );
    let config = config(dir.path(), &exec);
    let mut names = Vec::new();
    {
        let serve = Serve::start(Some(&config));
        let mut client = ExecutionClient::new(channel(serve.port).await);
        for team in ["team-a", "team-b/ci"] {
            let (ops, end) = drain(client.execute(request(team, team)).await).await;
            assert!(end.is_none(), "{end:?}");
            names.push(ops[0].name.clone());
        }
        let (_, end) = drain(client.execute(request("team-c", "x")).await).await;
        let end = end.expect("no route");
        assert_eq!(end.code(), Code::InvalidArgument);
        assert!(end.message().contains("team-c"), "{end}");
    }
    assert_eq!((n(&a.counts.executes), n(&b.counts.executes)), (1, 1));
    assert!(
        names[0].starts_with("a-ops/") && names[1].starts_with("b-ops/"),
        "{names:?}"
    );

    // A new serve knows no operation: it asks the backends.
    let serve = Serve::start(Some(&config));
    let ch = channel(serve.port).await;
    let mut client = ExecutionClient::new(ch.clone());
    let mut operations = OperationsClient::new(ch);
    for name in &names {
        let (ops, end) = drain(
            client
                .wait_execution(WaitExecutionRequest { name: name.clone() })
                .await,
        )
        .await;
        assert!(end.is_none() && ops.last().unwrap().done, "{name}: {end:?}");
        operations
            .cancel_operation(CancelOperationRequest { name: name.clone() })
            .await
            .unwrap();
    }
    assert_eq!((n(&a.counts.waits), n(&b.counts.waits)), (1, 1));
    assert_eq!((n(&a.counts.cancels), n(&b.counts.cancels)), (1, 1));
}

/// Executing needs a token that may write where the action runs; following
/// an operation needs one that may read.
#[tokio::test(flavor = "multi_thread")]
async fn executing_needs_a_write_token() {
    use tonic::service::interceptor::InterceptedService;
    let remote = FakeExecution::start(Behaviour {
        run_for: Duration::from_millis(100),
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let exec = format!("  grpc: {{endpoint: \"{}\"}}\n", remote.endpoint());
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "read reader-token\nwrite writer-token team-a\n").unwrap();
    let serve = Serve::start_with(
        Some(&config(dir.path(), &exec)),
        &["--auth-tokens", tokens.to_str().unwrap()],
    );
    let ch = channel(serve.port).await;
    let with = |token: &'static str| {
        let header: tonic::metadata::AsciiMetadataValue =
            format!("Bearer {token}").parse().unwrap();
        ExecutionClient::new(InterceptedService::new(
            ch.clone(),
            move |mut r: tonic::Request<()>| {
                r.metadata_mut().insert("authorization", header.clone());
                Ok(r)
            },
        ))
    };
    let (_, end) = drain(with("reader-token").execute(request("team-a", "r")).await).await;
    assert_eq!(end.map(|s| s.code()), Some(Code::PermissionDenied));
    let (_, end) = drain(with("writer-token").execute(request("team-b", "w")).await).await;
    assert_eq!(
        end.map(|s| s.code()),
        Some(Code::PermissionDenied),
        "outside its prefixes"
    );
    assert_eq!(n(&remote.counts.executes), 0);
    let (ops, end) = drain(with("writer-token").execute(request("team-a", "w")).await).await;
    assert!(end.is_none(), "{end:?}");
    let name = ops[0].name.clone();
    let (_, end) = drain(
        with("reader-token")
            .wait_execution(WaitExecutionRequest { name })
            .await,
    )
    .await;
    assert!(end.is_none(), "a reader may follow: {end:?}");
    let (_, end) = drain(
        ExecutionClient::new(ch)
            .execute(request("team-a", "none"))
            .await,
    )
    .await;
    assert_eq!(end.map(|s| s.code()), Some(Code::Unauthenticated));
}
