//! `fetch-tree`: materialise a REAPI `Directory` tree (an action's inputs or
//! outputs) in a local directory.
//!
//! The `BlobAccess` trait has no GetTree, so the tree is walked through its
//! `Directory` messages, each read with `get` (this works over any tree of
//! nodes). The walk goes level by level, fetching the `Directory` messages of a
//! level several at once, each distinct digest once.
//!
//! Files are then fetched many at a time, each distinct digest once, each
//! verified by the `get` stream (size and digest) and written atomically: an
//! unnamed file with its mode, linked into place (or a temp file, renamed). A
//! file that exists therefore holds its whole verified content, and a killed
//! run leaves no temp files of small ones. Small files are read whole, in
//! groups (a `grpc` node coalesces them into batch calls), and each group is
//! written in one blocking call; large ones stream, `--jobs` at once. Instead
//! of an fsync per file, the filesystem is synced once at the end (`syncfs`);
//! `--fsync` also syncs each file before it gets its name. Symlinks come last,
//! so no file is written through a symlink of the tree.
//!
//! On failure OUTDIR may hold part of the tree (directories, some files, no
//! symlinks), never a partial file; the error names the path in the tree and
//! the digest. Names that could escape OUTDIR (empty, `.`, `..`, with `/`) or
//! that repeat within a directory are refused, as is a directory of the tree
//! that already exists in OUTDIR as anything but a directory (say a symlink).
//! A file of the tree replaces a regular file or a symlink at its path (the
//! link itself, never what it points to); a device, FIFO, socket or directory
//! there is an error naming it, and is left as it was.

use crate::progress::Ui;
use blob_access::atomic_file::{self, AtomicFile};
use blob_access::output;
use blob_access::{proto, upload, util, BlobAccess, Digest, DigestFunction, ReadRange};
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Largest `Directory` message read into memory.
const MAX_DIRECTORY_BYTES: usize = 64 << 20;

struct File {
    /// Relative to OUTDIR.
    path: PathBuf,
    digest: Digest,
    executable: bool,
}

impl File {
    fn mode(&self) -> std::fs::Permissions {
        std::fs::Permissions::from_mode(if self.executable { 0o755 } else { 0o644 })
    }

    fn error(&self, e: impl std::fmt::Display) -> String {
        format!("{} ({}): {e}", self.path.display(), self.digest)
    }
}

#[derive(Default)]
struct Tree {
    dirs: usize,
    files: Vec<File>,
    symlinks: Vec<(PathBuf, String)>,
}

/// A name of a tree entry, checked so that no entry can escape OUTDIR.
fn checked_name<'a>(name: &'a str, parent: &Path) -> Result<&'a str, String> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(format!(
            "{}: invalid entry name {name:?} in the tree",
            shown(parent)
        ));
    }
    Ok(name)
}

fn shown(rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        ".".into()
    } else {
        rel.display().to_string()
    }
}

/// A digest named in a tree: of the function of the directory naming it.
fn child_digest(parent: &Digest, d: Option<&proto::Digest>, at: &Path) -> Result<Digest, String> {
    let d = d.ok_or_else(|| format!("{}: entry without a digest", at.display()))?;
    Digest::from_proto(parent.function(), d).map_err(|e| format!("{}: {e}", at.display()))
}

/// Reads and decodes one `Directory` message; `rel` is where it is in the tree.
async fn fetch_directory(
    cas: &dyn BlobAccess,
    digest: &Digest,
    rel: &Path,
) -> Result<proto::Directory, String> {
    let at = || format!("{} (directory {digest})", shown(rel));
    let bytes = util::read_to_bytes(cas, digest, ReadRange::FULL, MAX_DIRECTORY_BYTES)
        .await
        .map_err(|e| format!("{}: {e}", at()))?;
    proto::Directory::decode(bytes).map_err(|e| format!("{}: not a Directory message: {e}", at()))
}

/// Creates `out/rel`, whose parent is a directory already; refuses anything but
/// a real directory there, so nothing is written through an old symlink.
fn create_dir(out: &Path, rel: &Path) -> Result<(), String> {
    let abs = out.join(rel);
    let made = if rel.as_os_str().is_empty() {
        std::fs::create_dir_all(&abs)
    } else {
        std::fs::create_dir(&abs)
    };
    match made {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let meta = if rel.as_os_str().is_empty() {
                std::fs::metadata(&abs)
            } else {
                std::fs::symlink_metadata(&abs)
            };
            match meta {
                Ok(m) if m.is_dir() => Ok(()),
                _ => Err(format!(
                    "{}: exists in {} and is not a directory",
                    shown(rel),
                    out.display()
                )),
            }
        }
        Err(e) => Err(format!("creating {}: {e}", abs.display())),
    }
}

