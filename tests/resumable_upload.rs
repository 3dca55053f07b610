//! Uploads that survive cuts, on real parts: `blob-access put` of a 300 MiB
//! file (BLOB_ACCESS_UPLOAD_MIB to change) through `resumable_grpc` to
//! BuildGrid, through a proxy killing connections after 300 ms and through
//! nginx and HAProxy reloads, then a verified `get` of the same bytes.
//!
//! BuildGrid keeps nothing of a cut upload and answers QueryWriteStatus with
//! UNIMPLEMENTED, so each retry starts again at byte 0, reading the file
//! again (the replay window holds only its last 16 MiB): this is the restart
//! path on a real server (the fault server's tests cover going on at
//! `committed_size`). An upload to BuildGrid takes 1.4 s or more, so no
//! attempt would ever complete if every connection died: the proxy and the
//! reloads cut the first three, then let one through. The plain `grpc` node fails
//! on the first cut (the control).

mod support;

use blob_access_chaos::{Faults, Kill, Proxy};
use std::path::Path;
use std::time::Duration;
use support::*;

/// A successful `put`, then a `get` straight from BuildGrid of the same bytes.
fn assert_stored(out: &std::process::Output, bg: &BuildGrid, dir: &Path, file: &Path) -> u64 {
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "put failed: {log}");
    let digest = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let restarts = logged(&log, "write_restarts");
    assert!(restarts > 0, "no restart logged in: {log}");
    let direct = grpc_config(dir, "direct.yaml", bg.port);
    let got = dir.join("got");
    get_cli(&direct, &digest, &got);
    assert!(files_equal(file, &got));
    std::fs::remove_file(&got).unwrap();
    restarts
}

#[test]
fn uploads_through_a_proxy_killing_connections_start_again_and_arrive() {
    if !real_servers() {
        return;
    }
    let bg = BuildGrid::start();
    let dir = tempfile::tempdir().unwrap();
    let file = random_file(dir.path(), upload_size());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let upstream = ([127, 0, 0, 1], bg.port).into();
    // 300 ms: well under what 300 MiB takes even on a quiet machine (1.4 s).
    let cut = Faults::time(Kill::Rst, Duration::from_millis(300));
    let proxy = rt.block_on(Proxy::start(upstream, None)).unwrap();
    let port = proxy.addr.port();

    // The control: the plain node fails on the cut, naming the blob.
    proxy.set(Some(cut.times(1)));
    let plain = grpc_config(dir.path(), "plain.yaml", port);
    let out = put_verbose(&plain, &file);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "plain put survived a cut");
    let digest = rt
        .block_on(blob_access::util::digest_file(&file))
        .unwrap()
        .to_string();
    assert!(err.contains(&digest), "{err}");

    proxy.set(Some(cut.times(3)));
    let before = proxy.kills.load(std::sync::atomic::Ordering::Relaxed);
    let resumable = resumable_config(dir.path(), "resumable.yaml", port);
    let out = put_verbose(&resumable, &file);
    let restarts = assert_stored(&out, &bg, dir.path(), &file);
    let kills = proxy.kills.load(std::sync::atomic::Ordering::Relaxed) - before;
    eprintln!("through the proxy: {kills} connections killed, {restarts} restarts");
    assert!(kills >= 1);
}

#[test]
fn uploads_through_reloading_nginx_start_again_and_arrive() {
    if !real_servers() {
        return;
    }
    uploads_through_reloads(Nginx::start, 1);
}

/// HAProxy's old worker ends a cut upload with RST_STREAM REFUSED_STREAM,
/// although the server has had its bytes: retried all the same.
#[test]
fn uploads_through_reloading_haproxy_start_again_and_arrive() {
    if !(real_servers() && real_haproxy()) {
        return;
    }
    uploads_through_reloads(HaProxy::start, 2);
}

/// Three reloads of the proxy `start` makes, 300 ms apart, each closing the
/// upload's connection a moment later (nginx 200 ms, HAProxy 300 ms); then
/// one attempt goes through. The file is `extra` bytes longer than the
/// other tests' (BuildGrid answers at once for a stored blob).
fn uploads_through_reloads(start: fn(u16) -> support::Proxy, extra: u64) {
    let bg = BuildGrid::start();
    let proxy = start(bg.port);
    let dir = tempfile::tempdir().unwrap();
    let file = random_file(dir.path(), upload_size() + extra);
    let resumable = resumable_config(dir.path(), "resumable.yaml", proxy.port);
    let (out, reloads) = proxy.with_n_reloads(3, Duration::from_millis(300), || {
        put_verbose(&resumable, &file)
    });
    let restarts = assert_stored(&out, &bg, dir.path(), &file);
    eprintln!("through the reloading proxy: {reloads} reloads, {restarts} restarts");
}
