//! Figures for the Foundation issue, printed, not asserted:
//! - a 1 GiB full get through the `grpc` node from `blob-access serve` over
//!   `memory`, against a bare tonic ByteStream read loop on the same server
//!   (our get also hashes every byte);
//! - wall time and peak RSS of `blob-access get -o FILE` for that blob.
//!
//! Run: `cargo bench --bench get_throughput` (BLOB_MIB=256 for a quicker run).

mod common;

use blob_access::bytestream_proto::byte_stream_client::ByteStreamClient;
use blob_access::bytestream_proto::ReadRequest;
use blob_access::Digest;
use common::*;
use futures::StreamExt;
use std::process::Command;
use std::time::Instant;

async fn bare_loop(port: u16, digest: &Digest) -> f64 {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(32 << 20)
        .max_frame_size(1 << 20)
        .connect()
        .await
        .unwrap();
    let mut client = ByteStreamClient::new(channel).max_decoding_message_size(64 << 20);
    let start = Instant::now();
    let mut s = client
        .read(ReadRequest {
            resource_name: format!("blobs/{}/{}", digest.hash(), digest.size_bytes()),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0u64;
    while let Some(m) = s.next().await {
        n += m.unwrap().data.len() as u64;
    }
    assert_eq!(n, digest.size_bytes());
    start.elapsed().as_secs_f64()
}

fn main() {
    if listing_only() {
        return;
    }
    let mib = blob_mib();
    let served = Served::start(mib);
    let (port, digest) = (served.port, served.digest.clone());
    let yaml = format!("grpc: {{endpoint: \"grpc://127.0.0.1:{port}\"}}");
    let config = served.config("c.yaml", &yaml);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut bare, mut ours) = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        bare = bare.min(rt.block_on(bare_loop(port, &digest)));
        ours = ours.min(rt.block_on(timed_get(&yaml, &digest)));
    }
    let rate = |s: f64| (mib as f64) / s;
    // The ceiling of any verified read: SHA-256 of the same amount on this CPU.
    let buf = vec![7u8; 64 << 20];
    let start = Instant::now();
    let mut h = blob_access::DigestFunction::Sha256.hasher();
    for _ in 0..mib / 64 {
        h.update(&buf);
    }
    let _ = h.finish_hex();
    let hash_secs = start.elapsed().as_secs_f64();
    println!("blob: {mib} MiB, best of 3 each, same server, same run");
    println!(
        "bare tonic ByteStream read loop: {:.2}s {:.0} MiB/s",
        bare,
        rate(bare)
    );
    println!(
        "grpc node get (verified):        {:.2}s {:.0} MiB/s",
        ours,
        rate(ours)
    );
    println!(
        "SHA-256 alone, in memory:        {:.2}s {:.0} MiB/s",
        hash_secs,
        rate(hash_secs)
    );
    println!(
        "ratio get/bare:                  {:.3} (goal >= 0.95)",
        bare / ours
    );
    println!(
        "ratio get/min(bare, sha256):     {:.3}",
        bare.max(hash_secs) / ours
    );

    let out_file = served.path("out");
    let (secs, rss) = timed_child(
        Command::new(bin())
            .args(["get", "-q", "--config"])
            .arg(&config)
            .arg(digest.to_string())
            .arg("-o")
            .arg(&out_file),
    );
    println!(
        "cli get -o FILE (incl. fsync): {:.2}s {:.0} MiB/s, peak RSS {:.1} MiB (goal <= 64 MiB)",
        secs,
        rate(secs),
        rss
    );
    let (secs, rss) = timed_cli_get(&config, &digest);
    println!(
        "cli get > /dev/null:           {:.2}s {:.0} MiB/s, peak RSS {:.1} MiB",
        secs,
        rate(secs),
        rss
    );
    assert_eq!(std::fs::metadata(&out_file).unwrap().len(), mib << 20);
}
