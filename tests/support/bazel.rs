//! A real Bazel (Debian's `bazel-bootstrap`, 4.2.3, installed by
//! `scripts/setup-test-env.sh`) building the fixture workspace in
//! `tests/bazel/workspace` (or another, such as `tests/bazel/exec_workspace`)
//! against a REAPI remote cache, for end-to-end tests.
//!
//! One Bazel server per [`Bazel`], expunged (which also shuts it down) on drop:
//! `--batch` starts a JVM per command, ~1 s each; build, clean, build took
//! ~9.5 s that way and ~6.3 s with a server, shutdown (~1.5 s) included.
//! `BLOB_ACCESS_BAZEL_BIG_MIB=N` shrinks the fixture's 200 MiB output for quick
//! local runs.

use super::{free_port, installed, real_servers, root, script, BuildGrid};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::time::{Duration, Instant};

/// Whether the tests can run Bazel (and BuildGrid and nginx): like
/// [`real_servers`], a missing `bazel` is a failure under
/// BLOB_ACCESS_REAL_SERVERS=1 and a skip otherwise.
pub fn real_bazel() -> bool {
    if !real_servers() {
        return false;
    }
    let have = Command::new("bazel")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    installed("bazel", have)
}

/// BuildGrid with its ActionCache service as well as the CAS (see
/// `scripts/buildgrid.sh`); stopped on drop like [`BuildGrid::start`]'s.
pub fn start_buildgrid_with_action_cache() -> BuildGrid {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    script(&[
        "scripts/buildgrid.sh",
        "start",
        dir.path().to_str().unwrap(),
        &port.to_string(),
        "action-cache",
    ]);
    BuildGrid { dir, port }
}

/// A fresh copy of the fixture workspace and the Bazel server building it.
pub struct Bazel {
    dir: tempfile::TempDir,
    remote_cache: String,
    builds: usize,
    /// Startup options after ours (see [`Bazel::with_startup_options`]).
    startup: Vec<String>,
}

/// What one `bazel build` did. The counts come from the execution log; the
/// "N processes: ..." line of stderr is parsed too, as a cross-check.
#[derive(Debug)]
pub struct BuildSummary {
    pub status: ExitStatus,
    pub stderr: String,
    pub elapsed: Duration,
    pub spawns: Vec<Spawn>,
    /// "remote cache hit", "local", "internal", ... as counted by Bazel's
    /// "N processes: ..." line; internal ones are not spawns.
    pub processes: BTreeMap<String, usize>,
}

/// One entry (a SpawnExec message) of `--execution_log_json_file`.
#[derive(Debug)]
pub struct Spawn {
    /// "Executing genrule //:big": names the target.
    pub progress_message: String,
    /// "local", "remote cache hit", ...
    pub runner: String,
    pub remote_cache_hit: bool,
    /// The files it produced (`actualOutputs`), with their digests.
    pub outputs: Vec<LoggedFile>,
}

/// A file of a spawn, with the digest Bazel computed for it.
#[derive(Debug)]
pub struct LoggedFile {
    /// "bazel-out/k8-fastbuild/bin/hello.txt"
    pub path: String,
    /// Lowercase hex.
    pub hash: String,
    pub size_bytes: u64,
    /// Bazel's name of the digest function: "SHA-256", "SHA-1"...
    pub hash_function: String,
}

impl BuildSummary {
    pub fn success(&self) -> bool {
        self.status.success()
    }
    pub fn remote_cache_hits(&self) -> usize {
        self.spawns.iter().filter(|s| s.remote_cache_hit).count()
    }
    /// Spawns that ran here rather than coming from the remote cache.
    pub fn executed(&self) -> usize {
        self.spawns.len() - self.remote_cache_hits()
    }
    /// Spawns that ran on a remote executor (`--remote_executor`).
    pub fn executed_remotely(&self) -> usize {
        let remote = |s: &&Spawn| s.runner == "remote" && !s.remote_cache_hit;
        self.spawns.iter().filter(remote).count()
    }
    /// Panics unless the log and the stderr line agree on the counts.
    pub fn check_counts(&self) {
        let hits = self.processes.get("remote cache hit").copied();
        let local = self.processes.get("local").copied();
        assert_eq!(
            (hits.unwrap_or(0), local.unwrap_or(0)),
            (self.remote_cache_hits(), self.executed()),
            "the execution log and the processes line disagree: {self:#?}"
        );
    }
}

