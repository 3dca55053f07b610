//! A CAS on local disk: the fast tier a client cache or a proxy actually runs.
//!
//! One file per blob, at `objects/sha256/ab/<hash>-<size>`. A blob is written
//! to `tmp/`, verified, fsynced and renamed into place, so a crash never leaves
//! a partial blob visible; leftovers in `tmp/` are removed on open (only the
//! store's own temp files: other files in the directory are never touched). The index
//! (digest, size, recency) lives in memory and is rebuilt on open by listing
//! `objects/`, oldest modification time first; reads touch a file's
//! modification time so that recency survives restarts. Beyond
//! `max_size_bytes` the least recently used files are deleted.
//!
//! Every read is verified, ranged ones too (the whole file is hashed, which
//! local disks afford). A file that fails verification is deleted and the read
//! ends with NOT_FOUND, so that a `read_caching` above refetches the blob.
//!
//! ```
//! use blob_access::{disk::DiskBlobAccess, util, BlobAccess, Digest, ReadRange};
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let dir = tempfile::tempdir().unwrap();
//! let cas = DiskBlobAccess::open("disk", dir.path(), 1 << 30).unwrap();
//! let digest = Digest::of(b"hello");
//! cas.put(&digest, util::once("hello".into())).await.unwrap();
//! drop(cas);
//! // Reopened, the store still has it.
//! let cas = DiskBlobAccess::open("disk", dir.path(), 1 << 30).unwrap();
//! let data = util::read_to_bytes(&cas, &digest, ReadRange::FULL, 1024).await.unwrap();
//! assert_eq!(&data[..], b"hello");
//! # });
//! ```

use crate::action_cache::ActionCache;
pub use crate::action_cache::DiskActionCache;
use crate::config_types::ByteSize;
use crate::node::Counters;
use crate::util::{failed, CHUNK_SIZE};
use crate::verify::{verify, verify_range_of_full};
use crate::{
    BlobAccess, BlobStream, BuildContext, BuildNode, Code, Digest, DigestFunction, Error,
    NodeMetrics, ReadRange, Result,
};
use bytes::BytesMut;
use futures::StreamExt;
use lru::LruCache;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Config node `disk: {path: /var/cache/blob-access, max_size_bytes: 10GiB}`.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Directory of the store; created if absent. One CAS and one action cache
    /// per directory (they keep their files apart).
    pub path: PathBuf,
    /// Total size of the blobs kept; the least recently used are deleted beyond it.
    pub max_size_bytes: ByteSize,
}

impl<N> crate::ChildNodes<N> for DiskConfig {}

impl BuildNode for DiskConfig {
    fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn BlobAccess>> {
        let disk = DiskBlobAccess::open(ctx.path(), &self.path, self.max_size_bytes.bytes())?;
        Ok(Arc::new(disk))
    }

    fn build_action_cache(&self, ctx: &BuildContext) -> Result<Arc<dyn ActionCache>> {
        let ac = DiskActionCache::open(ctx.path(), &self.path, self.max_size_bytes.bytes())?;
        Ok(Arc::new(ac))
    }
}

/// The stored keys in recency order with the size of their files, and the total.
pub(crate) struct Index {
    lru: LruCache<Digest, u64>,
    size: u64,
}

impl Index {
    /// Indexes `(mtime, key, size)` entries, least recently modified first.
    pub(crate) fn from_files(mut found: Vec<(std::time::SystemTime, Digest, u64)>) -> Self {
        found.sort();
        let mut index = Index {
            lru: LruCache::unbounded(),
            size: 0,
        };
        for (_, d, size) in found {
            index.insert(d, size);
        }
        index
    }

    /// Whether `d` is stored, leaving its recency as it is.
    pub(crate) fn contains(&self, d: &Digest) -> bool {
        self.lru.contains(d)
    }

    /// Whether `d` is stored; marks it used.
    pub(crate) fn touch(&mut self, d: &Digest) -> bool {
        self.lru.get(d).is_some()
    }

