//! Helpers on top of `BlobAccess`: whole blobs in memory with a size cap, and
//! blobs to and from files without ever leaving a half-written file behind.

use crate::{BlobAccess, BlobStream, Code, Digest, Error, ReadRange, Result};
use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Size of the chunks read from files and sent on the wire.
pub const CHUNK_SIZE: usize = 64 * 1024;

/// A blob stream of one chunk.
pub fn once(data: Bytes) -> BlobStream {
    futures::stream::once(async move { Ok(data) }).boxed()
}

/// A blob stream whose only item is the error `e`: a get that failed before
/// any transfer.
pub fn failed(e: Error) -> BlobStream {
    futures::stream::once(async move { Err(e) }).boxed()
}

/// A blob stream that yields `data` in chunks of `chunk` bytes without copying.
pub fn chunked(data: Bytes, chunk: usize) -> BlobStream {
    let n = data.len().div_ceil(chunk.max(1));
    futures::stream::iter((0..n).map(move |i| {
        let end = ((i + 1) * chunk).min(data.len());
        Ok(data.slice(i * chunk..end))
    }))
    .boxed()
}

/// Reads (part of) a blob into memory, failing with RESOURCE_EXHAUSTED rather
/// than buffering more than `max_bytes`. A blob that arrives in one chunk is
/// that chunk, not a copy (it may share the buffer of a batch response).
pub async fn read_to_bytes(
    ba: &dyn BlobAccess,
    digest: &Digest,
    range: ReadRange,
    max_bytes: usize,
) -> Result<Bytes> {
    let want = range
        .len_in(digest.size_bytes())
        .map_err(|e| e.with_digest(digest))?;
    if want > max_bytes as u64 {
        return Err(Error::resource_exhausted(format!(
            "blob of {want} bytes is larger than the {max_bytes} byte limit for reading into memory"
        ))
        .with_digest(digest));
    }
    let mut s = ba.get(digest, range);
    // A blob that comes in one chunk (most small ones) is returned as it is.
    let first = match s.next().await {
        Some(chunk) => chunk?,
        None => return Ok(Bytes::new()),
    };
    let mut buf = BytesMut::new();
    let mut chunk = first;
    loop {
        if buf.len() + chunk.len() > max_bytes {
            return Err(
                Error::resource_exhausted("stream exceeded the memory limit").with_digest(digest),
            );
        }
        match s.next().await {
            None if buf.is_empty() => return Ok(chunk),
            None => {
                buf.extend_from_slice(&chunk);
                return Ok(buf.freeze());
            }
            Some(next) => {
                if buf.is_empty() {
                    buf.reserve(want as usize);
                }
                buf.extend_from_slice(&chunk);
                chunk = next?;
            }
        }
    }
}

/// Streams a blob into `path`, as [`crate::output`] decides: a regular file
/// (or nothing) is replaced atomically ([`crate::atomic_file`]): written,
/// fsynced and only then given its name, so `path` holds either nothing new
/// or the whole verified blob, and a failed or killed download leaves no temp
/// file. A device, a FIFO or `/dev/stdout` is written into, and a failure
/// then says how many bytes went in. `progress` is called with each chunk's
/// length.
pub async fn write_to_file(
    ba: &dyn BlobAccess,
    digest: &Digest,
    path: &Path,
    progress: impl FnMut(u64) + Send,
) -> Result<()> {
    write_to_file_with(ba, digest, path, true, None, progress).await
}

/// [`write_to_file`], with the fsync before naming the file only if `fsync`
/// (readers still see either nothing new or the whole blob, but a crash may
/// leave an empty file: for callers that write many files and sync the
/// filesystem once at the end), and with exactly `mode` if given (0666 less
/// the umask otherwise), set before the file has its name.
pub async fn write_to_file_with(
    ba: &dyn BlobAccess,
    digest: &Digest,
    path: &Path,
    fsync: bool,
    mode: Option<u32>,
    progress: impl FnMut(u64) + Send,
) -> Result<()> {
    use crate::output::OutputPath;
    let asked = path.to_path_buf();
    // Opening a FIFO waits for its reader: off the async threads.
    let resolved = blocking(move || OutputPath::resolve(&asked))
        .await
        .map_err(Error::from)?;
    let target = match resolved {
        OutputPath::Into(out) => return write_into(ba, digest, path, out, progress).await,
        OutputPath::Replace(target) => target,
    };
    write_replacing(ba, digest, path, target, fsync, mode, progress).await
}

