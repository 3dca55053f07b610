//! Issue 4, test 4: 64 concurrent gets of mixed sizes over one channel,
//! through a proxy that keeps killing the connection they all share, all
//! finish with verified bytes.

mod faults;

use blob_access_decorators::resumable_grpc::RetryPolicy;
use faults::proxy::{Faults, Kill, Proxy};
use faults::server::{FaultServer, Options};
use faults::{test_blob, Client};
use std::sync::atomic::Ordering;
use std::sync::Arc;

const SIZES: [usize; 8] = [0, 1, 1000, 65_535, 65_537, 1 << 20, (3 << 20) + 3, 8 << 20];

async fn sixty_four_gets(zstd: bool, faults: Faults) {
    let server = FaultServer::start(Options {
        zstd,
        ..Options::default()
    })
    .await;
    let mut blobs = Vec::new();
    for i in 0..64 {
        let data = test_blob(SIZES[i % SIZES.len()], i as u64);
        blobs.push((server.insert(data.clone()).await, data));
    }
    let proxy = Proxy::start(server.addr, Some(faults)).await.unwrap();
    let client = Arc::new(Client::new(&proxy.endpoint(), zstd, RetryPolicy::default()));
    let started = std::time::Instant::now();
    let tasks: Vec<_> = blobs
        .into_iter()
        .map(|(d, data)| {
            let client = client.clone();
            tokio::spawn(async move { client.read_all(&d, &data).await.map_err(|e| e.to_string()) })
        })
        .collect();
    let mut failures = Vec::new();
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            failures.push(e);
        }
    }
    eprintln!(
        "64 gets, zstd {zstd}, {faults:?}: {:?}, {} connections killed, {} resumptions",
        started.elapsed(),
        proxy.kills.load(Ordering::Relaxed),
        client.counter("resumptions"),
    );
    assert!(
        failures.is_empty(),
        "{} failed, e.g. {}",
        failures.len(),
        failures[0]
    );
    assert!(proxy.kills.load(Ordering::Relaxed) >= 2);
    assert!(client.counter("resumptions") >= 2);
}

/// One test, both variants in turn: run side by side, the two would compete
/// for the CI machine's two cores and starve each other's streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_gets_through_a_connection_killing_proxy() {
    sixty_four_gets(false, Faults::bytes(Kill::Rst, 16 << 20)).await;
    sixty_four_gets(true, Faults::bytes(Kill::Fin, 16 << 20)).await;
}
