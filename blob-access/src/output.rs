//! Where a download goes when given a path, as `cp` and curl would have it.
//!
//! Users time downloads with `-o /dev/null`, pipe them through a FIFO, or
//! write to `/dev/stdout`. Replacing such a path atomically (a new file
//! renamed over it) would turn `/dev/null` into a regular file for every
//! program on the machine. So only a regular file (or nothing) is replaced
//! atomically; what exists and is not a regular file is written *into*:
//!
//! - nothing there, a regular file: replaced atomically ([`crate::atomic_file`]);
//! - a symlink: followed, and what it points to handled by these rules (the
//!   link itself is never replaced);
//! - a character or block device, a FIFO: opened and written into;
//! - a path through `/proc` (`/dev/stdout`, `/proc/self/fd/N`): opened and
//!   written into, whatever it is (a pipe, a terminal, a file a shell opened);
//! - a directory, a socket: refused, naming the path.
//!
//! ```
//! use blob_access::output::{Output, OutputPath};
//! let dir = tempfile::tempdir().unwrap();
//! let file = dir.path().join("blob");
//! assert!(matches!(OutputPath::resolve(&file).unwrap(), OutputPath::Replace(p) if p == file));
//! match OutputPath::resolve(std::path::Path::new("/dev/null")).unwrap() {
//!     OutputPath::Into(Output { kind, .. }) => assert_eq!(kind, "a character device"),
//!     other => panic!("/dev/null would be replaced: {other:?}"),
//! }
//! ```

use std::fs::{File, FileType, OpenOptions};
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// Symlinks followed before giving up, as the kernel's `MAXSYMLINKS`.
const MAX_LINKS: usize = 40;

/// What a download to a path does; see the module documentation.
#[derive(Debug)]
pub enum OutputPath {
    /// Written beside this path (the given one with its symlinks followed)
    /// and renamed over it once whole.
    Replace(PathBuf),
    /// Written into an existing file that cannot be replaced.
    Into(Output),
}

/// An opened output that is written into, not replaced.
#[derive(Debug)]
pub struct Output {
    pub file: File,
    /// What it is, for messages: "a FIFO", "a character device"...
    pub kind: &'static str,
}

impl OutputPath {
    /// Decides how `path` is written, opening it if it is written into.
    /// Errors name `path` and say why.
    pub fn resolve(path: &Path) -> io::Result<OutputPath> {
        let mut at = path.to_path_buf();
        for _ in 0..MAX_LINKS {
            let meta = match std::fs::symlink_metadata(&at) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Ok(OutputPath::Replace(at));
                }
                Err(e) => return Err(named(path, e)),
                Ok(m) => m,
            };
            let kind = meta.file_type();
            if kind.is_symlink() {
                // /dev/stdout leads to /proc/self/fd/1, whose link names a
                // pipe or a terminal, or a file that a shell opened (maybe
                // to append): only opening it keeps what the shell meant.
                if on_procfs(&at) {
                    return open_into(path, &at, "an open file descriptor").map(OutputPath::Into);
                }
                let target = std::fs::read_link(&at).map_err(|e| named(path, e))?;
                at = match at.parent() {
                    Some(dir) => dir.join(target),
                    None => target,
                };
                continue;
            }
            return match describe(kind) {
                Kind::Regular => Ok(OutputPath::Replace(at)),
                Kind::WrittenInto(what) => open_into(path, &at, what).map(OutputPath::Into),
                Kind::Refused(why) => Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: {why}", shown(path, &at)),
                )),
            };
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: more than {MAX_LINKS} symlinks", path.display()),
        ))
    }
}

enum Kind {
    Regular,
    WrittenInto(&'static str),
    Refused(&'static str),
}

fn describe(kind: FileType) -> Kind {
    if kind.is_file() {
        Kind::Regular
    } else if kind.is_char_device() {
        Kind::WrittenInto("a character device")
    } else if kind.is_block_device() {
        Kind::WrittenInto("a block device")
    } else if kind.is_fifo() {
        Kind::WrittenInto("a FIFO")
    } else if kind.is_dir() {
        Kind::Refused("is a directory; give the path of a file to write")
    } else if kind.is_socket() {
        Kind::Refused("is a socket, which cannot be written as a file")
    } else {
        Kind::Refused("is not a file that can be written")
    }
}

/// Whether an existing entry at `path` may be replaced by a file of ours:
/// nothing, a regular file or a symlink (the link itself is replaced, never
/// followed). Anything else (a directory, a device, a FIFO, a socket) is an
/// error saying what it is.
pub fn check_replaceable(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_file() || m.file_type().is_symlink() => Ok(()),
        Ok(m) => {
            let what = match describe(m.file_type()) {
                Kind::WrittenInto(what) => what,
                Kind::Refused(_) if m.is_dir() => "a directory",
                Kind::Refused(_) if m.file_type().is_socket() => "a socket",
                _ => "not a regular file",
            };
            Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("exists and is {what}, which is not replaced"),
            ))
        }
    }
}

fn open_into(asked: &Path, at: &Path, kind: &'static str) -> io::Result<Output> {
    let mut options = OpenOptions::new();
    options.write(true);
    // A regular file reached through /proc was opened by whoever gave us
    // the descriptor; append rather than write over what it holds.
    if std::fs::metadata(at).is_ok_and(|m| m.is_file()) {
        options.append(true);
    }
    let file = options
        .open(at)
        .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", shown(asked, at))))?;
    Ok(Output { file, kind })
}