/// Streams a blob into a new file at `path` that replaces what was there
/// atomically, as [`write_to_file_with`] does with a regular file, but never
/// follows a symlink at `path` (the link itself is replaced) and refuses to
/// replace anything but a regular file or a symlink: for trees written into a
/// directory, whose entries must never lead out of it.
pub async fn replace_file(
    ba: &dyn BlobAccess,
    digest: &Digest,
    path: &Path,
    fsync: bool,
    mode: Option<u32>,
    progress: impl FnMut(u64) + Send,
) -> Result<()> {
    crate::output::check_replaceable(path)
        .map_err(|e| Error::io(format_args!("{}", path.display()), e))?;
    write_replacing(ba, digest, path, path.to_path_buf(), fsync, mode, progress).await
}

/// Writes the blob beside `target` and renames it over `target` once whole;
/// errors name `path`, the path the caller gave.
async fn write_replacing(
    ba: &dyn BlobAccess,
    digest: &Digest,
    path: &Path,
    target: std::path::PathBuf,
    fsync: bool,
    mode: Option<u32>,
    progress: impl FnMut(u64) + Send,
) -> Result<()> {
    let io = |what: &str, e| Error::io(format_args!("{what} {}", path.display()), e);
    let at = target.clone();
    let mut new = blocking(move || {
        use crate::atomic_file::AtomicFile;
        match mode {
            Some(mode) => AtomicFile::create_beside_with_mode(&at, mode),
            // As a plain file would be (not 0600).
            None => AtomicFile::create_beside(&at, 0o666),
        }
    })
    .await
    .map_err(|e| io("creating a file beside", e))?;
    let file = tokio::fs::File::from_std(new.file().try_clone().map_err(|e| io("opening", e))?);
    // On any error `new` is dropped, and with it what was written.
    let file = copy_stream(ba, digest, file, progress)
        .await
        .map_err(|(e, _)| e.unwrap_or_else(|e| io("writing", e)))?;
    if fsync {
        file.sync_all().await.map_err(|e| io("syncing", e))?;
    }
    drop(file);
    blocking(move || {
        // Something else may have been put there while the blob downloaded.
        crate::output::check_replaceable(&target)?;
        new.persist(&target)
    })
    .await
    .map_err(|e| io("naming", e))?;
    Ok(())
}

/// Streams a blob into an output that cannot be replaced atomically; a
/// failure says so, and how much of the blob went in.
async fn write_into(
    ba: &dyn BlobAccess,
    digest: &Digest,
    path: &Path,
    out: crate::output::Output,
    progress: impl FnMut(u64) + Send,
) -> Result<()> {
    let kind = out.kind;
    let file = tokio::fs::File::from_std(out.file);
    copy_stream(ba, digest, file, progress)
        .await
        .map_err(|(e, written)| {
            let e = e.unwrap_or_else(|e| Error::io("writing", e));
            Error::new(
                e.code(),
                format!(
                    "{} is {kind}, written into as the blob arrived (not atomically): \
                     {written} of its {} bytes went in before: {}",
                    path.display(),
                    digest.size_bytes(),
                    e.message()
                ),
            )
            .with_digest(digest)
        })?;
    Ok(())
}

/// Copies a blob into `file` and flushes it. An error is the stream's
/// (`Ok`) or the file's (`Err`), with the bytes written before it.
async fn copy_stream(
    ba: &dyn BlobAccess,
    digest: &Digest,
    mut file: tokio::fs::File,
    mut progress: impl FnMut(u64) + Send,
) -> std::result::Result<tokio::fs::File, (std::result::Result<Error, std::io::Error>, u64)> {
    let mut written = 0u64;
    let mut s = ba.get(digest, ReadRange::FULL);
    while let Some(chunk) = s.next().await {
        let chunk = chunk.map_err(|e| (Ok(e), written))?;
        file.write_all(&chunk)
            .await
            .map_err(|e| (Err(e), written))?;
        written += chunk.len() as u64;
        progress(chunk.len() as u64);
    }
    file.flush().await.map_err(|e| (Err(e), written))?;
    Ok(file)
}

/// Runs a blocking file operation off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)?
}

