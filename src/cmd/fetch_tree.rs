//! `fetch-tree`: materialise a REAPI `Directory` tree (an action's inputs or
//! outputs) in a local directory.
//!
//! The tree is walked through its `Directory` messages with `get` (the
//! `BlobAccess` trait has no GetTree, so this works over any tree of nodes).
//! Files are fetched many at a time, each verified and written atomically
//! (temp file, fsync, rename, then its mode), so a file that exists has its
//! whole verified content. On failure OUTDIR may hold some of the tree, never a
//! partial file; the error names the path in the tree and the digest.

use crate::progress::Ui;
use blob_access::{proto, util, BlobAccess, Digest, ReadRange};
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// Largest `Directory` message read into memory.
const MAX_DIRECTORY_BYTES: usize = 64 << 20;

struct File {
    path: PathBuf,
    digest: Digest,
    executable: bool,
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
    Digest::from_proto(blob_access::DigestFunction::Sha256, d)
        .map_err(|e| format!("{}: {e}", at.display()))
}

/// Reads every `Directory` of the tree, creating its directories under `out`.
async fn walk(cas: &dyn BlobAccess, root: &Digest, out: &Path) -> Result<Tree, String> {
    let mut tree = Tree::default();
    let mut queue = vec![(PathBuf::new(), root.clone())];
    while let Some((rel, digest)) = queue.pop() {
        let bytes = util::read_to_bytes(cas, &digest, ReadRange::FULL, MAX_DIRECTORY_BYTES)
            .await
            .map_err(|e| format!("{} (directory {digest}): {e}", shown(&rel)))?;
        let dir = proto::Directory::decode(bytes).map_err(|e| {
            format!(
                "{} (directory {digest}): not a Directory message: {e}",
                shown(&rel)
            )
        })?;
        let abs = out.join(&rel);
        std::fs::create_dir_all(&abs).map_err(|e| format!("creating {}: {e}", abs.display()))?;
        tree.dirs += 1;
        for f in &dir.files {
            let path = rel.join(checked_name(&f.name, &rel)?);
            let digest = child_digest(f.digest.as_ref(), &path)?;
            tree.files.push(File {
                path,
                digest,
                executable: f.is_executable,
            });
        }
        for s in &dir.symlinks {
            let path = rel.join(checked_name(&s.name, &rel)?);
            tree.symlinks.push((path, s.target.clone()));
        }
        for d in &dir.directories {
            let path = rel.join(checked_name(&d.name, &rel)?);
            let digest = child_digest(d.digest.as_ref(), &path)?;
            queue.push((path, digest));
        }
    }
    Ok(tree)
}

/// Creates a symlink atomically (beside it, then renamed over any old entry).
fn symlink(target: &str, path: &Path) -> std::io::Result<()> {
    let tmp = path.with_file_name(format!(
        ".blob-access-{}.tmp",
        uuid::Uuid::new_v4().simple()
    ));
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

pub async fn run(
    config: &Path,
    root: &str,
    out: &Path,
    jobs: usize,
    ui: &Ui,
) -> Result<ExitCode, String> {
    let root = super::transfer::parse_digest(root)?;
    let cas = super::open(config)?;
    let tree = walk(&*cas, &root, out).await?;
    let total: u64 = tree.files.iter().map(|f| f.digest.size_bytes()).sum();
    let bar = ui.bar(total, "fetch-tree");
    let fetches = tree.files.iter().map(|f| {
        let (cas, bar) = (cas.clone(), bar.clone());
        let path = out.join(&f.path);
        async move { fetch_file(cas, f, &path, |n| bar.inc(n)).await }
    });
    futures::stream::iter(fetches)
        .buffer_unordered(jobs.max(1))
        .try_collect::<()>()
        .await?;
    for (rel, target) in &tree.symlinks {
        symlink(target, &out.join(rel))
            .map_err(|e| format!("{}: creating a symlink to {target:?}: {e}", rel.display()))?;
    }
    bar.finish_and_clear();
    if !ui.quiet() {
        eprintln!(
            "fetched {}: {} directories, {} files ({total} bytes), {} symlinks into {}",
            root,
            tree.dirs,
            tree.files.len(),
            tree.symlinks.len(),
            out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn fetch_file(
    cas: Arc<dyn BlobAccess>,
    f: &File,
    path: &Path,
    progress: impl FnMut(u64) + Send,
) -> Result<(), String> {
    let failed = |e: String| format!("{} ({}): {e}", f.path.display(), f.digest);
    util::write_to_file(&*cas, &f.digest, path, progress)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let mode = if f.executable { 0o755 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| failed(format!("setting its mode: {e}")))
}
