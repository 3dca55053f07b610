//! Figures for the Foundation issue, printed, not asserted:
//! - a 1 GiB full get through the `grpc` node from `blob-access serve` over
//!   `memory`, against a bare tonic ByteStream read loop on the same server
//!   (our get also hashes every byte);
//! - wall time and peak RSS of `blob-access get -o FILE` for that blob.
//!
//! Run: `cargo bench --bench get_throughput` (BLOB_MIB=256 for a quicker run).

use blob_access::bytestream_proto::byte_stream_client::ByteStreamClient;
use blob_access::bytestream_proto::ReadRequest;
use blob_access::{BuildContext, BuildNode, Digest, ReadRange};
use futures::StreamExt;
use std::process::Command;
use std::time::Instant;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_random(path: &std::path::Path, size: u64) {
    use rand::{RngCore, SeedableRng};
    use std::io::Write;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..size >> 20 {
        rng.fill_bytes(&mut buf);
        f.write_all(&buf).unwrap();
    }
    f.flush().unwrap();
}

/// Runs a command and returns (seconds, peak RSS in MiB). The peak is read
/// from /proc (VmHWM, reset at exec) while the child runs: wait4's ru_maxrss
/// would also count the pages the child shared with this process before exec.
fn timed_child(cmd: &mut Command) -> (f64, f64) {
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    loop {
        if let Ok(text) = std::fs::read_to_string(&status_path) {
            if let Some(kib) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                peak_kib = peak_kib.max(kib);
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "child failed: {status}");
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    (start.elapsed().as_secs_f64(), peak_kib as f64 / 1024.0)
}

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

async fn our_get(port: u16, digest: &Digest) -> f64 {
    let yaml = format!("grpc: {{endpoint: \"grpc://127.0.0.1:{port}\"}}");
    let node =
        blob_access_config::load_str(&yaml, blob_access_config::Format::Yaml, "bench").unwrap();
    let cas = node.build(&BuildContext::root()).unwrap();
    let start = Instant::now();
    let mut s = cas.get(digest, ReadRange::FULL);
    let mut n = 0u64;
    while let Some(c) = s.next().await {
        n += c.unwrap().len() as u64;
    }
    assert_eq!(n, digest.size_bytes());
    start.elapsed().as_secs_f64()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a list; there is nothing to test here.
    }
    let mib: u64 = std::env::var("BLOB_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let bin = env!("CARGO_BIN_EXE_blob-access");
    let dir = tempfile::tempdir().unwrap();
    let blob = dir.path().join("blob");
    write_random(&blob, mib << 20);

    let port = free_port();
    let mut serve = Command::new(bin)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .spawn()
        .unwrap();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let config = dir.path().join("c.yaml");
    std::fs::write(
        &config,
        format!("grpc: {{endpoint: \"grpc://127.0.0.1:{port}\"}}\n"),
    )
    .unwrap();
    let out = Command::new(bin)
        .args(["put", "-q", "--config"])
        .arg(&config)
        .arg(&blob)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let digest: Digest = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    std::fs::remove_file(&blob).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut bare, mut ours) = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        bare = bare.min(rt.block_on(bare_loop(port, &digest)));
        ours = ours.min(rt.block_on(our_get(port, &digest)));
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

    let out_file = dir.path().join("out");
    let (secs, rss) = timed_child(
        Command::new(bin)
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
    let (secs, rss) = timed_child(
        Command::new(bin)
            .args(["get", "-q", "--config"])
            .arg(&config)
            .arg(digest.to_string())
            .stdout(std::fs::File::create("/dev/null").unwrap()),
    );
    println!(
        "cli get > /dev/null:           {:.2}s {:.0} MiB/s, peak RSS {:.1} MiB",
        secs,
        rate(secs),
        rss
    );
    assert_eq!(std::fs::metadata(&out_file).unwrap().len(), mib << 20);
    let _ = serve.kill();
    let _ = serve.wait();
}
