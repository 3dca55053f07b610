//! The reason this project exists, on real middleware: nginx in front of
//! BuildGrid, reloaded every 200 ms during a 600 MiB read. Each reload sends
//! GOAWAY and, 200 ms later (`worker_shutdown_timeout 200ms`), closes the old
//! worker's connections. A plain read dies; `resumable_grpc` finishes with
//! verified bytes.

mod support;

use std::path::Path;
use support::*;

const SIZE: u64 = 600 << 20;

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

    // Plain grpc through nginx: the stream is cut and the read fails.
    // Killed streams surface as UNAVAILABLE (GOAWAY), INTERNAL or UNKNOWN
    // (a broken h2 body), always naming the blob.
    let plain = grpc_config(dir.path(), "plain.yaml", nginx.port);
    plain_get_is_cut(&nginx, &plain, digest, &dir.path().join("plain.out"));

    // BuildGrid's own client fails the same way (three tries, as above).
    let out_bgd = dir.path().join("bgd.out");
    let bgd_failed = (0..3).any(|_| {
        let (out, _) = nginx.with_reloads(|| bgd_download(nginx.port, digest, &out_bgd));
        !String::from_utf8_lossy(&out.stdout).contains("Success: Pulled")
    });
    assert!(bgd_failed, "bgd survived the reloads three times");

    // resumable_grpc through nginx: completes, verified, with logged resumptions.
    let resumable = resumable_config(dir.path(), "resumable.yaml", nginx.port);
    let out_res = dir.path().join("resumable.out");
    resumable_get_survives(&nginx, &resumable, digest, &file, &out_res);

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
