//! Figures for the `s3` node against a private three-node Garage cluster
//! (`scripts/garage.sh`: replication 3, quorum 2, all on loopback), printed,
//! not asserted, one run of each:
//! - a 1 GiB random blob (BLOB_MIB): `blob-access put` and `get -o` with a
//!   config of one `s3` node vs `aws s3 cp` up and down (awscli's defaults:
//!   8 MiB parts, 10 at once), goal: ours faster both ways; beside the hash
//!   floor (SHA-256 of the file in this process with the `sha2` crate that
//!   blob-access uses, and coreutils' `sha256sum`); peak RSS of every process;
//! - that put with part_size 8/16/32 MiB x parts_in_flight 2/4/8, and with
//!   the defaults under AWS_UNSIGNED_PAYLOAD=true (object_store then sends
//!   `UNSIGNED-PAYLOAD` instead of hashing every request body for SigV4);
//! - find-missing of 10,000 digests, half stored, through the CLI (stdin, one
//!   call): straight to s3 with concurrent_heads 16/64/256, and through serve;
//! - a tree of 10,000 files of 1-16 KiB in 100 directories (TREE_FILES):
//!   `put` of its files and Directory messages and `fetch-tree`, straight to
//!   s3 and through `blob-access serve` whose CAS is the s3 node.
//!
//! Every upload of the big blob goes into a fresh cluster (Garage keeps a
//! deleted object's blocks for 10 minutes and dedups equal blocks, so a
//! second upload of the same bytes would be cheaper). The blob, the
//! clusters' data and all outputs live in /dev/shm when it has room (else
//! the temp dir; S3_BENCH_DIR overrides): this measures the clients and
//! Garage's CPU, not a disk. Client and three Garage nodes share the
//! machine's cores, so Garage's CPU is part of every figure.
//!
//! Needs garage (PATH or $CARGO_HOME/bin) and awscli (`$AWS`,
//! `target/venv/bin/aws` or PATH; without it the comparison is skipped), as
//! `scripts/setup-test-env.sh` installs them. Run: `cargo bench --bench
//! s3_transfer` (S3_BENCH_SWEEP=0 skips the part size table).

mod common;

use blob_access::proto::{Directory, DirectoryNode, FileNode};
use blob_access::Digest;
use common::*;
use prost::Message;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn garage_installed() -> bool {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cargo"));
    Command::new("garage").arg("--version").output().is_ok()
        || cargo_home.join("bin/garage").exists()
}

fn aws_bin() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("AWS").map(PathBuf::from),
        std::env::var_os("CARGO_TARGET_DIR").map(|t| PathBuf::from(t).join("venv/bin/aws")),
        Some(root().join("target/venv/bin/aws")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.exists())
        .or_else(|| {
            let found = Command::new("aws").arg("--version").output();
            found.is_ok().then(|| PathBuf::from("aws"))
        })
}