    pub(crate) fn insert(&mut self, d: Digest, size: u64) {
        self.size += size;
        if let Some(old) = self.lru.put(d, size) {
            self.size -= old;
        }
    }

    pub(crate) fn remove(&mut self, d: &Digest) {
        if let Some(size) = self.lru.pop(d) {
            self.size -= size;
        }
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Forgets the least recently used keys beyond `max_size`, returning them.
    pub(crate) fn over(&mut self, max_size: u64) -> Vec<Digest> {
        let mut out = Vec::new();
        while self.size > max_size {
            let Some((d, size)) = self.lru.pop_lru() else {
                break;
            };
            self.size -= size;
            out.push(d);
        }
        out
    }
}

/// See the module documentation.
pub struct DiskBlobAccess {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    root: PathBuf,
    max_size: u64,
    index: Mutex<Index>,
    counters: Counters,
}

const COUNTERS: &[&str] = &[
    "gets",
    "puts",
    "evictions",
    "corrupted",
    "bytes_read",
    "bytes_written",
];

/// Bytes read from the file per chunk: larger than the wire's chunks, as
/// each read is a trip to the blocking thread pool.
const READ_CHUNK: usize = 16 * CHUNK_SIZE;

impl DiskBlobAccess {
    /// Opens (or creates) the store in `root`, rebuilding its index from the
    /// files there. `name` identifies it in errors and metrics.
    pub fn open(name: &str, root: &Path, max_size_bytes: u64) -> Result<Self> {
        let name = if name.is_empty() { "disk" } else { name }.to_string();
        let at = |what: &str, path: &Path, e| {
            Error::io(format_args!("{what} {}", path.display()), e).with_backend(name.clone())
        };
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(|e| at("creating", &tmp, e))?;
        remove_temp_files(&tmp).map_err(|e| at("cleaning", &tmp, e))?;
        let objects = root.join("objects");
        std::fs::create_dir_all(&objects).map_err(|e| at("creating", &objects, e))?;

        let mut found = Vec::new();
        for entry in walk(&objects).map_err(|e| at("listing", &objects, e))? {
            let (path, meta) = entry;
            match digest_of_path(&objects, &path) {
                Some(d) if d.size_bytes() == meta.len() => {
                    let mtime = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                    found.push((mtime, d, meta.len()));
                }
                // Truncated by something other than us: never serve it.
                Some(_) => {
                    tracing::warn!(path = %path.display(), "removing a blob file of the wrong size");
                    let _ = std::fs::remove_file(&path);
                }
                None => {
                    tracing::warn!(path = %path.display(), "ignoring a file that is not a blob")
                }
            }
        }
        let index = Index::from_files(found);
        let disk = DiskBlobAccess {
            inner: Arc::new(Inner {
                name,
                root: root.to_path_buf(),
                max_size: max_size_bytes,
                index: Mutex::new(index),
                counters: Counters::new(COUNTERS),
            }),
        };
        // The limit may have shrunk since the last run.
        disk.inner.evict();
        Ok(disk)
    }

    /// Total bytes currently stored.
    pub fn size_bytes(&self) -> u64 {
        self.inner.index().size()
    }

    /// The file holding `digest`, whether or not it exists.
    pub fn path_of(&self, digest: &Digest) -> PathBuf {
        self.inner.path_of(digest)
    }
}

impl Inner {
    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path_of(&self, d: &Digest) -> PathBuf {
        object_path(&self.root.join("objects"), d)
    }

    fn error(&self, e: Error, digest: &Digest) -> Error {
        e.with_backend(self.name.clone()).with_digest(digest)
    }

    /// Forgets `digest` and deletes its file.
    fn remove(&self, digest: &Digest) {
        self.index().remove(digest);
        let _ = std::fs::remove_file(self.path_of(digest));
    }

