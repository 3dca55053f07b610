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
    function: crate::DigestFunction,
    jobs: usize,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<PutFilesReport> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    // Files go to the blocking threads in groups: one hand-off per file costs
    // more than hashing a small one.
    let digests: Vec<Digest> = futures::stream::iter(paths.chunks(GROUP))
        .map(|group| async move {
            let group = group.to_vec();
            let digests = blocking("hashing", move || {
                let mut buf = Vec::new();
                group
                    .iter()
                    .map(|p| hash_file(p, function, &mut buf))
                    .collect()
            })
            .await?;
            for d in &digests {
                progress(Progress::Hashed(d.size_bytes()));
            }
            Ok::<_, Error>(futures::stream::iter(
                digests.into_iter().map(Ok::<_, Error>),
            ))
        })
        .buffered(cores * 2)
        .try_flatten()
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
    // Small blobs are read a group at a time and sent one by one (a `grpc`
    // node below batches them); large ones stream from their file.
    let (small, large): (Vec<&Digest>, Vec<&Digest>) =
        missing.iter().partition(|d| d.size_bytes() <= SMALL_FILE);
    let first = &first;
    let small = futures::stream::iter(groups(&small, GROUP_BYTES))
        .map(|group| async move {
            let files: Vec<(Digest, PathBuf)> = group
                .into_iter()
                .map(|d| (d.clone(), first[d].to_path_buf()))
                .collect();
            let read = blocking("reading", move || {
                files
                    .into_iter()
                    .map(|(d, p)| match std::fs::read(&p) {
                        Ok(bytes) => Ok((d, p, bytes)),
                        Err(e) => Err(named(&p, e)),
                    })
                    .collect()
            })
            .await?;
            Ok::<_, Error>(futures::stream::iter(read.into_iter().map(Ok::<_, Error>)))
        })
        .buffered(2)
        .try_flatten()
        .map_ok(|(d, p, bytes)| async move {
            let put = ba.put(&d, util::once(bytes.into())).await;
            put.map_err(|e| in_file(&p, e))?;
            progress(Progress::Sent(d.size_bytes()));
            Ok(())
        });
    let large = futures::stream::iter(large).map(|d| -> Result<Sending<'_>> {
        Ok(Box::pin(async move {
            let path = first[d];
            // Reopenable: a node that retries uploads may read the file again.
            let put = ba.put_reopenable(d, util::reopenable_file(path)).await;
            put.map_err(|e| in_file(path, e))?;
            progress(Progress::Sent(d.size_bytes()));
            Ok(())
        }))
    });
    small
        .map_ok(|f| -> Sending<'_> { Box::pin(f) })
        .chain(large)
        .try_buffer_unordered(jobs.max(1))
        .try_collect::<()>()
        .await?;
    Ok(PutFilesReport {
        digests,
        sent_blobs: missing.len() as u64,
        sent_bytes: bytes,
    })
}

/// One blob being sent.
type Sending<'a> = futures::future::BoxFuture<'a, Result<()>>;

/// Files hashed, read or written per hand-off to a blocking thread: one
/// hand-off per small file costs more than the file's own work.
pub const GROUP: usize = 32;
/// Bytes read per hand-off at most (unless one file is larger), so that what
/// waits in memory to be sent stays small.
pub const GROUP_BYTES: u64 = 4 << 20;

/// `digests` in order, cut into groups of at most [`GROUP`] blobs and (unless
/// one alone is larger) `max_bytes`: the units of work handed to blocking
/// threads when many small files are read or written.
pub fn groups<'a>(digests: &[&'a Digest], max_bytes: u64) -> Vec<Vec<&'a Digest>> {
    let mut out: Vec<Vec<&Digest>> = Vec::new();
    let mut bytes = 0;
    for &d in digests {
        match out.last_mut() {
            Some(g) if g.len() < GROUP && bytes + d.size_bytes() <= max_bytes => {
                bytes += d.size_bytes();
                g.push(d);
            }
            _ => {
                bytes = d.size_bytes();
                out.push(vec![d]);
            }
        }
    }
    out
}

/// Runs `f` on a blocking thread; each of its results names its file.
async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<Vec<T>> + Send + 'static,
) -> Result<Vec<T>> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(format!("{what} thread failed: {e}")))?
}

fn named(path: &Path, e: std::io::Error) -> Error {
    Error::io(path.display(), e)
}

/// An error of sending the file at `path`, naming it.
fn in_file(path: &Path, e: Error) -> Error {
    Error::new(e.code(), format!("{}: {e}", path.display()))
}

/// SHA-256 and size of a file, read on this thread into `buf` (grown to
/// 256 KiB at most, and kept for the next file).
fn hash_file(path: &Path, function: crate::DigestFunction, buf: &mut Vec<u8>) -> Result<Digest> {
    // Each file is read twice (hashed, then sent if missing): a pipe or a
    // device would give other bytes the second time, or block opening it.
    let meta = std::fs::metadata(path).map_err(|e| named(path, e))?;
    if !meta.is_file() {
        return Err(Error::invalid_argument(format!(
            "{}: not a regular file (a directory, pipe or device); copy it to a file to upload it",
            path.display()
        )));
    }
    let mut file = std::fs::File::open(path).map_err(|e| named(path, e))?;
    let mut h = function.hasher();
    // One byte more than the file, so a small file's end is seen in one read.
    let want = (meta.len() as usize).saturating_add(1).min(256 << 10);
    if buf.len() < want {
        buf.resize(want, 0);
    }
    let mut size = 0u64;
    loop {
        let n = file.read(buf).map_err(|e| named(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Digest::new(function, h.finish_hex(), size).map_err(|e| Error::internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_cut_by_count_and_bytes_in_order() {
        let sizes = [1u64, 3 << 20, 2 << 20, 9 << 20, 1, 1];
        let mut digests: Vec<Digest> = sizes
            .iter()
            .enumerate()
            .map(|(i, &s)| Digest::new(crate::DigestFunction::Sha256, format!("{i:064x}"), s))
            .collect::<std::result::Result<_, _>>()
            .unwrap();
        digests.extend((0..70).map(|i| Digest::of(format!("{i}").as_bytes())));
        let refs: Vec<&Digest> = digests.iter().collect();
        let got = groups(&refs, 4 << 20);
        let flat: Vec<&Digest> = got.iter().flatten().copied().collect();
        assert_eq!(flat, refs, "every digest once, in order");
        let sizes = |g: &Vec<&Digest>| g.iter().map(|d| d.size_bytes()).collect::<Vec<_>>();
        assert_eq!(sizes(&got[0]), [1, 3 << 20]);
        assert_eq!(sizes(&got[1]), [2 << 20]);
        assert_eq!(sizes(&got[2]), [9 << 20], "a large one alone");
        for g in &got {
            assert!(g.len() <= GROUP);
            let bytes: u64 = g.iter().map(|d| d.size_bytes()).sum();
            assert!(g.len() == 1 || bytes <= 4 << 20, "{bytes}");
        }
    }
}
