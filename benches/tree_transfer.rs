//! Figures for the many-small-files issue, printed, not asserted: a tree of
//! 10,000 files of 1-16 KiB in 100 directories against `blob-access serve`
//! over memory, in one run:
//! - `blob-access put` of its files vs `bgd cas upload-dir` (each into a fresh
//!   serve; goal: put >= 3x faster), and put again when all are stored;
//! - `blob-access fetch-tree` vs `bgd cas download-dir` of the tree bgd
//!   uploaded (goal: fetch-tree >= 5x faster), best of 3 into directories
//!   never used before, and both again into /dev/shm to tell the transfer
//!   from the disk, each beside `tar -x` of the same files (the filesystem's
//!   own cost, the floor);
//! - 100,000 digests through `blob-access find-missing` (stdin) in one call
//!   vs a plain tonic loop of FindMissingBlobs calls.
//!
//! Needs BuildGrid's client: `bgd` in $BGD, `$CARGO_TARGET_DIR/venv/bin`,
//! `target/venv/bin` or PATH. Run: `cargo bench --bench tree_transfer`
//! (TREE_FILES, default 10000, in 100 directories).

mod common;

use blob_access::proto::content_addressable_storage_client::ContentAddressableStorageClient;
use blob_access::proto::FindMissingBlobsRequest;
use blob_access::Digest;
use common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

fn bgd() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("BGD").map(PathBuf::from),
        std::env::var_os("CARGO_TARGET_DIR").map(|t| PathBuf::from(t).join("venv/bin/bgd")),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/venv/bin/bgd")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.exists())
        .or_else(|| {
            let found = Command::new("bgd").arg("--help").output();
            found.is_ok().then(|| PathBuf::from("bgd"))
        })
}

fn tree_files() -> usize {
    std::env::var("TREE_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// `files` files of 1-16 KiB of random bytes in 100 directories.
fn make_tree(root: &Path, files: usize) -> Vec<PathBuf> {
    use rand::{Rng, RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut paths = Vec::with_capacity(files);
    for i in 0..files {
        let dir = root.join(format!("d{:03}", i % 100));
        std::fs::create_dir_all(&dir).unwrap();
        let mut data = vec![0u8; rng.random_range(1024..=16384)];
        rng.fill_bytes(&mut data);
        let path = dir.join(format!("f{i:05}"));
        std::fs::write(&path, data).unwrap();
        paths.push(path);
    }
    paths
}

fn url(port: u16) -> String {
    format!("--remote=http://127.0.0.1:{port}")
}

/// Seconds of a command that must succeed, with its stdout.
fn timed(cmd: &mut Command) -> (f64, String) {
    let start = Instant::now();
    let out = cmd.stderr(Stdio::inherit()).output().unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(out.status.success(), "{cmd:?} failed");
    (secs, String::from_utf8(out.stdout).unwrap())
}

fn put(config: &Path, files: &[PathBuf]) -> f64 {
    timed(
        Command::new(bin())
            .args(["put", "-q", "--config"])
            .arg(config)
            .args(files),
    )
    .0
}

/// `bgd cas upload-dir`: seconds and the root digest.
fn bgd_upload(bgd: &Path, port: u16, tree: &Path) -> (f64, String) {
    let (secs, out) = timed(
        Command::new(bgd)
            .args(["cas", &url(port), "upload-dir"])
            .arg(tree),
    );
    let line = format!("path=[{}] with digest=[", tree.display());
    let root = out
        .lines()
        .find_map(|l| l.split(&line).nth(1))
        .map(|d| d.trim_end_matches(']').to_string())
        .unwrap_or_else(|| panic!("bgd upload-dir printed no root digest: {out}"));
    (secs, root)
}

/// Output directories that were never used, none deleted until the end.
///
/// Deleting a tree right before writing the next one would time the
/// filesystem, not the client: ext4 without a journal skips inodes freed in
/// the last minute (five if their block is still dirty) by scanning past them,
/// which made each run after an `rm -rf` of 10,000 files 1.5 s slower whatever
/// the client (2.5 s of system time where a fresh directory takes 0.25 s).
struct Outputs {
    parent: PathBuf,
    next: usize,
}

impl Outputs {
    fn under(parent: &Path) -> Outputs {
        std::fs::create_dir_all(parent).unwrap();
        Outputs {
            parent: parent.to_path_buf(),
            next: 0,
        }
    }

    fn fresh(&mut self) -> PathBuf {
        self.next += 1;
        self.parent.join(format!("out-{}", self.next))
    }
}

impl Drop for Outputs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.parent);
    }
}

/// (seconds, files/s, MiB/s) text for a transfer of the tree.
fn rate(secs: f64, files: usize, bytes: u64) -> String {
    format!(
        "{secs:6.2}s {:7.0} files/s {:6.1} MiB/s",
        files as f64 / secs,
        bytes as f64 / (1 << 20) as f64 / secs
    )
}