    fn evict(&self) {
        let evicted = self.index().over(self.max_size);
        for d in &evicted {
            // One unlink per lock: others need not wait for all of them. Under
            // the lock, and only if no put stored the blob again meanwhile
            // (puts rename and index under the same lock), or its new file
            // would go. Readers that have the file open keep reading it.
            let index = self.index();
            if !index.contains(d) {
                let _ = std::fs::remove_file(self.path_of(d));
            }
        }
        self.counters.add("evictions", evicted.len() as u64);
    }

    /// Writes a verified blob to a temp file, fsyncs it and renames it into place.
    /// `data` yields verified chunks (the last one only once the hash matched);
    /// if it ends early (the caller gave up), nothing is stored.
    fn store(
        &self,
        digest: &Digest,
        mut data: impl FnMut() -> Option<Result<bytes::Bytes>>,
    ) -> Result<()> {
        let io = |what: &str, e| self.error(Error::io(what, e), digest);
        let tmp =
            temp_file_in(&self.root.join("tmp")).map_err(|e| io("creating a temp file", e))?;
        let mut file = std::io::BufWriter::with_capacity(READ_CHUNK, tmp);
        let mut written = 0u64;
        while let Some(chunk) = data() {
            let chunk = chunk?;
            written += chunk.len() as u64;
            file.write_all(&chunk).map_err(|e| io("writing", e))?;
        }
        if written != digest.size_bytes() {
            return Err(self.error(Error::new(Code::Cancelled, "upload ended early"), digest));
        }
        let tmp = file
            .into_inner()
            .map_err(|e| io("writing", e.into_error()))?;
        tmp.as_file().sync_all().map_err(|e| io("syncing", e))?;
        let path = self.path_of(digest);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io("creating a directory", e))?;
        }
        let mut index = self.index();
        tmp.persist(&path)
            .map_err(|e| io("renaming into place", e.error))?;
        index.insert(digest.clone(), digest.size_bytes());
        Ok(())
    }
}

/// Regular files under `dir`, recursively, with their metadata. Symlinks and
/// other entries are not the store's: left alone, never followed.
pub(crate) fn walk(dir: &Path) -> std::io::Result<Vec<(PathBuf, std::fs::Metadata)>> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            // Of the entry itself: a symlink is not followed.
            let meta = entry.metadata()?;
            if meta.is_dir() {
                dirs.push(entry.path());
            } else if meta.is_file() {
                out.push((entry.path(), meta));
            } else {
                tracing::warn!(path = %entry.path().display(), "ignoring an entry that is not a regular file");
            }
        }
    }
    Ok(out)
}

/// How the store's temp files are named, so that only they are ever removed
/// from its `tmp/` directory.
const TEMP_PREFIX: &str = ".blob-access-";

/// A new temp file of the store's in `dir`.
pub(crate) fn temp_file_in(dir: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempfile_in(dir)
}

/// Removes the leftovers of writes cut by a crash (never renamed, so never
/// visible) from `dir`: the store's own temp files, nothing else.
pub(crate) fn remove_temp_files(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let ours = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(TEMP_PREFIX));
        if ours && entry.file_type()?.is_file() {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Where the file of `d` lives under `objects`.
pub(crate) fn object_path(objects: &Path, d: &Digest) -> PathBuf {
    objects
        .join(d.function().name())
        .join(&d.hash()[..2])
        .join(format!("{}-{}", d.hash(), d.size_bytes()))
}

/// The digest a path under `objects/` names, if it is one of ours.
pub(crate) fn digest_of_path(objects: &Path, path: &Path) -> Option<Digest> {
    let rel = path.strip_prefix(objects).ok()?;
    let parts: Vec<_> = rel.iter().filter_map(|p| p.to_str()).collect();
    let [function, shard, file] = parts[..] else {
        return None;
    };
    let function = DigestFunction::ALL
        .into_iter()
        .find(|f| f.name() == function)?;
    let (hash, size) = file.rsplit_once('-')?;
    let d = Digest::from_parts(function, hash, size).ok()?;
    (d.hash()[..2] == *shard).then_some(d)
}

/// Streams `path` from a blocking thread, started on the first poll; dropping
/// the stream stops the thread at its next chunk.
fn read_file(path: PathBuf) -> BlobStream {
    futures::stream::once(async move {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes>>(4);
        tokio::task::spawn_blocking(move || {
            let mut file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e.into()));
                    return;
                }
            };
            // Recency that survives a restart; best effort.
            let _ = file.set_modified(std::time::SystemTime::now());
            let _ = file.rewind();
            loop {
                let mut buf = BytesMut::zeroed(READ_CHUNK);
                let n = match file.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e.into()));
                        return;
                    }
                };
                buf.truncate(n);
                if tx.blocking_send(Ok(buf.freeze())).is_err() {
                    return;
                }
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    })
    .flatten()
    .boxed()
}

