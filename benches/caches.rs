//! Figures for the caching issue, printed, not asserted:
//! - a full, verified get of a 1 GiB blob from the `disk` tier (in process and
//!   through the CLI to /dev/null) against `cat` and `sha256sum` of the same
//!   file, page cache warm;
//! - find_missing of 10,000 digests through `existence_caching`, cold and warm,
//!   against the `grpc` backend alone (`blob-access serve` over memory, loopback).
//!
//! Run: `cargo bench --bench caches` (BLOB_MIB=256 for a quicker run).

mod common;

use blob_access::disk::DiskBlobAccess;
use blob_access::{BlobAccess, BuildContext, Digest};
use blob_access_decorators::existence_caching::ExistenceCaching;
use common::*;
use futures::StreamExt;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

fn disk(rt: &tokio::runtime::Runtime, mib: u64) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blob");
    write_random(&file, mib << 20);
    let store = dir.path().join("store");
    let cas = DiskBlobAccess::open("disk", &store, 4 * (mib << 20)).unwrap();
    let digest = rt
        .block_on(blob_access::util::put_file(&cas, &file))
        .unwrap();
    let object = cas.path_of(&digest);
    let null = || std::fs::File::create("/dev/null").unwrap();

    let cat = best_of(3, || {
        timed_child(Command::new("cat").arg(&object).stdout(null())).0
    });
    let sha256sum = best_of(3, || {
        timed_child(Command::new("sha256sum").arg(&object).stdout(null())).0
    });
    let ours = best_of(3, || rt.block_on(timed_drain(&cas, &digest)));
    let config = dir.path().join("disk.yaml");
    std::fs::write(
        &config,
        format!("disk: {{path: {}, max_size_bytes: 8GiB}}", store.display()),
    )
    .unwrap();
    drop(cas);
    let mut rss = 0.0;
    let cli = best_of(3, || {
        let (secs, peak) = timed_cli_get(&config, &digest);
        rss = peak;
        secs
    });
    let rate = |secs: f64| mib as f64 / secs;
    println!("disk tier, {mib} MiB blob, page cache warm, best of 3:");
    println!("  cat FILE >/dev/null            {:7.0} MiB/s", rate(cat));
    println!(
        "  sha256sum FILE (read + verify) {:7.0} MiB/s  ratio {:.2}",
        rate(sha256sum),
        cat / sha256sum
    );
    println!(
        "  disk get, in process, verified {:7.0} MiB/s  ratio {:.2}",
        rate(ours),
        cat / ours
    );
    println!(
        "  blob-access get >/dev/null     {:7.0} MiB/s  ratio {:.2}  peak RSS {rss:.1} MiB",
        rate(cli),
        cat / cli
    );
    println!(
        "  ratio to cat (goal 0.8) is bounded by SHA-256; ratio disk get / sha256sum: {:.2}",
        sha256sum / ours
    );
}

fn find_missing(rt: &tokio::runtime::Runtime) {
    const N: usize = 10_000;
    let served = Served::start(1);
    let grpc = format!("grpc: {{endpoint: \"grpc://127.0.0.1:{}\"}}", served.port);
    // Building a grpc node needs a runtime (its channel is created there).
    let _guard = rt.enter();
    let build = |yaml: &str| -> Arc<dyn BlobAccess> {
        blob_access_config::load_str(yaml, blob_access_config::Format::Yaml, "bench")
            .unwrap()
            .build_cas(&BuildContext::root())
            .unwrap()
    };
    let backend = build(&grpc);
    // Half of the digests are stored: the usual answer mixes both.
    let digests: Vec<Digest> = (0..N)
        .map(|i| Digest::of(format!("blob {i}").as_bytes()))
        .collect();
    rt.block_on(async {
        let puts = futures::stream::iter(digests.iter().enumerate().step_by(2))
            .map(|(i, d)| {
                let data = bytes::Bytes::from(format!("blob {i}"));
                let backend = backend.clone();
                async move { backend.put(d, blob_access::util::once(data)).await }
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
        assert!(puts.iter().all(|r| r.is_ok()));
    });
    let present: Vec<Digest> = digests.iter().step_by(2).cloned().collect();
    let timed = |cas: &Arc<dyn BlobAccess>, ask: &[Digest], missing: usize| {
        let start = Instant::now();
        let got = rt.block_on(cas.find_missing(ask)).unwrap();
        assert_eq!(got.len(), missing);
        start.elapsed().as_secs_f64() * 1000.0
    };
    // The backend's connection is up before anything is timed.
    timed(&backend, &present, 0);
    let cached = || -> Arc<dyn BlobAccess> {
        Arc::new(ExistenceCaching::new(
            "existence_caching",
            backend.clone(),
            std::time::Duration::from_secs(300),
            1_000_000,
        ))
    };
    println!("find_missing, best of 3, grpc backend = blob-access serve over memory on loopback:");
    for (what, ask, missing) in [
        ("10000 digests, half present", &digests[..], N / 2),
        ("5000 digests, all present ", &present[..], 0),
    ] {
        let alone = best_of(3, || timed(&backend, ask, missing));
        let (mut cold, mut warm) = (f64::MAX, f64::MAX);
        for _ in 0..3 {
            let cache = cached();
            cold = cold.min(timed(&cache, ask, missing));
            warm = warm.min(timed(&cache, ask, missing));
        }
        println!(
            "  {what}: backend alone {alone:6.2} ms, existence_caching cold {cold:6.2} ms, warm {warm:6.3} ms ({:.0}x)",
            alone / warm
        );
    }
}

fn main() {
    if listing_only() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    disk(&rt, blob_mib());
    find_missing(&rt);
}
