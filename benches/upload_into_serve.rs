//! Upload goodput *into* `blob-access serve` through a proxy that resets
//! every connection 250 ms after it opened, against the same proxy without
//! faults, in one run; and the bytes sent per byte stored through the cuts
//! (serve keeps each cut upload, so every attempt goes on at the committed
//! size). Printed, not asserted. Goals: goodput ratio >= 0.8, bytes sent per
//! byte stored <= 1.1.
//!
//! Each `put` is a fresh serve over memory (the blob is never already
//! stored), `blob-access put -v` of a random file through `resumable_grpc`.
//!
//! Run: `cargo bench --bench upload_into_serve` (BLOB_MIB=256 for a quicker run).

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use blob_access_chaos::{Faults, Kill, Proxy};
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};
use support::logged;

/// One `put -v` into a fresh serve, through the proxy with `faults`:
/// (seconds, bytes sent again, resumptions, restarts).
fn put(
    rt: &tokio::runtime::Runtime,
    file: &std::path::Path,
    faults: Option<Faults>,
) -> (f64, u64, u64, u64) {
    let served = Served::empty();
    let proxy = rt
        .block_on(Proxy::start(([127, 0, 0, 1], served.port).into(), faults))
        .unwrap();
    let config = served.config(
        "resumable.yaml",
        &format!(
            "resumable_grpc: {{grpc: {{endpoint: \"{}\"}}}}",
            proxy.endpoint()
        ),
    );
    let start = Instant::now();
    let out = Command::new(bin())
        .args(["put", "-v", "-q", "--config"])
        .arg(&config)
        .arg(file)
        .output()
        .unwrap();
    let secs = start.elapsed().as_secs_f64();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "put failed: {log}");
    (
        secs,
        logged(&log, "bytes_resent"),
        logged(&log, "write_retries"),
        logged(&log, "write_restarts"),
    )
}

fn main() {
    if listing_only() {
        return;
    }
    let mib = blob_mib();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blob");
    write_random(&file, mib << 20);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let size = (mib << 20) as f64;

    let (uncut, ..) = put(&rt, &file, None);
    let cuts = Faults::time(Kill::Rst, Duration::from_millis(250));
    let (cut, resent, retries, restarts) = put(&rt, &file, Some(cuts));
    let mibs = |secs: f64| size / (1 << 20) as f64 / secs;
    println!("upload of {mib} MiB into serve (memory) through resumable_grpc and a proxy:");
    println!(
        "  uncut:                     {uncut:.2} s  {:.0} MiB/s",
        mibs(uncut)
    );
    println!(
        "  reset every 250 ms:        {cut:.2} s  {:.0} MiB/s  ({retries} resumptions, {restarts} restarts)",
        mibs(cut)
    );
    println!(
        "  goodput ratio cut/uncut:   {:.2}  (goal >= 0.8)",
        uncut / cut
    );
    println!(
        "  bytes sent per byte stored: {:.3}  (goal <= 1.1)",
        (size + resent as f64) / size
    );
}
