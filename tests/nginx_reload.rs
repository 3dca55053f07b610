//! The reason this project exists, on real middleware: nginx in front of
//! BuildGrid, reloaded every 300 ms during a 600 MiB read. Each reload sends
//! GOAWAY and, one second later (`worker_shutdown_timeout 1s`), closes the old
//! worker's connections. A plain read dies; `resumable_grpc` finishes with
//! verified bytes.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use support::*;

const SIZE: u64 = 600 << 20;

/// Reloads nginx every 300 ms while `f` runs.
fn with_reloads<T>(nginx: &Nginx, f: impl FnOnce() -> T) -> (T, u32) {
    let stop = Arc::new(AtomicBool::new(false));
    let dir = nginx.dir.path().to_path_buf();
    let flag = stop.clone();
    let reloader = std::thread::spawn(move || {
        let mut n = 0;
        while !flag.load(Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(300));
            let ok = std::process::Command::new("bash")
                .arg("scripts/nginx.sh")
                .arg("reload")
                .arg(&dir)
                .current_dir(root())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            n += ok as u32;
        }
        n
    });
    let out = f();
    stop.store(true, Ordering::Relaxed);
    (out, reloader.join().unwrap())
}

fn resumable_config(dir: &Path, port: u16) -> std::path::PathBuf {
    let path = dir.join("resumable.yaml");
    std::fs::write(
        &path,
        format!(
            "resumable_grpc:\n  grpc:\n    endpoint: grpc://127.0.0.1:{port}\n    instance_name: \"\"\n  max_attempts_without_progress: 10\n"
        ),
    )
    .unwrap();
    path
}

#[test]
fn reloading_nginx_kills_plain_reads_and_resumable_reads_survive() {
    if !real_servers() {
        return;
    }
    let bg = BuildGrid::start();
    let nginx = Nginx::start(bg.port);
    let dir = tempfile::tempdir().unwrap();
    let file = random_file(dir.path(), SIZE);
    let direct = grpc_config(dir.path(), "direct.yaml", bg.port);
    let digest = cli_ok(&[
        "put",
        "--config",
        direct.to_str().unwrap(),
        file.to_str().unwrap(),
    ]);
    let digest = digest.trim();

    // Plain grpc through nginx: the stream is cut and the read fails.
    let plain = grpc_config(dir.path(), "plain.yaml", nginx.port);
    let out_plain = dir.path().join("plain.out");
    let (out, _) = with_reloads(&nginx, || {
        cli(&[
            "get",
            "--config",
            plain.to_str().unwrap(),
            digest,
            "-o",
            out_plain.to_str().unwrap(),
        ])
    });
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "plain read survived the reloads");
    // Killed streams surface as UNAVAILABLE (GOAWAY), INTERNAL or UNKNOWN
    // (a broken h2 body), always naming the blob.
    assert!(err.contains(digest), "{err}");
    assert!(!out_plain.exists(), "a failed read left a file");

    // BuildGrid's own client fails the same way.
    let out_bgd = dir.path().join("bgd.out");
    let (out, _) = with_reloads(&nginx, || {
        std::process::Command::new(bgd())
            .args([
                "cas",
                &format!("--remote=http://127.0.0.1:{}", nginx.port),
                "download-file",
                digest,
            ])
            .arg(&out_bgd)
            .output()
            .unwrap()
    });
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("Success: Pulled"),
        "bgd survived the reloads"
    );

    // resumable_grpc through nginx: completes, verified, with logged resumptions.
    let resumable = resumable_config(dir.path(), nginx.port);
    let out_res = dir.path().join("resumable.out");
    let (out, reloads) = with_reloads(&nginx, || {
        std::process::Command::new(bin())
            .args([
                "get",
                "-v",
                "--config",
                resumable.to_str().unwrap(),
                digest,
                "-o",
                out_res.to_str().unwrap(),
            ])
            .output()
            .unwrap()
    });
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "resumable read failed after {reloads} reloads: {log}"
    );
    assert!(files_equal(&file, &out_res));
    let resumptions: u64 = log
        .split(" resumptions")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(resumptions > 0, "no resumption logged in: {log}");
    eprintln!("resumable read: {reloads} reloads, {resumptions} resumptions");
}
