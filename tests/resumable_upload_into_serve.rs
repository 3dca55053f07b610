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
    let out = put_verbose(&config, file);
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
    assert_serve_holds(dir, port, &digest, file);
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
    let digest = {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(blob_access::util::digest_file(&file))
            .unwrap()
            .to_string()
    };
    assert_serve_holds(dir.path(), upstream.port, &digest, &file);
}

/// The same upload through HAProxy reloading every 200 ms between the
/// client and serve: it arrives, never started again from 0.
#[test]
fn uploads_through_haproxy_reloads_resume_into_serve() {
    if !real_haproxy() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = random_file(dir.path(), upload_size());
    let serve = Serve::start(None);
    let proxy = HaProxy::start(serve.port);
    let config = resumable_config(dir.path(), "through-haproxy.yaml", proxy.port);
    let (out, reloads) = proxy.with_reloads(|| put_verbose(&config, &file));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "put failed: {log}");
    assert!(reloads > 0, "HAProxy was never reloaded");
    assert_eq!(
        logged(&log, "write_restarts"),
        0,
        "started again at 0: {log}"
    );
    eprintln!(
        "{reloads} reloads, {} resumptions",
        logged(&log, "write_retries")
    );
    let digest = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_serve_holds(dir.path(), serve.port, &digest, &file);
}

/// Many clients cut at once, past serve's bound on kept uploads: each
/// upload still arrives (a dropped one starts again at 0), serve's memory
/// stays bounded while the blobs go to disk, and nothing is left in the
/// store's temp directory.
#[test]
fn many_uploads_cut_at_once_stay_within_the_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let disk = dir.path().join("disk.yaml");
    std::fs::write(
        &disk,
        format!(
            "disk: {{path: {}, max_size_bytes: 4GiB}}\n",
            store.display()
        ),
    )
    .unwrap();
    let serve = Serve::start_with(Some(&disk), &["--max-kept-uploads", "4"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cuts = Faults::time(Kill::Rst, Duration::from_millis(250));
    let proxy = rt
        .block_on(Proxy::start(
            ([127, 0, 0, 1], serve.port).into(),
            Some(cuts),
        ))
        .unwrap();
    let config = resumable_config(dir.path(), "cut.yaml", proxy.addr.port());
    let files: Vec<_> = (0..12u64)
        .map(|i| {
            let sub = dir.path().join(format!("f{i}"));
            std::fs::create_dir(&sub).unwrap();
            random_file(&sub, (48 << 20) + i)
        })
        .collect();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (peak, done, pid) = (peak.clone(), done.clone(), serve.pid());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
                let kib: u64 = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                    .unwrap_or(0);
                peak.fetch_max(kib, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let puts: Vec<_> = files
        .iter()
        .map(|f| {
            let (config, f) = (config.clone(), f.clone());
            std::thread::spawn(move || put_verbose(&config, &f))
        })
        .collect();
    for (p, f) in puts.into_iter().zip(&files) {
        let out = p.join().unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "put of {} failed: {log}", f.display());
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    watcher.join().unwrap();
    let peak_mib = peak.load(std::sync::atomic::Ordering::Relaxed) >> 10;
    let kills = proxy.kills.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("12 uploads of 48 MiB: {kills} connections reset, serve's peak RSS {peak_mib} MiB");
    assert!(kills >= 12, "too few cuts: {kills}");
    // 576 MiB went through; what serve holds is bounded by the uploads in
    // flight, not by their size.
    assert!(peak_mib < 300, "serve's peak RSS {peak_mib} MiB");
    let direct = grpc_config(dir.path(), "direct.yaml", serve.port);
    for f in &files {
        let digest = {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(blob_access::util::digest_file(f))
                .unwrap()
                .to_string()
        };
        let got = dir.path().join("got");
        get_cli(&direct, &digest, &got);
        assert!(files_equal(f, &got));
    }
    drop(serve);
    let left = std::fs::read_dir(store.join("tmp")).unwrap().count();
    assert_eq!(left, 0, "temp files left in the store");
}
