//! An in-memory action cache bounded by total size, least recently used
//! results evicted first: the embedded default of `serve`.

use super::{decode, encode, not_found, ActionCache, ActionResult};
use crate::memory::Store;
use crate::node::Counters;
use crate::{Digest, Error, NodeMetrics, Result};
use std::sync::Mutex;

/// See the module documentation.
pub struct MemoryActionCache {
    name: String,
    max_size: u64,
    store: Mutex<Store>,
    counters: Counters,
}

const COUNTERS: &[&str] = &["hits", "misses", "updates", "evictions"];

impl MemoryActionCache {
    /// `name` identifies this node in errors and metrics.
    pub fn new(name: &str, max_size_bytes: u64) -> Self {
        MemoryActionCache {
            name: if name.is_empty() { "memory" } else { name }.into(),
            max_size: max_size_bytes,
            store: Mutex::new(Store::new()),
            counters: Counters::new(COUNTERS),
        }
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
impl ActionCache for MemoryActionCache {
    async fn get_action_result(&self, action: &Digest) -> Result<ActionResult> {
        let found = self.store().blobs.get(action).cloned();
        match found {
            Some(data) => {
                self.counters.inc("hits");
                decode(action, &data, &self.name)
            }
            None => {
                self.counters.inc("misses");
                Err(not_found(action, &self.name))
            }
        }
    }

    async fn update_action_result(&self, action: &Digest, result: &ActionResult) -> Result<()> {
        let data = encode(action, result, &self.name)?;
        if data.len() as u64 > self.max_size {
            // Stored, it would evict every other result, then itself.
            return Err(Error::resource_exhausted(format!(
                "action result of {} bytes is larger than this action cache's {} byte limit",
                data.len(),
                self.max_size
            ))
            .with_backend(self.name.clone())
            .with_digest(action));
        }
        self.counters.inc("updates");
        let evicted = self.store().insert(action.clone(), data, self.max_size);
        self.counters.add("evictions", evicted);
        Ok(())
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        out.push(self.counters.snapshot(&self.name, "memory"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Code;

    fn result(code: i32) -> ActionResult {
        ActionResult {
            exit_code: code,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn stores_replaces_and_evicts() {
        let ac = MemoryActionCache::new("ac", 12);
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let err = ac.get_action_result(&a).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        assert!(err.to_string().contains(a.hash()), "{err}");
        ac.update_action_result(&a, &result(1)).await.unwrap();
        ac.update_action_result(&a, &result(2)).await.unwrap();
        assert_eq!(ac.get_action_result(&a).await.unwrap(), result(2));
        // Each result encodes to 2 bytes; 7 of them exceed 12 bytes, evicting `a`.
        for i in 3..10 {
            ac.update_action_result(&Digest::of(&[i]), &result(i as i32))
                .await
                .unwrap();
        }
        assert_eq!(
            ac.get_action_result(&a).await.unwrap_err().code(),
            Code::NotFound
        );
        assert!(ac.store().size <= 12);
        assert_eq!(
            ac.get_action_result(&b).await.unwrap_err().code(),
            Code::NotFound
        );
    }

    #[tokio::test]
    async fn oversized_result_is_refused() {
        let ac = MemoryActionCache::new("ac", 1 << 30);
        let big = ActionResult {
            stdout_raw: vec![0; super::super::MAX_ACTION_RESULT_SIZE + 1],
            ..Default::default()
        };
        let a = Digest::of(b"a");
        let err = ac.update_action_result(&a, &big).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert_eq!(
            ac.get_action_result(&a).await.unwrap_err().code(),
            Code::NotFound
        );
    }

    #[tokio::test]
    async fn a_result_larger_than_the_cache_is_refused_and_evicts_nothing() {
        let ac = MemoryActionCache::new("ac", 12);
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        ac.update_action_result(&a, &result(1)).await.unwrap();
        let big = ActionResult {
            stdout_raw: vec![1; 20],
            ..Default::default()
        };
        let err = ac.update_action_result(&b, &big).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert_eq!(err.digest(), Some(&b));
        assert_eq!(err.backend(), Some("ac"));
        assert_eq!(ac.get_action_result(&a).await.unwrap(), result(1));
        assert_eq!(
            ac.get_action_result(&b).await.unwrap_err().code(),
            Code::NotFound
        );
    }
}