impl Bazel {
    /// A copy of `tests/bazel/workspace` whose builds use the REAPI cache at
    /// `remote_cache` (e.g. `grpc://127.0.0.1:PORT`).
    pub fn new(remote_cache: &str) -> Bazel {
        Self::with_workspace(&root().join("tests/bazel/workspace"), remote_cache)
    }

    /// As [`Bazel::new`], with a copy of another fixture workspace.
    pub fn with_workspace(workspace: &Path, remote_cache: &str) -> Bazel {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(workspace, &dir.path().join("ws"));
        Bazel {
            dir,
            remote_cache: remote_cache.to_string(),
            builds: 0,
            startup: Vec::new(),
        }
    }

    /// This Bazel with more startup options (e.g.
    /// `--host_jvm_args=-Dbazel.DigestFunction=SHA1`), passed to every command
    /// after the usual ones: a server started with other options would be
    /// restarted, so set them before the first command.
    pub fn with_startup_options(mut self, options: &[&str]) -> Bazel {
        self.startup.extend(options.iter().map(|o| o.to_string()));
        self
    }

    /// Points the next builds at another cache (e.g. a restarted server's new port).
    pub fn set_remote_cache(&mut self, remote_cache: &str) {
        self.remote_cache = remote_cache.to_string();
    }

    pub fn workspace(&self) -> PathBuf {
        self.dir.path().join("ws")
    }

    /// The convenience symlink to the outputs; gone after `clean`.
    pub fn bazel_bin(&self) -> PathBuf {
        self.workspace().join("bazel-bin")
    }

    /// `bazel COMMAND ARGS...` in the workspace, with the startup options.
    pub fn command(&self, command: &str, args: &[&str]) -> Output {
        let user_root = root().join("target/bazel-root");
        Command::new("bazel")
            // The system bazelrc stays: Debian's sets the install base there.
            .arg("--nohome_rc")
            .arg(format!("--output_user_root={}", user_root.display()))
            // A server a test failed to shut down exits by itself soon.
            .arg("--max_idle_secs=60")
            .args(&self.startup)
            .arg(command)
            .args(args)
            .current_dir(self.workspace())
            .output()
            .unwrap()
    }