fn main() {
    if listing_only() {
        return;
    }
    let Some(bgd) = bgd() else {
        eprintln!("BuildGrid's bgd is not installed: run scripts/setup-test-env.sh first");
        return;
    };
    let n = tree_files();
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    let files = make_tree(&tree, n);
    let bytes: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    println!(
        "tree: {n} files, {:.1} MiB, in 100 directories; serve over memory on loopback",
        bytes as f64 / (1 << 20) as f64
    );

    // Uploads, each into an empty serve.
    let ours = Served::empty();
    let config = ours.config(
        "c.yaml",
        &format!("grpc: {{endpoint: \"grpc://127.0.0.1:{}\"}}", ours.port),
    );
    let put_secs = put(&config, &files);
    let put_again = put(&config, &files);
    let theirs = Served::empty();
    let (bgd_up, root) = bgd_upload(&bgd, theirs.port, &tree);
    println!("upload:");
    println!("  blob-access put          {}", rate(put_secs, n, bytes));
    println!("  bgd cas upload-dir       {}", rate(bgd_up, n, bytes));
    println!("  put again, all stored    {}", rate(put_again, n, bytes));
    println!(
        "  put is {:.1}x as fast as bgd (goal >= 3x)",
        bgd_up / put_secs
    );

    // Downloads of the tree bgd uploaded (it wrote the Directory messages).
    let config = theirs.config(
        "c.yaml",
        &format!("grpc: {{endpoint: \"grpc://127.0.0.1:{}\"}}", theirs.port),
    );
    let fetch_into = |outs: &mut Outputs, flags: &[&str]| {
        best_of(3, || {
            let out = outs.fresh();
            timed(
                Command::new(bin())
                    .args(["fetch-tree", "-q"])
                    .args(flags)
                    .arg("--config")
                    .arg(&config)
                    .arg(&root)
                    .arg(&out),
            )
            .0
        })
    };
    let bgd_into = |outs: &mut Outputs| {
        best_of(3, || {
            let out = outs.fresh();
            timed(
                Command::new(&bgd)
                    .args(["cas", &url(theirs.port), "download-dir", &root])
                    .arg(&out),
            )
            .0
        })
    };
    // The filesystem's own cost of making these files: `tar -x` of them, in
    // one process, nothing verified or fetched (the floor beside bgd).
    let archive = work.path().join("tree.tar");
    let tarred = Command::new("tar")
        .arg("-C")
        .arg(&tree)
        .arg("-cf")
        .arg(&archive)
        .arg(".")
        .status();
    let tar_into = |outs: &mut Outputs| {
        tarred.as_ref().is_ok_and(|s| s.success()).then(|| {
            best_of(3, || {
                let out = outs.fresh();
                std::fs::create_dir(&out).unwrap();
                timed(
                    Command::new("tar")
                        .arg("-C")
                        .arg(&out)
                        .arg("-xf")
                        .arg(&archive),
                )
                .0
            })
        })
    };
    let print_tar = |secs: Option<f64>| {
        if let Some(secs) = secs {
            println!("  tar -x (the floor)       {}", rate(secs, n, bytes));
        }
    };
    // Best of 3 runs each, into directories never used before.
    let mut disk = Outputs::under(&work.path().join("out"));
    let fetch = fetch_into(&mut disk, &[]);
    let fetch_fsync = fetch_into(&mut disk, &["--fsync"]);
    let bgd_down = bgd_into(&mut disk);
    let tar = tar_into(&mut disk);
    drop(disk);
    println!("download (best of 3, into {}):", work.path().display());
    println!("  blob-access fetch-tree   {}", rate(fetch, n, bytes));
    println!("  fetch-tree --fsync       {}", rate(fetch_fsync, n, bytes));
    println!("  bgd cas download-dir     {}", rate(bgd_down, n, bytes));
    print_tar(tar);
    println!(
        "  fetch-tree is {:.1}x as fast as bgd (goal >= 5x)",
        bgd_down / fetch
    );
    // The same into memory (tmpfs), to tell the transfer from the disk's cost.
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        let mut mem = Outputs::under(&shm.join(format!("tree-transfer-{}", std::process::id())));
        let fetch = fetch_into(&mut mem, &[]);
        let bgd_down = bgd_into(&mut mem);
        let tar = tar_into(&mut mem);
        println!("download into /dev/shm (best of 3):");
        println!("  blob-access fetch-tree   {}", rate(fetch, n, bytes));
        println!("  bgd cas download-dir     {}", rate(bgd_down, n, bytes));
        print_tar(tar);
        println!("  fetch-tree is {:.1}x as fast as bgd", bgd_down / fetch);
    }

    // 100,000 digests, half of them stored (the tree's files, repeated).
    let stored: Vec<Digest> = files
        .iter()
        .map(|f| Digest::of(&std::fs::read(f).unwrap()))
        .collect();
    let digests: Vec<Digest> = (0..100_000)
        .map(|i| {
            if i % 2 == 0 {
                stored[i / 2 % stored.len()].clone()
            } else {
                Digest::of(format!("absent {i}").as_bytes())
            }
        })
        .collect();
    let input: String = digests.iter().map(|d| format!("{d}\n")).collect();
    let cli_secs = best_of(3, || {
        let start = Instant::now();
        let mut child = Command::new(bin())
            .args(["find-missing", "--config"])
            .arg(&config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout.iter().filter(|&&b| b == b'\n').count(), 50_000);
        start.elapsed().as_secs_f64()
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tonic_secs = best_of(3, || {
        rt.block_on(async {
            let start = Instant::now();
            let mut client = ContentAddressableStorageClient::connect(format!(
                "http://127.0.0.1:{}",
                theirs.port
            ))
            .await
            .unwrap()
            .max_decoding_message_size(64 << 20);
            let mut missing = 0;
            for chunk in digests.chunks(10_000) {
                let req = FindMissingBlobsRequest {
                    blob_digests: chunk.iter().map(|d| d.to_proto()).collect(),
                    ..Default::default()
                };
                missing += client
                    .find_missing_blobs(req)
                    .await
                    .unwrap()
                    .into_inner()
                    .missing_blob_digests
                    .len();
            }
            assert_eq!(missing, 50_000);
            start.elapsed().as_secs_f64()
        })
    });
    println!("find-missing of 100,000 digests (half stored), best of 3:");
    println!("  blob-access find-missing (stdin, one call, whole process) {cli_secs:6.2}s");
    println!("  plain tonic loop, 10 calls of 10,000 (in-process)         {tonic_secs:6.2}s");
}
