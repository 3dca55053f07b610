//! Figures for remote execution through `serve`, printed, not asserted: the
//! wall time of a Bazel build of the fixture tests/bazel/exec_workspace (three
//! actions sleeping 6 s, one joining them) executed on BuildGrid directly and
//! through `serve` (resumable_grpc); and through nginx reloading every 200 ms
//! between serve and BuildGrid, the actions the worker ran per action the
//! build requested (goal 1.00). One run each, same machine, same run; every
//! build runs new actions (a salt in their environment).
//!
//! Needs Bazel, BuildGrid and PostgreSQL (`scripts/setup-test-env.sh`).
//! Run: `cargo bench --bench bazel_execution`.

#[path = "../tests/support/mod.rs"]
mod support;

use support::bazel::*;
use support::*;

/// The fixture's actions.
const ACTIONS: usize = 4;

/// A build of new actions (`salt`) executing on `remote`, its cache too.
fn build(remote: &str, salt: &str) -> BuildSummary {
    let workspace = root().join("tests/bazel/exec_workspace");
    let mut bazel = Bazel::with_workspace(&workspace, remote);
    let summary = bazel.build(&[
        &format!("--remote_executor={remote}"),
        "--spawn_strategy=remote",
        "--jobs=8",
        &format!("--action_env=BLOB_ACCESS_SALT={salt}"),
    ]);
    assert!(summary.success(), "{}", summary.stderr);
    assert_eq!(summary.executed_remotely(), ACTIONS, "{summary:#?}");
    summary
}

/// `serve` whose three trees are `resumable_grpc` to 127.0.0.1:`port`.
fn serve_to(dir: &std::path::Path, name: &str, port: u16) -> Serve {
    let node = format!(
        "resumable_grpc: {{grpc: {{endpoint: \"grpc://127.0.0.1:{port}\", instance_name: \"\"}}, \
         max_attempts_without_progress: 10}}"
    );
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "content_addressable_storage:\n  {node}\naction_cache:\n  {node}\nexecution:\n  {node}\n"
        ),
    )
    .unwrap();
    Serve::start(Some(&path))
}

fn main() {
    std::env::set_var("BLOB_ACCESS_REAL_SERVERS", "1");
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    assert!(real_bazel(), "needs bazel: run scripts/setup-test-env.sh");
    let dir = tempfile::tempdir().unwrap();
    let bg = BuildGridExec::start();
    let direct = build(&format!("grpc://127.0.0.1:{}", bg.port), "direct");

    let serve = serve_to(dir.path(), "serve.yaml", bg.port);
    let through = build(&format!("grpc://127.0.0.1:{}", serve.port), "serve");

    let nginx = Nginx::start(bg.port);
    let behind = serve_to(dir.path(), "reloads.yaml", nginx.port);
    let before = bg.worker_runs().len();
    let (reloaded, reloads) =
        nginx.with_reloads(|| build(&format!("grpc://127.0.0.1:{}", behind.port), "reloads"));
    let runs = bg.worker_runs().len() - before;

    let secs = |s: &BuildSummary| s.elapsed.as_secs_f64();
    println!("Bazel 4.2.3 build of {ACTIONS} remote actions (three sleep 6 s) on BuildGrid 0.4.4:");
    println!(
        "  directly:                            {:.1} s",
        secs(&direct)
    );
    println!(
        "  through serve (resumable_grpc):      {:.1} s  ratio {:.2}",
        secs(&through),
        secs(&through) / secs(&direct)
    );
    println!(
        "  through serve, nginx reloading:      {:.1} s  ({reloads} reloads)",
        secs(&reloaded)
    );
    println!(
        "  actions run per action requested:    {:.2}  ({runs} runs for {ACTIONS} actions; goal 1.00)",
        runs as f64 / ACTIONS as f64
    );
}