/// `asked`, and where it led if that is elsewhere.
fn shown(asked: &Path, at: &Path) -> String {
    if asked == at {
        asked.display().to_string()
    } else {
        format!("{} (-> {})", asked.display(), at.display())
    }
}

fn named(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Whether the directory holding `path` is on procfs, where symlinks are
/// magic (they open what a process has open, which may have no path).
fn on_procfs(path: &Path) -> bool {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    statfs_type(dir) == Some(PROC_SUPER_MAGIC)
}

// The type of f_type (and of the constant) differs between libcs and targets.
#[cfg(any(target_os = "linux", target_os = "android"))]
#[allow(clippy::unnecessary_cast)]
const PROC_SUPER_MAGIC: i64 = libc::PROC_SUPER_MAGIC as i64;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const PROC_SUPER_MAGIC: i64 = -1;

#[cfg(any(target_os = "linux", target_os = "android"))]
#[allow(clippy::unnecessary_cast)]
fn statfs_type(dir: &Path) -> Option<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: a NUL-terminated path and a buffer of the right type.
    if unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statfs filled it in.
    Some(unsafe { st.assume_init() }.f_type as i64)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn statfs_type(_dir: &Path) -> Option<i64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn replaced_at(p: &Path) -> PathBuf {
        match OutputPath::resolve(p).unwrap() {
            OutputPath::Replace(at) => at,
            other => panic!("{}: {other:?}", p.display()),
        }
    }

    fn kind_into(p: &Path) -> &'static str {
        match OutputPath::resolve(p).unwrap() {
            OutputPath::Into(o) => o.kind,
            other => panic!("{}: {other:?}", p.display()),
        }
    }

    #[test]
    fn files_and_nothing_are_replaced_through_their_links() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let file = d.join("file");
        std::fs::write(&file, "x").unwrap();
        assert_eq!(replaced_at(&file), file);
        assert_eq!(replaced_at(&d.join("new")), d.join("new"));
        // A chain of links, relative and absolute, ends at the file.
        std::fs::create_dir(d.join("sub")).unwrap();
        symlink("../file", d.join("sub/rel")).unwrap();
        symlink(d.join("sub/rel"), d.join("abs")).unwrap();
        let at = replaced_at(&d.join("abs"));
        assert_eq!(
            std::fs::canonicalize(at).unwrap(),
            file.canonicalize().unwrap()
        );
        // A dangling link: the file it names is created, the link kept.
        symlink("missing", d.join("dangling")).unwrap();
        assert_eq!(replaced_at(&d.join("dangling")), d.join("missing"));
    }

    #[test]
    fn devices_fifos_and_proc_links_are_written_into() {
        assert_eq!(kind_into(Path::new("/dev/null")), "a character device");
        // A pipe has no path but the one /proc gives it.
        let mut fds = [0; 2];
        // SAFETY: a buffer of two descriptors.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let fd = format!("/proc/self/fd/{}", fds[1]);
        match OutputPath::resolve(Path::new(&fd)).unwrap() {
            OutputPath::Into(mut o) => {
                assert_eq!(o.kind, "an open file descriptor");
                std::io::Write::write_all(&mut o.file, b"piped").unwrap();
            }
            other => panic!("{other:?}"),
        }
        let mut got = [0u8; 5];
        // SAFETY: reads into a buffer of its length, then closes our two fds.
        unsafe {
            assert_eq!(libc::read(fds[0], got.as_mut_ptr().cast(), 5), 5);
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        assert_eq!(&got, b"piped");
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Opening a FIFO for writing waits for a reader.
        let reader = std::thread::spawn({
            let fifo = fifo.clone();
            move || std::fs::read(fifo).unwrap()
        });
        let link = dir.path().join("to-fifo");
        symlink(&fifo, &link).unwrap();
        match OutputPath::resolve(&link).unwrap() {
            OutputPath::Into(mut o) => {
                assert_eq!(o.kind, "a FIFO");
                std::io::Write::write_all(&mut o.file, b"through").unwrap();
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(reader.join().unwrap(), b"through");
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn directories_sockets_and_loops_are_refused_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let sock = d.join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        symlink("loop-b", d.join("loop-a")).unwrap();
        symlink("loop-a", d.join("loop-b")).unwrap();
        for (p, says) in [
            (d.to_path_buf(), "is a directory"),
            (sock.clone(), "is a socket"),
            (d.join("loop-a"), "symlinks"),
        ] {
            let err = OutputPath::resolve(&p).unwrap_err().to_string();
            assert!(
                err.contains(&p.display().to_string()) && err.contains(says),
                "{err}"
            );
        }
    }

    #[test]
    fn only_files_and_links_are_replaceable() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("f"), "").unwrap();
        symlink("/etc", d.join("l")).unwrap();
        for ok in ["f", "l", "absent"] {
            check_replaceable(&d.join(ok)).unwrap();
        }
        let _listener = std::os::unix::net::UnixListener::bind(d.join("s")).unwrap();
        for (p, says) in [(d.to_path_buf(), "a directory"), (d.join("s"), "a socket")] {
            let err = check_replaceable(&p).unwrap_err().to_string();
            assert!(err.contains(says), "{err}");
        }
        let err = check_replaceable(Path::new("/dev/null")).unwrap_err();
        assert!(err.to_string().contains("a character device"), "{err}");
    }
}
