//! `get -o PATH` for every kind of path: a regular file (or nothing) is
//! replaced atomically; what exists and is not a regular file is written
//! into, never replaced (devices, FIFOs, /dev/stdout); sockets and
//! directories are refused; symlinks are followed, never replaced.
//!
//! `/dev/null` itself is only written into here, and `scripts/test.sh`
//! checks after the whole suite that it is still a character device.

mod support;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use support::*;

/// A `disk` store in `dir` holding one blob of `size` bytes: its config,
/// digest and the file it came from.
fn store(dir: &Path, size: u64) -> (PathBuf, String, PathBuf) {
    let config = dir.join("c.yaml");
    let cas = dir.join("cas");
    std::fs::write(
        &config,
        format!("disk: {{path: {}, max_size_bytes: 1GiB}}\n", cas.display()),
    )
    .unwrap();
    let file = random_file(dir, size);
    let digest = put_cli(&config, &file);
    (config, digest, file)
}

fn get(config: &Path, digest: &str, out: &Path) -> Output {
    cli(&get_args(config, digest, out))
}

fn error(o: &Output) -> String {
    assert!(!o.status.success(), "succeeded");
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// A device node like `dev` (same type and numbers) at `path`; false where
/// this user may not make one (only root may).
fn mknod_like(dev: &Path, path: &Path) -> bool {
    let meta = std::fs::metadata(dev).unwrap();
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    let made = unsafe { libc::mknod(c.as_ptr(), meta.mode() as libc::mode_t, meta.rdev()) };
    made == 0
}

fn is_root() -> bool {
    // SAFETY: no arguments, no side effects.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn character_devices_are_written_into_never_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let (config, digest, _) = store(dir.path(), 3 << 20);
    let null = std::fs::metadata("/dev/null").unwrap();
    let o = get(&config, &digest, Path::new("/dev/null"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let after = std::fs::metadata("/dev/null").unwrap();
    assert!(after.file_type().is_char_device());
    assert_eq!((after.rdev(), after.mode()), (null.rdev(), null.mode()));

    // A device node of our own (root, as in CI, may make one).
    let dev = dir.path().join("null-copy");
    if !mknod_like(Path::new("/dev/null"), &dev) {
        assert!(!is_root(), "root could not mknod");
        eprintln!("not root: no device node of our own");
        return;
    }
    let o = get(&config, &digest, &dev);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::metadata(&dev)
        .unwrap()
        .file_type()
        .is_char_device());
    // Through a symlink: the device is written, the link stays a link.
    let link = dir.path().join("to-dev");
    std::os::unix::fs::symlink(&dev, &link).unwrap();
    let o = get(&config, &digest, &link);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(std::fs::metadata(&dev)
        .unwrap()
        .file_type()
        .is_char_device());
}

/// A block device is opened, never replaced: one with no disk behind it (an
/// unattached loop device's numbers) fails to open, naming the path, and
/// stays a block device.
#[test]
fn block_devices_are_opened_never_replaced() {
    if !is_root() {
        eprintln!("not root: cannot make a block device node");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (config, digest, _) = store(dir.path(), 1000);
    let dev = dir.path().join("blk");
    let c = std::ffi::CString::new(dev.to_str().unwrap()).unwrap();
    // Loop device 7:255, which nothing attaches to in tests.
    // SAFETY: a NUL-terminated path.
    let made = unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o600, libc::makedev(7, 255)) };
    assert_eq!(made, 0, "root could not mknod");
    let o = get(&config, &digest, &dev);
    if o.status.success() {
        // A kernel that has such a loop device: written into it, not replaced.
        assert!(std::fs::metadata(&dev)
            .unwrap()
            .file_type()
            .is_block_device());
        return;
    }
    let err = error(&o);
    assert!(err.contains(dev.to_str().unwrap()), "{err}");
    assert!(std::fs::metadata(&dev)
        .unwrap()
        .file_type()
        .is_block_device());
}

#[test]
fn a_fifo_s_reader_gets_the_blob() {
    let dir = tempfile::tempdir().unwrap();
    let (config, digest, file) = store(dir.path(), (2 << 20) + 7);
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let reader = std::thread::spawn({
        let fifo = fifo.clone();
        move || std::fs::read(fifo).unwrap()
    });
    let o = get(&config, &digest, &fifo);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(reader.join().unwrap(), std::fs::read(&file).unwrap());
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());

    // A failed download into a FIFO says it was not atomic and how much went in.
    let missing = format!("{}/123", "ab".repeat(32));
    let reader = std::thread::spawn({
        let fifo = fifo.clone();
        move || std::fs::read(fifo).unwrap()
    });
    let err = error(&get(&config, &missing, &fifo));
    assert!(reader.join().unwrap().is_empty());
    assert!(
        err.contains("a FIFO") && err.contains("not atomically") && err.contains("0 of its 123"),
        "{err}"
    );
}

