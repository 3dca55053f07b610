//! A real Bazel against BuildGrid's CAS and ActionCache: the reference for the
//! harness in `support::bazel`, and for what `blob-access serve` must do.

mod support;

use support::bazel::*;

#[test]
fn bazel_rebuild_after_clean_is_all_remote_cache_hits() {
    if !real_bazel() {
        return;
    }
    let start = std::time::Instant::now();
    let bg = start_buildgrid_with_action_cache();
    let mut bazel = Bazel::new(&format!("grpc://127.0.0.1:{}", bg.port));

    // Empty cache: everything runs here and is uploaded.
    let first = bazel.build(&[]);
    assert!(first.success(), "first build failed:\n{}", first.stderr);
    first.check_counts();
    assert!(first.spawns.len() >= 5, "{first:#?}");
    assert_eq!(first.remote_cache_hits(), 0, "{first:#?}");
    let outputs = bazel.output_hashes();
    assert!(outputs.contains_key("big.bin"), "{outputs:#?}");

    // No local state left: every spawn must come from the remote cache.
    bazel.clean();
    assert!(!bazel.bazel_bin().exists());
    let second = bazel.build(&[]);
    assert!(second.success(), "second build failed:\n{}", second.stderr);
    second.check_counts();
    assert_eq!(second.spawns.len(), first.spawns.len(), "{second:#?}");
    assert_eq!(
        second.executed(),
        0,
        "not all remote cache hits: {second:#?}"
    );
    assert_eq!(bazel.output_hashes(), outputs);

    eprintln!(
        "first build {:.1?}, second build {:.1?}, whole test {:.1?}",
        first.elapsed,
        second.elapsed,
        start.elapsed()
    );
}
