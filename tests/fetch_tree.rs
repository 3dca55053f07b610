//! `blob-access fetch-tree` against `serve` over memory: files, executable
//! bits, symlinks, nested directories, identical blobs; a missing blob, hostile
//! names and a symlink left in OUTDIR.

mod support;

use blob_access::proto::{Directory, DirectoryNode, FileNode, SymlinkNode};
use blob_access::{util, BlobAccess, BuildContext, Digest};
use bytes::Bytes;
use prost::Message;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

/// `blob-access serve` (memory) on a unix socket in the test's own directory:
/// unlike a TCP port, it cannot be taken by a server of another test.
struct UnixServe(Child);

impl UnixServe {
    fn start(socket: &Path) -> UnixServe {
        let child = Command::new(bin())
            .args(["serve", "--listen"])
            .arg(format!("unix:{}", socket.display()))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut serve = UnixServe(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            assert!(serve.0.try_wait().unwrap().is_none(), "serve exited");
            assert!(Instant::now() < deadline, "serve does not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        serve
    }
}

impl Drop for UnixServe {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Cas {
    rt: tokio::runtime::Runtime,
    cas: Arc<dyn BlobAccess>,
    config: PathBuf,
    _serve: UnixServe,
}

impl Cas {
    fn start(dir: &Path) -> Cas {
        let socket = dir.join("cas.sock");
        let serve = UnixServe::start(&socket);
        let config = dir.join("c.yaml");
        std::fs::write(
            &config,
            format!(
                "grpc:\n  endpoint: \"unix:{}\"\n  instance_name: \"\"\n",
                socket.display()
            ),
        )
        .unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let node = blob_access_config::load_file(&config).unwrap();
        let cas = rt
            .block_on(async { node.build_cas(&BuildContext::root()) })
            .unwrap();
        Cas {
            rt,
            cas,
            config,
            _serve: serve,
        }
    }
    fn put(&self, data: impl Into<Bytes>) -> Digest {
        let data = data.into();
        let d = Digest::of(&data);
        self.rt
            .block_on(self.cas.put(&d, util::once(data)))
            .unwrap();
        d
    }
    fn put_dir(&self, dir: &Directory) -> Digest {
        self.put(dir.encode_to_vec())
    }
    fn fetch_with(&self, root: &Digest, out: &Path, extra: &[&str]) -> Output {
        let mut args = vec!["fetch-tree", "--config", self.config.to_str().unwrap()];
        args.extend(extra);
        let root = root.to_string();
        args.extend([root.as_str(), out.to_str().unwrap()]);
        cli(&args)
    }
    fn fetch(&self, root: &Digest, out: &Path) -> Output {
        self.fetch_with(root, out, &[])
    }
}

fn file(name: &str, d: &Digest, executable: bool) -> FileNode {
    FileNode {
        name: name.into(),
        digest: Some(d.to_proto()),
        is_executable: executable,
        ..Default::default()
    }
}

fn dir(name: &str, d: &Digest) -> DirectoryNode {
    DirectoryNode {
        name: name.into(),
        digest: Some(d.to_proto()),
    }
}

fn symlink(name: &str, target: &str) -> SymlinkNode {
    SymlinkNode {
        name: name.into(),
        target: target.into(),
        ..Default::default()
    }
}

/// A tree with a nested 3 MiB file; `upload_big: false` leaves that blob out.
fn tree(cas: &Cas, big: &[u8], upload_big: bool) -> Digest {
    let big_digest = if upload_big {
        cas.put(big.to_vec())
    } else {
        Digest::of(big)
    };
    let empty = cas.put(Bytes::new());
    let deeper = cas.put_dir(&Directory {
        files: vec![
            file("big.bin", &big_digest, false),
            file("empty", &empty, false),
        ],
        ..Default::default()
    });
    let sub = cas.put_dir(&Directory {
        directories: vec![dir("deeper", &deeper)],
        ..Default::default()
    });
    let script = cas.put(&b"#!/bin/sh\necho hi\n"[..]);
    // The same large blob as an executable: streamed once, copied once, each
    // with its own mode.
    let bin = cas.put_dir(&Directory {
        files: vec![
            file("big-tool", &big_digest, true),
            file("run.sh", &script, true),
        ],
        ..Default::default()
    });
    let hello = cas.put(&b"hello\n"[..]);
    cas.put_dir(&Directory {
        files: vec![file("a.txt", &hello, false)],
        directories: vec![dir("bin", &bin), dir("sub", &sub)],
        symlinks: vec![symlink("link", "a.txt")],
        ..Default::default()
    })
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// No temp file left anywhere under `dir`.
fn assert_no_temp_files(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(
            !name.ends_with(".tmp"),
            "left behind: {}",
            e.path().display()
        );
        if e.file_type().unwrap().is_dir() {
            assert_no_temp_files(&e.path());
        }
    }
}

#[test]
fn fetches_files_modes_symlinks_and_nested_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let cas = Cas::start(tmp.path());
    let big = std::fs::read(random_file(tmp.path(), 3 << 20)).unwrap();
    let root = tree(&cas, &big, true);
    let out = tmp.path().join("out/not/yet/there");
    let o = cas.fetch(&root, &out);
    assert!(o.status.success(), "{}", stderr(&o));

    assert_eq!(std::fs::read(out.join("a.txt")).unwrap(), b"hello\n");
    assert_eq!(mode(&out.join("a.txt")), 0o644);
    assert_eq!(
        std::fs::read(out.join("bin/run.sh")).unwrap(),
        b"#!/bin/sh\necho hi\n"
    );
    assert_eq!(mode(&out.join("bin/run.sh")), 0o755);
    assert!(std::fs::read(out.join("sub/deeper/big.bin")).unwrap() == big);
    assert_eq!(mode(&out.join("sub/deeper/big.bin")), 0o644);
    assert!(std::fs::read(out.join("bin/big-tool")).unwrap() == big);
    assert_eq!(mode(&out.join("bin/big-tool")), 0o755);
    assert_eq!(std::fs::read(out.join("sub/deeper/empty")).unwrap(), b"");
    assert_eq!(
        std::fs::read_link(out.join("link")).unwrap(),
        Path::new("a.txt")
    );
    assert_eq!(std::fs::read(out.join("link")).unwrap(), b"hello\n");
    assert_no_temp_files(&out);
    let summary = stderr(&o);
    assert!(
        summary.contains("4 directories, 5 files")
            && summary.contains(&format!("{} bytes", 2 * big.len() + 6 + 18))
            && summary.contains("1 symlinks"),
        "{summary}"
    );
    // Fetching again over the result replaces it in place, with one job at a time.
    let o = cas.fetch_with(&root, &out, &["--jobs", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::read(out.join("sub/deeper/big.bin")).unwrap() == big);
}

#[test]
fn identical_files_and_directories_are_fetched_once_and_copied() {
    let tmp = tempfile::tempdir().unwrap();
    let cas = Cas::start(tmp.path());
    let data = cas.put(&b"same bytes"[..]);
    let inner = cas.put_dir(&Directory {
        files: vec![file("exe", &data, true), file("plain", &data, false)],
        ..Default::default()
    });
    let root = cas.put_dir(&Directory {
        files: vec![file("top", &data, false)],
        directories: vec![dir("x", &inner), dir("y", &inner)],
        ..Default::default()
    });
    let out = tmp.path().join("out");
    let o = cas.fetch(&root, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    for (path, m) in [
        ("top", 0o644),
        ("x/exe", 0o755),
        ("x/plain", 0o644),
        ("y/exe", 0o755),
        ("y/plain", 0o644),
    ] {
        assert_eq!(
            std::fs::read(out.join(path)).unwrap(),
            b"same bytes",
            "{path}"
        );
        assert_eq!(mode(&out.join(path)), m, "{path}");
    }
    let summary = stderr(&o);
    assert!(
        summary.contains("3 directories, 5 files (50 bytes in 1 distinct blobs)"),
        "{summary}"
    );
    assert_no_temp_files(&out);
}

#[test]
fn a_missing_blob_fails_naming_its_path_and_leaves_no_partial_file() {
    let tmp = tempfile::tempdir().unwrap();
    let cas = Cas::start(tmp.path());
    let big = vec![7u8; 3 << 20];
    let root = tree(&cas, &big, false);
    let out = tmp.path().join("out");
    let o = cas.fetch(&root, &out);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.starts_with("blob-access: "), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // Named by the first of its two paths in the tree.
    assert!(err.contains("bin/big-tool"), "{err}");
    assert!(err.contains(&Digest::of(&big).to_string()), "{err}");
    assert!(!out.join("bin/big-tool").exists());
    assert!(!out.join("sub/deeper/big.bin").exists());
    assert!(!out.join("link").exists(), "symlinks come after all files");
    assert_no_temp_files(&out);

    // A missing Directory message: the error names the directory and its digest.
    let absent = Digest::of(&b"not uploaded"[..]);
    let root = cas.put_dir(&Directory {
        directories: vec![dir("d", &absent)],
        ..Default::default()
    });
    let o = cas.fetch(&root, &tmp.path().join("out2"));
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains(&format!("d (directory {absent})")), "{err}");
}

#[test]
fn entry_names_that_escape_the_output_directory_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cas = Cas::start(tmp.path());
    let evil = cas.put(&b"owned"[..]);
    let empty_dir = cas.put_dir(&Directory::default());
    let out = tmp.path().join("out");
    for name in ["..", ".", "a/../../b", "/etc/x", ""] {
        for root in [
            Directory {
                files: vec![file(name, &evil, false)],
                ..Default::default()
            },
            Directory {
                directories: vec![dir(name, &empty_dir)],
                ..Default::default()
            },
            Directory {
                symlinks: vec![symlink(name, "/etc")],
                ..Default::default()
            },
        ] {
            let o = cas.fetch(&cas.put_dir(&root), &out);
            let err = stderr(&o);
            assert!(!o.status.success(), "{name:?} accepted");
            assert!(err.contains("invalid entry name"), "{err}");
        }
    }
    assert!(!tmp.path().join("b").exists());
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);

    // The same name twice in one directory.
    let root = cas.put_dir(&Directory {
        files: vec![file("x", &evil, false)],
        symlinks: vec![symlink("x", "/etc")],
        ..Default::default()
    });
    let o = cas.fetch(&root, &out);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("appears twice"), "{}", stderr(&o));

