//! Real servers for end-to-end tests: BuildGrid, nginx and HAProxy through the scripts in
//! `scripts/` (installed by `scripts/setup-test-env.sh`), and `blob-access serve`
//! as a child process. Each is stopped when its guard is dropped.
#![allow(dead_code)]
pub mod bazel;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blob-access"))
}

pub fn bgd() -> PathBuf {
    root().join("target/venv/bin/bgd")
}

/// Whether BuildGrid and nginx are installed. When they are not, tests that need
/// them skip, except under `scripts/test.sh` (BLOB_ACCESS_REAL_SERVERS=1), where
/// a missing server is a failure.
pub fn real_servers() -> bool {
    let have = bgd().exists() && Command::new("nginx").arg("-v").output().is_ok();
    installed("BuildGrid/nginx", have)
}

/// Whether HAProxy is installed, as [`real_servers`].
pub fn real_haproxy() -> bool {
    installed(
        "haproxy",
        Command::new("haproxy").arg("-v").output().is_ok(),
    )
}

/// `have`, after a panic if `what` is missing under BLOB_ACCESS_REAL_SERVERS=1,
/// or a note that the test skips.
pub fn installed(what: &str, have: bool) -> bool {
    if !have && std::env::var_os("BLOB_ACCESS_REAL_SERVERS").is_some() {
        panic!("{what} missing: run scripts/setup-test-env.sh");
    }
    if !have {
        eprintln!("skipping: {what} not installed (run scripts/test.sh)");
    }
    have
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn script(args: &[&str]) {
    script_env(&[], args)
}

fn script_env(env: &[(&str, &str)], args: &[&str]) {
    let out = Command::new("bash")
        .args(args)
        .envs(env.iter().copied())
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A BuildGrid CAS (instance "") on a free loopback port.
pub struct BuildGrid {
    pub dir: tempfile::TempDir,
    pub port: u16,
}

impl BuildGrid {
    pub fn start() -> BuildGrid {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        script(&[
            "scripts/buildgrid.sh",
            "start",
            dir.path().to_str().unwrap(),
            &port.to_string(),
        ]);
        BuildGrid { dir, port }
    }
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    pub fn stop(&self) {
        script(&[
            "scripts/buildgrid.sh",
            "stop",
            self.dir.path().to_str().unwrap(),
        ]);
    }
    /// Stops it and starts an empty one on the same port (a replaced server).
    pub fn restart_empty(&mut self) {
        self.stop();
        self.dir = tempfile::tempdir().unwrap();
        script(&[
            "scripts/buildgrid.sh",
            "start",
            self.dir.path().to_str().unwrap(),
            &self.port.to_string(),
        ]);
    }
}

impl Drop for BuildGrid {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A BuildGrid that executes (`scripts/buildgrid-exec.sh`): Execution,
/// Operations, CAS and ActionCache (instance "") on a free loopback port, its
/// scheduler on a private PostgreSQL, and a test worker that runs the actions
/// (4 at once) and logs each run. Stopped on drop.
pub struct BuildGridExec {
    pub dir: tempfile::TempDir,
    pub port: u16,
}

impl BuildGridExec {
    pub fn start() -> BuildGridExec {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let bg = BuildGridExec { dir, port };
        bg.start_again();
        bg
    }
    fn start_again(&self) {
        script(&[
            "scripts/buildgrid-exec.sh",
            "start",
            self.dir.path().to_str().unwrap(),
            &self.port.to_string(),
        ]);
    }
    pub fn stop(&self) {
        script(&[
            "scripts/buildgrid-exec.sh",
            "stop",
            self.dir.path().to_str().unwrap(),
        ]);
    }
    /// Stops it (the worker and the actions it runs too) and starts it again
    /// on the same port and directory: its database, with the operations and
    /// the jobs they wait for, and its CAS are kept.
    pub fn restart(&self) {
        self.stop();
        self.start_again();
    }
    /// One `HASH/SIZE` of an action's digest per run the worker started, in
    /// order (from `worker.log`).
    pub fn worker_runs(&self) -> Vec<String> {
        let log = std::fs::read_to_string(self.dir.path().join("worker.log")).unwrap_or_default();
        log.lines()
            .map(|l| {
                let digest = l.strip_prefix("executed ");
                digest
                    .unwrap_or_else(|| panic!("worker.log: {l:?}"))
                    .to_string()
            })
            .collect()
    }
}

impl Drop for BuildGridExec {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether Garage is installed, as [`real_servers`].
pub fn real_garage() -> bool {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cargo"));
    let have = Command::new("garage").arg("--version").output().is_ok()
        || cargo_home.join("bin/garage").exists();
    installed("garage", have)
}

/// A three-node Garage cluster (`scripts/garage.sh`), replication factor 3,
/// with a bucket `blob-access` and a key allowed on it; stopped on drop.
pub struct Garage {
    pub dir: tempfile::TempDir,
    /// Node I (1..3) serves S3 on `port + I - 1`.
    pub port: u16,
    /// `AWS_ACCESS_KEY_ID` and the other lines of the script's `env` file.
    pub env: Vec<(String, String)>,
}

impl Garage {
    pub fn start() -> Garage {
        let dir = tempfile::tempdir().unwrap();
        let port = free_ports(9);
        script(&[
            "scripts/garage.sh",
            "start",
            dir.path().to_str().unwrap(),
            &port.to_string(),
        ]);
        let env = std::fs::read_to_string(dir.path().join("env")).unwrap();
        let env = env
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Garage { dir, port, env }
    }
    /// Node I's S3 endpoint.
    pub fn endpoint(&self, node: u16) -> String {
        format!("http://127.0.0.1:{}", self.port + node - 1)
    }
    pub fn var(&self, name: &str) -> String {
        self.env.iter().find(|(k, _)| k == name).unwrap().1.clone()
    }
    /// An `s3` node of a config file on `endpoint`, with the cluster's key.
    pub fn node_yaml(&self, endpoint: &str, extra: &str) -> String {
        format!(
            "s3: {{bucket: blob-access, endpoint: \"{endpoint}\", region: garage, access_key_id: {}, secret_access_key: {}{extra}}}",
            self.var("AWS_ACCESS_KEY_ID"),
            self.var("AWS_SECRET_ACCESS_KEY")
        )
    }
    pub fn stop_node(&self, node: u16) {
        self.node("stop-node", node)
    }
    pub fn start_node(&self, node: u16) {
        self.node("start-node", node)
    }
    fn node(&self, what: &str, node: u16) {
        let dir = self.dir.path().to_str().unwrap();
        script(&["scripts/garage.sh", what, dir, &node.to_string()]);
    }
    /// `aws s3api ARGS --endpoint-url` node 1 (awscli from the venv).
    pub fn aws(&self, args: &[&str]) -> Output {
        Command::new(root().join("target/venv/bin/aws"))
            .args(args)
            .args(["--endpoint-url", &self.endpoint(1)])
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .unwrap()
    }
    /// The multipart uploads not completed nor aborted in the bucket.
    pub fn open_multipart_uploads(&self) -> usize {
        let out = self.aws(&[
            "s3api",
            "list-multipart-uploads",
            "--bucket",
            "blob-access",
            "--output",
            "json",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        if text.trim().is_empty() {
            return 0;
        }
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["Uploads"].as_array().map_or(0, |a| a.len())
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let dir = self.dir.path().to_str().unwrap();
        script(&["scripts/garage.sh", "stop", dir]);
    }
}

/// The first of `n` consecutive free loopback ports.
pub fn free_ports(n: u16) -> u16 {
    loop {
        let base = free_port();
        if base > 65535 - n {
            continue;
        }
        let all_free = (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if all_free {
            return base;
        }
    }
}

/// A gRPC reverse proxy (h2c both ways) to `upstream_port`, run by a script
/// with the commands `start DIR PORT UPSTREAM_PORT`, `reload DIR` and `stop DIR`;
/// stopped on drop. Made by [`Nginx`] or [`HaProxy`].
pub struct Proxy {
    pub dir: tempfile::TempDir,
    pub port: u16,
    script: &'static str,
}

/// nginx (`scripts/nginx.sh`): a reload sends GOAWAY, and 200 ms later the
/// old worker closes its connections.
pub struct Nginx;

/// HAProxy (`scripts/haproxy.sh`): a reload sends GOAWAY, and 300 ms later
/// the old worker ends its streams without trailers and closes.
pub struct HaProxy;

impl Nginx {
    pub fn start(upstream_port: u16) -> Proxy {
        Self::start_with_requests_cap(upstream_port, None)
    }
    /// nginx that sends GOAWAY to a client after `cap` requests on a connection.
    pub fn start_with_requests_cap(upstream_port: u16, cap: Option<u32>) -> Proxy {
        let cap = cap.map(|n| n.to_string());
        let env: Vec<(&str, &str)> = cap
            .iter()
            .map(|n| ("NGINX_KEEPALIVE_REQUESTS", n.as_str()))
            .collect();
        Proxy::start("scripts/nginx.sh", upstream_port, &env)
    }
}

impl HaProxy {
    pub fn start(upstream_port: u16) -> Proxy {
        Proxy::start("scripts/haproxy.sh", upstream_port, &[])
    }
}

impl Proxy {
    fn start(script: &'static str, upstream_port: u16, env: &[(&str, &str)]) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        script_env(
            env,
            &[
                script,
                "start",
                dir.path().to_str().unwrap(),
                &port.to_string(),
                &upstream_port.to_string(),
            ],
        );
        Proxy { dir, port, script }
    }

    pub fn reload(&self) {
        script(&[self.script, "reload", self.dir.path().to_str().unwrap()]);
    }

    /// A reloader for another thread: each call reloads once and says whether
    /// it worked.
    fn reloader(&self) -> impl FnMut() -> bool + Send + 'static {
        let (script, dir) = (self.script, self.dir.path().to_path_buf());
        move || {
            Command::new("bash")
                .arg(script)
                .arg("reload")
                .arg(&dir)
                .current_dir(root())
                .status()
                .is_ok_and(|s| s.success())
        }
    }

    /// Reloads `n` times, `every` apart (the first after `every`), while `f`
    /// runs; returns `f`'s result and the number of reloads.
    pub fn with_n_reloads<T>(&self, n: u32, every: Duration, f: impl FnOnce() -> T) -> (T, u32) {
        self.reloading(Some(n), every, f)
    }

    /// Reloads while `f` runs, 200 ms after each reload is done (nginx's is
    /// at once, HAProxy's takes ~200 ms); returns `f`'s result and the number
    /// of reloads.
    pub fn with_reloads<T>(&self, f: impl FnOnce() -> T) -> (T, u32) {
        self.reloading(None, Duration::from_millis(200), f)
    }

    fn reloading<T>(&self, n: Option<u32>, every: Duration, f: impl FnOnce() -> T) -> (T, u32) {
        let mut reload = self.reloader();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut done = 0;
            for _ in 0..n.unwrap_or(u32::MAX) {
                std::thread::sleep(every);
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                done += reload() as u32;
            }
            done
        });
        // Stopped and joined even when `f` panics, before the proxy is
        // stopped: a reload racing the stop could leave a proxy running.
        let mut reloads = Reloads {
            stop,
            thread: Some(thread),
        };
        let out = f();
        if n.is_none() {
            reloads.stop.store(true, Ordering::Relaxed);
        }
        let done = reloads.thread.take().expect("joined once").join().unwrap();
        (out, done)
    }
}

/// The thread reloading a proxy, stopped and joined when dropped.
struct Reloads {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u32>>,
}

impl Drop for Reloads {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        script(&[self.script, "stop", self.dir.path().to_str().unwrap()]);
    }
}

/// A config file `name` with a `resumable_grpc` node to `port` that gives up
/// after 10 attempts in a row without progress.
pub fn resumable_config(dir: &Path, name: &str, port: u16) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "resumable_grpc:\n  grpc:\n    endpoint: grpc://127.0.0.1:{port}\n    instance_name: \"\"\n  max_attempts_without_progress: 10\n"
        ),
    )
    .unwrap();
    path
}

