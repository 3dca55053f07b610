//! `resumable_grpc` in an execution tree against an Execution server with
//! chosen quirks, through a proxy that cuts its connections: every way an
//! Execute stream can end, and that each action runs once.

use blob_access::execution::{execute_response, ExecuteRequest, Execution, Operation};
use blob_access::{BuildContext, BuildNode, Code, Digest, Error};
use blob_access_chaos::fake_execution::{result_of, Behaviour, Counts, FakeExecution};
use blob_access_chaos::{Faults, Kill, Proxy};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;

/// A `resumable_grpc` (or with `plain`, a `grpc`) execution node for `endpoint`.
fn node(endpoint: &str, plain: bool, extra: &str) -> Arc<dyn Execution> {
    let yaml = if plain {
        format!("grpc: {{endpoint: \"{endpoint}\"}}")
    } else {
        format!(
            "resumable_grpc: {{grpc: {{endpoint: \"{endpoint}\"}}, initial_backoff: 10ms, max_backoff: 100ms{extra}}}"
        )
    };
    let config =
        blob_access_config::load_str(&yaml, blob_access_config::Format::Yaml, "test").unwrap();
    config
        .content_addressable_storage
        .build_execution(&BuildContext::root())
        .unwrap()
}

fn request(seed: &str) -> ExecuteRequest {
    ExecuteRequest {
        action_digest: Some(Digest::of(seed.as_bytes()).to_proto()),
        ..Default::default()
    }
}

/// Every message of `stream` until it ends, and how it ended.
async fn run(
    mut stream: blob_access::execution::OperationStream,
) -> (Vec<Operation>, Option<Error>) {
    let mut ops = Vec::new();
    let deadline = tokio::time::sleep(Duration::from_secs(30));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            item = stream.next() => match item {
                Some(Ok(op)) => ops.push(op),
                Some(Err(e)) => return (ops, Some(e)),
                None => return (ops, None),
            },
            () = &mut deadline => panic!("the stream neither ended nor failed in 30 s: {ops:?}"),
        }
    }
}

/// The stream ended with a done operation carrying the result of `ran_as`,
/// every message under one name.
fn assert_completed(ops: &[Operation], end: &Option<Error>, ran_as: &str) {
    assert!(end.is_none(), "failed: {end:?}");
    let last = ops.last().expect("no message");
    assert!(last.done, "the last message is not done");
    let names: std::collections::BTreeSet<_> = ops.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names.len(), 1, "names changed: {names:?}");
    let response = execute_response(last).expect("an ExecuteResponse");
    assert_eq!(response.result, Some(result_of(ran_as)));
}

fn count(c: &std::sync::atomic::AtomicU64) -> u64 {
    Counts::get(c)
}

/// Cut every 150 ms (RST and FIN alike) while the action runs 1.2 s: the
/// stream goes on with WaitExecution, the action runs once, and the caller
/// sees one unbroken stream.
#[tokio::test]
async fn cuts_mid_action_resume_with_wait_execution_and_run_the_action_once() {
    for kill in [Kill::Rst, Kill::Fin] {
        let server = FakeExecution::start(Behaviour {
            run_for: Duration::from_millis(1200),
            ..Default::default()
        })
        .await
        .unwrap();
        let faults = Faults::time(kill, Duration::from_millis(150));
        let proxy = Proxy::start(server.addr, Some(faults)).await.unwrap();
        let exec = node(&proxy.endpoint(), false, "");
        let (ops, end) = run(exec.execute(request("cut"))).await;
        assert_completed(&ops, &end, "operations/0");
        assert_eq!(server.created(), 1, "{kill:?}: the action ran again");
        assert_eq!(count(&server.counts.executes), 1);
        assert!(
            count(&server.counts.waits) >= 3,
            "{kill:?}: resumed only {} times",
            count(&server.counts.waits)
        );

        // The control: the plain node fails at the first cut.
        let plain = node(&proxy.endpoint(), true, "");
        let (ops, end) = run(plain.execute(request("plain"))).await;
        assert!(
            end.is_some() && !ops.iter().any(|o| o.done),
            "{kill:?}: the plain node was not cut"
        );
    }
}

/// Cut before the first message (no name yet): the same Execute is sent again.
#[tokio::test]
async fn a_cut_before_any_name_sends_the_execute_again() {
    let server = FakeExecution::start(Behaviour {
        run_for: Duration::from_millis(300),
        first_message_after: Duration::from_millis(400),
        ..Default::default()
    })
    .await
    .unwrap();
    let faults = Faults::time(Kill::Rst, Duration::from_millis(150)).times(1);
    let proxy = Proxy::start(server.addr, Some(faults)).await.unwrap();
    let exec = node(&proxy.endpoint(), false, "");
    let (ops, end) = run(exec.execute(request("early"))).await;
    assert_completed(&ops, &end, "operations/1");
    assert_eq!(count(&server.counts.executes), 2);
    assert_eq!(count(&server.counts.waits), 0);
}

