//! A file that appears at its path only once it is whole.
//!
//! Downloads are written into an unnamed file in the target's directory
//! (`O_TMPFILE`) and linked into place when complete: a download that fails,
//! or a process killed half-way, leaves nothing behind, not even a temp file
//! of many GiB (but for the instant an existing target is replaced: linked
//! beside it, then renamed over it). Where the filesystem has no unnamed files (or there is no
//! `/proc` to name one by), a named temp file beside the target is renamed
//! instead, and deleted on failure.
//!
//! ```
//! use blob_access::atomic_file::AtomicFile;
//! use std::io::Write;
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("out");
//! let mut f = AtomicFile::create_beside(&path, 0o644).unwrap();
//! f.file().write_all(b"whole").unwrap();
//! assert!(!path.exists(), "not there until persisted");
//! f.persist(&path).unwrap();
//! assert_eq!(std::fs::read(&path).unwrap(), b"whole");
//! ```

use std::fs::File;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// See the module documentation.
pub struct AtomicFile {
    file: File,
    /// The temp file's name, when it has one (deleted on drop).
    named: Option<tempfile::TempPath>,
}

impl AtomicFile {
    /// A new empty file in `target`'s directory, created with `mode` less the
    /// umask, as a plain file would be. Nothing appears at `target` yet.
    pub fn create_beside(target: &Path, mode: u32) -> io::Result<AtomicFile> {
        Self::create(target, mode & !umask(), UNNAMED)
    }

    /// [`AtomicFile::create_beside`], with exactly `mode`, whatever the umask
    /// (say a tree's 0755 executables).
    pub fn create_beside_with_mode(target: &Path, mode: u32) -> io::Result<AtomicFile> {
        Self::create(target, mode, UNNAMED)
    }

    fn create(target: &Path, mode: u32, try_unnamed: bool) -> io::Result<AtomicFile> {
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let exact = |file: &File| file.set_permissions(std::fs::Permissions::from_mode(mode));
        if try_unnamed && proc_fd_links() {
            match open_unnamed(dir) {
                // The mode is set here, not by open: kernels before 6.x left
                // the umask out of O_TMPFILE files on some filesystems.
                Ok(file) => {
                    exact(&file)?;
                    return Ok(AtomicFile { file, named: None });
                }
                // No O_TMPFILE on this filesystem (EOPNOTSUPP; EISDIR or
                // EINVAL from old kernels): a named temp file does.
                Err(e) if unsupported(&e) => {}
                // No such directory, no permission: said as it is.
                Err(e) => return Err(e),
            }
        }
        let (file, path) = tempfile::Builder::new()
            .prefix(".blob-access-")
            .suffix(".tmp")
            .permissions(std::fs::Permissions::from_mode(0o600))
            .tempfile_in(dir)?
            .into_parts();
        exact(&file)?;
        Ok(AtomicFile {
            file,
            named: Some(path),
        })
    }

    /// The file to write (and fsync, if the caller wants it on disk).
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// Gives the file its name `target`, replacing what was there.
    pub fn persist(self, target: &Path) -> io::Result<()> {
        let AtomicFile { file, named } = self;
        if let Some(path) = named {
            drop(file);
            return path.persist(target).map_err(|e| e.error);
        }
        match link_unnamed(&file, target) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // linkat never replaces: link beside, then rename over.
                let beside = temp_name_beside(target);
                link_unnamed(&file, &beside)?;
                std::fs::rename(&beside, target).inspect_err(|_| {
                    let _ = std::fs::remove_file(&beside);
                })
            }
            linked => linked,
        }
    }
}

/// Whether unnamed files are tried at all: O_TMPFILE is Linux's.
const UNNAMED: bool = cfg!(any(target_os = "linux", target_os = "android"));

#[cfg(any(target_os = "linux", target_os = "android"))]
fn open_unnamed(dir: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(dir)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn open_unnamed(_dir: &Path) -> io::Result<File> {
    Err(io::ErrorKind::Unsupported.into())
}

fn unsupported(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Unsupported
        || matches!(
            e.raw_os_error(),
            Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
        )
}

/// Whether an unnamed file can be named through `/proc/self/fd` (looked up
/// once).
fn proc_fd_links() -> bool {
    static THERE: OnceLock<bool> = OnceLock::new();
    *THERE.get_or_init(|| Path::new("/proc/self/fd").is_dir())
}

/// The process's umask, read once (from /proc where the kernel shows it, so
/// that it is never changed, even for an instant).
fn umask() -> u32 {
    static UMASK: OnceLock<u32> = OnceLock::new();
    *UMASK.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let shown = status
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .and_then(|v| u32::from_str_radix(v.trim(), 8).ok());
        shown.unwrap_or_else(|| {
            // SAFETY: umask only swaps the process's mask; the stricter 077
            // is in place only between the two calls.
            let old = unsafe { libc::umask(0o077) };
            unsafe { libc::umask(old) };
            old as u32
        })
    })
}

