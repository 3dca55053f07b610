//! A proxy that caps the requests of a connection: nginx with
//! `keepalive_requests` (3 here) sends GOAWAY after that many requests and refuses the
//! streams past them. A build with hundreds of small blobs in flight hits the
//! cap again and again. Through `resumable_grpc`, `put` of many files,
//! `find-missing` and `fetch-tree` must still complete: refused calls are made
//! again without spending the retry budget, and small blobs travel in
//! batches (a few dozen calls, not one per blob).

mod support;

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

    // Files of 1-9 KiB, and the Directory listing them, put through nginx.
    let paths = small_files_and_listing(dir.path(), FILES, "");
    put_and_fetch_tree(&config, &paths, &dir.path().join("out"));

    // The cap was reached: three commands made more requests than a
    // connection each takes.
    let log = std::fs::read_to_string(nginx.dir.path().join("access.log")).unwrap();
    let requests = log.lines().count();
    assert!(requests > 3 * CAP as usize, "{requests} requests");
}
