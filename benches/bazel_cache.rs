//! Figures for the remote-cache issue, printed, not asserted: the wall time of
//! a fully cached Bazel build (after `bazel clean`) of the fixture workspace
//! (tests/bazel/workspace, one 200 MiB output), with Bazel's remote cache being
//! BuildGrid directly, `serve`'s embedded default, `serve` over disk, and
//! examples/bazel-proxy.yaml forwarding to that BuildGrid (disk tier cold, then
//! warm). One run each, same machine, same run.
//!
//! Needs Bazel and BuildGrid (`scripts/setup-test-env.sh`).
//! Run: `cargo bench --bench bazel_cache` (BLOB_ACCESS_BAZEL_BIG_MIB to shrink).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;
use support::bazel::*;
use support::*;

/// First build (uploads), then `clean` and the timed, fully cached builds;
/// `rebuilds` > 1 times later ones too (e.g. a warm local tier).
fn cached_builds(remote: &str, rebuilds: usize) -> Vec<Duration> {
    let mut bazel = Bazel::new(remote);
    let first = bazel.build(&[]);
    assert!(first.success(), "{}", first.stderr);
    (0..rebuilds)
        .map(|_| {
            bazel.clean();
            let cached = bazel.build(&[]);
            assert!(cached.success(), "{}", cached.stderr);
            assert_eq!(cached.executed(), 0, "not all cache hits: {cached:#?}");
            cached.elapsed
        })
        .collect()
}

fn main() {
    std::env::set_var("BLOB_ACCESS_REAL_SERVERS", "1");
    assert!(real_bazel(), "needs bazel: run scripts/setup-test-env.sh");
    let dir = tempfile::tempdir().unwrap();
    let mut rows: Vec<(&str, Duration)> = Vec::new();

    let bg = start_buildgrid_with_action_cache();
    let bg_url = format!("grpc://127.0.0.1:{}", bg.port);
    rows.push(("BuildGrid directly", cached_builds(&bg_url, 1)[0]));

    let embedded = Serve::start(None);
    let url = format!("grpc://127.0.0.1:{}", embedded.port);
    rows.push((
        "serve, embedded default (memory)",
        cached_builds(&url, 1)[0],
    ));
    drop(embedded);

    let disk_config = dir.path().join("disk.yaml");
    let store = dir.path().join("store");
    std::fs::write(
        &disk_config,
        format!(
            "content_addressable_storage: {{disk: {{path: {0}, max_size_bytes: 2GiB}}}}\n\
             action_cache: {{completeness_checking: {{backend: {{disk: {{path: {0}, max_size_bytes: 64MiB}}}}}}}}\n",
            store.display()
        ),
    )
    .unwrap();
    let disk = Serve::start(Some(&disk_config));
    let url = format!("grpc://127.0.0.1:{}", disk.port);
    rows.push(("serve, disk CAS + AC", cached_builds(&url, 1)[0]));
    drop(disk);

    let example = std::fs::read_to_string(root().join("examples/bazel-proxy.yaml")).unwrap();
    let proxy_config = dir.path().join("bazel-proxy.yaml");
    let yaml = example.replace("grpc://127.0.0.1:8980", &bg_url).replace(
        "/tmp/blob-access-bazel-proxy",
        dir.path().join("cache").to_str().unwrap(),
    );
    std::fs::write(&proxy_config, yaml).unwrap();
    let proxy = Serve::start(Some(&proxy_config));
    let url = format!("grpc://127.0.0.1:{}", proxy.port);
    let times = cached_builds(&url, 2);
    rows.push((
        "serve, bazel-proxy.yaml -> BuildGrid (disk tier cold)",
        times[0],
    ));
    rows.push((
        "serve, bazel-proxy.yaml -> BuildGrid (disk tier warm)",
        times[1],
    ));

    let base = rows[0].1.as_secs_f64();
    println!("\ncached Bazel build after `bazel clean` (one run each):");
    for (what, t) in &rows {
        println!(
            "  {what:<55} {:>6.2} s   {:>5.2}x of BuildGrid directly",
            t.as_secs_f64(),
            t.as_secs_f64() / base
        );
    }
}
