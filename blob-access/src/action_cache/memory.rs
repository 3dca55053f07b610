//! An in-memory action cache bounded by total size, least recently used
//! results evicted first: the embedded default of `serve`.

use super::{check_fits, decode, encode, not_found, ActionCache, ActionResult};
use crate::memory::Store;
use crate::node::Counters;
use crate::{Digest, NodeMetrics, Result};
use std::sync::Mutex;

/// See the module documentation.
pub struct MemoryActionCache {
    name: String,
    max_size: u64,
    store: Mutex<Store>,
    counters: Counters,
}

const COUNTERS: &[&str] = &["hits", "misses", "updates", "evictions"];

/// What an entry costs beyond its encoded result (key, hash string, LRU node):
/// counted so that many tiny results cannot outgrow `max_size_bytes`.
pub(crate) const ENTRY_OVERHEAD: u64 = 256;

impl MemoryActionCache {
    /// `name` identifies this node in errors and metrics.
    pub fn new(name: &str, max_size_bytes: u64) -> Self {
        MemoryActionCache {
            name: if name.is_empty() { "memory" } else { name }.into(),
            max_size: max_size_bytes,
            store: Mutex::new(Store::new(ENTRY_OVERHEAD)),
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
        let cost = data.len() as u64 + ENTRY_OVERHEAD;
        check_fits(action, cost, self.max_size, &self.name)?;
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
        // Room for six entries of 2 bytes each.
        let max = 6 * (2 + ENTRY_OVERHEAD);
        let ac = MemoryActionCache::new("ac", max);
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let err = ac.get_action_result(&a).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        assert!(err.to_string().contains(a.hash()), "{err}");
        ac.update_action_result(&a, &result(1)).await.unwrap();
        ac.update_action_result(&a, &result(2)).await.unwrap();
        assert_eq!(ac.get_action_result(&a).await.unwrap(), result(2));
        // Each result encodes to 2 bytes; 7 more exceed the room for six, evicting `a`.
        for i in 3..10 {
            ac.update_action_result(&Digest::of(&[i]), &result(i as i32))
                .await
                .unwrap();
        }
        assert_eq!(
            ac.get_action_result(&a).await.unwrap_err().code(),
            Code::NotFound
        );
        assert!(ac.store().size <= max);
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
        let ac = MemoryActionCache::new("ac", 12 + ENTRY_OVERHEAD);
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

    #[tokio::test]
    async fn many_tiny_results_stay_within_the_limit() {
        let max = 64 << 10;
        let ac = MemoryActionCache::new("ac", max);
        for i in 0..10_000u32 {
            let action = Digest::of(&i.to_le_bytes());
            ac.update_action_result(&action, &ActionResult::default())
                .await
                .unwrap();
        }
        let store = ac.store();
        assert!(store.size <= max);
        assert!(
            store.blobs.len() as u64 <= max / ENTRY_OVERHEAD,
            "{}",
            store.blobs.len()
        );
    }
}