#[test]
fn stdout_stderr_and_proc_fd_paths_are_the_process_s_own() {
    let dir = tempfile::tempdir().unwrap();
    let (config, digest, file) = store(dir.path(), 100_000);
    let want = std::fs::read(&file).unwrap();
    for path in ["/dev/stdout", "/proc/self/fd/1"] {
        let o = get(&config, &digest, Path::new(path));
        assert!(
            o.status.success(),
            "{path}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            o.stdout == want,
            "{path}: {} bytes on stdout",
            o.stdout.len()
        );
    }
    let o = Command::new(bin())
        .args(get_args(&config, &digest, Path::new("/dev/stderr")))
        .args(["-q"])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(o.stderr == want, "{} bytes on stderr", o.stderr.len());

    // Standard output redirected to a file by a shell: appended to as the
    // shell's `>>` asked, the file keeps its inode.
    let log = dir.path().join("log");
    std::fs::write(&log, b"before\n").unwrap();
    let inode = std::fs::metadata(&log).unwrap().ino();
    let status = Command::new("sh")
        .arg("-c")
        .arg("exec \"$0\" \"$@\" >> \"$LOG\"")
        .env("LOG", &log)
        .arg(bin())
        .args(get_args(&config, &digest, Path::new("/dev/stdout")))
        .status()
        .unwrap();
    assert!(status.success());
    let got = std::fs::read(&log).unwrap();
    assert!(got.starts_with(b"before\n") && got[7..] == want[..]);
    assert_eq!(std::fs::metadata(&log).unwrap().ino(), inode);
}

#[test]
fn regular_files_are_replaced_atomically_through_symlinks() {
    let dir = tempfile::tempdir().unwrap();
    let (config, digest, file) = store(dir.path(), 5000);
    let want = std::fs::read(&file).unwrap();
    let target = dir.path().join("target");
    std::fs::write(&target, b"old").unwrap();
    let old_inode = std::fs::metadata(&target).unwrap().ino();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let link = dir.path().join("sub/link");
    std::os::unix::fs::symlink("../target", &link).unwrap();
    let o = get(&config, &digest, &link);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("../target"));
    assert_eq!(std::fs::read(&target).unwrap(), want);
    // Replaced (a new inode), not written over in place.
    assert_ne!(std::fs::metadata(&target).unwrap().ino(), old_inode);

    // A dangling link: the file it names is made, the link kept.
    let dangling = dir.path().join("dangling");
    std::os::unix::fs::symlink("made", &dangling).unwrap();
    let o = get(&config, &digest, &dangling);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::symlink_metadata(&dangling)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read(dir.path().join("made")).unwrap(), want);

    // A failed download leaves the old file as it was.
    let missing = format!("{}/123", "cd".repeat(32));
    let err = error(&get(&config, &missing, &link));
    assert!(
        err.contains("NotFound") || err.contains("not found"),
        "{err}"
    );
    assert_eq!(std::fs::read(&target).unwrap(), want);
}

#[test]
fn sockets_directories_and_symlink_loops_are_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (config, digest, _) = store(dir.path(), 1000);
    let sock = dir.path().join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let a_dir = dir.path().join("a-dir");
    std::fs::create_dir(&a_dir).unwrap();
    let to_dir = dir.path().join("to-dir");
    std::os::unix::fs::symlink(&a_dir, &to_dir).unwrap();
    let loop_a = dir.path().join("loop-a");
    std::os::unix::fs::symlink("loop-b", &loop_a).unwrap();
    std::os::unix::fs::symlink("loop-a", dir.path().join("loop-b")).unwrap();
    for (path, says) in [
        (&sock, "is a socket"),
        (&a_dir, "is a directory"),
        (&to_dir, "is a directory"),
        (&loop_a, "symlinks"),
    ] {
        let err = error(&get(&config, &digest, path));
        assert!(
            err.contains(path.to_str().unwrap()) && err.contains(says),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    assert!(std::fs::symlink_metadata(&sock)
        .unwrap()
        .file_type()
        .is_socket());
    assert!(std::fs::symlink_metadata(&to_dir)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read_dir(&a_dir).unwrap().count(), 0);
}
