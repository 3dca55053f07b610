//! `sharding` and `mirrored` over real servers: three `serve` instances and
//! three BuildGrid servers as shards (shares follow weights, every blob reads
//! back, a fourth shard takes about its share, a stopped shard fails only its
//! own blobs and is named), and `mirrored` over two BuildGrid servers (a
//! stopped side fails writes by name while reads go on; restarted empty, it
//! is repaired by reads).

mod support;

use blob_access::{util, BlobAccess, BuildContext, Digest, ReadRange};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

/// Blobs put through the sharding node (moderate: the servers are real).
const BLOBS: usize = 2000;
const WEIGHTS: [u32; 3] = [1, 1, 2];

fn build(yaml: &str) -> Arc<dyn BlobAccess> {
    blob_access_config::load_str(yaml, blob_access_config::Format::Yaml, "test.yaml")
        .unwrap_or_else(|e| panic!("{e}"))
        .build_cas(&BuildContext::root())
        .unwrap()
}

fn grpc(url: &str) -> String {
    format!("{{grpc: {{endpoint: \"{url}\", instance_name: \"\"}}}}")
}

fn sharding(urls: &[String], weights: &[u32]) -> Arc<dyn BlobAccess> {
    let shards: Vec<String> = urls
        .iter()
        .zip(weights)
        .map(|(u, w)| format!("{{weight: {w}, backend: {}}}", grpc(u)))
        .collect();
    build(&format!("sharding: {{shards: [{}]}}", shards.join(", ")))
}

/// Small blobs of different sizes, alike on every run.
fn blobs() -> Vec<(Digest, Bytes)> {
    (0..BLOBS)
        .map(|i| {
            let data = Bytes::from(format!("blob {i} ").repeat(1 + i % 37));
            (Digest::of(&data), data)
        })
        .collect()
}

async fn present(backend: &dyn BlobAccess, digests: &[Digest]) -> usize {
    let mut n = 0;
    for part in digests.chunks(500) {
        n += part.len() - backend.find_missing(part).await.unwrap().len();
    }
    n
}

