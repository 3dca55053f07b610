//! Figures for the speed issue, printed, not asserted: CPU-seconds a proxy
//! spends per GiB it passes on, for a 1 GiB ByteStream read from an upstream
//! `blob-access serve` over memory, same run, best of 3:
//! - `serve` with `resumable_grpc` to the upstream (verifies every byte;
//!   goal: <= 1.0 CPU-s/GiB);
//! - `serve` with the plain `grpc` node (verifies too);
//! - nginx's `grpc_pass` (one worker; hashes nothing), the anchor;
//! - SHA-256 alone in this process, over a buffer in cache as a proxy hashes
//!   each message: with nginx's relay, the floor of any proxy that verifies
//!   what it passes on.
//!
//! The client is this process (a `grpc` node that verifies); only the
//! proxy's own user+system time is counted, read from /proc.
//!
//! Needs nginx with grpc_pass on PATH (`scripts/setup-test-env.sh`).
//! Run: `cargo bench --bench proxy_cpu` (BLOB_MIB, default 1024).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

/// CPU seconds (user + system) of `pid` so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) end with ')'.
    let rest = stat.rsplit(") ").next().unwrap_or("");
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    let hz = 100.0; // USER_HZ, 100 on every Linux ABI
    (ticks(11).unwrap_or(0.0) + ticks(12).unwrap_or(0.0)) / hz
}

/// Pids of `parent` and its children (nginx's master and workers).
fn with_children(parent: u32) -> Vec<u32> {
    let mut pids = vec![parent];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let ppid = stat.rsplit(") ").next().and_then(|r| r.split(' ').nth(1));
        if ppid == Some(&parent.to_string()) {
            pids.push(pid);
        }
    }
    pids
}

/// Best of 3: (CPU-seconds of `pids` per GiB, wall seconds) of one verified get through `port`.
fn per_gib(rt: &tokio::runtime::Runtime, pids: &[u32], port: u16, served: &Served) -> (f64, f64) {
    let yaml = format!("grpc: {{endpoint: \"grpc://127.0.0.1:{port}\"}}");
    let gib = served.digest.size_bytes() as f64 / (1u64 << 30) as f64;
    let total = || pids.iter().map(|&p| cpu_secs(p)).sum::<f64>();
    let mut best = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        let before = total();
        let wall = rt.block_on(timed_get(&yaml, &served.digest));
        let cpu = (total() - before) / gib;
        if cpu < best.0 {
            best = (cpu, wall);
        }
    }
    best
}

struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `serve` on a free port with `yaml` as its CAS tree.
fn serve_proxy(served: &Served, name: &str, yaml: &str) -> (Proxy, u16) {
    let config = served.config(name, yaml);
    let port = free_port();
    let child = Command::new(bin())
        .args(["serve", "-q", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--config")
        .arg(config)
        .spawn()
        .unwrap();
    wait_for(port);
    (Proxy(child), port)
}

struct Nginx(PathBuf);

impl Nginx {
    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/nginx.sh")
    }

    fn start(dir: PathBuf, port: u16, upstream: u16) -> Option<Self> {
        let ok = Command::new("bash")
            .arg(Self::script())
            .args(["start"])
            .arg(&dir)
            .args([port.to_string(), upstream.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Nginx(dir))
    }

    fn pids(&self) -> Vec<u32> {
        let master = std::fs::read_to_string(self.0.join("nginx.pid")).unwrap();
        with_children(master.trim().parse().unwrap())
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(Self::script())
            .arg("stop")
            .arg(&self.0)
            .status();
    }
}

/// Seconds per GiB of one SHA-256 pass over a `chunk`-byte buffer hashed again
/// and again (best of 3). A proxy hashes each message just after receiving it,
/// while it is in cache, so the 1 MiB figure is its part of the floor, the part
/// no relay design removes; 64 MiB shows what hashing from memory costs.
fn sha256_per_gib(chunk: usize) -> f64 {
    use sha2::Digest as _;
    let buf = vec![7u8; chunk];
    let mut best = f64::MAX;
    for _ in 0..3 {
        let start = std::time::Instant::now();
        let mut h = sha2::Sha256::new();
        for _ in 0..(1 << 30) / chunk {
            h.update(&buf);
        }
        std::hint::black_box(h.finalize());
        best = best.min(start.elapsed().as_secs_f64());
    }
    best
}

fn main() {
    if listing_only() {
        return;
    }
    let mib = blob_mib();
    let served = Served::start(mib);
    let up = served.port;
    let rt = tokio::runtime::Runtime::new().unwrap();
    println!(
        "a {mib} MiB read through each proxy from serve over memory; CPU-s of the proxy per GiB, best of 3"
    );
    let row = |name: &str, (cpu, wall): (f64, f64)| {
        println!(
            "  {name:34} {cpu:5.2} CPU-s/GiB  ({:.0} MiB/s)",
            mib as f64 / wall
        );
    };

    let upstream = format!("grpc: {{endpoint: \"grpc://127.0.0.1:{up}\"}}");
    let (resumable, port) = serve_proxy(
        &served,
        "resumable.yaml",
        &format!("resumable_grpc:\n  {upstream}\n"),
    );
    let resumable_cpu = per_gib(&rt, &[resumable.0.id()], port, &served);
    drop(resumable);
    let (plain, port) = serve_proxy(&served, "plain.yaml", &upstream);
    let plain_cpu = per_gib(&rt, &[plain.0.id()], port, &served);
    drop(plain);
    row("serve, resumable_grpc (goal <= 1.0)", resumable_cpu);
    row("serve, grpc", plain_cpu);

    let port = free_port();
    let sha = sha256_per_gib(1 << 20);
    println!("  {:34} {sha:5.2} s/GiB", "sha256 alone, 1 MiB in cache");
    let from_memory = sha256_per_gib(64 << 20);
    println!(
        "  {:34} {from_memory:5.2} s/GiB",
        "sha256 alone, 64 MiB from memory"
    );
    match Nginx::start(served.path("nginx"), port, up) {
        Some(nginx) => {
            let relay = per_gib(&rt, &nginx.pids(), port, &served);
            row("nginx grpc_pass (anchor)", relay);
            println!(
                "  {:34} {:5.2} CPU-s/GiB",
                "floor: sha256 + nginx's relay",
                sha + relay.0
            );
        }
        None => println!("  nginx grpc_pass: nginx did not start (run scripts/setup-test-env.sh)"),
    }
    // The upstream reads from memory, verifies nothing, and sends: the floor of a hop.
    row(
        "upstream serve over memory",
        per_gib(&rt, &[served.pid()], up, &served),
    );
}
