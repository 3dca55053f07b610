//! Uploads that resume *into* `serve`: `blob-access put` of a 300 MiB file
//! (BLOB_ACCESS_UPLOAD_MIB to change) through `resumable_grpc` and a proxy
//! that resets every connection 250 ms after it opened, into serve over
//! memory, over disk, and into a serve that forwards to another through
//! `resumable_grpc`. serve keeps each cut upload, so every attempt goes on
//! at the committed size: no restart from 0, few bytes sent twice; then a
//! verified `get` from serve of the same bytes.

mod support;

use blob_access_chaos::{Faults, Kill, Proxy};
use std::path::Path;
use std::time::Duration;
use support::*;

/// `put -v` of `file` through a proxy resetting each connection after
/// 250 ms into the serve on `port`; then a verified get from it directly.
fn put_through_cuts(dir: &Path, port: u16, file: &Path) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cuts = Faults::time(Kill::Rst, Duration::from_millis(250));
    let proxy = rt
        .block_on(Proxy::start(([127, 0, 0, 1], port).into(), Some(cuts)))
        .unwrap();
    let config = resumable_config(dir, "through-cuts.yaml", proxy.addr.port());
    let out = cli(&[
        "put".as_ref(),
        "-v".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        file.as_os_str(),
    ]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "put failed: {log}");
    let kills = proxy.kills.load(std::sync::atomic::Ordering::Relaxed);
    let (retries, restarts) = (
        logged(&log, "write_retries"),
        logged(&log, "write_restarts"),
    );
    let resent = logged(&log, "bytes_resent");
    eprintln!(
        "{kills} connections reset, {retries} resumptions, {restarts} restarts, {resent} bytes sent again"
    );
    assert!(kills >= 1 && retries >= 1, "never cut: {log}");
    assert_eq!(restarts, 0, "an attempt started again at 0: {log}");
    assert!(
        resent <= upload_size() / 10,
        "{resent} bytes sent again: {log}"
    );
    let digest = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let got = dir.join("got");
    get_cli(&grpc_config(dir, "direct.yaml", port), &digest, &got);
    assert!(files_equal(file, &got));
    std::fs::remove_file(&got).unwrap();
}

#[test]
fn uploads_through_cuts_resume_into_serve_over_memory_and_disk() {
    let dir = tempfile::tempdir().unwrap();
    let file = random_file(dir.path(), upload_size());
    let memory = Serve::start_env(
        "127.0.0.1:0",
        None,
        &["-vv"],
        &[("RUST_LOG", "blob_access_server=debug,blob_access=debug")],
    );
    put_through_cuts(dir.path(), memory.port, &file);

    let disk = dir.path().join("disk.yaml");
    let store = dir.path().join("store");
    std::fs::write(
        &disk,
        format!(
            "disk: {{path: {}, max_size_bytes: 2GiB}}\n",
            store.display()
        ),
    )
    .unwrap();
    let serve = Serve::start(Some(&disk));
    put_through_cuts(dir.path(), serve.port, &file);
    // Nothing but the blob is left behind in the store's temp directory.
    let left = std::fs::read_dir(store.join("tmp")).unwrap().count();
    assert_eq!(left, 0, "temp files left in the store");
}

/// A serve that forwards to another keeps its upstream write open while a
/// cut upload is kept, and goes on with it.
#[test]
fn uploads_through_cuts_resume_into_a_forwarding_serve() {
    let dir = tempfile::tempdir().unwrap();
    let file = random_file(dir.path(), upload_size());
    let upstream = Serve::start(None);
    let forwarding = resumable_config(dir.path(), "forward.yaml", upstream.port);
    let front = Serve::start(Some(&forwarding));
    put_through_cuts(dir.path(), front.port, &file);
    let got = dir.path().join("from-upstream");
    let digest = {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(blob_access::util::digest_file(&file))
            .unwrap()
            .to_string()
    };
    get_cli(
        &grpc_config(dir.path(), "up.yaml", upstream.port),
        &digest,
        &got,
    );
    assert!(files_equal(&file, &got));
}