    // Not a Directory message at all.
    let junk = cas.put(&b"\xff\xff\xff"[..]);
    let o = cas.fetch(&junk, &tmp.path().join("out2"));
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("not a Directory message") && err.contains(&junk.to_string()),
        "{err}"
    );
}

#[test]
fn a_symlink_left_in_outdir_is_not_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let cas = Cas::start(tmp.path());
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::os::unix::fs::symlink(&elsewhere, out.join("d")).unwrap();
    let data = cas.put(&b"data"[..]);
    let d = cas.put_dir(&Directory {
        files: vec![file("f", &data, false)],
        ..Default::default()
    });
    let root = cas.put_dir(&Directory {
        directories: vec![dir("d", &d)],
        ..Default::default()
    });
    let o = cas.fetch(&root, &out);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is not a directory"), "{}", stderr(&o));
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
}

/// What OUTDIR holds where the tree has a file or a symlink: a regular file
/// or a symlink is replaced (the link itself, never what it points to, even
/// out of OUTDIR); a FIFO, a device or a socket is an error naming it, left
/// as it was. OUTDIR itself may be a symlink to a directory.
#[test]
fn what_outdir_holds_at_a_tree_s_paths_is_replaced_or_refused_by_kind() {
    use std::os::unix::fs::FileTypeExt;
    let tmp = tempfile::tempdir().unwrap();
    let cas = Cas::start(tmp.path());
    let outside = tmp.path().join("outside");
    std::fs::write(&outside, b"not the tree's").unwrap();
    let data = cas.put(&b"data"[..]);
    let large = cas.put(vec![3u8; 3 << 20]);
    let tree = |name: &str| {
        cas.put_dir(&Directory {
            files: vec![file(name, &data, false), file("large", &large, false)],
            symlinks: vec![symlink("link", "f")],
            ..Default::default()
        })
    };
    let real = tmp.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let out = tmp.path().join("out");
    std::os::unix::fs::symlink(&real, &out).unwrap();
    // Symlinks out of OUTDIR where the tree has files and a symlink.
    for name in ["f", "large", "link"] {
        std::os::unix::fs::symlink(&outside, real.join(name)).unwrap();
    }
    let o = cas.fetch(&tree("f"), &out);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(real.join("f")).unwrap(), b"data");
    assert_eq!(std::fs::read(real.join("large")).unwrap().len(), 3 << 20);
    assert_eq!(
        std::fs::read_link(real.join("link")).unwrap(),
        Path::new("f")
    );
    assert_eq!(std::fs::read(&outside).unwrap(), b"not the tree's");
    assert!(std::fs::symlink_metadata(&out)
        .unwrap()
        .file_type()
        .is_symlink());

    // A FIFO, a socket, a directory where the tree has a file, small or large.
    let fifo = real.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let _socket = std::os::unix::net::UnixListener::bind(real.join("sock")).unwrap();
    std::fs::create_dir(real.join("dir")).unwrap();
    for (name, says) in [
        ("fifo", "a FIFO"),
        ("sock", "a socket"),
        ("dir", "a directory"),
    ] {
        let o = cas.fetch(&tree(name), &out);
        assert!(!o.status.success(), "{name} was replaced");
        assert!(
            stderr(&o).contains(name) && stderr(&o).contains(says),
            "{}",
            stderr(&o)
        );
    }
    // A large file (streamed, not written in a group) at the FIFO too.
    let large_at_fifo = cas.put_dir(&Directory {
        files: vec![file("fifo", &large, false)],
        ..Default::default()
    });
    let o = cas.fetch(&large_at_fifo, &out);
    assert!(stderr(&o).contains("a FIFO"), "{}", stderr(&o));
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(std::fs::symlink_metadata(real.join("sock"))
        .unwrap()
        .file_type()
        .is_socket());
    assert!(real.join("dir").is_dir());
    assert_no_temp_files(&real);
}