async fn put_all(node: &Arc<dyn BlobAccess>, blobs: &[(Digest, Bytes)]) {
    futures::stream::iter(blobs.iter().cloned())
        .map(|(d, data)| {
            let node = node.clone();
            async move { node.put(&d, util::once(data)).await }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await
        .unwrap();
}

async fn read_all(node: &Arc<dyn BlobAccess>, blobs: &[(Digest, Bytes)]) {
    futures::stream::iter(blobs.iter().cloned())
        .map(|(d, data)| {
            let node = node.clone();
            async move {
                let got = util::read_to_bytes(&*node, &d, ReadRange::FULL, 1 << 20).await;
                assert_eq!(got.unwrap_or_else(|e| panic!("{e}")), data, "blob {d}");
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
}

/// The whole check over four servers (the fourth empty, added later);
/// `stop(i)` stops server `i`.
async fn check_cluster(urls: &[String], stop: impl FnOnce(usize)) {
    let node = sharding(&urls[..3], &WEIGHTS);
    let blobs = blobs();
    let digests: Vec<Digest> = blobs.iter().map(|(d, _)| d.clone()).collect();
    let started = Instant::now();
    put_all(&node, &blobs).await;
    eprintln!("put {BLOBS} blobs in {:?}", started.elapsed());

    // Each server holds its weight's share.
    let total: u32 = WEIGHTS.iter().sum();
    for (i, url) in urls[..3].iter().enumerate() {
        let held = present(&*build(&grpc(url)), &digests).await as f64;
        let expected = BLOBS as f64 * f64::from(WEIGHTS[i]) / f64::from(total);
        eprintln!("shard {i} holds {held} blobs, expected {expected}");
        assert!(
            (held - expected).abs() <= 0.15 * expected,
            "shard {i}: {held} vs {expected}"
        );
    }
    read_all(&node, &blobs).await;
    assert!(node.find_missing(&digests).await.unwrap().is_empty());

    // A fourth (empty) shard: the blobs it now owns are the ones that moved.
    let mut weights4 = WEIGHTS.to_vec();
    weights4.push(1);
    let node4 = sharding(urls, &weights4);
    let moved = node4.find_missing(&digests).await.unwrap().len();
    eprintln!("adding a fourth shard moved {moved} of {BLOBS} blobs");
    assert!(
        moved > 0 && moved as f64 <= 0.30 * BLOBS as f64,
        "{moved} moved"
    );

    // Shard 1 stopped: the others' blobs still read and write, its own fail by name.
    stop(1);
    let (mut theirs, mut others) = (Vec::new(), Vec::new());
    for part in blobs.chunks(200) {
        let ds: Vec<Digest> = part.iter().map(|(d, _)| d.clone()).collect();
        let on_0 = build(&grpc(&urls[0])).find_missing(&ds).await.unwrap();
        let on_2 = build(&grpc(&urls[2])).find_missing(&ds).await.unwrap();
        for b in part {
            if !on_0.contains(&b.0) || !on_2.contains(&b.0) {
                others.push(b.clone());
            } else {
                theirs.push(b.clone());
            }
        }
    }
    assert!(!theirs.is_empty() && !others.is_empty());
    read_all(&node, &others[..100]).await;
    let fresh: Vec<(Digest, Bytes)> = (0..200)
        .map(|i| {
            let data = Bytes::from(format!("fresh {i}"));
            (Digest::of(&data), data)
        })
        .collect();
    let (mut wrote, mut refused) = (0, 0);
    for (d, data) in &fresh {
        match node.put(d, util::once(data.clone())).await {
            Ok(()) => wrote += 1,
            Err(e) => {
                assert!(e.to_string().contains("sharding.shards[1].backend"), "{e}");
                refused += 1;
            }
        }
    }
    eprintln!("shard 1 stopped: {wrote} writes went through, {refused} refused naming it");
    assert!(wrote > 100 && refused > 0);
    for (d, _) in &theirs[..5] {
        let e = util::read_to_bytes(&*node, d, ReadRange::FULL, 1 << 20)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("sharding.shards[1].backend"), "{e}");
        eprintln!("a blob of the stopped shard: {e}");
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

#[test]
fn sharding_over_serve_instances() {
    let mut servers: Vec<Option<Serve>> = (0..4).map(|_| Some(Serve::start(None))).collect();
    let urls: Vec<String> = servers
        .iter()
        .map(|s| format!("grpc://127.0.0.1:{}", s.as_ref().unwrap().port))
        .collect();
    runtime().block_on(check_cluster(&urls, |i| servers[i] = None));
}

#[test]
fn sharding_over_buildgrid_servers() {
    if !real_servers() {
        return;
    }
    let servers: Vec<BuildGrid> = (0..4).map(|_| BuildGrid::start()).collect();
    let urls: Vec<String> = servers
        .iter()
        .map(|s| format!("grpc://127.0.0.1:{}", s.port))
        .collect();
    runtime().block_on(check_cluster(&urls, |i| servers[i].stop()));
}

#[test]
fn mirrored_over_buildgrid_servers() {
    if !real_servers() {
        return;
    }
    let a = BuildGrid::start();
    let mut b = BuildGrid::start();
    let yaml = format!(
        "mirrored: {{backend_a: {}, backend_b: {}}}",
        grpc(&format!("grpc://127.0.0.1:{}", a.port)),
        grpc(&format!("grpc://127.0.0.1:{}", b.port))
    );
    let rt = runtime();
    let _in_runtime = rt.enter();
    let node = build(&yaml);
    let blobs: Vec<(Digest, Bytes)> = blobs().into_iter().take(100).collect();
    let digests: Vec<Digest> = blobs.iter().map(|(d, _)| d.clone()).collect();
    let side_b = build(&grpc(&format!("grpc://127.0.0.1:{}", b.port)));
    rt.block_on(async {
        put_all(&node, &blobs).await;
        assert_eq!(present(&*side_b, &digests).await, blobs.len());
    });

    b.stop();
    rt.block_on(async {
        read_all(&node, &blobs).await;
        let (d, data) = (
            Digest::of(b"written while b is down"),
            Bytes::from_static(b"written while b is down"),
        );
        let e = node.put(&d, util::once(data)).await.unwrap_err();
        assert!(e.to_string().contains("mirrored.backend_b"), "{e}");
        eprintln!("write with b stopped: {e}");
    });

    b.restart_empty();
    rt.block_on(async {
        assert_eq!(present(&*side_b, &digests).await, 0);
        // Two reads of each in a row: one of them starts at the empty side,
        // finds nothing, reads the other and queues a copy.
        let deadline = Instant::now() + Duration::from_secs(30);
        while present(&*side_b, &digests).await < blobs.len() {
            assert!(Instant::now() < deadline, "b was not repaired");
            for (d, data) in &blobs {
                for _ in 0..2 {
                    let got = util::read_to_bytes(&*node, d, ReadRange::FULL, 1 << 20).await;
                    assert_eq!(&got.unwrap(), data);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut metrics = Vec::new();
        node.metrics(&mut metrics);
        let m = metrics.iter().find(|m| m.kind == "mirrored").unwrap();
        eprintln!("{m:?}");
        assert!(m.get("repairs_done").unwrap() >= blobs.len() as u64);
    });
}
