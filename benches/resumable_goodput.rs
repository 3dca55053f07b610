//! Figures for the resumable_grpc issue, printed, not asserted:
//! - a 1 GiB get through `resumable_grpc` vs the plain `grpc` node, no faults;
//! - goodput when a proxy kills every connection each 1 s and each 100 ms,
//!   vs the same proxy without faults;
//! - wall time and peak RSS of `blob-access get` with `resumable_grpc` while
//!   connections are killed each 1 s.
//!
//! Run: `cargo bench --bench resumable_goodput` (BLOB_MIB=256 for a quicker run).

mod common;

use blob_access_chaos::{Faults, Kill, Proxy};
use common::*;
use std::time::Duration;

fn resumable(port: u16) -> String {
    format!(
        "resumable_grpc:\n  grpc: {{endpoint: \"grpc://127.0.0.1:{port}\"}}\n  max_attempts_without_progress: 10\n"
    )
}

fn main() {
    if listing_only() {
        return;
    }
    let mib = blob_mib();
    let served = Served::start(mib);
    let (port, digest) = (served.port, served.digest.clone());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let rate = |s: f64| mib as f64 / s;

    let plain_yaml = format!("grpc: {{endpoint: \"grpc://127.0.0.1:{port}\"}}");
    let (mut plain, mut res) = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        plain = plain.min(rt.block_on(timed_get(&plain_yaml, &digest)));
        res = res.min(rt.block_on(timed_get(&resumable(port), &digest)));
    }
    println!("blob: {mib} MiB, best of 3 each, same server, same run");
    println!(
        "grpc, no faults:           {plain:.2}s {:.0} MiB/s",
        rate(plain)
    );
    println!(
        "resumable_grpc, no faults: {res:.2}s {:.0} MiB/s",
        rate(res)
    );
    println!(
        "ratio resumable/grpc:      {:.3} (goal >= 0.97)",
        plain / res
    );

    let upstream = ([127, 0, 0, 1], port).into();
    let proxy = rt.block_on(Proxy::start(upstream, None)).unwrap();
    let yaml = resumable(proxy.addr.port());
    let mut base = f64::MAX;
    for _ in 0..2 {
        base = base.min(rt.block_on(timed_get(&yaml, &digest)));
    }
    println!(
        "through the proxy, no faults:    {base:.2}s {:.0} MiB/s",
        rate(base)
    );
    for (every, goal) in [(1000, 0.90), (100, 0.50)] {
        proxy.set(Some(Faults::time(Kill::Rst, Duration::from_millis(every))));
        let kills = proxy.kills.load(std::sync::atomic::Ordering::Relaxed);
        let secs = rt.block_on(timed_get(&yaml, &digest));
        let kills = proxy.kills.load(std::sync::atomic::Ordering::Relaxed) - kills;
        println!(
            "killed each {every:>4} ms:            {secs:.2}s {:.0} MiB/s, {kills} connections killed, goodput ratio {:.3} (goal >= {goal})",
            rate(secs),
            base / secs
        );
    }

    proxy.set(Some(Faults::time(Kill::Rst, Duration::from_secs(1))));
    let config = served.config("resumable.yaml", &yaml);
    let (secs, rss) = timed_cli_get(&config, &digest);
    println!(
        "cli get > /dev/null, killed each 1 s: {secs:.2}s {:.0} MiB/s, peak RSS {rss:.1} MiB (goal <= 64 MiB)",
        rate(secs)
    );
}
