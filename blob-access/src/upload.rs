//! Uploading many files at once, as a build tool uploads an action's outputs:
//! hashed in parallel on blocking threads, one `find_missing` for all of them
//! (as Bazel does), then only what the CAS lacks is sent, many at a time, so
//! that a `grpc` node below coalesces small ones into batch calls.

use crate::{util, BlobAccess, Digest, Error, Result};
use futures::{StreamExt, TryStreamExt};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Files up to this size are read whole (one blocking call) when sent; larger
/// ones stream.
const SMALL_FILE: u64 = 1 << 20;

/// What `put_files` reports as it goes (each file once per stage).
#[derive(Clone, Copy, Debug)]
pub enum Progress {
    /// One more file hashed, of this many bytes.
    Hashed(u64),
    /// Hashing is over: this many distinct blobs, of this many bytes, are missing.
    Missing { files: u64, bytes: u64 },
    /// One more missing blob sent, of this many bytes.
    Sent(u64),
}

/// What `put_files` did.
#[derive(Clone, Debug, Default)]
pub struct PutFilesReport {
    /// The digest of each file, in the order given.
    pub digests: Vec<Digest>,
    /// Distinct blobs sent (the others were stored already).
    pub sent_blobs: u64,
    pub sent_bytes: u64,
}

/// Uploads `paths`, `jobs` files at a time (hashing uses the cores), sending
/// only the blobs `ba` does not have. Errors name the file.
pub async fn put_files(
    ba: &dyn BlobAccess,
    paths: &[PathBuf],
    jobs: usize,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<PutFilesReport> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let digests: Vec<Digest> = futures::stream::iter(paths.iter().cloned())
        .map(|path| async move {
            let d = tokio::task::spawn_blocking(move || hash_file(&path))
                .await
                .map_err(|e| Error::internal(format!("hashing thread failed: {e}")))??;
            progress(Progress::Hashed(d.size_bytes()));
            Ok::<_, Error>(d)
        })
        .buffered(cores * 2)
        .try_collect()
        .await?;

    // The first file of each distinct digest is the one sent.
    let mut first: HashMap<&Digest, &Path> = HashMap::new();
    for (d, p) in digests.iter().zip(paths) {
        first.entry(d).or_insert(p);
    }
    let distinct: Vec<Digest> = first.keys().map(|d| (*d).clone()).collect();
    let missing = ba.find_missing(&distinct).await?;
    let bytes = missing.iter().map(|d| d.size_bytes()).sum();
    progress(Progress::Missing {
        files: missing.len() as u64,
        bytes,
    });
    let first = &first;
    futures::stream::iter(&missing)
        .map(|d| async move {
            put_one(ba, d, first[d]).await?;
            progress(Progress::Sent(d.size_bytes()));
            Ok::<_, Error>(())
        })
        .buffer_unordered(jobs.max(1))
        .try_collect::<()>()
        .await?;
    Ok(PutFilesReport {
        digests,
        sent_blobs: missing.len() as u64,
        sent_bytes: bytes,
    })
}

fn named(path: &Path, e: std::io::Error) -> Error {
    Error::io(path.display(), e)
}

/// SHA-256 and size of a file, read in 256 KiB pieces on this thread.
fn hash_file(path: &Path) -> Result<Digest> {
    let mut file = std::fs::File::open(path).map_err(|e| named(path, e))?;
    let mut h = crate::DigestFunction::Sha256.hasher();
    let mut buf = vec![0u8; 256 << 10];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| named(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Digest::new(crate::DigestFunction::Sha256, h.finish_hex(), size)
        .map_err(|e| Error::internal(e.to_string()))
}

/// Sends one file; `put` verifies it against `digest`, so a file changed
/// since it was hashed fails here rather than storing wrong bytes.
async fn put_one(ba: &dyn BlobAccess, digest: &Digest, path: &Path) -> Result<()> {
    let data = if digest.size_bytes() <= SMALL_FILE {
        let p = path.to_path_buf();
        let bytes = tokio::task::spawn_blocking(move || std::fs::read(&p))
            .await
            .map_err(|e| Error::internal(format!("reading thread failed: {e}")))?
            .map_err(|e| named(path, e))?;
        util::once(bytes.into())
    } else {
        // Reopenable: a node that retries uploads may read the file again.
        return ba
            .put_reopenable(digest, util::reopenable_file(path))
            .await
            .map_err(|e| Error::new(e.code(), format!("{}: {e}", path.display())));
    };
    ba.put(digest, data)
        .await
        .map_err(|e| Error::new(e.code(), format!("{}: {e}", path.display())))
}
