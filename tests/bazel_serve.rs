//! A real Bazel (4.2.3) using `blob-access serve` as its remote cache: the
//! embedded default, a disk CAS and action cache across restarts (and what
//! completeness checking does when a blob is gone), and examples/bazel-proxy.yaml
//! forwarding to BuildGrid behind an nginx that reloads during the build.

mod support;

use support::bazel::*;
use support::*;

fn url(serve: &Serve) -> String {
    format!("grpc://127.0.0.1:{}", serve.port)
}

#[test]
fn embedded_default_is_a_remote_cache_for_bazel() {
    if !real_bazel() {
        return;
    }
    let serve = Serve::start(None);
    let mut bazel = Bazel::new(&url(&serve));
    build_clean_build(&mut bazel, |_| {}, |build| build());
}

#[test]
fn disk_cache_survives_restarts_and_incomplete_results_are_rebuilt() {
    if !real_bazel() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("disk.yaml");
    let store = dir.path().join("store");
    std::fs::write(
        &config,
        format!(
            "content_addressable_storage:
  disk: {{path: {0}, max_size_bytes: 2GiB}}
action_cache:
  completeness_checking:
    backend:
      disk: {{path: {0}, max_size_bytes: 64MiB}}
",
            store.display()
        ),
    )
    .unwrap();
    let mut serve = Some(Serve::start(Some(&config)));
    let mut bazel = Bazel::new(&url(serve.as_ref().unwrap()));
    build_clean_build(
        &mut bazel,
        |bazel| {
            // Killed, not stopped: what was acknowledged must be on disk.
            drop(serve.take());
            let again = Serve::start(Some(&config));
            bazel.set_remote_cache(&url(&again));
            serve = Some(again);
        },
        |build| build(),
    );

    // An output blob disappears from the CAS (evicted, deleted by hand): its
    // action's result must not be served, and Bazel runs that action again.
    // --remote_download_minimal downloads nothing, so only the action cache can
    // tell Bazel the output is gone.
    let hello = bazel.output_hashes()["hello.txt"].clone();
    let size = std::fs::metadata(bazel.bazel_bin().join("hello.txt"))
        .unwrap()
        .len();
    drop(serve.take());
    let blob = store.join(format!("objects/sha256/{}/{hello}-{size}", &hello[..2]));
    std::fs::remove_file(&blob).unwrap_or_else(|e| panic!("{}: {e}", blob.display()));
    let serve = Serve::start(Some(&config));
    bazel.set_remote_cache(&url(&serve));
    bazel.clean();
    let third = bazel.build(&["--remote_download_minimal"]);
    assert!(third.success(), "{}", third.stderr);
    third.check_counts();
    let ran: Vec<&str> = third
        .spawns
        .iter()
        .filter(|s| !s.remote_cache_hit)
        .map(|s| s.progress_message.as_str())
        .collect();
    assert_eq!(ran.len(), 1, "{third:#?}");
    assert!(ran[0].contains("//:hello"), "{ran:?}");
    assert!(blob.exists(), "the rebuilt output was not uploaded again");
}

#[test]
fn bazel_proxy_example_serves_hits_through_reloading_nginx() {
    if !real_bazel() {
        return;
    }
    let bg = start_buildgrid_with_action_cache();
    let nginx = Nginx::start(bg.port);
    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(root().join("examples/bazel-proxy.yaml")).unwrap();
    let yaml = example
        .replace(
            "grpc://127.0.0.1:8980",
            &format!("grpc://127.0.0.1:{}", nginx.port),
        )
        .replace(
            "/tmp/blob-access-bazel-proxy",
            dir.path().join("cache").to_str().unwrap(),
        );
    assert_ne!(yaml, example, "the example's endpoint or path changed");
    let config = dir.path().join("bazel-proxy.yaml");
    std::fs::write(&config, yaml).unwrap();
    let cache = dir.path().join("cache");
    let start = || Serve::start_with(Some(&config), &["--metrics-listen", "127.0.0.1:0"]);
    let mut serve = start();
    let mut bazel = Bazel::new(&url(&serve));

    // The first build uploads without reloads (resuming uploads is another
    // issue); the second build's lookups and downloads go through reloads.
    let mut reloads = 0;
    build_clean_build(
        &mut bazel,
        |_| {},
        |build| {
            let (summary, n) = nginx.with_reloads(build);
            reloads = n;
            summary
        },
    );
    assert!(reloads > 0, "nginx was never reloaded during the build");
    let outputs = bazel.output_hashes();
    // The 200 MiB read must have been cut and resumed at least once, or the
    // test proved nothing: on a machine fast enough to slip between reloads,
    // try again with an empty disk tier (two more times).
    let mut resumptions = resumptions_of(&serve);
    for _ in 0..2 {
        if resumptions > 0 {
            break;
        }
        drop(serve);
        std::fs::remove_dir_all(&cache).unwrap();
        serve = start();
        bazel.set_remote_cache(&url(&serve));
        bazel.clean();
        let (again, n) = nginx.with_reloads(|| bazel.build(&[]));
        assert!(again.success(), "{}", again.stderr);
        assert_eq!(again.executed(), 0, "not all remote cache hits: {again:#?}");
        assert_eq!(bazel.output_hashes(), outputs);
        reloads = n;
        resumptions = resumptions_of(&serve);
    }
    eprintln!("nginx reloads during the cached build: {reloads}, resumed reads: {resumptions}");
    assert!(
        resumptions > 0,
        "no read was cut and resumed in three builds"
    );
}

fn resumptions_of(serve: &Serve) -> u64 {
    scrape(serve.metrics_port.unwrap())
        .lines()
        .filter(|l| l.starts_with("blob_access_resumable_grpc_resumptions_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Bazel's own uploads resume into serve: the 200 MiB output goes up through
/// a proxy that resets every connection 250 ms after it opened, and Bazel's
/// uploader, told by QueryWriteStatus what serve kept of each cut attempt,
/// goes on from there; after `bazel clean`, every action is a remote cache
/// hit with the same outputs.
#[test]
fn bazel_uploads_resume_into_serve_through_a_cutting_proxy() {
    if !real_bazel() {
        return;
    }
    use blob_access_chaos::{Faults, Kill, Proxy};
    let serve = Serve::start_env(
        "127.0.0.1:0",
        None,
        &[],
        &[("RUST_LOG", "warn,blob_access_server::parked=debug")],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cuts = Faults::time(Kill::Rst, std::time::Duration::from_millis(250));
    let proxy = rt
        .block_on(Proxy::start(
            ([127, 0, 0, 1], serve.port).into(),
            Some(cuts),
        ))
        .unwrap();
    let mut bazel = Bazel::new(&proxy.endpoint());
    build_clean_build(&mut bazel, |_| {}, |build| build());
    let kept = serve.log().matches("keeping a cut upload").count();
    let kills = proxy.kills.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("{kills} connections reset; serve kept {kept} cut uploads for Bazel to resume");
    assert!(kept > 0, "no upload was cut and kept: {}", serve.log());
}
