//! `mirrored` over memory backends: writes reach both sides, reads survive a
//! side that is down or empty, and the side lacking a blob is repaired.

mod common;

use blob_access::memory::MemoryBlobAccess;
use blob_access::{BlobAccess, BlobStream, Code, Digest, Error, ReadRange, Result};
use blob_access_decorators::mirrored::{Mirrored, MirroredActionCache, Side};
use common::{counter, put, read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A memory backend that can be switched off (UNAVAILABLE on every call).
struct Switch {
    inner: MemoryBlobAccess,
    down: AtomicBool,
}

impl Switch {
    fn new(name: &str) -> Arc<Self> {
        Arc::new(Switch {
            inner: MemoryBlobAccess::new(name, 64 << 20),
            down: AtomicBool::new(false),
        })
    }
    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
    fn check(&self) -> Result<()> {
        match self.down.load(Ordering::SeqCst) {
            true => Err(Error::unavailable("connection refused")),
            false => Ok(()),
        }
    }
    async fn has(&self, d: &Digest) -> bool {
        self.inner
            .find_missing(std::slice::from_ref(d))
            .await
            .unwrap()
            .is_empty()
    }
}

#[async_trait::async_trait]
impl BlobAccess for Switch {
    fn get(&self, d: &Digest, r: ReadRange) -> BlobStream {
        match self.check() {
            Ok(()) => self.inner.get(d, r),
            Err(e) => blob_access::util::failed(e),
        }
    }
    async fn put(&self, d: &Digest, data: BlobStream) -> Result<()> {
        self.check()?;
        self.inner.put(d, data).await
    }
    async fn find_missing(&self, ds: &[Digest]) -> Result<Vec<Digest>> {
        self.check()?;
        self.inner.find_missing(ds).await
    }
}

fn mirror() -> (Arc<Switch>, Arc<Switch>, Mirrored) {
    let (a, b) = (Switch::new("a"), Switch::new("b"));
    let m = Mirrored::new(
        "mirrored",
        Side::named(a.clone() as Arc<dyn BlobAccess>, "mirrored.backend_a"),
        Side::named(b.clone() as Arc<dyn BlobAccess>, "mirrored.backend_b"),
    );
    (a, b, m)
}

#[tokio::test]
async fn writes_go_to_both_and_reads_alternate() {
    let (a, b, m) = mirror();
    let d = put(&m, "both").await;
    assert!(a.has(&d).await && b.has(&d).await);
    for _ in 0..4 {
        assert_eq!(read(&m, &d).await.unwrap(), b"both");
    }
    assert_eq!(counter(&m, "mirrored", "fallbacks"), 0);
    let big = bytes::Bytes::from(vec![7u8; 3 << 20]);
    let bd = Digest::of(&big);
    m.put(&bd, blob_access::util::chunked(big.clone(), 64 << 10))
        .await
        .unwrap();
    assert!(a.has(&bd).await && b.has(&bd).await);
}

#[tokio::test]
async fn a_side_down_fails_writes_by_name_and_reads_go_on() {
    let (a, b, m) = mirror();
    let mut stored = Vec::new();
    for i in 0..6 {
        stored.push(put(&m, &format!("blob {i}")).await);
    }
    b.set_down(true);
    for d in &stored {
        read(&m, d).await.unwrap();
    }
    assert!(counter(&m, "mirrored", "fallbacks") >= 3);
    let (d, data) = common::blob("new");
    let e = m.put(&d, blob_access::util::once(data)).await.unwrap_err();
    assert!(e.to_string().contains("mirrored.backend_b"), "{e}");
    assert_eq!(e.code(), Code::Unavailable);
    // find_missing answers from the side that is up.
    assert_eq!(m.find_missing(&stored).await.unwrap(), Vec::<Digest>::new());
    assert_eq!(counter(&m, "mirrored", "side_failures"), 1);
    // Both down: the failure, not NOT_FOUND.
    a.set_down(true);
    let e = read(&m, &stored[0]).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
}

#[tokio::test]
async fn reads_repair_an_empty_side() {
    let (a, b, m) = mirror();
    let d = put(&*b, "only on b").await;
    // Two reads in a row: one of them starts at `a`, which lacks the blob.
    for _ in 0..2 {
        assert_eq!(read(&m, &d).await.unwrap(), b"only on b");
    }
    m.repairs_idle().await;
    assert!(a.has(&d).await);
    assert_eq!(counter(&m, "mirrored", "repairs_done"), 1);
    let missing = Digest::of(b"nowhere");
    let e = read(&m, &missing).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test]
async fn find_missing_reports_what_both_lack_and_repairs() {
    let (a, b, m) = mirror();
    let on_a = put(&*a, "on a").await;
    let on_b = put(&*b, "on b").await;
    let nowhere = Digest::of(b"nowhere");
    let missing = m
        .find_missing(&[on_a.clone(), on_b.clone(), nowhere.clone()])
        .await
        .unwrap();
    assert_eq!(missing, vec![nowhere]);
    m.repairs_idle().await;
    assert!(b.has(&on_a).await && a.has(&on_b).await);
    assert_eq!(counter(&m, "mirrored", "repairs_done"), 2);
}

#[tokio::test]
async fn repairs_are_bounded() {
    let (a, b) = (Switch::new("a"), Switch::new("b"));
    let m = Mirrored::with_repair_limits(
        "mirrored",
        Side::named(a.clone() as Arc<dyn BlobAccess>, "mirrored.backend_a"),
        Side::named(b.clone() as Arc<dyn BlobAccess>, "mirrored.backend_b"),
        1,
        5,
    );
    let mut ds = Vec::new();
    for i in 0..20 {
        ds.push(put(&*b, &format!("blob {i}")).await);
    }
    m.find_missing(&ds).await.unwrap();
    assert!(m.repairs_in_flight() <= 5);
    assert_eq!(counter(&m, "mirrored", "repairs_dropped"), 15);
    m.repairs_idle().await;
    // The next ask queues the rest.
    m.find_missing(&ds).await.unwrap();
    m.repairs_idle().await;
    m.find_missing(&ds).await.unwrap();
    m.repairs_idle().await;
    m.find_missing(&ds).await.unwrap();
    m.repairs_idle().await;
    for d in &ds {
        assert!(a.has(d).await);
    }
}

#[tokio::test]
async fn action_cache_writes_both_and_repairs() {
    let log = common::ac::CallLog::default();
    let (a, b) = (
        common::ac::TestAc::new("a", &log),
        common::ac::TestAc::new("b", &log),
    );
    let m = MirroredActionCache::new(
        "mirrored",
        Side::named(
            a.clone() as Arc<dyn blob_access::ActionCache>,
            "mirrored.backend_a",
        ),
        Side::named(
            b.clone() as Arc<dyn blob_access::ActionCache>,
            "mirrored.backend_b",
        ),
    );
    use blob_access::ActionCache;
    let action = Digest::of(b"action");
    let result = blob_access::action_cache::ActionResult {
        exit_code: 1,
        ..Default::default()
    };
    m.update_action_result(&action, &result).await.unwrap();
    assert_eq!(a.inner.get_action_result(&action).await.unwrap(), result);
    assert_eq!(b.inner.get_action_result(&action).await.unwrap(), result);
    let only_b = Digest::of(b"only b");
    b.inner
        .update_action_result(&only_b, &result)
        .await
        .unwrap();
    for _ in 0..2 {
        assert_eq!(m.get_action_result(&only_b).await.unwrap(), result);
    }
    assert_eq!(a.inner.get_action_result(&only_b).await.unwrap(), result);
    a.fail_updates(Some(Code::Unavailable));
    let e = m.update_action_result(&action, &result).await.unwrap_err();
    // The side's own name (a node below names itself, as leaves do).
    assert_eq!(e.backend(), Some("a"), "{e}");
}

/// A side whose reads never end.
struct Stuck;

#[async_trait::async_trait]
impl BlobAccess for Stuck {
    fn get(&self, _: &Digest, _: ReadRange) -> BlobStream {
        Box::pin(futures::stream::pending())
    }
    async fn put(&self, _: &Digest, _: BlobStream) -> Result<()> {
        futures::future::pending().await
    }
    async fn find_missing(&self, _: &[Digest]) -> Result<Vec<Digest>> {
        Ok(Vec::new())
    }
}

#[tokio::test]
async fn dropping_the_node_stops_its_repairs() {
    let stuck: Arc<dyn BlobAccess> = Arc::new(Stuck);
    let empty = Switch::new("empty");
    let m = Mirrored::new(
        "mirrored",
        Side::named(empty as Arc<dyn BlobAccess>, "mirrored.backend_a"),
        Side::named(stuck.clone(), "mirrored.backend_b"),
    );
    m.find_missing(&[Digest::of(b"x")]).await.unwrap();
    assert_eq!(m.repairs_in_flight(), 1);
    tokio::task::yield_now().await;
    assert!(Arc::strong_count(&stuck) > 1);
    drop(m);
    for _ in 0..100 {
        if Arc::strong_count(&stuck) == 1 {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("a repair task outlived its node");
}

#[tokio::test]
async fn config_trees_mirror_the_cas_and_the_action_cache() {
    let load =
        |yaml: &str| blob_access_config::load_str(yaml, blob_access_config::Format::Yaml, "t.yaml");
    let yaml = "
content_addressable_storage:
  mirrored:
    backend_a: {memory: {max_size_bytes: 1MiB}}
    backend_b: {memory: {max_size_bytes: 1MiB}}
    max_concurrent_repairs: 2
action_cache:
  mirrored:
    backend_a: {memory: {max_size_bytes: 1MiB}}
    backend_b: {memory: {max_size_bytes: 1MiB}}
";
    let storage = load(yaml)
        .unwrap()
        .build(&blob_access::BuildContext::root())
        .unwrap();
    let d = put(&*storage.cas, "mirrored").await;
    assert_eq!(read(&*storage.cas, &d).await.unwrap(), b"mirrored");
    let mut m = Vec::new();
    storage.cas.metrics(&mut m);
    let paths: Vec<&str> = m.iter().map(|m| m.path.as_str()).collect();
    assert!(
        paths.contains(&"content_addressable_storage.mirrored.backend_b.memory"),
        "{paths:?}"
    );
    let ac = storage.action_cache.unwrap();
    let action = Digest::of(b"action");
    let result = blob_access::action_cache::ActionResult::default();
    ac.update_action_result(&action, &result).await.unwrap();
    assert_eq!(ac.get_action_result(&action).await.unwrap(), result);

    let e = load("mirrored: {backend_a: {memory: {max_size_bytes: 1MiB}}, backend_b: {memory: {max_size_bytes: 1MiB}}, max_concurrent_repairs: 0}").unwrap_err();
    assert_eq!(e.path, "mirrored.max_concurrent_repairs", "{e}");
    let e = load("mirrored: {backend_a: {memory: {max_size_bytes: 1MiB}}}").unwrap_err();
    assert!(e.message.contains("backend_b"), "{e}");
}
