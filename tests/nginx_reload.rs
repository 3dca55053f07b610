//! The reason this project exists, on real middleware: nginx in front of
//! BuildGrid, reloaded every 200 ms during a 600 MiB read. Each reload sends
//! GOAWAY and, 200 ms later (`worker_shutdown_timeout 200ms`), closes the old
//! worker's connections. A plain read dies; `resumable_grpc` finishes with
//! verified bytes.

mod support;

use std::path::Path;
use support::*;

const SIZE: u64 = 600 << 20;

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
    let digest = put_cli(&direct, &file);
    let digest = digest.as_str();

    // Plain grpc through nginx: the stream is cut and the read fails. Only a
    // read ending within 400 ms (next reload, then the shutdown timeout) can
    // slip through; three tries to be cut, for a machine that fast.
    let plain = grpc_config(dir.path(), "plain.yaml", nginx.port);
    let out_plain = dir.path().join("plain.out");
    let failed = (0..3).find_map(|_| {
        let (out, _) = nginx.with_reloads(|| {
            cli(&[
                "get",
                "--config",
                plain.to_str().unwrap(),
                digest,
                "-o",
                out_plain.to_str().unwrap(),
            ])
        });
        if out.status.success() {
            std::fs::remove_file(&out_plain).unwrap();
            return None;
        }
        assert!(!out_plain.exists(), "a failed read left a file");
        Some(String::from_utf8_lossy(&out.stderr).into_owned())
    });
    let err = failed.expect("plain read survived the reloads three times");
    // Killed streams surface as UNAVAILABLE (GOAWAY), INTERNAL or UNKNOWN
    // (a broken h2 body), always naming the blob.
    assert!(err.contains(digest), "{err}");

    // BuildGrid's own client fails the same way (three tries, as above).
    let out_bgd = dir.path().join("bgd.out");
    let bgd_failed = (0..3).any(|_| {
        let (out, _) = nginx.with_reloads(|| bgd_download(nginx.port, digest, &out_bgd));
        !String::from_utf8_lossy(&out.stdout).contains("Success: Pulled")
    });
    assert!(bgd_failed, "bgd survived the reloads three times");

    // resumable_grpc through nginx: completes, verified, with logged resumptions.
    let resumable = resumable_config(dir.path(), nginx.port);
    let out_res = dir.path().join("resumable.out");
    let (out, reloads) = nginx.with_reloads(|| {
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

    // BuildGrid's own client, unmodified, gains the resumption through
    // `blob-access serve` whose tree is that same resumable_grpc node.
    let serve = Serve::start(Some(&resumable));
    let out_served = dir.path().join("served.out");
    let (out, reloads) = nginx.with_reloads(|| bgd_download(serve.port, digest, &out_served));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Success: Pulled"),
        "bgd through serve failed after {reloads} reloads: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(files_equal(&file, &out_served));
    eprintln!("bgd through serve: {reloads} reloads, bytes identical");
}

fn bgd_download(port: u16, digest: &str, out: &Path) -> std::process::Output {
    std::process::Command::new(bgd())
        .args([
            "cas",
            &format!("--remote=http://127.0.0.1:{port}"),
            "download-file",
            digest,
        ])
        .arg(out)
        .output()
        .unwrap()
}