/// Reads every `Directory` of the tree, creating its directories under `out`.
async fn walk(
    cas: &dyn BlobAccess,
    root: &Digest,
    out: &Path,
    jobs: usize,
) -> Result<Tree, String> {
    let mut tree = Tree::default();
    let mut known: HashMap<Digest, proto::Directory> = HashMap::new();
    let mut level = vec![(PathBuf::new(), root.clone())];
    while !level.is_empty() {
        let mut wanted = HashSet::new();
        let fetches =
            level
                .iter()
                .filter(|(_, d)| !known.contains_key(d) && wanted.insert(d))
                .map(|(rel, d)| async move {
                    fetch_directory(cas, d, rel).await.map(|m| (d.clone(), m))
                })
                .collect::<Vec<_>>();
        let fetched: Vec<_> = futures::stream::iter(fetches)
            .buffer_unordered(jobs.max(SMALL_JOBS))
            .try_collect()
            .await?;
        known.extend(fetched);

        let mut next = Vec::new();
        for (rel, digest) in level {
            let dir = &known[&digest];
            create_dir(out, &rel)?;
            tree.dirs += 1;
            let mut names = HashSet::new();
            let mut entry = |name: &str| {
                let path = rel.join(checked_name(name, &rel)?);
                if !names.insert(name.to_string()) {
                    return Err(format!(
                        "{}: entry name {name:?} appears twice in the tree",
                        shown(&rel)
                    ));
                }
                Ok::<_, String>(path)
            };
            for f in &dir.files {
                let path = entry(&f.name)?;
                let digest = child_digest(&digest, f.digest.as_ref(), &path)?;
                tree.files.push(File {
                    path,
                    digest,
                    executable: f.is_executable,
                });
            }
            for s in &dir.symlinks {
                let path = entry(&s.name)?;
                tree.symlinks.push((path, s.target.clone()));
            }
            for d in &dir.directories {
                let path = entry(&d.name)?;
                let digest = child_digest(&digest, d.digest.as_ref(), &path)?;
                next.push((path, digest));
            }
        }
        level = next;
    }
    Ok(tree)
}

/// Files up to this size are fetched whole into memory and written in one go.
const SMALL_FILE: u64 = 1 << 20;
/// Small files in flight at once, enough to fill batch calls; they go in
/// groups of at most 4 MiB, so at most `SMALL_JOBS / GROUP` groups are in
/// memory.
const SMALL_JOBS: usize = 256;

/// Makes `to` atomically ([`AtomicFile`]) with exactly the tree's `mode`,
/// whatever the umask, its bytes written by `fill`.
fn place(
    to: &Path,
    mode: std::fs::Permissions,
    fsync: bool,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    // Never through or over what is not a file or a symlink (a FIFO, a device).
    output::check_replaceable(to)?;
    let mut new = AtomicFile::create_beside_with_mode(to, mode.mode())?;
    fill(new.file())?;
    if fsync {
        new.file().sync_all()?;
    }
    output::check_replaceable(to)?;
    new.persist(to)
}

/// Writes `data` to `to` atomically, with `mode`.
fn write_file(
    to: &Path,
    data: &[u8],
    mode: std::fs::Permissions,
    fsync: bool,
) -> std::io::Result<()> {
    use std::io::Write;
    place(to, mode, fsync, |f| f.write_all(data))
}

/// Copies a fetched file to `to` atomically, with `mode`.
fn copy_file(
    from: &Path,
    to: &Path,
    mode: std::fs::Permissions,
    fsync: bool,
) -> std::io::Result<()> {
    place(to, mode, fsync, |f| {
        std::io::copy(&mut std::fs::File::open(from)?, f).map(drop)
    })
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("file thread failed: {e}"))?
}

/// Fetches a group of small blobs into memory, at once (a `grpc` node below
/// coalesces them into batch calls), and writes each to its files (all those
/// of its digest) in one blocking call for the whole group.
async fn fetch_small_group(
    cas: &dyn BlobAccess,
    out: &Path,
    group: Vec<&[&File]>,
    fsync: bool,
    bar: &indicatif::ProgressBar,
) -> Result<(), String> {
    let reads = group.iter().map(|files| async move {
        let first = files[0];
        let size = first.digest.size_bytes() as usize;
        util::read_to_bytes(cas, &first.digest, ReadRange::FULL, size)
            .await
            .map_err(|e| first.error(e))
    });
    let blobs = futures::future::try_join_all(reads).await?;
    let mut bytes = 0;
    let writes: Vec<_> = group
        .iter()
        .zip(blobs)
        .map(|(files, data)| {
            bytes += data.len() as u64 * files.len() as u64;
            let targets: Vec<_> = files
                .iter()
                .map(|f| (out.join(&f.path), f.mode(), f.error("writing")))
                .collect();
            (data, targets)
        })
        .collect();
    blocking(move || {
        for (data, targets) in writes {
            for (path, mode, what) in targets {
                write_file(&path, &data, mode, fsync).map_err(|e| format!("{what}: {e}"))?;
            }
        }
        Ok(())
    })
    .await?;
    bar.inc(bytes);
    Ok(())
}