#[async_trait::async_trait]
impl BlobAccess for DiskBlobAccess {
    fn get(&self, digest: &Digest, range: ReadRange) -> BlobStream {
        // Content is the same whatever the instance: files are named by hash and size.
        let digest = &digest.without_instance_name();
        let inner = self.inner.clone();
        inner.counters.inc("gets");
        let known = inner.index().touch(digest);
        if !known {
            let e = inner.error(Error::not_found("blob not found"), digest);
            return failed(e);
        }
        let d = digest.clone();
        let data = read_file(inner.path_of(digest));
        verify_range_of_full(digest, range, &inner.name, data)
            .map(move |item| {
                item.inspect(|c| inner.counters.add("bytes_read", c.len() as u64))
                    .map_err(|e| match e.code() {
                        // Deleted under us (evicted, or by hand): it is simply gone.
                        Code::NotFound => {
                            inner.remove(&d);
                            inner.error(Error::not_found("blob file disappeared"), &d)
                        }
                        Code::DataLoss => {
                            inner.counters.inc("corrupted");
                            inner.remove(&d);
                            tracing::warn!(backend = %inner.name, digest = %d, error = %e, "removed a corrupted blob file");
                            let msg = format!("stored copy was corrupted and is removed: {}", e.message());
                            inner.error(Error::not_found(msg), &d)
                        }
                        _ => e,
                    })
            })
            .boxed()
    }

    async fn put(&self, digest: &Digest, data: BlobStream) -> Result<()> {
        let digest = &digest.without_instance_name();
        let inner = self.inner.clone();
        inner.counters.inc("puts");
        if digest.size_bytes() > inner.max_size {
            return Err(inner.error(
                Error::resource_exhausted(format!(
                    "blob is larger than this disk store's {} byte limit",
                    inner.max_size
                )),
                digest,
            ));
        }
        let mut verified = verify(digest, ReadRange::FULL, &inner.name, data);
        if inner.index().touch(digest) {
            // Already stored; still drain and check the upload so a bad one is reported.
            while let Some(c) = verified.next().await {
                c?;
            }
            return Ok(());
        }
        // Chunks cross from this task to a blocking writer; the channel bounds memory.
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let writer = {
            let (inner, digest) = (inner.clone(), digest.clone());
            tokio::task::spawn_blocking(move || inner.store(&digest, || rx.blocking_recv()))
        };
        while let Some(chunk) = verified.next().await {
            let failed = chunk.is_err();
            if tx.send(chunk).await.is_err() || failed {
                break;
            }
        }
        drop(tx);
        writer
            .await
            .map_err(|e| inner.error(Error::internal(format!("writer task: {e}")), digest))??;
        inner.counters.add("bytes_written", digest.size_bytes());
        inner.evict();
        Ok(())
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let mut index = self.inner.index();
        // Asking marks a blob used: a blob a build asks about is likely to be read.
        Ok(digests
            .iter()
            .filter(|d| !index.touch(&d.without_instance_name()))
            .cloned()
            .collect())
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        out.push(self.inner.counters.snapshot(&self.inner.name, "disk"));
    }
}