/// A lazy stream of a file's contents in `CHUNK_SIZE` chunks.
pub fn file_stream(file: tokio::fs::File) -> BlobStream {
    futures::stream::try_unfold(file, |mut f| async move {
        let mut buf = BytesMut::with_capacity(CHUNK_SIZE);
        while buf.len() < CHUNK_SIZE {
            let n = f.read_buf(&mut buf).await?;
            if n == 0 {
                break;
            }
        }
        Ok::<_, Error>((!buf.is_empty()).then(|| (buf.freeze(), f)))
    })
    .boxed()
}

/// A file's contents, readable again from the start (for
/// [`BlobAccess::put_reopenable`]); each stream opens the file anew.
pub fn reopenable_file(path: &Path) -> crate::Reopen {
    let path = path.to_path_buf();
    std::sync::Arc::new(move || {
        let path = path.clone();
        futures::stream::once(async move {
            tokio::fs::File::open(&path)
                .await
                .map(file_stream)
                .map_err(|e| Error::from(e).with_context_path(&path))
        })
        .try_flatten()
        .boxed()
    })
}

/// Hashes a file in a streaming fashion and returns its SHA-256 digest.
pub async fn digest_file(path: &Path) -> Result<Digest> {
    digest_file_with(crate::DigestFunction::Sha256, path).await
}

/// Hashes a file in a streaming fashion and returns its digest under `function`.
pub async fn digest_file_with(function: crate::DigestFunction, path: &Path) -> Result<Digest> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| Error::from(e).with_context_path(path))?;
    let mut h = function.hasher();
    let mut size = 0u64;
    let mut s = file_stream(file);
    while let Some(c) = s.next().await {
        let c = c.map_err(|e| e.with_context_path(path))?;
        size += c.len() as u64;
        h.update(&c);
    }
    Digest::new(function, h.finish_hex(), size)
        .map_err(|e| Error::new(Code::Internal, e.to_string()))
}

/// Uploads a file, hashing it first, and returns its digest.
pub async fn put_file(ba: &dyn BlobAccess, path: &Path) -> Result<Digest> {
    let digest = digest_file(path).await?;
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| Error::from(e).with_context_path(path))?;
    ba.put(&digest, file_stream(file)).await?;
    Ok(digest)
}

impl Error {
    fn with_context_path(self, path: &Path) -> Error {
        Error::new(
            self.code(),
            format!("{}: {}", path.display(), self.message()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryBlobAccess;

    #[tokio::test]
    async fn write_to_file_is_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let cas = MemoryBlobAccess::new("memory", 1 << 20);
        let data = Bytes::from(vec![7u8; 200_000]);
        let d = Digest::of(&data);
        cas.put(&d, chunked(data.clone(), 1000)).await.unwrap();
        let out = dir.path().join("out");
        write_to_file(&cas, &d, &out, |_| {}).await.unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), data);

        let missing = Digest::of(b"missing");
        let out2 = dir.path().join("out2");
        let err = write_to_file(&cas, &missing, &out2, |_| {})
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        // Nothing at the target, and no temp file left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn put_file_and_read_back_with_cap() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![1u8; 300_000]).unwrap();
        let cas = MemoryBlobAccess::new("memory", 1 << 20);
        let d = put_file(&cas, &p).await.unwrap();
        assert_eq!(d.size_bytes(), 300_000);
        let err = read_to_bytes(&cas, &d, ReadRange::FULL, 1000)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        let part = read_to_bytes(&cas, &d, ReadRange::new(10, Some(5)), 1000)
            .await
            .unwrap();
        assert_eq!(&part[..], &[1u8; 5]);
    }

    #[tokio::test]
    async fn read_to_bytes_joins_chunks_in_order_and_passes_one_chunk_through() {
        let cas = MemoryBlobAccess::new("memory", 4 << 20);
        for size in [0usize, 1, 100, (1 << 20) + 17, 3 << 20] {
            let data: Bytes = (0..size)
                .map(|i| (i * 7 / 3) as u8)
                .collect::<Vec<_>>()
                .into();
            let d = Digest::of(&data);
            cas.put(&d, once(data.clone())).await.unwrap();
            let got = read_to_bytes(&cas, &d, ReadRange::FULL, size)
                .await
                .unwrap();
            assert!(got == data, "size {size}");
            let tail = read_to_bytes(&cas, &d, ReadRange::new(size as u64 / 2, None), size)
                .await
                .unwrap();
            assert!(tail == data.slice(size / 2..), "tail of size {size}");
        }
    }
}
