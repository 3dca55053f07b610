//! A real Bazel (4.2.3) executing remotely through `blob-access serve` on a
//! real execution service: BuildGrid 0.4.4, whose test worker logs each action
//! it runs (scripts/buildgrid-exec.sh). The fixture, tests/bazel/exec_workspace,
//! has three genrules that sleep 6 s and a quick one that joins their outputs.
//! Serve forwards to BuildGrid directly; through nginx and HAProxy reloading
//! every few hundred ms, which cut each Execute stream many times while its
//! action runs; and to a BuildGrid restarted mid-action. With `resumable_grpc`
//! as the execution tree the builds succeed and, through the proxies, each
//! action runs exactly once.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::bazel::*;
use support::*;

/// The fixture's actions: slow_a, slow_b, slow_c and joined.
const ACTIONS: usize = 4;

fn url(serve: &Serve) -> String {
    format!("grpc://127.0.0.1:{}", serve.port)
}

/// A `grpc` node to `port`, on one line.
fn grpc(port: u16) -> String {
    format!("grpc: {{endpoint: \"grpc://127.0.0.1:{port}\", instance_name: \"\"}}")
}

/// A `resumable_grpc` node to `port` with `settings`, on one line.
fn resumable(port: u16, settings: &str) -> String {
    format!("resumable_grpc: {{{}, {settings}}}", grpc(port))
}

/// Through a reloading proxy: every attempt reaches the server.
const THROUGH_RELOADS: &str = "max_attempts_without_progress: 10";

/// A config file `name` in `dir`: `storage` as the CAS and action cache
/// trees, `execution` as the execution tree (one-line nodes).
fn config(dir: &Path, name: &str, storage: &str, execution: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "content_addressable_storage:\n  {storage}\naction_cache:\n  {storage}\nexecution:\n  {execution}\n"
        ),
    )
    .unwrap();
    path
}

fn new_bazel(serve: &Serve) -> Bazel {
    Bazel::with_workspace(&root().join("tests/bazel/exec_workspace"), &url(serve))
}

/// `bazel build //...` executing remotely on `serve`, which is its remote
/// cache too. `salt`, in every action's environment, makes other actions of
/// the same genrules (in no cache yet).
fn build_remotely(bazel: &mut Bazel, serve: &Serve, salt: &str) -> BuildSummary {
    bazel.set_remote_cache(&url(serve));
    bazel.build(&[
        &format!("--remote_executor={}", url(serve)),
        "--spawn_strategy=remote",
        // Remote actions take no local core: the three slow ones at once.
        "--jobs=8",
        &format!("--action_env=BLOB_ACCESS_SALT={salt}"),
    ])
}

/// What the fixture's genrules write, by output.
fn expected_outputs() -> BTreeMap<&'static str, String> {
    let a = "alpha, run remotely\n".to_string();
    let b: String = (1..=1000).map(|i| format!("{i}\n")).collect();
    // `tr 0-9 a-j`
    let letters = |i: u32| -> String {
        let digits = i.to_string();
        let letters = digits.bytes().map(|d| (d - b'0' + b'a') as char);
        letters.chain(['\n']).collect()
    };
    let c: String = (1..=1000).rev().map(letters).collect();
    let joined = format!("{a}1000\nb\n");
    BTreeMap::from([
        ("slow_a.txt", a),
        ("slow_b.txt", b),
        ("slow_c.txt", c),
        ("joined.txt", joined),
    ])
}

fn check_outputs(bazel: &Bazel) {
    for (name, expected) in expected_outputs() {
        let path = bazel.bazel_bin().join(name);
        let got =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(got, expected, "{name}");
    }
}

/// Runs of the worker in `runs` (one action digest each): their number and
/// how many distinct actions they were.
fn counts(runs: &[String]) -> (usize, usize) {
    let distinct: BTreeSet<&String> = runs.iter().collect();
    (runs.len(), distinct.len())
}

/// `build` of new actions, during which the worker made `runs`: every action
/// ran remotely, each exactly once, and wrote the right outputs.
fn assert_each_ran_remotely_once(bazel: &Bazel, build: &BuildSummary, runs: &[String]) {
    assert!(build.success(), "build failed:\n{}", build.stderr);
    assert_eq!(build.spawns.len(), ACTIONS, "{build:#?}");
    assert_eq!(build.executed_remotely(), ACTIONS, "{build:#?}");
    assert_eq!(build.processes.get("remote"), Some(&ACTIONS), "{build:#?}");
    assert_eq!(
        counts(runs),
        (ACTIONS, ACTIONS),
        "not one worker run per action: {runs:#?}"
    );
    check_outputs(bazel);
}

