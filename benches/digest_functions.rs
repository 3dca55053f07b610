//! Figures for the digest functions issue, printed, not asserted: the same
//! 1 GiB blob under SHA-256 and under BLAKE3, each
//! - put into `serve` (over memory) and read back, verified, with `get`
//!   (wall time and the client's CPU seconds);
//! - read through a second `serve` that proxies to the first (`grpc` node):
//!   the proxy's CPU seconds per GiB;
//!
//! beside the floors: `sha256sum` and `b3sum` over the same file (page cache).
//!
//! Run: `cargo bench --bench digest_functions` (BLOB_MIB=256 for a quicker run).

mod common;

use common::*;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Instant;

/// `serve --config` of `yaml` on a free port.
fn serve(dir: &Path, name: &str, yaml: &str) -> (Child, u16) {
    let config = dir.join(name);
    std::fs::write(&config, yaml).unwrap();
    let port = free_port();
    let child = Command::new(bin())
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--config",
        ])
        .arg(&config)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(port);
    (child, port)
}

fn grpc_config(dir: &Path, name: &str, port: u16) -> std::path::PathBuf {
    let path = dir.join(name);
    let yaml = format!("grpc: {{endpoint: \"grpc://127.0.0.1:{port}\", instance_name: \"\"}}");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// CPU seconds (user + system) of the children this process reaped so far.
fn children_cpu() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// CPU seconds (user + system) a running process used so far.
fn process_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// (wall seconds, CPU seconds) of a command that must succeed.
fn timed(cmd: &mut Command) -> (f64, f64) {
    let cpu = children_cpu();
    let start = Instant::now();
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (start.elapsed().as_secs_f64(), children_cpu() - cpu)
}

fn put(config: &Path, function: &str, file: &Path) -> (String, f64) {
    let start = Instant::now();
    let out = Command::new(bin())
        .args(["put", "-q", "--digest-function", function, "--config"])
        .arg(config)
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let digest = String::from_utf8(out.stdout).unwrap().trim().to_string();
    (digest, start.elapsed().as_secs_f64())
}

fn get(config: &Path, function: &str, digest: &str) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(["get", "-q", "--digest-function", function, "--config"])
        .arg(config)
        .args([digest, "-o", "/dev/null"]);
    cmd
}

fn main() {
    if listing_only() {
        return;
    }
    let mib = blob_mib();
    let gib = mib as f64 / 1024.0;
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let file = dir.path().join("blob");
    write_random(&file, mib << 20);
    let (mut upstream, up_port) = serve(dir.path(), "up.yaml", "memory: {max_size_bytes: 3GiB}");
    let proxy_yaml =
        format!("grpc: {{endpoint: \"grpc://127.0.0.1:{up_port}\", instance_name: \"\"}}");
    let (mut proxy, proxy_port) = serve(dir.path(), "proxy.yaml", &proxy_yaml);
    let direct = grpc_config(dir.path(), "direct.yaml", up_port);
    let via_proxy = grpc_config(dir.path(), "via-proxy.yaml", proxy_port);

    println!("{mib} MiB, one run each (best of 3 for gets); 2 cores, a noisy machine");
    let mut rows = Vec::new();
    for function in ["sha256", "blake3"] {
        let (digest, put_secs) = put(&direct, function, &file);
        let mut best = (f64::MAX, 0.0);
        for _ in 0..3 {
            let (secs, cpu) = timed(&mut get(&direct, function, &digest));
            if secs < best.0 {
                best = (secs, cpu);
            }
        }
        let before = process_cpu(proxy.id());
        let (proxy_secs, _) = timed(&mut get(&via_proxy, function, &digest));
        let proxy_cpu = process_cpu(proxy.id()) - before;
        rows.push((
            function,
            put_secs,
            best.0,
            best.1,
            proxy_secs,
            proxy_cpu / gib,
        ));
    }
    let floor = |tool: &str| {
        timed(
            Command::new(tool)
                .arg(&file)
                .stdout(std::process::Stdio::null()),
        )
    };
    let (sha_floor, _) = floor("sha256sum");
    let b3_floor = Command::new("b3sum")
        .arg("--version")
        .output()
        .is_ok()
        .then(|| floor("b3sum").0);

    println!("| function | put s | get s | get MiB/s | get client CPU-s | via proxy s | proxy CPU-s/GiB |");
    println!("|---|---|---|---|---|---|---|");
    for (f, put_s, get_s, cpu, via_s, proxy) in &rows {
        let rate = mib as f64 / get_s;
        println!(
            "| {f} | {put_s:.2} | {get_s:.2} | {rate:.0} | {cpu:.2} | {via_s:.2} | {proxy:.2} |"
        );
    }
    let (sha, b3) = (&rows[0], &rows[1]);
    println!(
        "get speed-up blake3/sha256: {:.2}x (goal >= 1.6x)",
        sha.2 / b3.2
    );
    println!(
        "proxy CPU-s/GiB: sha256 {:.2}, blake3 {:.2} (goal <= 0.8 with blake3)",
        sha.5, b3.5
    );
    println!(
        "floors over the same file: sha256sum {sha_floor:.2} s ({:.0} MiB/s)",
        mib as f64 / sha_floor
    );
    match b3_floor {
        Some(s) => println!(
            "                           b3sum {s:.2} s ({:.0} MiB/s)",
            mib as f64 / s
        ),
        None => println!("                           b3sum not installed"),
    }
    let _ = proxy.kill();
    let _ = upstream.kill();
    let _ = proxy.wait();
    let _ = upstream.wait();
}