/// The first of `n` consecutive free loopback ports.
fn free_ports(n: u16) -> u16 {
    loop {
        let base = free_port();
        if base > 65535 - n {
            continue;
        }
        if (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
}

/// A fresh cluster from `scripts/garage.sh` in `dir`; stopped and its data
/// removed on drop.
struct Garage {
    dir: PathBuf,
    port: u16,
    key_id: String,
    secret: String,
}

impl Garage {
    fn start(dir: PathBuf) -> Garage {
        let port = free_ports(9);
        let out = Command::new("bash")
            .arg(root().join("scripts/garage.sh"))
            .arg("start")
            .arg(&dir)
            .arg(port.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "garage.sh start failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let env = std::fs::read_to_string(dir.join("env")).unwrap();
        let var = |name: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .unwrap()
                .to_string()
        };
        let mut servers = SERVERS.lock().unwrap();
        for i in 1..=3 {
            let pid = std::fs::read_to_string(dir.join(format!("node{i}.pid"))).unwrap();
            servers.push(pid.trim().parse().unwrap());
        }
        Garage {
            key_id: var("AWS_ACCESS_KEY_ID"),
            secret: var("AWS_SECRET_ACCESS_KEY"),
            dir,
            port,
        }
    }

    /// Node 1's S3 endpoint (every client here talks to node 1).
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// An `s3` node with `extra` fields (", part_size: 8MiB").
    fn node(&self, extra: &str) -> String {
        format!(
            "s3: {{bucket: blob-access, endpoint: \"{}\", region: garage, access_key_id: {}, secret_access_key: {}{extra}}}",
            self.endpoint(),
            self.key_id,
            self.secret
        )
    }

    /// A config file of one `s3` node.
    fn config(&self, name: &str, extra: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, self.node(extra)).unwrap();
        path
    }

    /// `aws s3 cp FROM TO` against node 1, with only this cluster's key.
    fn aws_cp(&self, aws: &Path, from: &str, to: &str) -> Command {
        let mut cmd = Command::new(aws);
        cmd.args(["s3", "cp", "--only-show-errors", "--no-progress"])
            .args([from, to, "--endpoint-url", &self.endpoint()])
            .env("AWS_ACCESS_KEY_ID", &self.key_id)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret)
            .env("AWS_DEFAULT_REGION", "garage")
            .env("AWS_REGION", "garage")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
        cmd
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        SERVERS.lock().unwrap().clear();
        let _ = Command::new("bash")
            .arg(root().join("scripts/garage.sh"))
            .arg("stop")
            .arg(&self.dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Servers whose CPU time each [`run`] counts: the running cluster's nodes.
static SERVERS: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());
/// And serve's, apart.
static SERVE: std::sync::Mutex<Option<u32>> = std::sync::Mutex::new(None);

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// User + system seconds of the processes `pids` so far.
fn cpu_of(pids: &[u32]) -> f64 {
    let ticks: u64 = pids
        .iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command (which may hold spaces): state is
            // field 3, utime and stime are 14 and 15.
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    ticks as f64 / clock_ticks()
}

/// User + system seconds of Garage's nodes and of serve so far.
fn servers_cpu() -> (f64, f64) {
    let garage = cpu_of(&SERVERS.lock().unwrap());
    let serve = cpu_of(&SERVE.lock().unwrap().iter().copied().collect::<Vec<_>>());
    (garage, serve)
}

/// User + system seconds of this process's waited-for children so far.
fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        ru
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

/// What one child did: seconds, peak RSS, CPU seconds (its own, and the
/// servers' meanwhile) and its stderr.
struct Run {
    secs: f64,
    rss_mib: f64,
    cpu: f64,
    servers_cpu: f64,
    serve_cpu: f64,
    log: String,
}

impl Run {
    /// Lines of its log that tell of trouble: warnings, errors, retries.
    fn trouble(&self) -> Vec<&str> {
        self.log
            .lines()
            .filter(|l| {
                let l = l.to_ascii_lowercase();
                l.contains("warn") || l.contains("error") || l.contains("retry")
            })
            .collect()
    }
}

/// Runs `cmd` (stdout to `stdout` or /dev/null, stderr kept) and polls its
/// peak RSS (VmHWM, reset at exec) from /proc; panics with its log if it fails.
fn run(cmd: &mut Command, stdin: Option<&[u8]>, stdout: Option<&Path>) -> Run {
    let err_path = std::env::temp_dir().join(format!("s3-bench-stderr-{}", std::process::id()));
    cmd.stderr(File::create(&err_path).unwrap());
    match stdout {
        Some(p) => cmd.stdout(File::create(p).unwrap()),
        None => cmd.stdout(Stdio::null()),
    };
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let (cpu0, servers0) = (children_cpu(), servers_cpu());
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        let input = input.to_vec();
        std::thread::spawn(move || pipe.write_all(&input).unwrap());
    }
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    let status = loop {
        if let Ok(text) = std::fs::read_to_string(&status_path) {
            let hwm = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
            peak_kib = peak_kib.max(hwm.unwrap_or(0));
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let secs = start.elapsed().as_secs_f64();
    let (cpu, servers) = (children_cpu() - cpu0, servers_cpu());
    let (servers, serve) = (servers.0 - servers0.0, servers.1 - servers0.1);
    let log = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_file(&err_path);
    assert!(status.success(), "{cmd:?} failed ({status}):\n{log}");
    Run {
        secs,
        rss_mib: peak_kib as f64 / 1024.0,
        cpu,
        servers_cpu: servers,
        serve_cpu: serve,
        log,
    }
}

/// `blob-access ARGS...` with info logging (retries of object_store show).
fn ours(args: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(args).env("RUST_LOG", "info");
    cmd
}

/// `HASH/SIZE` of a file with the sha2 crate, and the seconds it took.
fn hash_file(path: &Path) -> (String, f64) {
    use sha2::Digest as _;
    let start = Instant::now();
    let mut f = File::open(path).unwrap();
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    (
        format!("{}/{size}", hex::encode(h.finalize())),
        start.elapsed().as_secs_f64(),
    )
}

/// Where the bench's files go: S3_BENCH_DIR, else /dev/shm if it has room
/// for the blob, three replicas of it and a download (plus 2 GiB), else the
/// temp dir.
fn work_dir(blob: u64) -> tempfile::TempDir {
    if let Some(d) = std::env::var_os("S3_BENCH_DIR") {
        return tempfile::tempdir_in(d).unwrap();
    }
    let free = |p: &str| -> u64 {
        let out = Command::new("df")
            .args(["-B1", "--output=avail", p])
            .output()
            .ok();
        out.and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|t| t.lines().nth(1).and_then(|l| l.trim().parse().ok()))
            .unwrap_or(0)
    };
    if free("/dev/shm") > 5 * blob + (2 << 30) {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

fn mibs(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs
}

fn note_trouble(what: &str, run: &Run) {
    let lines = run.trouble();
    if !lines.is_empty() {
        println!("  ! {what}: {} log lines of trouble, e.g.:", lines.len());
        for l in lines.iter().take(5) {
            println!("      {l}");
        }
    }
}

/// `files` files of 1-16 KiB of random bytes in 100 directories under
/// `root/tree`, and one file per REAPI Directory message under `root/dirs`
/// (the root's last): (all paths, the root's `HASH/SIZE`, bytes of the files).
fn make_tree(root: &Path, files: usize) -> (Vec<PathBuf>, String, u64) {
    use rand::{Rng, RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut paths = Vec::with_capacity(files + 101);
    let mut listings: Vec<Vec<FileNode>> = vec![Vec::new(); 100.min(files)];
    let mut bytes = 0;
    for i in 0..files {
        let d = i % listings.len();
        let dir = root.join(format!("tree/d{d:03}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut data = vec![0u8; rng.random_range(1024..=16384)];
        rng.fill_bytes(&mut data);
        bytes += data.len() as u64;
        let name = format!("f{i:05}");
        std::fs::write(dir.join(&name), &data).unwrap();
        listings[d].push(FileNode {
            name: name.clone(),
            digest: Some(Digest::of(&data).to_proto()),
            ..Default::default()
        });
        paths.push(dir.join(name));
    }
    let dirs = root.join("dirs");
    std::fs::create_dir_all(&dirs).unwrap();
    let mut top = Directory::default();
    for (d, files) in listings.into_iter().enumerate() {
        let msg = Directory {
            files,
            ..Default::default()
        }
        .encode_to_vec();
        let path = dirs.join(format!("d{d:03}"));
        std::fs::write(&path, &msg).unwrap();
        top.directories.push(DirectoryNode {
            name: format!("d{d:03}"),
            digest: Some(Digest::of(&msg).to_proto()),
        });
        paths.push(path);
    }
    let msg = top.encode_to_vec();
    let path = dirs.join("root");
    std::fs::write(&path, &msg).unwrap();
    paths.push(path);
    let root_digest = Digest::of(&msg);
    (
        paths,
        format!("{}/{}", root_digest.hash(), root_digest.size_bytes()),
        bytes,
    )
}

/// `blob-access serve` over the cluster's s3 node, killed on drop.
struct Serve {
    child: std::process::Child,
    port: u16,
    log: PathBuf,
}

impl Serve {
    fn start(garage: &Garage, extra: &str) -> Serve {
        let config = garage.dir.join("serve.yaml");
        std::fs::write(
            &config,
            format!(
                "content_addressable_storage:\n  {0}\naction_cache:\n  completeness_checking:\n    backend:\n      {0}\n",
                garage.node(extra)
            ),
        )
        .unwrap();
        let port = free_port();
        let log = garage.dir.join("serve.log");
        let child = Command::new(bin())
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--config",
            ])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        wait_for(port);
        *SERVE.lock().unwrap() = Some(child.id());
        Serve { child, port, log }
    }

    fn config(&self, dir: &Path) -> PathBuf {
        let path = dir.join("via-serve.yaml");
        std::fs::write(
            &path,
            format!("grpc: {{endpoint: \"grpc://127.0.0.1:{}\"}}", self.port),
        )
        .unwrap();
        path
    }

    fn peak_rss_mib(&self) -> f64 {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        *SERVE.lock().unwrap() = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn main() {
    if listing_only() {
        return;
    }
    if !garage_installed() {
        eprintln!("garage is not installed: run scripts/setup-test-env.sh first");
        return;
    }
    let aws = aws_bin();
    let mib = blob_mib();
    let size = mib << 20;
    let work = work_dir(size);
    let w = work.path();
    let cluster_dir = || w.join("garage");
    println!(
        "s3 node vs awscli against a three-node Garage 2.5 cluster on loopback (replication 3), \
         files and cluster data in {}; {} cores, shared with the cluster (and whatever else runs)",
        w.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // --- (a), (b): the big blob ---------------------------------------------------------
    let blob = w.join("blob");
    write_random(&blob, size);
    let (digest, hash_secs) = hash_file(&blob);
    let sha256sum = run(Command::new("sha256sum").arg(&blob), None, None);
    let out = w.join("out");

    let garage = Garage::start(cluster_dir());
    let config = garage.config("s3.yaml", "");
    let b = blob.to_str().unwrap();
    let o = out.to_str().unwrap();
    let c = config.to_str().unwrap();
    let put = run(
        &mut ours(&["put", "-q", "-v", "--config", c, b]),
        None,
        None,
    );
    let get = run(
        &mut ours(&["get", "-q", "-v", "--config", c, &digest, "-o", o]),
        None,
        None,
    );
    assert_eq!(std::fs::metadata(&out).unwrap().len(), size);
    std::fs::remove_file(&out).unwrap();
    drop(garage);

    let theirs = aws.as_ref().map(|aws| {
        let garage = Garage::start(cluster_dir());
        let up = run(
            &mut garage.aws_cp(aws, b, "s3://blob-access/aws/blob"),
            None,
            None,
        );
        let down = run(
            &mut garage.aws_cp(aws, "s3://blob-access/aws/blob", o),
            None,
            None,
        );
        assert_eq!(std::fs::metadata(&out).unwrap().len(), size);
        std::fs::remove_file(&out).unwrap();
        (up, down)
    });

    println!("{mib} MiB random blob (one run each; each upload into a fresh cluster):");
    let line = |what: &str, r: &Run| {
        println!(
            "  {what:<40} {:6.2} s {:5.0} MiB/s  peak RSS {:6.1} MiB  CPU s: own {:5.1}, Garage {:5.1}",
            r.secs,
            mibs(size, r.secs),
            r.rss_mib,
            r.cpu,
            r.servers_cpu
        )
    };
    line("blob-access put (s3 node, defaults)", &put);
    line("blob-access get -o FILE (s3 node)", &get);
    if let Some((up, down)) = &theirs {
        line("aws s3 cp FILE s3://... (upload)", up);
        line("aws s3 cp s3://... FILE (download)", down);
        println!(
            "  ours vs aws: upload {:.2}x as fast, download {:.2}x as fast (goal > 1 both)",
            up.secs / put.secs,
            down.secs / get.secs
        );
    } else {
        println!("  (awscli not found: no comparison; run scripts/setup-test-env.sh)");
    }
    println!(
        "  floor: SHA-256 in-process (sha2)             {hash_secs:6.2} s {:6.0} MiB/s",
        mibs(size, hash_secs)
    );
    println!(
        "  floor: sha256sum (coreutils)                 {:6.2} s {:6.0} MiB/s",
        sha256sum.secs,
        mibs(size, sha256sum.secs)
    );
    println!(
        "  (CPU s: user+system of the client process, and of the three Garage nodes meanwhile)"
    );
    note_trouble("blob-access put", &put);
    note_trouble("blob-access get", &get);
    if let Some((up, down)) = &theirs {
        note_trouble("aws upload", up);
        note_trouble("aws download", down);
    }

    // --- part size x parts in flight --------------------------------------------------------
    if env_usize("S3_BENCH_SWEEP", 1) != 0 {
        println!(
            "put of {mib} MiB by part_size x parts_in_flight, each into a fresh cluster \
             (s, MiB/s, peak RSS MiB, CPU s own+Garage):"
        );
        println!(
            "  {:<10} {:>30} {:>30} {:>30}",
            "part_size", "2 in flight", "4 in flight", "8 in flight"
        );
        let mut trouble = Vec::new();
        for part in [8, 16, 32] {
            let mut row = format!("  {:<10}", format!("{part} MiB"));
            for parts in [2, 4, 8] {
                let garage = Garage::start(cluster_dir());
                let config = garage.config(
                    "s3.yaml",
                    &format!(", part_size: {part}MiB, parts_in_flight: {parts}"),
                );
                let r = run(
                    &mut ours(&["put", "-q", "-v", "--config", config.to_str().unwrap(), b]),
                    None,
                    None,
                );
                row += &format!(
                    " {:>30}",
                    format!(
                        "{:.2}s {:4.0} {:4.0}M {:.1}+{:.1}",
                        r.secs,
                        mibs(size, r.secs),
                        r.rss_mib,
                        r.cpu,
                        r.servers_cpu
                    )
                );
                trouble.push((format!("put {part} MiB x {parts}"), r));
            }
            println!("{row}");
        }
        let garage = Garage::start(cluster_dir());
        let config = garage.config("s3.yaml", "");
        let r = run(
            ours(&["put", "-q", "-v", "--config", config.to_str().unwrap(), b])
                .env("AWS_UNSIGNED_PAYLOAD", "true"),
            None,
            None,
        );
        drop(garage);
        println!(
            "  defaults (16 MiB x 4) with AWS_UNSIGNED_PAYLOAD=true: {:.2}s {:4.0} MiB/s {:4.0} MiB RSS, CPU s {:.1}+{:.1}",
            r.secs,
            mibs(size, r.secs),
            r.rss_mib,
            r.cpu,
            r.servers_cpu
        );
        trouble.push(("put unsigned payload".into(), r));
        for (what, r) in &trouble {
            note_trouble(what, r);
        }
    }
    std::fs::remove_file(&blob).unwrap();

    // --- many small files: put, find-missing, fetch-tree -------------------------------------
    let n = env_usize("TREE_FILES", 10_000);
    let (paths, root_digest, bytes) = make_tree(w, n);
    let path_args: Vec<&str> = paths.iter().map(|p| p.to_str().unwrap()).collect();
    let garage = Garage::start(cluster_dir());
    // Straight to s3 under one prefix, through serve under another: each put
    // finds nothing stored.
    let direct = garage.config("direct.yaml", ", prefix: direct");
    let serve = Serve::start(&garage, ", prefix: serve");
    let via_serve = serve.config(w);
    let put_tree = |config: &Path| {
        let mut args = vec!["put", "-q", "-v", "--config", config.to_str().unwrap()];
        args.extend(&path_args);
        run(&mut ours(&args), None, None)
    };
    let fetch = |config: &Path, into: &str| {
        let out = w.join(into);
        let r = run(
            &mut ours(&[
                "fetch-tree",
                "-q",
                "-v",
                "--config",
                config.to_str().unwrap(),
                &root_digest,
                out.to_str().unwrap(),
            ]),
            None,
            None,
        );
        let fetched = (0..100.min(n))
            .map(|d| {
                std::fs::read_dir(out.join(format!("d{d:03}")))
                    .unwrap()
                    .count()
            })
            .sum::<usize>();
        assert_eq!(fetched, n, "fetch-tree left files out");
        r
    };
    let put_direct = put_tree(&direct);
    let fetch_direct = fetch(&direct, "out-direct");
    let put_serve = put_tree(&via_serve);
    let fetch_serve = fetch(&via_serve, "out-serve");

    // 10,000 digests, half of them stored (files of the tree).
    let digests: String = (0..10_000)
        .map(|i| {
            if i % 2 == 0 {
                let f = &paths[i / 2 % n];
                let d = Digest::of(&std::fs::read(f).unwrap());
                format!("{}/{}\n", d.hash(), d.size_bytes())
            } else {
                let d = Digest::of(format!("absent {i}").as_bytes());
                format!("{}/{}\n", d.hash(), d.size_bytes())
            }
        })
        .collect();
    let find_missing = |config: &Path| {
        let listing = w.join("missing.txt");
        let r = run(
            &mut ours(&["find-missing", "--config", config.to_str().unwrap()]),
            Some(digests.as_bytes()),
            Some(&listing),
        );
        let missing = std::fs::read_to_string(&listing).unwrap().lines().count();
        assert_eq!(missing, 5_000, "find-missing found {missing} missing");
        r
    };
    let heads: Vec<(usize, Run)> = [16, 64, 256]
        .into_iter()
        .map(|h| {
            let c = garage.config(
                &format!("heads-{h}.yaml"),
                &format!(", prefix: direct, concurrent_heads: {h}"),
            );
            (h, find_missing(&c))
        })
        .collect();
    let fm_serve = find_missing(&via_serve);
    // awscli on the same files (10 requests at once, its default), into the
    // same cluster under another prefix: Garage's pace for small objects
    // with another client.
    let aws_tree = aws.as_ref().map(|aws| {
        let tree = w.join("tree");
        let up = run(
            garage
                .aws_cp(aws, tree.to_str().unwrap(), "s3://blob-access/aws-tree/")
                .arg("--recursive"),
            None,
            None,
        );
        let down = run(
            garage
                .aws_cp(
                    aws,
                    "s3://blob-access/aws-tree/",
                    w.join("out-aws").to_str().unwrap(),
                )
                .arg("--recursive"),
            None,
            None,
        );
        (up, down)
    });
    let serve_rss = serve.peak_rss_mib();
    let serve_log = std::fs::read_to_string(&serve.log).unwrap_or_default();

    println!(
        "tree of {n} files ({:.1} MiB) in 100 directories + 101 Directory messages (one run each):",
        bytes as f64 / (1 << 20) as f64
    );
    let tree_line = |what: &str, r: &Run| {
        println!(
            "  {what:<44} {:6.2} s {:5.0} files/s  peak RSS {:5.1} MiB  CPU s: own {:4.1}, Garage {:4.1}, serve {:4.1}",
            r.secs,
            n as f64 / r.secs,
            r.rss_mib,
            r.cpu,
            r.servers_cpu,
            r.serve_cpu
        )
    };
    tree_line("put, straight to s3", &put_direct);
    tree_line("put, through serve over s3", &put_serve);
    tree_line("fetch-tree, straight from s3", &fetch_direct);
    tree_line("fetch-tree, through serve over s3", &fetch_serve);
    if let Some((up, down)) = &aws_tree {
        tree_line("aws s3 cp --recursive (upload, files only)", up);
        tree_line("aws s3 cp --recursive (download)", down);
    }
    println!("  serve's peak RSS over put, fetch-tree, find-missing: {serve_rss:.1} MiB");
    println!("  (CPU s: user+system of the client, and of Garage's nodes and of serve meanwhile)");
    println!("find-missing of 10,000 digests (5,000 stored), CLI, one call (whole process):");
    for (h, r) in &heads {
        println!(
            "  {:<44} {:6.2} s {:7.0} digests/s  CPU s: own {:4.1}, Garage {:4.1}, serve {:4.1}",
            format!("straight to s3, concurrent_heads {h}"),
            r.secs,
            10_000.0 / r.secs,
            r.cpu,
            r.servers_cpu,
            r.serve_cpu
        );
    }
    println!(
        "  {:<44} {:6.2} s {:7.0} digests/s  CPU s: own {:4.1}, Garage {:4.1}, serve {:4.1}",
        "through serve (s3, concurrent_heads 64)",
        fm_serve.secs,
        10_000.0 / fm_serve.secs,
        fm_serve.cpu,
        fm_serve.servers_cpu,
        fm_serve.serve_cpu
    );
    note_trouble("put straight", &put_direct);
    note_trouble("put through serve", &put_serve);
    note_trouble("fetch-tree straight", &fetch_direct);
    note_trouble("fetch-tree through serve", &fetch_serve);
    for (h, r) in &heads {
        note_trouble(&format!("find-missing heads {h}"), r);
    }
    let serve_run = Run {
        secs: 0.0,
        rss_mib: 0.0,
        cpu: 0.0,
        servers_cpu: 0.0,
        serve_cpu: 0.0,
        log: serve_log,
    };
    note_trouble("serve", &serve_run);
}
