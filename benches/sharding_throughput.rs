//! Figures for the sharding issue, printed, not asserted: aggregate get
//! throughput of 16 concurrent clients (each its own tree and connections)
//! through a `sharding` node over 1, 2 and 3 `blob-access serve` shards
//! (embedded memory CAS), best of 3 rounds. Every read is verified.
//!
//! All processes share one machine: with few cores the servers and the
//! clients compete, and the figures say how the node scales there, not how a
//! cluster of machines would.
//! Run: `cargo bench --bench sharding_throughput` (SHARD_BLOBS, default 256;
//! SHARD_BLOB_KIB, default 1024).

mod common;

use blob_access::{util, BlobAccess, BuildContext, Digest, ReadRange};
use bytes::Bytes;
use common::*;
use futures::StreamExt;
use rand::SeedableRng;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

const CLIENTS: usize = 16;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Server(Child, u16);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve() -> Server {
    let port = free_port();
    let child = Command::new(bin())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Server(child, port)
}

fn tree(servers: &[Server]) -> Arc<dyn BlobAccess> {
    let shards: Vec<String> = servers
        .iter()
        .map(|s| {
            format!(
                "{{backend: {{grpc: {{endpoint: \"grpc://127.0.0.1:{}\", instance_name: \"\"}}}}}}",
                s.1
            )
        })
        .collect();
    let yaml = format!("sharding: {{shards: [{}]}}", shards.join(", "));
    blob_access_config::load_str(&yaml, blob_access_config::Format::Yaml, "bench")
        .unwrap()
        .build_cas(&BuildContext::root())
        .unwrap()
}

/// Bytes per second of `CLIENTS` clients each reading every blob once.
async fn round(servers: &[Server], digests: &Arc<Vec<Digest>>) -> f64 {
    let clients: Vec<_> = (0..CLIENTS).map(|_| tree(servers)).collect();
    let start = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(c, cas)| {
            let digests = digests.clone();
            tokio::spawn(async move {
                let mut bytes = 0u64;
                // Each client starts elsewhere in the list.
                for i in 0..digests.len() {
                    let d = &digests[(i + c * digests.len() / CLIENTS) % digests.len()];
                    let mut s = cas.get(d, ReadRange::FULL);
                    while let Some(chunk) = s.next().await {
                        bytes += chunk.unwrap().len() as u64;
                    }
                }
                bytes
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    if listing_only() {
        return;
    }
    let (blobs, kib) = (env("SHARD_BLOBS", 256), env("SHARD_BLOB_KIB", 1024));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let servers: Vec<Server> = (0..3).map(|_| serve()).collect();
    let data: Vec<(Digest, Bytes)> = (0..blobs)
        .map(|i| {
            let mut b = vec![0u8; kib << 10];
            rand::Rng::fill(&mut rand::rngs::StdRng::seed_from_u64(i as u64), &mut b[..]);
            let b = Bytes::from(b);
            (Digest::of(&b), b)
        })
        .collect();
    let digests = Arc::new(data.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>());
    println!(
        "sharding: {CLIENTS} concurrent clients, each reading {blobs} blobs of {kib} KiB, over N serve shards (memory), loopback, best of 3, {} cores:",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut first = None;
    for n in 1..=3 {
        let shards = &servers[..n];
        rt.block_on(async {
            let cas = tree(shards);
            for (d, b) in &data {
                cas.put(d, util::chunked(b.clone(), 64 << 10))
                    .await
                    .unwrap();
            }
        });
        let best = (0..3)
            .map(|_| rt.block_on(round(shards, &digests)))
            .fold(0f64, f64::max);
        let mib_s = best / f64::from(1 << 20);
        let base = *first.get_or_insert(mib_s);
        println!(
            "  {n} shard{}  {mib_s:8.0} MiB/s aggregate  ({:.2}x one shard)",
            if n == 1 { " " } else { "s" },
            mib_s / base
        );
    }
}
