//! `fetch-tree`: materialise a REAPI `Directory` tree (an action's inputs or
//! outputs) in a local directory.
//!
//! The `BlobAccess` trait has no GetTree, so the tree is walked through its
//! `Directory` messages, each read with `get` (this works over any tree of
//! nodes). The walk goes level by level, fetching the `Directory` messages of a
//! level several at once, each distinct digest once.
//!
//! Files are then fetched many at a time (`--jobs`), each distinct digest once
//! (identical files are copied from the first), each verified by the `get`
//! stream (size and digest) and written atomically: temp file, fsync, rename,
//! then its mode. A file that exists therefore holds its whole verified content.
//! Symlinks come last, so no file is written through a symlink of the tree.
//!
//! On failure OUTDIR may hold part of the tree (directories, some files, no
//! symlinks), never a partial file; the error names the path in the tree and
//! the digest. Names that could escape OUTDIR (empty, `.`, `..`, with `/`) or
//! that repeat within a directory are refused, as is a directory of the tree
//! that already exists in OUTDIR as anything but a directory (say a symlink).

use crate::progress::Ui;
use blob_access::{proto, util, BlobAccess, Digest, DigestFunction, ReadRange};
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

fn child_digest(d: Option<&proto::Digest>, at: &Path) -> Result<Digest, String> {
    let d = d.ok_or_else(|| format!("{}: entry without a digest", at.display()))?;
    Digest::from_proto(DigestFunction::Sha256, d).map_err(|e| format!("{}: {e}", at.display()))
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
            .buffer_unordered(jobs)
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
                let digest = child_digest(f.digest.as_ref(), &path)?;
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
                let digest = child_digest(d.digest.as_ref(), &path)?;
                next.push((path, digest));
            }
        }
        level = next;
    }
    Ok(tree)
}

/// A name beside `path` for a temp file or symlink that is renamed over it.
fn temp_beside(path: &Path) -> PathBuf {
    path.with_file_name(format!(
        ".blob-access-{}.tmp",
        uuid::Uuid::new_v4().simple()
    ))
}

/// Creates a symlink atomically (beside it, then renamed over any old entry).
fn symlink(target: &str, path: &Path) -> std::io::Result<()> {
    let tmp = temp_beside(path);
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Copies a fetched file to `to` atomically, with `mode`.
async fn copy_file(from: &Path, to: &Path, mode: std::fs::Permissions) -> std::io::Result<()> {
    let tmp = temp_beside(to);
    let copied = async {
        tokio::fs::copy(from, &tmp).await?;
        tokio::fs::set_permissions(&tmp, mode).await?;
        tokio::fs::File::open(&tmp).await?.sync_all().await?;
        tokio::fs::rename(&tmp, to).await
    }
    .await;
    if copied.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    copied
}

/// Fetches one blob into the first of `files` (all of the same digest) and
/// copies it to the others.
async fn fetch_files(
    cas: &dyn BlobAccess,
    out: &Path,
    files: &[&File],
    bar: &indicatif::ProgressBar,
) -> Result<(), String> {
    let first = files[0];
    let first_path = out.join(&first.path);
    util::write_to_file(cas, &first.digest, &first_path, |n| bar.inc(n))
        .await
        .map_err(|e| first.error(e))?;
    tokio::fs::set_permissions(&first_path, first.mode())
        .await
        .map_err(|e| first.error(format_args!("setting its mode: {e}")))?;
    for f in &files[1..] {
        copy_file(&first_path, &out.join(&f.path), f.mode())
            .await
            .map_err(|e| f.error(format_args!("copying from {}: {e}", first.path.display())))?;
        bar.inc(f.digest.size_bytes());
    }
    Ok(())
}

pub async fn run(
    config: &Path,
    root: &str,
    out: &Path,
    jobs: usize,
    ui: &Ui,
) -> Result<ExitCode, String> {
    let jobs = jobs.max(1);
    let root = super::transfer::parse_digest(root)?;
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
    let fetches = order
        .iter()
        .map(|d| fetch_files(&*cas, out, &by_digest[d], &bar));
    futures::stream::iter(fetches)
        .buffer_unordered(jobs)
        .try_collect::<()>()
        .await?;
    for (rel, target) in &tree.symlinks {
        symlink(target, &out.join(rel))
            .map_err(|e| format!("{}: creating a symlink to {target:?}: {e}", rel.display()))?;
    }
    bar.finish_and_clear();
    if !ui.quiet() {
        eprintln!(
            "fetched {root} into {}: {} directories, {} files ({total} bytes in {} distinct blobs), {} symlinks",
            out.display(),
            tree.dirs,
            tree.files.len(),
            order.len(),
            tree.symlinks.len(),
        );
    }
    Ok(ExitCode::SUCCESS)
}
