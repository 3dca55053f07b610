//! What the benchmarks share: a `blob-access serve` child over memory holding
//! one random blob, timed gets through any config tree, peak RSS of a child.
#![allow(dead_code)]

use blob_access::{BuildContext, Digest, ReadRange};
use futures::StreamExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Instant;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_blob-access")
}

/// Blob size in MiB: `BLOB_MIB`, default 1024.
pub fn blob_mib() -> u64 {
    std::env::var("BLOB_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
}

/// `cargo test --benches` runs benches with `--list`; there is nothing to test.
pub fn listing_only() -> bool {
    std::env::args().any(|a| a == "--list")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn write_random(path: &std::path::Path, size: u64) {
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
pub fn timed_child(cmd: &mut Command) -> (f64, f64) {
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

/// `blob-access get -q --config config DIGEST >/dev/null`: (seconds, peak RSS in MiB).
pub fn timed_cli_get(config: &std::path::Path, digest: impl std::fmt::Display) -> (f64, f64) {
    timed_child(
        Command::new(bin())
            .args(["get", "-q", "--config"])
            .arg(config)
            .arg(digest.to_string())
            .stdout(std::fs::File::create("/dev/null").unwrap()),
    )
}

/// Blocks until something accepts TCP connections on 127.0.0.1:`port`.
pub fn wait_for(port: u16) {
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The smallest of `n` measurements.
pub fn best_of(n: usize, mut f: impl FnMut() -> f64) -> f64 {
    (0..n).map(|_| f()).fold(f64::MAX, f64::min)
}

/// `blob-access serve` over the embedded in-memory CAS, holding one random blob.
pub struct Served {
    child: Child,
    pub port: u16,
    pub digest: Digest,
    pub dir: tempfile::TempDir,
}

impl Served {
    /// `serve` over memory with nothing stored (`digest` is the empty blob's).
    pub fn empty() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new(bin())
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .spawn()
            .unwrap();
        wait_for(port);
        Served {
            child,
            port,
            digest: Digest::of(b""),
            dir,
        }
    }

    pub fn start(mib: u64) -> Self {
        let mut served = Self::empty();
        let blob = served.dir.path().join("blob");
        write_random(&blob, mib << 20);
        let port = served.port;
        let config = served.config(
            "direct.yaml",
            &format!("grpc: {{endpoint: \"grpc://127.0.0.1:{port}\"}}"),
        );
        served.digest = put_cli(&config, &blob);
        std::fs::remove_file(&blob).unwrap();
        served
    }

    /// Writes a config file in the bench's directory.
    pub fn config(&self, name: &str, yaml: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, yaml).unwrap();
        path
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Uploads `file` with `blob-access put --config config` and returns its digest.
pub fn put_cli(config: &std::path::Path, file: &std::path::Path) -> Digest {
    let out = Command::new(bin())
        .args(["put", "-q", "--config"])
        .arg(config)
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Seconds of one full, verified get of `digest` through the tree `yaml`.
pub async fn timed_get(yaml: &str, digest: &Digest) -> f64 {
    let node =
        blob_access_config::load_str(yaml, blob_access_config::Format::Yaml, "bench").unwrap();
    let cas = node.build_cas(&BuildContext::root()).unwrap();
    timed_drain(&*cas, digest).await
}

/// Seconds of one full, verified get of `digest` from `cas`.
pub async fn timed_drain(cas: &dyn blob_access::BlobAccess, digest: &Digest) -> f64 {
    let start = Instant::now();
    let mut s = cas.get(digest, ReadRange::FULL);
    let mut n = 0u64;
    while let Some(c) = s.next().await {
        n += c.unwrap().len() as u64;
    }
    assert_eq!(n, digest.size_bytes());
    start.elapsed().as_secs_f64()
}
