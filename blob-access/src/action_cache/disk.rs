//! An action cache on local disk, surviving restarts: one file per action at
//! `action-cache/objects/sha256/ab/<hash>-<size>` under the node's `path`
//! (beside a CAS `disk` node's files if both name the same path), written to
//! `action-cache/tmp/`, fsynced and renamed into place. The least recently used
//! results are deleted beyond `max_size_bytes`; reads refresh a file's
//! modification time, from which recency is rebuilt on open.
//!
//! Results are kept per instance name (instances may build differently): the
//! default instance's file is named by the action digest, another instance's
//! by the SHA-256 of `INSTANCE\0HASH/SIZE`, so the layout stays flat.

use super::{check_fits, decode, encode, not_found, ActionCache, ActionResult};
use crate::disk::{digest_of_path, object_path, walk, Index};
use crate::node::Counters;
use crate::{Digest, Error, NodeMetrics, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// See the module documentation.
pub struct DiskActionCache {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    objects: PathBuf,
    tmp: PathBuf,
    max_size: u64,
    index: Mutex<Index>,
    counters: Counters,
}

const COUNTERS: &[&str] = &[
    "hits",
    "misses",
    "updates",
    "evictions",
    "corrupted",
    "errors",
];

/// What a result of `len` bytes costs on disk: whole blocks, at least one, so
/// that many tiny results cannot outgrow `max_size_bytes` in inodes and blocks.
fn cost(len: u64) -> u64 {
    len.div_ceil(4096).max(1) * 4096
}

impl DiskActionCache {
    /// Opens (or creates) the action cache under `root`, rebuilding its index
    /// from the files there. `name` identifies it in errors and metrics.
    pub fn open(name: &str, root: &Path, max_size_bytes: u64) -> Result<Self> {
        let name = if name.is_empty() { "disk" } else { name }.to_string();
        let at = |what: &str, path: &Path, e| {
            Error::io(format_args!("{what} {}", path.display()), e).with_backend(name.clone())
        };
        let root = root.join("action-cache");
        let (objects, tmp) = (root.join("objects"), root.join("tmp"));
        for dir in [&tmp, &objects] {
            std::fs::create_dir_all(dir).map_err(|e| at("creating", dir, e))?;
        }
        crate::disk::remove_temp_files(&tmp).map_err(|e| at("cleaning", &tmp, e))?;
        let mut found = Vec::new();
        for (path, meta) in walk(&objects).map_err(|e| at("listing", &objects, e))? {
            match digest_of_path(&objects, &path) {
                Some(d) => {
                    let mtime = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                    found.push((mtime, d, cost(meta.len())));
                }
                None => {
                    tracing::warn!(path = %path.display(), "ignoring a file that is not an action result")
                }
            }
        }
        let inner = Inner {
            name,
            objects,
            tmp,
            max_size: max_size_bytes,
            index: Mutex::new(Index::from_files(found)),
            counters: Counters::new(COUNTERS),
        };
        inner.evict();
        Ok(DiskActionCache {
            inner: Arc::new(inner),
        })
    }
}

impl Inner {
    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets the least recently used results beyond the limit and deletes
    /// their files, each under the lock and only if no update stored it again
    /// meanwhile (updates rename and index under the same lock).
    fn evict(&self) {
        let evicted = self.index().over(self.max_size);
        for d in &evicted {
            let index = self.index();
            if !index.contains(d) {
                let _ = std::fs::remove_file(object_path(&self.objects, d));
            }
        }
        self.counters.add("evictions", evicted.len() as u64);
    }

    fn read(&self, key: &Digest, action: &Digest) -> Result<ActionResult> {
        let path = object_path(&self.objects, key);
        let data = match std::fs::read(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.index().remove(key);
                return Err(not_found(action, &self.name));
            }
            Err(e) => {
                let e = Error::io(format_args!("reading {}", path.display()), e);
                return Err(e.with_backend(self.name.clone()).with_digest(action));
            }
        };
        // Recency that survives a restart; best effort.
        if let Ok(f) = std::fs::File::options().append(true).open(&path) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
        decode(action, &data, &self.name).map_err(|e| {
            self.counters.inc("corrupted");
            self.index().remove(key);
            let _ = std::fs::remove_file(&path);
            tracing::warn!(backend = %self.name, %action, error = %e, "removed a corrupted action result");
            not_found(action, &self.name)
        })
    }

    fn write(&self, key: &Digest, action: &Digest, data: &[u8]) -> Result<()> {
        let io = |what: &str, e| {
            Error::io(what, e)
                .with_backend(self.name.clone())
                .with_digest(action)
        };
        let mut tmp =
            crate::disk::temp_file_in(&self.tmp).map_err(|e| io("creating a temp file", e))?;
        tmp.write_all(data).map_err(|e| io("writing", e))?;
        tmp.as_file().sync_all().map_err(|e| io("syncing", e))?;
        let path = object_path(&self.objects, key);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io("creating a directory", e))?;
        }
        {
            let mut index = self.index();
            tmp.persist(&path)
                .map_err(|e| io("renaming into place", e.error))?;
            index.insert(key.clone(), cost(data.len() as u64));
        }
        self.evict();
        Ok(())
    }
}

/// The digest naming `action`'s file and index entry (see the module documentation).
fn key(action: &Digest) -> Digest {
    let function = action.function();
    match action.instance_name() {
        "" => action.clone(),
        // SHA-256 keys as before the other functions came.
        instance if function == crate::DigestFunction::Sha256 => {
            Digest::of(format!("{instance}\0{action}").as_bytes())
        }
        instance => Digest::of(format!("{instance}\0{function}\0{action}").as_bytes()),
    }
}

#[async_trait::async_trait]
impl ActionCache for DiskActionCache {
    async fn get_action_result(&self, action: &Digest) -> Result<ActionResult> {
        let inner = self.inner.clone();
        let key = key(action);
        if !inner.index().touch(&key) {
            inner.counters.inc("misses");
            return Err(not_found(action, &inner.name));
        }
        let a = action.clone();
        let result = tokio::task::spawn_blocking(move || inner.read(&key, &a))
            .await
            .map_err(|e| Error::internal(format!("reader task: {e}")))?;
        let outcome = match &result {
            Ok(_) => "hits",
            Err(e) if e.code() == crate::Code::NotFound => "misses",
            Err(_) => "errors",
        };
        self.inner.counters.inc(outcome);
        result
    }

    async fn update_action_result(&self, action: &Digest, result: &ActionResult) -> Result<()> {
        let data = encode(action, result, &self.inner.name)?;
        let (max, name) = (self.inner.max_size, &self.inner.name);
        check_fits(action, cost(data.len() as u64), max, name)?;
        let (inner, a, key) = (self.inner.clone(), action.clone(), key(action));
        tokio::task::spawn_blocking(move || inner.write(&key, &a, &data))
            .await
            .map_err(|e| Error::internal(format!("writer task: {e}")))??;
        self.inner.counters.inc("updates");
        Ok(())
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        out.push(self.inner.counters.snapshot(&self.inner.name, "disk"));
    }
}
