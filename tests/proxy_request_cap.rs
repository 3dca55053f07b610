//! A proxy that caps the requests of a connection: nginx with
//! `keepalive_requests` (3 here) sends GOAWAY after that many requests and refuses the
//! streams past them. A build with hundreds of small blobs in flight hits the
//! cap again and again. Through `resumable_grpc`, `put` of many files,
//! `find-missing` and `fetch-tree` must still complete: refused calls are made
//! again without spending the retry budget, and small blobs travel in
//! batches (a few dozen calls, not one per blob).

mod support;

use blob_access::proto::{Directory, FileNode};
use blob_access::Digest;
use prost::Message;
use std::path::Path;
use support::*;

const FILES: usize = 600;
const CAP: u32 = 3;

fn resumable_config(dir: &Path, port: u16) -> std::path::PathBuf {
    let path = dir.join("resumable.yaml");
    let yaml = format!(
        "resumable_grpc:\n  grpc:\n    endpoint: grpc://127.0.0.1:{port}\n    instance_name: \"\"\n"
    );
    std::fs::write(&path, yaml).unwrap();
    path
}

#[test]
fn many_small_blobs_get_through_a_proxy_that_caps_requests_per_connection() {
    if !real_servers() {
        return;
    }
    let upstream = Serve::start(None);
    let nginx = Nginx::start_with_requests_cap(upstream.port, Some(CAP));
    let dir = tempfile::tempdir().unwrap();
    let config = resumable_config(dir.path(), nginx.port);
    let config = config.to_str().unwrap();

    // Files of 1-9 KiB, and the Directory listing them, put through nginx.
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let mut paths = Vec::new();
    let mut nodes = Vec::new();
    for i in 0..FILES {
        let data = format!("file {i}\n").repeat(100 + i * 1000 % 8000 / 8);
        let path = src.join(format!("f{i:04}"));
        std::fs::write(&path, &data).unwrap();
        nodes.push(FileNode {
            name: format!("f{i:04}"),
            digest: Some(Digest::of(data.as_bytes()).to_proto()),
            ..Default::default()
        });
        paths.push(path);
    }
    let listing = dir.path().join("directory");
    std::fs::write(
        &listing,
        Directory {
            files: nodes,
            ..Default::default()
        }
        .encode_to_vec(),
    )
    .unwrap();
    paths.push(listing);

    let mut args = vec!["put", "-q", "--config", config];
    args.extend(paths.iter().map(|p| p.to_str().unwrap()));
    let out = cli(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "put failed: {stderr}");
    let digests = String::from_utf8(out.stdout).unwrap();
    assert_eq!(digests.lines().count(), FILES + 1);
    let root = digests.lines().last().unwrap();

    let mut args = vec!["find-missing", "--config", config];
    args.extend(digests.lines());
    assert_eq!(cli_ok(&args), "", "every blob is stored");

    let out_dir = dir.path().join("out");
    let out = cli(&[
        "fetch-tree",
        "-q",
        "--config",
        config,
        root,
        out_dir.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fetch-tree failed: {stderr}");
    for p in &paths[..FILES] {
        let got = out_dir.join(p.file_name().unwrap());
        assert!(files_equal(p, &got), "{} differs", got.display());
    }
    // The cap was reached: three commands made more requests than a
    // connection each takes.
    let log = std::fs::read_to_string(nginx.dir.path().join("access.log")).unwrap();
    let requests = log.lines().count();
    assert!(requests > 3 * CAP as usize, "{requests} requests");
}