/// `get` of `digest` with `config` (a plain `grpc` node through `proxy`)
/// while the proxy reloads: the read is cut and fails, naming the blob and
/// leaving no file; returns its error. Only a read ending between two cuts
/// can slip through: three tries to be cut, for a machine that fast.
pub fn plain_get_is_cut(proxy: &Proxy, config: &Path, digest: &str, out: &Path) -> String {
    let failed = (0..3).find_map(|_| {
        let (got, _) = proxy.with_reloads(|| cli(&get_args(config, digest, out)));
        if got.status.success() {
            std::fs::remove_file(out).unwrap();
            return None;
        }
        assert!(!out.exists(), "a failed read left a file");
        Some(String::from_utf8_lossy(&got.stderr).into_owned())
    });
    let err = failed.expect("plain read survived the reloads three times");
    assert!(err.contains(digest), "{err}");
    err
}

/// `get -v` of `digest` with `config` (a `resumable_grpc` node through
/// `proxy`) while the proxy reloads: it completes with the bytes of `file`
/// after at least one resumption. Returns its log.
pub fn resumable_get_survives(
    proxy: &Proxy,
    config: &Path,
    digest: &str,
    file: &Path,
    out: &Path,
) -> String {
    let (got, reloads) = proxy.with_reloads(|| {
        Command::new(bin())
            .args(["get", "-v", "--config"])
            .arg(config)
            .args([digest, "-o"])
            .arg(out)
            .output()
            .unwrap()
    });
    let log = String::from_utf8_lossy(&got.stderr).into_owned();
    assert!(
        got.status.success(),
        "resumable read failed after {reloads} reloads: {log}"
    );
    assert!(files_equal(file, out));
    let resumptions = logged_resumptions(&log);
    assert!(resumptions > 0, "no resumption logged in: {log}");
    eprintln!("resumable read: {reloads} reloads, {resumptions} resumptions");
    log
}