/// Counter `name` of the execution tree's `resumable_grpc` node in `serve`'s metrics.
fn execution_counter(serve: &Serve, name: &str) -> u64 {
    let metric = format!("blob_access_resumable_grpc_{name}_total{{node=\"execution.");
    scrape(serve.metrics_port.unwrap())
        .lines()
        .filter(|l| l.starts_with(&metric))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn bazel_executes_remotely_through_serve_and_a_rebuild_is_all_cache_hits() {
    if !real_bazel() {
        return;
    }
    let start = Instant::now();
    let bg = BuildGridExec::start();
    let dir = tempfile::tempdir().unwrap();
    let node = grpc(bg.port);
    let config = config(dir.path(), "grpc.yaml", &node, &node);
    let serve = Serve::start(Some(&config));
    let mut bazel = new_bazel(&serve);

    let first = build_remotely(&mut bazel, &serve, "direct");
    let runs = bg.worker_runs();
    assert_each_ran_remotely_once(&bazel, &first, &runs);

    // The results the worker made went to BuildGrid's action cache: after a
    // clean, Bazel finds them all there, and nothing runs again.
    bazel.clean();
    let second = build_remotely(&mut bazel, &serve, "direct");
    assert!(second.success(), "second build failed:\n{}", second.stderr);
    second.check_counts();
    assert_eq!(second.remote_cache_hits(), ACTIONS, "{second:#?}");
    assert_eq!(bg.worker_runs(), runs, "actions ran again");
    check_outputs(&bazel);
    eprintln!(
        "executed build {:.1?}, cached build {:.1?}, worker runs {}; whole test {:.1?}",
        first.elapsed,
        second.elapsed,
        runs.len(),
        start.elapsed()
    );
}

#[test]
fn execute_streams_cut_by_reloading_nginx_are_resumed_and_actions_run_once() {
    if !real_bazel() {
        return;
    }
    let start = Instant::now();
    let bg = BuildGridExec::start();
    let nginx = Nginx::start(bg.port);
    executes_through_reloads(&bg, &nginx, "nginx");
    eprintln!("whole test {:.1?}", start.elapsed());
}

#[test]
fn execute_streams_cut_by_reloading_haproxy_are_resumed_and_actions_run_once() {
    if !real_bazel() || !real_haproxy() {
        return;
    }
    let start = Instant::now();
    let bg = BuildGridExec::start();
    let haproxy = HaProxy::start(bg.port);
    executes_through_reloads(&bg, &haproxy, "haproxy");
    eprintln!("whole test {:.1?}", start.elapsed());
}

/// Serve between Bazel and `proxy` (named `name`, in front of `bg`), which
/// reloads all through each build; the CAS and action cache trees are
/// `resumable_grpc` nodes to it. With a `resumable_grpc` execution tree, the
/// build succeeds, each action having run exactly once, though Execute
/// streams were cut. Then the control: new actions with a plain `grpc`
/// execution tree, whose outcome (a failed build, actions run again, or, by
/// luck or Bazel's own retries, neither) is printed, not asserted.
fn executes_through_reloads(bg: &BuildGridExec, proxy: &Proxy, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let storage = resumable(proxy.port, THROUGH_RELOADS);
    let config_resumable = config(dir.path(), "resumable.yaml", &storage, &storage);
    let metrics = ["--metrics-listen", "127.0.0.1:0"];
    let serve = Serve::start_with(Some(&config_resumable), &metrics);
    let mut bazel = new_bazel(&serve);

    let before = bg.worker_runs().len();
    let (build, reloads) = proxy.with_reloads(|| build_remotely(&mut bazel, &serve, "resumable"));
    let runs = bg.worker_runs()[before..].to_vec();
    let resumed = execution_counter(&serve, "resumptions");
    let again = execution_counter(&serve, "executes_again");
    eprintln!(
        "{name}, resumable_grpc: {reloads} reloads in {:.1?}, {resumed} resumptions \
         of Execute/WaitExecution streams, {again} Executes sent again; worker runs \
         {} for {} actions",
        build.elapsed,
        runs.len(),
        counts(&runs).1
    );
    assert_each_ran_remotely_once(&bazel, &build, &runs);
    assert!(reloads > 0, "{name} was never reloaded during the build");
    assert!(
        resumed > 0,
        "no Execute stream was cut: the test proved nothing"
    );

    let plain_execution = grpc(proxy.port);
    let config_plain = config(dir.path(), "plain.yaml", &storage, &plain_execution);
    let plain = Serve::start(Some(&config_plain));
    let before = bg.worker_runs().len();
    let (control, reloads) = proxy.with_reloads(|| build_remotely(&mut bazel, &plain, "plain"));
    let (runs, actions) = counts(&bg.worker_runs()[before..]);
    let outcome = if !control.success() {
        let error = control.stderr.lines().find(|l| l.starts_with("ERROR: "));
        format!("the build failed: {}", error.unwrap_or("(no ERROR line)"))
    } else if runs > actions {
        format!("the build succeeded, {} actions ran again", runs - actions)
    } else {
        "the build succeeded and each action ran once".to_string()
    };
    eprintln!(
        "{name}, control (plain grpc execution tree): {reloads} reloads in {:.1?}; \
         {outcome}; worker runs {runs} for {actions} actions",
        control.elapsed
    );
}

#[test]
fn a_build_goes_on_when_buildgrid_restarts_mid_action() {
    if !real_bazel() {
        return;
    }
    let start = Instant::now();
    let bg = BuildGridExec::start();
    let dir = tempfile::tempdir().unwrap();
    // BuildGrid is away for 8-15 s (stop, then PostgreSQL, bgd and the
    // worker start). The execution node keeps its defaults: an execution is
    // given up only after no update for execution_stall_timeout (5m). The
    // cache calls have the budget of reads (5 attempts from 50 ms, a second
    // in all): here 30 attempts at most 1 s apart, for Bazel's lookups and
    // uploads that fall in the restart.
    let storage = resumable(
        bg.port,
        "max_attempts_without_progress: 30, max_backoff: 1s",
    );
    let execution = resumable(bg.port, "execution_stall_timeout: 5m");
    let config = config(dir.path(), "resumable.yaml", &storage, &execution);
    let serve = Serve::start_with(Some(&config), &["--metrics-listen", "127.0.0.1:0"]);
    let mut bazel = new_bazel(&serve);

    let (build, down) = std::thread::scope(|s| {
        let building = s.spawn(|| build_remotely(&mut bazel, &serve, "restart"));
        // Once the worker runs the three slow actions, a second into them,
        // BuildGrid stops (killing them) and starts again.
        let deadline = Instant::now() + Duration::from_secs(60);
        while bg.worker_runs().len() < 3 {
            assert!(
                !building.is_finished(),
                "the build ended before its actions ran"
            );
            assert!(Instant::now() < deadline, "the slow actions never ran");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_secs(1));
        let restart = Instant::now();
        bg.restart();
        (building.join().unwrap(), restart.elapsed())
    });
    let runs = bg.worker_runs();
    let resumed = execution_counter(&serve, "resumptions");
    let again = execution_counter(&serve, "executes_again");
    eprintln!(
        "BuildGrid down for {down:.1?}; {resumed} resumptions of Execute/WaitExecution \
         streams, {again} Executes sent again; worker runs {} for {} actions; \
         build {:.1?}, whole test {:.1?}",
        runs.len(),
        counts(&runs).1,
        build.elapsed,
        start.elapsed()
    );
    assert!(build.success(), "build failed:\n{}", build.stderr);
    assert_eq!(build.executed_remotely(), ACTIONS, "{build:#?}");
    assert_eq!(counts(&runs).1, ACTIONS, "{runs:#?}");
    check_outputs(&bazel);
    assert!(
        resumed + again > 0,
        "no Execute stream was resumed: the restart was not mid-action"
    );
}

/// BuildGrid's own client, `bgd execute command`, as a second client
/// through serve: it uploads an input root, executes, and fetches the output.
#[test]
fn bgd_execute_runs_an_action_through_serve() {
    if !real_servers() {
        return;
    }
    let bg = BuildGridExec::start();
    let dir = tempfile::tempdir().unwrap();
    let node = resumable(bg.port, THROUGH_RELOADS);
    let serve = Serve::start(Some(&config(dir.path(), "serve.yaml", &node, &node)));
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    std::fs::write(input.join("f.txt"), "an input of bgd\n").unwrap();
    let out = dir.path().join("out");
    let status = std::process::Command::new(bgd())
        .current_dir(dir.path())
        .args([
            "execute",
            "--remote",
            &format!("http://127.0.0.1:{}", serve.port),
        ])
        .args(["command", "--output-file", "out.txt", "--output-directory"])
        .arg(&out)
        .arg(&input)
        .args(["--", "sh", "-c", "tr a-z A-Z < f.txt > out.txt"])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        std::fs::read_to_string(out.join("out.txt")).unwrap(),
        "AN INPUT OF BGD\n"
    );
    assert_eq!(bg.worker_runs().len(), 1);
}