/// NOT_FOUND from WaitExecution (the server restarted and lost the
/// operation): the action is executed again, and the caller still sees the
/// first name, by which the operation can be looked up and cancelled.
#[tokio::test]
async fn an_operation_the_server_lost_is_executed_again_under_the_first_name() {
    let server = FakeExecution::start(Behaviour {
        run_for: Duration::from_millis(800),
        ..Default::default()
    })
    .await
    .unwrap();
    let faults = Faults::time(Kill::Rst, Duration::from_millis(250)).times(1);
    let proxy = Proxy::start(server.addr, Some(faults)).await.unwrap();
    let exec = node(&proxy.endpoint(), false, "");
    let mut stream = exec.execute(request("lost"));
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.name, "operations/0");
    server.forget();
    let (mut ops, end) = run(stream).await;
    ops.insert(0, first);
    assert_eq!(count(&server.counts.executes), 2);
    assert!(ops.iter().all(|o| o.name == "operations/0"));
    assert_completed(&ops, &end, "operations/1");
    // The first name stands for the new operation.
    let looked_up = exec.get_operation("operations/0").await.unwrap();
    assert_eq!(looked_up.name, "operations/0");
    assert!(looked_up.done);
    let (waited, end) = run(exec.wait_execution("operations/0")).await;
    assert_completed(&waited, &end, "operations/1");
    // Waiting (without the request) on a name the server lost: NOT_FOUND.
    let (_, end) = run(exec.wait_execution("operations/99")).await;
    assert_eq!(end.map(|e| e.code()), Some(Code::NotFound));
}

/// An answer about the request itself (trailers-only) is passed on at once,
/// code and details, without a retry; an unavailable server is retried
/// within the budget, then given up on, saying how often.
#[tokio::test]
async fn the_server_s_answers_pass_unchanged_and_the_budget_is_bounded() {
    let details = b"\x08\x09\x12\x04gone".to_vec();
    let server = FakeExecution::start(Behaviour {
        refuse_execute: Some((tonic::Code::FailedPrecondition, details.clone())),
        ..Default::default()
    })
    .await
    .unwrap();
    let exec = node(
        &server.endpoint(),
        false,
        ", max_attempts_without_progress: 4, execution_stall_timeout: 1s",
    );
    let (ops, end) = run(exec.execute(request("missing inputs"))).await;
    let e = end.expect("refused");
    assert!(ops.is_empty());
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(count(&server.counts.executes), 1);
    let status = tonic::Status::from(e);
    assert_eq!(status.details(), &details[..], "details lost");

    server.set(|b| b.refuse_execute = Some((tonic::Code::Unavailable, Vec::new())));
    let (_, end) = run(exec.execute(request("busy"))).await;
    let e = end.expect("gave up");
    assert_eq!(e.code(), Code::Unavailable);
    assert!(
        e.message()
            .contains("brought no operation update, none for 1."),
        "{e}"
    );
    // The attempts of the budget, and as many more as fit in the second.
    assert!(count(&server.counts.executes) >= 5);
}

/// After `done`, nothing is resumed, even when the stream is then cut.
#[tokio::test]
async fn nothing_is_resumed_after_done() {
    let server = FakeExecution::start(Behaviour {
        run_for: Duration::from_millis(100),
        hold_after_done: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let faults = Faults::time(Kill::Rst, Duration::from_millis(400));
    let proxy = Proxy::start(server.addr, Some(faults)).await.unwrap();
    let exec = node(&proxy.endpoint(), false, "");
    let (ops, end) = run(exec.execute(request("done"))).await;
    assert_completed(&ops, &end, "operations/0");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(count(&server.counts.waits), 0);
    assert_eq!(count(&server.counts.executes), 1);
}

/// A server silent for longer than the stall limit while the action runs:
/// resumed with WaitExecution (which sends the state at once), not failed.
#[tokio::test]
async fn a_silent_server_is_resumed_not_failed() {
    let server = FakeExecution::start(Behaviour {
        run_for: Duration::from_millis(1500),
        repeat_every: Duration::from_secs(60),
        ..Default::default()
    })
    .await
    .unwrap();
    let exec = node(
        &server.endpoint(),
        false,
        ", execution_stall_timeout: 300ms, max_attempts_without_progress: 2",
    );
    let (ops, end) = run(exec.execute(request("quiet"))).await;
    assert_completed(&ops, &end, "operations/0");
    assert_eq!(count(&server.counts.executes), 1);
    assert!(
        count(&server.counts.waits) >= 3,
        "{}",
        count(&server.counts.waits)
    );
    let mut m = Vec::new();
    exec.metrics(&mut m);
    let stalls: u64 = m.iter().filter_map(|n| n.get("stalls")).sum();
    assert!(stalls >= 3, "{m:?}");
}
