//! An action cache for decorator tests: a memory one whose calls are logged
//! and fail on demand.

use blob_access::action_cache::{ActionCache, ActionResult};
use blob_access::memory::MemoryActionCache;
use blob_access::{Code, Digest, Error, NodeMetrics, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Calls of several [`TestAc`]s in the order they happened, e.g. `"slow update"`.
pub type CallLog = Arc<Mutex<Vec<String>>>;

pub struct TestAc {
    pub name: &'static str,
    pub inner: MemoryActionCache,
    fail_get: Mutex<Option<Code>>,
    fail_update: Mutex<Option<Code>>,
    update_enabled: AtomicBool,
    log: CallLog,
}

impl TestAc {
    pub fn new(name: &'static str, log: &CallLog) -> Arc<Self> {
        Arc::new(TestAc {
            name,
            inner: MemoryActionCache::new(name, 64 << 20),
            fail_get: Mutex::new(None),
            fail_update: Mutex::new(None),
            update_enabled: AtomicBool::new(true),
            log: log.clone(),
        })
    }
    /// Gets fail with `code` from now on (`None`: they work again).
    pub fn fail_gets(&self, code: Option<Code>) {
        *self.fail_get.lock().unwrap() = code;
    }
    pub fn fail_updates(&self, code: Option<Code>) {
        *self.fail_update.lock().unwrap() = code;
    }
    pub fn set_update_enabled(&self, on: bool) {
        self.update_enabled.store(on, Ordering::SeqCst);
    }
    /// What is stored, read without going through the log.
    pub async fn stored(&self, action: &Digest) -> Option<ActionResult> {
        self.inner.get_action_result(action).await.ok()
    }
    fn injected(&self, code: Code, action: &Digest) -> Error {
        Error::new(code, format!("injected {code:?}"))
            .with_backend(self.name)
            .with_digest(action)
    }
}

#[async_trait::async_trait]
impl ActionCache for TestAc {
    async fn get_action_result(&self, action: &Digest) -> Result<ActionResult> {
        self.log.lock().unwrap().push(format!("{} get", self.name));
        let fail = *self.fail_get.lock().unwrap();
        match fail {
            Some(code) => Err(self.injected(code, action)),
            None => self.inner.get_action_result(action).await,
        }
    }
    async fn update_action_result(&self, action: &Digest, result: &ActionResult) -> Result<()> {
        self.log
            .lock()
            .unwrap()
            .push(format!("{} update", self.name));
        let fail = *self.fail_update.lock().unwrap();
        match fail {
            Some(code) => Err(self.injected(code, action)),
            None => self.inner.update_action_result(action, result).await,
        }
    }
    async fn update_enabled(&self) -> bool {
        self.update_enabled.load(Ordering::SeqCst)
    }
    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        self.inner.metrics(out)
    }
}

/// Counter `name` of the first node of `kind` in `ac`'s metrics.
pub fn ac_counter(ac: &dyn ActionCache, kind: &str, name: &str) -> u64 {
    let mut m = Vec::new();
    ac.metrics(&mut m);
    m.iter()
        .find(|m| m.kind == kind)
        .and_then(|m| m.get(name))
        .unwrap_or_else(|| panic!("no counter {kind}.{name} in {m:?}"))
}
