mod common;

use blob_access::action_cache::{ActionCache, ActionResult};
use blob_access::disk::DiskBlobAccess;
use blob_access::memory::MemoryBlobAccess;
use blob_access::util::{chunked, read_to_bytes};
use blob_access::{BlobAccess, BlobStream, BuildContext, Code, Digest, Error, ReadRange, Result};
use blob_access_decorators::read_caching::{ReadCaching, ReadCachingActionCache};
use bytes::Bytes;
use common::ac::{ac_counter, CallLog, TestAc};
use common::*;
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;

fn big(len: usize) -> (Digest, Bytes) {
    let data: Bytes = (0..len).map(|i| (i % 251) as u8).collect();
    (Digest::of(&data), data)
}

async fn put_big(b: &dyn BlobAccess, len: usize) -> (Digest, Bytes) {
    let (d, data) = big(len);
    b.put(&d, chunked(data.clone(), 64 << 10)).await.unwrap();
    (d, data)
}

/// The copy into `fast` finishes in the background: wait for it (or not).
async fn present(b: &dyn BlobAccess, d: &Digest) -> bool {
    for _ in 0..100 {
        if b.find_missing(std::slice::from_ref(d))
            .await
            .unwrap()
            .is_empty()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn a_miss_is_streamed_from_slow_and_copied_into_fast() {
    let (fast, slow) = (Counting::memory(), Counting::memory());
    let (d, data) = put_big(&*slow, 3 << 20).await;
    let rc = ReadCaching::new("rc", fast.clone(), slow.clone());

    assert_eq!(read(&rc, &d).await.unwrap(), data);
    assert!(present(&*fast, &d).await);
    assert_eq!(read(&rc, &d).await.unwrap(), data);
    assert_eq!(slow.gets(), 1, "the second read reached slow");
    assert_eq!(counter(&rc, "read_caching", "hits"), 1);
    assert_eq!(counter(&rc, "read_caching", "misses"), 1);

    // find_missing asks slow, the authority; put goes to slow only.
    let (other, _) = blob("other");
    assert_eq!(
        rc.find_missing(&[d, other.clone()]).await.unwrap(),
        vec![other]
    );
    assert_eq!(slow.asked().len(), 1);
    let fresh = put(&rc, "fresh").await;
    assert!(slow
        .find_missing(std::slice::from_ref(&fresh))
        .await
        .unwrap()
        .is_empty());
    assert!(!fast
        .find_missing(std::slice::from_ref(&fresh))
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn write_through_puts_into_both() {
    let (fast, slow) = (Counting::memory(), Counting::memory());
    let rc = ReadCaching::new("rc", fast.clone(), slow.clone()).write_through(true);
    let (d, _) = put_big(&rc, 1 << 20).await;
    assert!(slow
        .find_missing(std::slice::from_ref(&d))
        .await
        .unwrap()
        .is_empty());
    assert!(present(&*fast, &d).await);
}

#[tokio::test]
async fn ranged_misses_are_not_cached_and_ranged_hits_are_served_fast() {
    let (fast, slow) = (Counting::memory(), Counting::memory());
    let (d, data) = put_big(&*slow, 1 << 20).await;
    let rc = ReadCaching::new("rc", fast.clone(), slow.clone());
    let range = ReadRange::new(1000, Some(10));
    let part = read_to_bytes(&rc, &d, range, 100).await.unwrap();
    assert_eq!(part, data.slice(1000..1010));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!fast
        .find_missing(std::slice::from_ref(&d))
        .await
        .unwrap()
        .is_empty());

    read(&rc, &d).await.unwrap();
    assert!(present(&*fast, &d).await);
    let part = read_to_bytes(&rc, &d, range, 100).await.unwrap();
    assert_eq!(part, data.slice(1000..1010));
    assert_eq!(slow.gets(), 2);
}

#[tokio::test]
async fn a_missing_blob_is_not_found_naming_slow() {
    let rc = ReadCaching::new("rc", Counting::memory(), Counting::memory());
    let (d, _) = blob("nowhere");
    let err = read(&rc, &d).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.to_string().contains(d.hash()), "{err}");
}

/// A fast tier that is broken: reads fail with UNAVAILABLE, writes with
/// RESOURCE_EXHAUSTED (a full disk).
struct Broken;

#[async_trait::async_trait]
impl BlobAccess for Broken {
    fn get(&self, _: &Digest, _: ReadRange) -> BlobStream {
        futures::stream::once(async { Err(Error::unavailable("fast tier down")) }).boxed()
    }
    async fn put(&self, _: &Digest, mut data: BlobStream) -> Result<()> {
        let _ = data.next().await;
        Err(Error::resource_exhausted("disk full"))
    }
    async fn find_missing(&self, d: &[Digest]) -> Result<Vec<Digest>> {
        Ok(d.to_vec())
    }
}

#[tokio::test]
async fn a_failing_fast_tier_never_fails_a_read() {
    let slow = Counting::memory();
    let (d, data) = put_big(&*slow, 2 << 20).await;
    let rc = ReadCaching::new("rc", Arc::new(Broken), slow.clone());
    for _ in 0..2 {
        assert_eq!(read(&rc, &d).await.unwrap(), data);
        // Let the copy fail in the background, so the next read is not
        // coalesced with it.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(counter(&rc, "read_caching", "fast_errors"), 2);
    assert_eq!(counter(&rc, "read_caching", "fast_put_failures"), 2);
}

#[tokio::test]
async fn a_reader_that_stops_early_leaves_nothing_in_fast() {
    let (fast, slow) = (Counting::memory(), Counting::memory());
    let (d, _) = put_big(&*slow, 4 << 20).await;
    let rc = ReadCaching::new("rc", fast.clone(), slow.clone());
    let mut s = rc.get(&d, ReadRange::FULL);
    s.next().await.unwrap().unwrap();
    drop(s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!fast
        .find_missing(std::slice::from_ref(&d))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(counter(&rc, "read_caching", "fast_put_failures"), 0);
    // The next read is a miss again and is cached.
    read(&rc, &d).await.unwrap();
    assert!(present(&*fast, &d).await);
}

/// A slow tier whose reads wait for a gate, so that concurrent readers pile up.
struct Gated {
    inner: Arc<Counting>,
    gate: tokio::sync::watch::Receiver<bool>,
}

#[async_trait::async_trait]
impl BlobAccess for Gated {
    fn get(&self, d: &Digest, range: ReadRange) -> BlobStream {
        let (mut gate, inner) = (self.gate.clone(), self.inner.get(d, range));
        futures::stream::once(async move {
            let _ = gate.wait_for(|open| *open).await;
            inner
        })
        .flatten()
        .boxed()
    }
    async fn put(&self, d: &Digest, data: BlobStream) -> Result<()> {
        self.inner.put(d, data).await
    }
    async fn find_missing(&self, d: &[Digest]) -> Result<Vec<Digest>> {
        self.inner.find_missing(d).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_of_one_blob_fetch_it_from_slow_once() {
    let counting = Counting::memory();
    let (d, data) = put_big(&*counting, 3 << 20).await;
    let (open, gate) = tokio::sync::watch::channel(false);
    let slow = Arc::new(Gated {
        inner: counting.clone(),
        gate,
    });
    let fast = Counting::memory();
    let rc = Arc::new(ReadCaching::new("rc", fast.clone(), slow));
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let (rc, d) = (rc.clone(), d.clone());
            tokio::spawn(async move { read(&*rc, &d).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    open.send(true).unwrap();
    for r in readers {
        assert_eq!(r.await.unwrap().unwrap(), data);
    }
    assert_eq!(counting.gets(), 1, "slow was read more than once");
    assert_eq!(counter(&*rc, "read_caching", "coalesced"), 7);
    assert_eq!(fast.puts.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_corrupted_small_blob_on_disk_is_refetched_transparently() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(DiskBlobAccess::open("disk", dir.path(), 64 << 20).unwrap());
    let slow = Counting::memory();
    let (d, data) = put_big(&*slow, 100_000).await;
    let rc = ReadCaching::new("rc", disk.clone(), slow.clone());
    read(&rc, &d).await.unwrap();
    assert!(present(&*disk, &d).await);
    std::fs::write(disk.path_of(&d), vec![0u8; 100_000]).unwrap();

    assert_eq!(read(&rc, &d).await.unwrap(), data);
    assert_eq!(slow.gets(), 2);
    assert!(present(&*disk, &d).await);
    assert_eq!(std::fs::read(disk.path_of(&d)).unwrap(), data);
}

#[tokio::test]
async fn a_tree_from_yaml_caches_on_disk_in_front_of_a_remote() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "error_logging:\n  backend:\n    read_caching:\n      fast:\n        disk: {{path: {}, max_size_bytes: 64MiB}}\n      slow:\n        existence_caching:\n          backend:\n            memory: {{max_size_bytes: 64MiB}}\n",
        dir.path().join("cache").display()
    );
    let node = blob_access_config::load_str(&yaml, blob_access_config::Format::Yaml, "t").unwrap();
    let cas = node.build_cas(&BuildContext::root()).unwrap();
    let (d, data) = put_big(&*cas, 1 << 20).await;
    // Uploads went to slow only; the first read copies into the disk tier.
    assert_eq!(read(&*cas, &d).await.unwrap(), data);
    assert_eq!(counter(&*cas, "disk", "bytes_written"), data.len() as u64);
    assert_eq!(read(&*cas, &d).await.unwrap(), data);
    assert_eq!(counter(&*cas, "read_caching", "hits"), 1);
    // Node paths in the metrics tell the tiers apart.
    let mut m = Vec::new();
    cas.metrics(&mut m);
    let paths: Vec<_> = m.iter().map(|m| m.path.as_str()).collect();
    assert!(
        paths.contains(&"error_logging.backend.read_caching.fast.disk"),
        "{paths:?}"
    );
}

#[tokio::test]
async fn memory_fast_tier_rejects_a_lying_slow_tier() {
    // A slow tier that returns the wrong bytes (and does not verify): the
    // copy into fast is verified, so fast never keeps them.
    struct Liar(Bytes);
    #[async_trait::async_trait]
    impl BlobAccess for Liar {
        fn get(&self, _: &Digest, _: ReadRange) -> BlobStream {
            blob_access::util::once(self.0.clone())
        }
        async fn put(&self, _: &Digest, _: BlobStream) -> Result<()> {
            Ok(())
        }
        async fn find_missing(&self, _: &[Digest]) -> Result<Vec<Digest>> {
            Ok(vec![])
        }
    }
    let (d, _) = blob("truth");
    let fast = Arc::new(MemoryBlobAccess::new("fast", 1 << 20));
    let rc = ReadCaching::new(
        "rc",
        fast.clone(),
        Arc::new(Liar(Bytes::from_static(b"lies!"))),
    );
    let _ = read(&rc, &d).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        fast.find_missing(std::slice::from_ref(&d)).await.unwrap(),
        vec![d]
    );
}

// In an action cache tree: `ReadCachingActionCache`.

fn exit(code: i32) -> ActionResult {
    ActionResult {
        exit_code: code,
        stdout_raw: format!("run {code}").into_bytes(),
        ..Default::default()
    }
}

struct Tiers {
    log: CallLog,
    fast: Arc<TestAc>,
    slow: Arc<TestAc>,
    rc: ReadCachingActionCache,
}

fn tiers() -> Tiers {
    let log = CallLog::default();
    let (fast, slow) = (TestAc::new("fast", &log), TestAc::new("slow", &log));
    let rc = ReadCachingActionCache::new("rc", fast.clone(), slow.clone());
    Tiers {
        log,
        fast,
        slow,
        rc,
    }
}

impl Tiers {
    /// The calls since the last look.
    fn calls(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
    fn counter(&self, name: &str) -> u64 {
        ac_counter(&self.rc, "read_caching", name)
    }
}

#[tokio::test]
async fn a_result_missing_in_fast_is_read_from_slow_and_copied_into_fast() {
    let t = tiers();
    let a = Digest::of(b"Action");
    t.slow
        .inner
        .update_action_result(&a, &exit(1))
        .await
        .unwrap();

    assert_eq!(t.rc.get_action_result(&a).await.unwrap(), exit(1));
    assert_eq!(t.calls(), ["fast get", "slow get", "fast update"]);
    assert_eq!(t.fast.stored(&a).await, Some(exit(1)));
    // Served by fast from now on.
    assert_eq!(t.rc.get_action_result(&a).await.unwrap(), exit(1));
    assert_eq!(t.calls(), ["fast get"]);
    assert_eq!(t.counter("hits"), 1);
    assert_eq!(t.counter("misses"), 1);
    assert_eq!(t.counter("fast_errors"), 0);

    // Missing in both: slow's NOT_FOUND, nothing copied.
    let b = Digest::of(b"Other action");
    let err = t.rc.get_action_result(&b).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.backend(), Some("slow"), "{err}");
    assert_eq!(err.digest(), Some(&b));
    assert_eq!(t.calls(), ["fast get", "slow get"]);
    assert_eq!(t.fast.stored(&b).await, None);

    // Both tiers' counters are reported below the node's.
    let mut m = Vec::new();
    t.rc.metrics(&mut m);
    let paths: Vec<_> = m.iter().map(|m| (m.kind, m.path.as_str())).collect();
    assert_eq!(
        paths,
        [
            ("read_caching", "rc"),
            ("memory", "fast"),
            ("memory", "slow")
        ]
    );
}

#[tokio::test]
async fn a_failing_fast_tier_falls_back_to_slow_and_is_counted() {
    let t = tiers();
    let a = Digest::of(b"Action");
    t.slow
        .inner
        .update_action_result(&a, &exit(1))
        .await
        .unwrap();
    t.fast.fail_gets(Some(Code::Unavailable));
    assert_eq!(t.rc.get_action_result(&a).await.unwrap(), exit(1));
    assert_eq!(t.calls(), ["fast get", "slow get", "fast update"]);
    assert_eq!(t.counter("fast_errors"), 1);
    assert_eq!(t.counter("misses"), 1);

    // A fast tier that cannot store the copy does not fail the read either.
    t.fast.fail_updates(Some(Code::ResourceExhausted));
    assert_eq!(t.rc.get_action_result(&a).await.unwrap(), exit(1));
    assert_eq!(t.counter("fast_errors"), 2);
    assert_eq!(t.counter("fast_put_failures"), 1);

    // A plain miss in fast is no error of fast's.
    t.fast.fail_gets(None);
    t.fast.fail_updates(None);
    let b = Digest::of(b"Other action");
    t.slow
        .inner
        .update_action_result(&b, &exit(2))
        .await
        .unwrap();
    assert_eq!(t.rc.get_action_result(&b).await.unwrap(), exit(2));
    assert_eq!(t.counter("fast_errors"), 2);

    // Slow's failures are the caller's, with their code.
    t.calls();
    t.slow.fail_gets(Some(Code::Unavailable));
    let c = Digest::of(b"Third action");
    let err = t.rc.get_action_result(&c).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert_eq!(err.backend(), Some("slow"));
    assert_eq!(t.calls(), ["fast get", "slow get"]);
}

#[tokio::test]
async fn updates_go_to_slow_then_fast() {
    let t = tiers();
    let a = Digest::of(b"Action");
    t.slow
        .inner
        .update_action_result(&a, &exit(1))
        .await
        .unwrap();
    t.rc.get_action_result(&a).await.unwrap();
    assert_eq!(t.fast.stored(&a).await, Some(exit(1)));
    t.calls();

    // The replacement reaches both: fast does not keep serving the old result.
    t.rc.update_action_result(&a, &exit(2)).await.unwrap();
    assert_eq!(t.calls(), ["slow update", "fast update"]);
    assert_eq!(t.slow.stored(&a).await, Some(exit(2)));
    assert_eq!(t.fast.stored(&a).await, Some(exit(2)));
    assert_eq!(t.rc.get_action_result(&a).await.unwrap(), exit(2));

    // Slow refuses: the update fails and fast is left alone.
    t.calls();
    t.slow.fail_updates(Some(Code::PermissionDenied));
    let err = t.rc.update_action_result(&a, &exit(3)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(t.calls(), ["slow update"]);
    assert_eq!(t.fast.stored(&a).await, Some(exit(2)));

    // Fast refuses: the update still succeeds, stored in slow.
    t.slow.fail_updates(None);
    t.fast.fail_updates(Some(Code::Internal));
    let b = Digest::of(b"Other action");
    t.rc.update_action_result(&b, &exit(4)).await.unwrap();
    assert_eq!(t.slow.stored(&b).await, Some(exit(4)));
    assert_eq!(t.fast.stored(&b).await, None);
    assert_eq!(t.counter("fast_put_failures"), 1);
}

#[tokio::test]
async fn update_enabled_follows_slow() {
    let t = tiers();
    assert!(t.rc.update_enabled().await);
    t.fast.set_update_enabled(false);
    assert!(t.rc.update_enabled().await);
    t.slow.set_update_enabled(false);
    assert!(!t.rc.update_enabled().await);
    t.fast.set_update_enabled(true);
    assert!(!t.rc.update_enabled().await);
}
