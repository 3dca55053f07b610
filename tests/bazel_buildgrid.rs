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

    build_clean_build(&mut bazel, |_| {}, |build| build());
    eprintln!("whole test {:.1?}", start.elapsed());
}
