mod common;

use blob_access::{BlobAccess, Code};
use blob_access_decorators::existence_caching::ExistenceCaching;
use common::*;
use std::sync::Arc;
use std::time::Duration;

fn cached(backend: Arc<Counting>, ttl_secs: u64, max: usize) -> ExistenceCaching {
    ExistenceCaching::new("ec", backend, Duration::from_secs(ttl_secs), max)
}

#[tokio::test(start_paused = true)]
async fn present_digests_are_asked_once_per_ttl() {
    let backend = Counting::memory();
    let a = put(&*backend, "a").await;
    let b = put(&*backend, "b").await;
    let (missing, _) = blob("missing");
    let ec = cached(backend.clone(), 300, 100);
    let all = vec![a.clone(), b.clone(), missing.clone()];
    assert_eq!(ec.find_missing(&all).await.unwrap(), vec![missing.clone()]);
    assert_eq!(ec.find_missing(&all).await.unwrap(), vec![missing.clone()]);
    // Only the missing digest reached the backend the second time.
    assert_eq!(backend.asked(), vec![all.clone(), vec![missing.clone()]]);
    assert_eq!(counter(&ec, "existence_caching", "hits"), 2);
    assert_eq!(counter(&ec, "existence_caching", "misses"), 4);

    tokio::time::advance(Duration::from_secs(301)).await;
    ec.find_missing(&all).await.unwrap();
    assert_eq!(backend.asked().last().unwrap(), &all, "ttl did not expire");
}

#[tokio::test]
async fn a_put_marks_present() {
    let backend = Counting::memory();
    let ec = cached(backend.clone(), 300, 100);
    let d = put(&ec, "new").await;
    assert!(ec.find_missing(&[d]).await.unwrap().is_empty());
    assert!(backend.asked().is_empty());
}

#[tokio::test]
async fn a_not_found_get_forgets_the_digest() {
    // The backend loses a blob it had: the cache must stop claiming it.
    let memory = Arc::new(blob_access::memory::MemoryBlobAccess::new("m", 10));
    let backend = Counting::new(memory.clone());
    let ec = cached(backend.clone(), 300, 100);
    let lost = put(&ec, "0123456789").await;
    assert!(ec
        .find_missing(std::slice::from_ref(&lost))
        .await
        .unwrap()
        .is_empty());
    put(&*memory, "abcdefghij").await; // evicts `lost` from the 10-byte memory
    let err = read(&ec, &lost).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(counter(&ec, "existence_caching", "not_found_evictions"), 1);
    assert_eq!(
        ec.find_missing(std::slice::from_ref(&lost)).await.unwrap(),
        vec![lost.clone()]
    );
}

#[tokio::test]
async fn memory_is_bounded_by_max_entries() {
    let backend = Counting::memory();
    let mut digests = Vec::new();
    for i in 0..10 {
        digests.push(put(&*backend, &format!("blob {i}")).await);
    }
    let ec = cached(backend.clone(), 300, 4);
    ec.find_missing(&digests).await.unwrap();
    ec.find_missing(&digests).await.unwrap();
    // Only 4 were remembered, so at least 6 were asked again.
    assert!(
        backend.asked()[1].len() >= 6,
        "{:?}",
        backend.asked()[1].len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_callers_agree() {
    let backend = Counting::memory();
    let mut present = Vec::new();
    for i in 0..50 {
        present.push(put(&*backend, &format!("p{i}")).await);
    }
    let absent: Vec<_> = (0..50).map(|i| blob(&format!("a{i}")).0).collect();
    let ec = Arc::new(cached(backend.clone(), 300, 1000));
    let mut tasks = Vec::new();
    for t in 0..16 {
        let (ec, mut ask) = (ec.clone(), present.clone());
        ask.extend(absent.iter().cloned());
        ask.rotate_left(t * 3);
        tasks.push(tokio::spawn(async move {
            let mut missing = ec.find_missing(&ask).await.unwrap();
            missing.sort();
            missing
        }));
    }
    let mut want = absent.clone();
    want.sort();
    for t in tasks {
        assert_eq!(t.await.unwrap(), want);
    }
}