#[test]
fn quiet_prints_nothing_and_jobs_must_be_positive() {
    let tmp = tempfile::tempdir().unwrap();
    let cas = Cas::start(tmp.path());
    let data = cas.put(&b"q"[..]);
    let root = cas.put_dir(&Directory {
        files: vec![file("q", &data, false)],
        ..Default::default()
    });
    let out = tmp.path().join("out");
    let o = cas.fetch_with(&root, &out, &["--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stderr.is_empty() && o.stdout.is_empty(), "{}", stderr(&o));
    assert_eq!(std::fs::read(out.join("q")).unwrap(), b"q");

    let o = cas.fetch_with(&root, &out, &["--jobs", "0"]);
    assert!(!o.status.success());
}

/// fsync-family calls a fetch-tree run makes, from `strace` (None when strace
/// cannot run here): (fsync + fdatasync calls, syncfs calls).
fn traced_syncs(cas: &Cas, root: &Digest, out: &Path, extra: &[&str]) -> Option<(usize, usize)> {
    let log = out.with_extension("strace");
    let mut cmd = Command::new("strace");
    cmd.args([
        "-f",
        "-qq",
        "-e",
        "trace=fsync,fdatasync,syncfs",
        "-e",
        "signal=none",
        "-o",
    ])
    .arg(&log)
    .arg(bin())
    .args(["fetch-tree", "-q", "--config"])
    .arg(&cas.config)
    .args(extra)
    .arg(root.to_string())
    .arg(out);
    let o = cmd.output().ok()?;
    if !o.status.success() {
        let err = stderr(&o);
        // No strace, or no ptrace in this sandbox.
        if !log.exists() || err.contains("ptrace") {
            return None;
        }
        panic!("fetch-tree under strace failed: {err}");
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let count = |call: &str| text.lines().filter(|l| l.contains(call)).count();
    Some((count("fsync(") + count("fdatasync("), count("syncfs(")))
}

#[test]
fn files_are_not_fsynced_one_by_one_unless_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let cas = Cas::start(tmp.path());
    let n = 40;
    let files: Vec<FileNode> = (0..n)
        .map(|i| {
            let d = cas.put(format!("file {i}\n").repeat(i + 1));
            file(&format!("f{i:02}"), &d, i % 3 == 0)
        })
        .collect();
    let root = cas.put_dir(&Directory {
        files,
        ..Default::default()
    });
    let check = |out: &Path| {
        for i in 0..n {
            let p = out.join(format!("f{i:02}"));
            assert_eq!(
                std::fs::read(&p).unwrap(),
                format!("file {i}\n").repeat(i + 1).as_bytes()
            );
            assert_eq!(mode(&p), if i % 3 == 0 { 0o755 } else { 0o644 });
        }
        assert_no_temp_files(out);
    };
    let plain = tmp.path().join("plain");
    let synced = tmp.path().join("synced");
    let Some((fsyncs, syncfs)) = traced_syncs(&cas, &root, &plain, &[]) else {
        eprintln!("strace cannot run here; checking the files only");
        for (out, extra) in [(&plain, &[][..]), (&synced, &["--fsync"][..])] {
            let o = cas.fetch_with(&root, out, extra);
            assert!(o.status.success(), "{}", stderr(&o));
            check(out);
        }
        return;
    };
    check(&plain);
    assert_eq!((fsyncs, syncfs), (0, 1), "by default: one syncfs, no fsync");
    let (fsyncs, _) = traced_syncs(&cas, &root, &synced, &["--fsync"]).unwrap();
    check(&synced);
    assert!(fsyncs >= n, "--fsync: {fsyncs} fsyncs for {n} files");
}

#[test]
fn many_small_files_replace_what_outdir_held() {
    let tmp = tempfile::tempdir().unwrap();
    let cas = Cas::start(tmp.path());
    // More files than go to a writer thread at once, of sizes that cut the
    // groups by bytes too, some identical.
    let content = |i: usize| format!("{}:{i}\n", "x".repeat(i * 3001 % 700_000));
    let dirs: Vec<DirectoryNode> = (0..4)
        .map(|k| {
            let files = (0..60)
                .map(|i| {
                    let d = cas.put(content(k * 60 + i % 50));
                    file(&format!("f{i:02}"), &d, i % 4 == 0)
                })
                .collect();
            dir(
                &format!("d{k}"),
                &cas.put_dir(&Directory {
                    files,
                    ..Default::default()
                }),
            )
        })
        .collect();
    let root = cas.put_dir(&Directory {
        directories: dirs,
        ..Default::default()
    });
    let out = tmp.path().join("out");
    // Old contents and modes where some of the tree's files go.
    for k in 0..4 {
        std::fs::create_dir_all(out.join(format!("d{k}"))).unwrap();
        for i in (0..60).step_by(7) {
            let p = out.join(format!("d{k}/f{i:02}"));
            std::fs::write(&p, "old").unwrap();
            let m = if i % 4 == 0 { 0o600 } else { 0o700 };
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
        }
    }
    let o = cas.fetch(&root, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    for k in 0..4 {
        for i in 0..60 {
            let p = out.join(format!("d{k}/f{i:02}"));
            assert_eq!(
                std::fs::read(&p).unwrap(),
                content(k * 60 + i % 50).as_bytes(),
                "{}",
                p.display()
            );
            assert_eq!(mode(&p), if i % 4 == 0 { 0o755 } else { 0o644 });
        }
        assert_eq!(
            std::fs::read_dir(out.join(format!("d{k}")))
                .unwrap()
                .count(),
            60
        );
    }
    assert_no_temp_files(&out);
}
