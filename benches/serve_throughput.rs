//! Figures for the proxy issue, printed, not asserted: one blob downloaded
//! from BuildGrid directly and through `blob-access serve` (tree:
//! `resumable_grpc` pointed at that BuildGrid), by BuildGrid's own client
//! (`bgd cas download-file`) and by our `blob-access get`, same run, best of 3.
//!
//! Needs BuildGrid in `target/venv` (`scripts/setup-test-env.sh`).
//! Run: `cargo bench --bench serve_throughput` (BLOB_MIB, default 1024).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct BuildGrid(PathBuf);

impl Drop for BuildGrid {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(root().join("scripts/buildgrid.sh"))
            .arg("stop")
            .arg(&self.0)
            .status();
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bgd_download(bgd: &Path, port: u16, digest: &str, out: &Path) -> f64 {
    let start = Instant::now();
    let o = Command::new(bgd)
        .args(["cas", &format!("--remote=http://127.0.0.1:{port}")])
        .args(["download-file", digest])
        .arg(out)
        .output()
        .unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("Success: Pulled"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::remove_file(out).unwrap();
    secs
}

fn main() {
    if listing_only() {
        return;
    }
    let bgd = root().join("target/venv/bin/bgd");
    if !bgd.exists() {
        eprintln!("BuildGrid is not installed: run scripts/setup-test-env.sh first");
        return;
    }
    let mib = blob_mib();
    let dir = tempfile::tempdir().unwrap();
    let bg_port = free_port();
    let bg_dir = dir.path().join("bgd");
    let ok = Command::new("bash")
        .arg(root().join("scripts/buildgrid.sh"))
        .arg("start")
        .arg(&bg_dir)
        .arg(bg_port.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "BuildGrid did not start");
    let _bg = BuildGrid(bg_dir);

    let direct = dir.path().join("direct.yaml");
    std::fs::write(
        &direct,
        format!("grpc: {{endpoint: \"grpc://127.0.0.1:{bg_port}\"}}"),
    )
    .unwrap();
    let blob = dir.path().join("blob");
    write_random(&blob, mib << 20);
    let digest = put_cli(&direct, &blob).to_string();
    std::fs::remove_file(&blob).unwrap();

    let tree = dir.path().join("tree.yaml");
    std::fs::write(
        &tree,
        format!("resumable_grpc:\n  grpc: {{endpoint: \"grpc://127.0.0.1:{bg_port}\"}}\n"),
    )
    .unwrap();
    let serve_port = free_port();
    let _serve = Killed(
        Command::new(bin())
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{serve_port}"),
                "--config",
            ])
            .arg(&tree)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(serve_port);
    let via_serve = dir.path().join("via-serve.yaml");
    std::fs::write(
        &via_serve,
        format!("grpc: {{endpoint: \"grpc://127.0.0.1:{serve_port}\"}}"),
    )
    .unwrap();

    let out_file = dir.path().join("out");
    let bgd_direct = best_of(3, || bgd_download(&bgd, bg_port, &digest, &out_file));
    let bgd_serve = best_of(3, || bgd_download(&bgd, serve_port, &digest, &out_file));
    let ours = |config: &Path| best_of(3, || timed_cli_get(config, &digest).0);
    let (get_direct, get_serve) = (ours(&direct), ours(&via_serve));
    let rate = |s: f64| mib as f64 / s;
    println!("{mib} MiB blob from BuildGrid 0.4.4 (disk CAS), loopback, best of 3:");
    println!(
        "  bgd cas download-file, direct     {:6.2}s {:6.0} MiB/s",
        bgd_direct,
        rate(bgd_direct)
    );
    println!(
        "  bgd cas download-file, via serve  {:6.2}s {:6.0} MiB/s  ratio {:.2} (goal >= 0.9)",
        bgd_serve,
        rate(bgd_serve),
        bgd_direct / bgd_serve
    );
    println!(
        "  blob-access get, direct           {:6.2}s {:6.0} MiB/s",
        get_direct,
        rate(get_direct)
    );
    println!(
        "  blob-access get, via serve        {:6.2}s {:6.0} MiB/s  ratio {:.2}",
        get_serve,
        rate(get_serve),
        get_direct / get_serve
    );
}