/// N in the "... N resumptions" of a transfer summary; 0 without one.
pub fn logged_resumptions(summary: &str) -> u64 {
    logged(summary, "resumptions")
}

/// N in the "... N `name`" of a transfer summary (`put -v`, `get -v`); 0
/// without one.
pub fn logged(summary: &str, name: &str) -> u64 {
    summary
        .split(&format!(" {name}"))
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Size of the uploads of the upload tests: BLOB_ACCESS_UPLOAD_MIB, default 300 MiB.
pub fn upload_size() -> u64 {
    let mib = std::env::var("BLOB_ACCESS_UPLOAD_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300u64);
    mib << 20
}

/// `n` files of 1-9 KiB in `dir/src` and, last, `dir/directory`: the REAPI
/// Directory listing them. `salt` starts every line: another salt, other blobs.
pub fn small_files_and_listing(dir: &Path, n: usize, salt: &str) -> Vec<PathBuf> {
    use blob_access::proto::{Directory, FileNode};
    use prost::Message;
    let src = dir.join("src");
    std::fs::create_dir(&src).unwrap();
    let mut paths = Vec::new();
    let mut nodes = Vec::new();
    for i in 0..n {
        let data = format!("{salt}file {i}\n").repeat(100 + i * 1000 % 8000 / 8);
        let path = src.join(format!("f{i:04}"));
        std::fs::write(&path, &data).unwrap();
        nodes.push(FileNode {
            name: format!("f{i:04}"),
            digest: Some(blob_access::Digest::of(data.as_bytes()).to_proto()),
            ..Default::default()
        });
        paths.push(path);
    }
    let listing = dir.join("directory");
    let directory = Directory {
        files: nodes,
        ..Default::default()
    };
    std::fs::write(&listing, directory.encode_to_vec()).unwrap();
    paths.push(listing);
    paths
}

/// With `config`: `put` of `paths` (from [`small_files_and_listing`]),
/// `find-missing` of their digests, which finds none, and `fetch-tree` of the
/// listing into `out`, which must hold every file whole.
pub fn put_and_fetch_tree(config: &Path, paths: &[PathBuf], out: &Path) {
    let config = config.to_str().unwrap();
    let mut args = vec!["put", "-q", "--config", config];
    args.extend(paths.iter().map(|p| p.to_str().unwrap()));
    let got = cli(&args);
    let stderr = String::from_utf8_lossy(&got.stderr);
    assert!(got.status.success(), "put failed: {stderr}");
    let digests = String::from_utf8(got.stdout).unwrap();
    assert_eq!(digests.lines().count(), paths.len());
    let root = digests.lines().last().unwrap();

    let mut args = vec!["find-missing", "--config", config];
    args.extend(digests.lines());
    assert_eq!(cli_ok(&args), "", "every blob is stored");

    let got = cli(&[
        "fetch-tree",
        "-q",
        "--config",
        config,
        root,
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&got.stderr);
    assert!(got.status.success(), "fetch-tree failed: {stderr}");
    for p in &paths[..paths.len() - 1] {
        let file = out.join(p.file_name().unwrap());
        assert!(files_equal(p, &file), "{} differs", file.display());
    }
}

/// `blob-access serve` as a child process, killed on drop.
pub struct Serve {
    child: Child,
    pub port: u16,
    pub metrics_port: Option<u16>,
    /// Everything it wrote to stderr so far.
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Serve {
    /// Starts `serve` on a port it picks itself (`127.0.0.1:0`) and reads the
    /// port from its "serving ... on ADDR" line: no window in which another
    /// process could take a port chosen in advance.
    pub fn start(config: Option<&Path>) -> Serve {
        Self::start_with(config, &[])
    }

    /// As `start`, with more arguments; `--metrics-listen 127.0.0.1:0` sets
    /// `metrics_port` from its line.
    pub fn start_with(config: Option<&Path>, args: &[&str]) -> Serve {
        Self::start_on("127.0.0.1:0", config, args)
    }

    /// As `start_with`, listening on `listen` (a port 0 address; clients connect
    /// to 127.0.0.1 on the port it picked).
    pub fn start_on(listen: &str, config: Option<&Path>, args: &[&str]) -> Serve {
        Self::start_env(listen, config, args, &[])
    }

    /// As `start_on`, with environment variables (e.g. `RUST_LOG`).
    pub fn start_env(
        listen: &str,
        config: Option<&Path>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Serve {
        use std::io::BufRead;
        let mut cmd = Command::new(bin());
        cmd.args(["serve", "--listen", listen])
            .args(args)
            .envs(env.iter().copied());
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let port_in = |l: &str, after: &str| -> Option<u16> {
            let addr = l.split(after).nth(1)?.trim_end_matches("/metrics");
            addr.rsplit(':').next()?.trim().parse().ok()
        };
        let mut metrics_port = None;
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let keep = log.clone();
        let record = move |l: &String| {
            eprintln!("{l}");
            let mut log = keep.lock().unwrap();
            log.push_str(l);
            log.push('\n');
        };
        let port = lines
            .by_ref()
            .map_while(Result::ok)
            .inspect(&record)
            .inspect(|l| metrics_port = metrics_port.or(port_in(l, "metrics on http://")))
            .find_map(|l| {
                let what = l.strip_prefix("blob-access: serving ")?;
                let addr = what.rsplit(" on ").next()?;
                addr.rsplit(':').next()?.trim().parse::<u16>().ok()
            })
            .expect("serve exited before listening");
        // Keep forwarding its log, or it would block on a full pipe.
        std::thread::spawn(move || lines.map_while(Result::ok).for_each(|l| record(&l)));
        wait_for_port(port);
        Serve {
            child,
            port,
            metrics_port,
            log,
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits up to 30 s for a log line containing `text`.
    pub fn wait_for_log(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.log().contains(text) {
            assert!(Instant::now() < deadline, "serve never logged {text:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends it a signal (`"HUP"`, `"TERM"`).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} failed");
    }

    /// Waits for it to exit.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/2 channel to a server on loopback, connected.
pub async fn channel(port: u16) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

pub fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A file of `size` pseudo-random bytes (seeded by the size, so reruns are alike).
pub fn random_file(dir: &Path, size: u64) -> PathBuf {
    use rand::{RngCore, SeedableRng};
    let path = dir.join(format!("random-{size}"));
    let mut rng = rand::rngs::StdRng::seed_from_u64(size);
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        std::io::Write::write_all(&mut f, &buf[..n]).unwrap();
        left -= n as u64;
    }
    std::io::Write::flush(&mut f).unwrap();
    path
}

/// A config file with a `grpc` node pointing at `port`.
pub fn grpc_config(dir: &Path, name: &str, port: u16) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!("grpc:\n  endpoint: grpc://127.0.0.1:{port}\n  instance_name: \"\"\n"),
    )
    .unwrap();
    path
}

/// Runs the CLI and returns its output.
pub fn cli<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

/// stdout of a CLI run that must succeed.
pub fn cli_ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let out = cli(args);
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `put --config config file`, which must succeed; returns `HASH/SIZE`.
pub fn put_cli(config: &Path, file: &Path) -> String {
    let out = cli_ok(&[
        "put".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        file.as_os_str(),
    ]);
    out.trim().to_string()
}

/// `put -v --config config file` (its summary, with the node's counters, on stderr).
pub fn put_verbose(config: &Path, file: &Path) -> Output {
    cli(&[
        "put".as_ref(),
        "-v".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        file.as_os_str(),
    ])
}

/// Reads `digest` from the serve on `port` (a `grpc` node, verified) and
/// checks that it holds the bytes of `file`.
pub fn assert_serve_holds(dir: &Path, port: u16, digest: &str, file: &Path) {
    let got = dir.join(format!("from-{port}"));
    get_cli(
        &grpc_config(dir, &format!("to-{port}.yaml"), port),
        digest,
        &got,
    );
    assert!(files_equal(file, &got), "serve on {port} holds other bytes");
    std::fs::remove_file(&got).unwrap();
}

/// The arguments of `get --config config digest -o out`.
pub fn get_args<'a>(config: &'a Path, digest: &'a str, out: &'a Path) -> [&'a OsStr; 6] {
    [
        "get".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        digest.as_ref(),
        "-o".as_ref(),
        out.as_os_str(),
    ]
}

/// `get --config config digest -o out`, which must succeed.
pub fn get_cli(config: &Path, digest: &str, out: &Path) {
    cli_ok(&get_args(config, digest, out));
}

pub fn files_equal(a: &Path, b: &Path) -> bool {
    let (fa, fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    if fa.metadata().unwrap().len() != fb.metadata().unwrap().len() {
        return false;
    }
    use std::io::Read;
    let (mut ra, mut rb) = (std::io::BufReader::new(fa), std::io::BufReader::new(fb));
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = ra.read(&mut ba).unwrap();
        if n == 0 {
            return true;
        }
        rb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            return false;
        }
    }
}

/// The text of `serve --metrics-listen`'s `/metrics` on `port`.
pub fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}