/// Streams one large blob into the first of `files` (all of the same digest)
/// and copies it to the others.
async fn fetch_large(
    cas: &dyn BlobAccess,
    out: &Path,
    files: &[&File],
    fsync: bool,
    bar: &indicatif::ProgressBar,
) -> Result<(), String> {
    let first = files[0];
    let first_path = out.join(&first.path);
    let mode = Some(first.mode().mode());
    util::replace_file(cas, &first.digest, &first_path, fsync, mode, |n| bar.inc(n))
        .await
        .map_err(|e| first.error(e))?;
    for f in &files[1..] {
        let (to, mode, from) = (out.join(&f.path), f.mode(), first_path.clone());
        blocking(move || copy_file(&from, &to, mode, fsync).map_err(|e| e.to_string()))
            .await
            .map_err(|e| f.error(format_args!("copying from {}: {e}", first.path.display())))?;
        bar.inc(f.digest.size_bytes());
    }
    Ok(())
}

/// One `syncfs` of the filesystem holding `dir`: every file and rename above
/// reaches the disk in one call rather than an fsync each.
fn sync_filesystem(dir: &Path) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let d = std::fs::File::open(dir).map_err(|e| format!("opening {}: {e}", dir.display()))?;
    // SAFETY: syncfs only reads the descriptor, which `d` keeps open.
    if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("syncing the filesystem of {}: {e}", dir.display()));
    }
    Ok(())
}

/// How `fetch-tree` runs (see the command's flags).
pub struct Options {
    pub jobs: usize,
    pub fsync: bool,
    /// The digest function of the root and of every digest in the tree.
    pub function: DigestFunction,
}

pub async fn run(
    config: &Path,
    root: &str,
    out: &Path,
    opts: Options,
    ui: &Ui,
) -> Result<ExitCode, String> {
    let Options {
        jobs,
        fsync,
        function,
    } = opts;
    let started = std::time::Instant::now();
    let jobs = jobs.max(1);
    let root = super::transfer::parse_digest(root, function)?;
    let cas = super::open(config)?;
    let tree = walk(&*cas, &root, out, jobs).await?;

    // Files by digest, in tree order, so each distinct blob is fetched once.
    let mut by_digest: HashMap<&Digest, Vec<&File>> = HashMap::new();
    let mut order = Vec::new();
    for f in &tree.files {
        let same = by_digest.entry(&f.digest).or_default();
        if same.is_empty() {
            order.push(&f.digest);
        }
        same.push(f);
    }
    let total: u64 = tree.files.iter().map(|f| f.digest.size_bytes()).sum();
    let bar = ui.bar(total, "fetch-tree");
    let (small, large): (Vec<&Digest>, Vec<&Digest>) =
        order.iter().partition(|d| d.size_bytes() <= SMALL_FILE);
    let small = futures::stream::iter(upload::groups(&small, upload::GROUP_BYTES))
        .map(|g| {
            let group = g.into_iter().map(|d| &by_digest[d][..]).collect();
            fetch_small_group(&*cas, out, group, fsync, &bar)
        })
        .buffer_unordered(SMALL_JOBS / upload::GROUP)
        .try_collect::<()>();
    let large = futures::stream::iter(large)
        .map(|d| fetch_large(&*cas, out, &by_digest[d], fsync, &bar))
        .buffer_unordered(jobs)
        .try_collect::<()>();
    futures::try_join!(small, large)?;
    for (rel, target) in &tree.symlinks {
        let path = out.join(rel);
        output::check_replaceable(&path)
            .and_then(|()| atomic_file::symlink(target, &path))
            .map_err(|e| format!("{}: creating a symlink to {target:?}: {e}", rel.display()))?;
    }
    sync_filesystem(out)?;
    bar.finish_and_clear();
    if !ui.quiet() {
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        eprintln!(
            "fetched {root} into {}: {} directories, {} files ({total} bytes in {} distinct blobs), {} symlinks \
             in {secs:.2}s ({:.0} files/s, {:.1} MiB/s)",
            out.display(),
            tree.dirs,
            tree.files.len(),
            order.len(),
            tree.symlinks.len(),
            tree.files.len() as f64 / secs,
            total as f64 / (1 << 20) as f64 / secs,
        );
    }
    Ok(ExitCode::SUCCESS)
}