/// Names the unnamed (`O_TMPFILE`) `file` `target`; fails if `target` exists.
fn link_unnamed(file: &File, target: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    // The /proc link, not AT_EMPTY_PATH, which needs CAP_DAC_READ_SEARCH.
    let from = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let to = std::ffi::CString::new(target.as_os_str().as_bytes())?;
    // SAFETY: both are NUL-terminated paths that live across the call.
    let linked = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if linked == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Creates a symlink at `path` to `target` atomically: made beside it, then
/// renamed over whatever `path` held.
pub fn symlink(target: &str, path: &Path) -> io::Result<()> {
    let beside = temp_name_beside(path);
    std::os::unix::fs::symlink(target, &beside)?;
    std::fs::rename(&beside, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&beside);
    })
}

/// A name beside `target` that nothing else uses.
fn temp_name_beside(target: &Path) -> PathBuf {
    target.with_file_name(format!(".blob-access-{:016x}.tmp", rand::random::<u64>()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn appears_whole_replaces_and_leaves_nothing_when_dropped() {
        // Unnamed (O_TMPFILE) and named temp files alike.
        for unnamed in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let target = dir.path().join("t");
            let mut f = AtomicFile::create(&target, 0o600, unnamed).unwrap();
            assert_eq!(f.named.is_none(), unnamed);
            f.file().write_all(b"first").unwrap();
            assert!(!target.exists());
            f.persist(&target).unwrap();
            assert_eq!(std::fs::read(&target).unwrap(), b"first");
            let mode = std::fs::metadata(&target).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);

            // Over an existing file: replaced, nothing else left.
            let mut f = AtomicFile::create(&target, 0o600, unnamed).unwrap();
            f.file().write_all(b"second").unwrap();
            f.persist(&target).unwrap();
            assert_eq!(std::fs::read(&target).unwrap(), b"second");
            assert_eq!(entries(dir.path()), ["t"]);

            // Dropped before persisting: no trace.
            let mut f = AtomicFile::create(&dir.path().join("u"), 0o600, unnamed).unwrap();
            f.file().write_all(b"never").unwrap();
            drop(f);
            assert_eq!(entries(dir.path()), ["t"]);
        }
    }

    #[test]
    fn symlinks_replace_what_was_there() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("l");
        std::fs::write(&link, "a file first").unwrap();
        symlink("somewhere", &link).unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("somewhere"));
        symlink("elsewhere", &link).unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("elsewhere"));
        assert_eq!(entries(dir.path()), ["l"]);
    }

    #[test]
    fn a_missing_directory_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no/such/dir/f");
        let err = AtomicFile::create_beside(&missing, 0o644)
            .err()
            .expect("no directory to create it in");
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        // The directory's error, not one of a temp file that never was.
        assert!(!err.to_string().contains(".blob-access-"), "{err}");
    }

    #[test]
    fn modes_less_the_umask_or_exact() {
        let dir = tempfile::tempdir().unwrap();
        let mode_of = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        for unnamed in [true, false] {
            let plain = dir.path().join(format!("plain-{unnamed}"));
            AtomicFile::create(&plain, 0o666 & !umask(), unnamed)
                .and_then(|f| f.persist(&plain))
                .unwrap();
            assert_eq!(mode_of(&plain), 0o666 & !umask());
            let exe = dir.path().join(format!("exe-{unnamed}"));
            AtomicFile::create(&exe, 0o755, unnamed)
                .and_then(|f| f.persist(&exe))
                .unwrap();
            assert_eq!(mode_of(&exe), 0o755);
        }
        let via_api = dir.path().join("api");
        AtomicFile::create_beside(&via_api, 0o640)
            .and_then(|f| f.persist(&via_api))
            .unwrap();
        assert_eq!(mode_of(&via_api), 0o640 & !umask());
    }

    #[test]
    fn the_umask_read_is_the_process_s() {
        // SAFETY: set and restored at once; only this test reads it.
        let old = unsafe { libc::umask(0o022) };
        unsafe { libc::umask(old) };
        assert_eq!(umask(), old as u32);
    }
}