    /// `bazel build //...` with the remote cache; `flags` come last, so they
    /// can override any of these (e.g. `--noremote_accept_cached`).
    pub fn build(&mut self, flags: &[&str]) -> BuildSummary {
        self.builds += 1;
        let log = self.dir.path().join(format!("exec-{}.json", self.builds));
        let mut args = vec![
            format!("--remote_cache={}", self.remote_cache),
            "--remote_upload_local_results".into(),
            // Hits must come from the remote cache alone.
            "--disk_cache=".into(),
            // Action keys must not depend on the caller's PATH (cargo's
            // differs between machines): PATH=/bin:/usr/bin:/usr/local/bin.
            "--incompatible_strict_action_env".into(),
            // Sandboxes need namespaces some containers lack; the cache key
            // does not depend on the strategy.
            "--spawn_strategy=local".into(),
            // The fixture needs nothing from the network: fail if it tries.
            "--experimental_repository_disable_download".into(),
            format!("--execution_log_json_file={}", log.display()),
            "--color=no".into(),
            "--curses=no".into(),
        ];
        if let Ok(mib) = std::env::var("BLOB_ACCESS_BAZEL_BIG_MIB") {
            args.push(format!("--define=BIG_MIB={mib}"));
        }
        args.extend(flags.iter().map(|f| f.to_string()));
        args.push("//...".into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let start = Instant::now();
        let out = self.command("build", &args);
        let elapsed = start.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        eprintln!("bazel build {args:?}: {elapsed:.1?}\n{stderr}");
        // No log if the build failed before execution.
        let spawns = std::fs::read_to_string(&log)
            .map(|json| parse_execution_log(&json))
            .unwrap_or_default();
        BuildSummary {
            status: out.status,
            processes: parse_processes(&stderr),
            stderr,
            elapsed,
            spawns,
        }
    }

    /// `bazel clean`: outputs and the local action cache gone, server kept.
    pub fn clean(&self) {
        let out = self.command("clean", &[]);
        assert!(
            out.status.success(),
            "bazel clean failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// SHA-256 (hex) of every file under bazel-bin, by path relative to it.
    pub fn output_hashes(&self) -> BTreeMap<String, String> {
        let mut hashes = BTreeMap::new();
        hash_files(&self.bazel_bin(), &self.bazel_bin(), &mut hashes);
        hashes
    }
}

impl Drop for Bazel {
    /// Shuts the server down and deletes its output base (GBs of outputs).
    fn drop(&mut self) {
        let out = self.command("clean", &["--expunge"]);
        if !out.status.success() {
            eprintln!(
                "bazel clean --expunge failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// The log is a stream of pretty-printed JSON objects, not an array. Bazel 4
/// writes default values too, so a missing field means a format change.
fn parse_execution_log(json: &str) -> Vec<Spawn> {
    serde_json::Deserializer::from_str(json)
        .into_iter::<serde_json::Value>()
        .map(|spawn| {
            let spawn = spawn.expect("execution log is not JSON");
            let field = |name: &str| {
                spawn
                    .get(name)
                    .unwrap_or_else(|| panic!("no {name} in spawn {spawn:#}"))
            };
            Spawn {
                progress_message: field("progressMessage").as_str().unwrap().into(),
                runner: field("runner").as_str().unwrap().into(),
                remote_cache_hit: field("remoteCacheHit").as_bool().unwrap(),
                outputs: field("actualOutputs")
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(parse_logged_file)
                    .collect(),
            }
        })
        .collect()
}

/// `{"path": ..., "digest": {"hash": ..., "sizeBytes": "17", "hashFunctionName": ...}}`.
fn parse_logged_file(file: &serde_json::Value) -> LoggedFile {
    let text = |v: &serde_json::Value, name: &str| -> String {
        v.get(name)
            .and_then(|f| f.as_str())
            .unwrap_or_else(|| panic!("no {name} in logged file {file:#}"))
            .to_string()
    };
    let digest = file
        .get("digest")
        .unwrap_or_else(|| panic!("no digest in logged file {file:#}"));
    LoggedFile {
        path: text(file, "path"),
        hash: text(digest, "hash"),
        // int64 fields are JSON strings in protobuf's mapping.
        size_bytes: text(digest, "sizeBytes").parse().unwrap(),
        hash_function: text(digest, "hashFunctionName"),
    }
}

/// "INFO: 6 processes: 5 remote cache hit, 1 internal." -> {"internal": 1,
/// "remote cache hit": 5}; "INFO: 0 processes." -> {}.
fn parse_processes(stderr: &str) -> BTreeMap<String, usize> {
    let Some(line) = stderr.lines().rev().find(|l| l.contains(" processes")) else {
        return BTreeMap::new();
    };
    let Some((_, kinds)) = line.split_once("processes: ") else {
        return BTreeMap::new();
    };
    kinds
        .trim_end_matches('.')
        .split(", ")
        .map(|kind| {
            let (n, name) = kind.split_once(' ').unwrap();
            (name.to_string(), n.parse().unwrap())
        })
        .collect()
}

fn hash_files(base: &Path, dir: &Path, hashes: &mut BTreeMap<String, String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            hash_files(base, &path, hashes);
            continue;
        }
        let mut hasher = Sha256::new();
        std::io::copy(&mut std::fs::File::open(&path).unwrap(), &mut hasher).unwrap();
        let rel = path.strip_prefix(base).unwrap();
        hashes.insert(
            rel.to_string_lossy().into_owned(),
            hex::encode(hasher.finalize()),
        );
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

/// Builds from scratch, then after `bazel clean` builds again (after
/// `between`, which may restart the cache; inside `around`, which may disturb
/// it): every action of the second build must be a remote cache hit, and its
/// outputs identical to the first's.
pub fn build_clean_build(
    bazel: &mut Bazel,
    between: impl FnOnce(&mut Bazel),
    around: impl FnOnce(&mut dyn FnMut() -> BuildSummary) -> BuildSummary,
) {
    let first = bazel.build(&[]);
    assert!(first.success(), "first build failed:\n{}", first.stderr);
    first.check_counts();
    assert_eq!(first.remote_cache_hits(), 0, "{first:#?}");
    let outputs = bazel.output_hashes();
    assert!(outputs.contains_key("big.bin"), "{outputs:#?}");
    between(bazel);
    bazel.clean();
    let second = around(&mut || bazel.build(&[]));
    assert!(second.success(), "second build failed:\n{}", second.stderr);
    second.check_counts();
    assert_eq!(second.spawns.len(), first.spawns.len(), "{second:#?}");
    assert_eq!(
        second.executed(),
        0,
        "not all remote cache hits: {second:#?}"
    );
    assert_eq!(bazel.output_hashes(), outputs, "outputs differ");
    eprintln!(
        "first build {:.1?}, cached second build {:.1?}",
        first.elapsed, second.elapsed
    );
}
