//! Against a real REAPI server: BuildGrid 0.4.4 (disk CAS), directly and through
//! `blob-access serve`, cross-checked with BuildGrid's own client `bgd cas`.

mod support;

use std::path::Path;
use std::process::Command;
use support::*;

const SIZES: &[u64] = &[0, 1, (1 << 20) - 1, (1 << 20) + 1, 100 << 20];

fn bgd_upload(url: &str, file: &Path) -> String {
    let out = Command::new(bgd())
        .args(["cas", &format!("--remote={url}"), "upload-file"])
        .arg(file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // bgd exits 0 even on some failures: trust only its success line.
    text.lines()
        .find_map(|l| l.split("with digest=[").nth(1))
        .map(|d| d.trim_end_matches(']').to_string())
        .unwrap_or_else(|| {
            panic!(
                "bgd upload failed: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

fn bgd_download(url: &str, digest: &str, out_path: &Path) {
    let out = Command::new(bgd())
        .args(["cas", &format!("--remote={url}"), "download-file", digest])
        .arg(out_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("Success: Pulled"),
        "bgd download of {digest} failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Our CLI and bgd, each reading what the other wrote, against `port`.
fn cross_check(port: u16, url: &str, dir: &Path) {
    let config = grpc_config(dir, &format!("grpc-{port}.yaml"), port);
    let c = config.to_str().unwrap();
    for &size in SIZES {
        let file = random_file(dir, size);
        // We write, bgd reads.
        let digest = put_cli(&config, &file);
        assert_eq!(
            cli_ok(&["find-missing", "--config", c, &digest]),
            "",
            "size {size}"
        );
        let by_bgd = dir.join(format!("bgd-{port}-{size}"));
        bgd_download(url, &digest, &by_bgd);
        assert!(
            files_equal(&file, &by_bgd),
            "bgd read back something else, size {size}"
        );
        // We read what we wrote.
        let ours = dir.join(format!("ours-{port}-{size}"));
        get_cli(&config, &digest, &ours);
        assert!(files_equal(&file, &ours), "size {size}");
    }
    // bgd writes, we read.
    let other = random_file(dir, 3 << 20 | 7);
    let digest = bgd_upload(url, &other);
    let ours = dir.join(format!("from-bgd-{port}"));
    get_cli(&config, &digest, &ours);
    assert!(files_equal(&other, &ours));
}

#[test]
fn round_trips_with_buildgrid_and_its_client() {
    if !real_servers() {
        return;
    }
    let bg = BuildGrid::start();
    let dir = tempfile::tempdir().unwrap();
    cross_check(bg.port, &bg.url(), dir.path());
}

#[test]
fn round_trips_through_serve_in_front_of_buildgrid() {
    if !real_servers() {
        return;
    }
    let bg = BuildGrid::start();
    let dir = tempfile::tempdir().unwrap();
    let upstream = grpc_config(dir.path(), "upstream.yaml", bg.port);
    let serve = Serve::start(Some(&upstream));
    cross_check(
        serve.port,
        &format!("http://127.0.0.1:{}", serve.port),
        dir.path(),
    );
    // What went through `serve` landed in BuildGrid: bgd reads it there directly.
    let file = random_file(dir.path(), 5 << 20);
    let via_serve = grpc_config(dir.path(), "via.yaml", serve.port);
    let digest = put_cli(&via_serve, &file);
    let direct = dir.path().join("direct");
    bgd_download(&bg.url(), &digest, &direct);
    assert!(files_equal(&file, &direct));
}

#[test]
fn missing_blob_in_buildgrid_is_not_found() {
    if !real_servers() {
        return;
    }
    let bg = BuildGrid::start();
    let dir = tempfile::tempdir().unwrap();
    let config = grpc_config(dir.path(), "c.yaml", bg.port);
    let absent = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae/3";
    let out = cli(&["get", "--config", config.to_str().unwrap(), absent]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NotFound") && err.contains(absent), "{err}");
    assert_eq!(
        cli_ok(&["find-missing", "--config", config.to_str().unwrap(), absent]).trim(),
        absent
    );
}
