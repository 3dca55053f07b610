//! A real Bazel (4.2.3) using `blob-access serve` whose CAS is an `s3` node
//! and whose action cache is `completeness_checking` over an `s3` node (one
//! bucket) on a private three-node Garage cluster: build, clean, build again
//! from the cache alone; then, with one Garage node stopped (not the one
//! serve talks to), clean and build again: still every action a hit.

mod support;

use support::bazel::*;
use support::*;

/// The s3 counters of serve's `/metrics` (uploads, parts, resumptions...).
fn s3_counters(serve: &Serve) -> String {
    scrape(serve.metrics_port.unwrap())
        .lines()
        .filter(|l| l.starts_with("blob_access_s3_"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn bazel_hits_through_serve_over_s3_also_with_a_garage_node_down() {
    if !real_bazel() || !real_garage() {
        return;
    }
    let garage = Garage::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("s3.yaml");
    let node = garage.node_yaml(&garage.endpoint(1), "");
    std::fs::write(
        &config,
        format!(
            "content_addressable_storage:
  {node}
action_cache:
  completeness_checking:
    backend:
      {node}
"
        ),
    )
    .unwrap();
    let serve = Serve::start_with(Some(&config), &["--metrics-listen", "127.0.0.1:0"]);
    let url = format!("grpc://127.0.0.1:{}", serve.port);
    let mut bazel = Bazel::new(&url);
    build_clean_build(&mut bazel, |_| {}, |build| build());
    let outputs = bazel.output_hashes();
    eprintln!("s3 counters after two builds:\n{}", s3_counters(&serve));

    // The big output is one object of the CAS, uploaded in parts.
    let big = &outputs["big.bin"];
    let listed = garage.aws(&["s3", "ls", "--recursive", "s3://blob-access/"]);
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(
        listed.contains(&format!("cas/sha256/{big}-")),
        "big.bin is not in the bucket:\n{listed}"
    );
    assert!(
        listed.contains(" ac/sha256/"),
        "no action result:\n{listed}"
    );
    assert_eq!(garage.open_multipart_uploads(), 0);

    // Replication 3 and quorum 2: with node 3 down, node 1 still reads and
    // writes. serve keeps its client (and connections) to node 1.
    garage.stop_node(3);
    bazel.clean();
    let third = bazel.build(&[]);
    assert!(
        third.success(),
        "build with a node down failed:\n{}",
        third.stderr
    );
    third.check_counts();
    assert!(!third.spawns.is_empty());
    assert_eq!(third.executed(), 0, "not all remote cache hits: {third:#?}");
    assert_eq!(bazel.output_hashes(), outputs, "outputs differ");
    eprintln!(
        "cached build with Garage node 3 down: {:.1?}\ns3 counters:\n{}",
        third.elapsed,
        s3_counters(&serve)
    );
}
