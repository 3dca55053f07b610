//! The `disk` action cache: round trips, restarts, replacement, eviction by
//! recency (kept across restarts), corrupted and stray files, and a CAS on the
//! same path.

use blob_access::action_cache::{ActionCache, ActionResult, DiskActionCache};
use blob_access::disk::DiskBlobAccess;
use blob_access::util::{once, read_to_bytes};
use blob_access::{BlobAccess, Code, Digest, NodeMetrics, ReadRange};
use prost::Message;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A result whose encoding is exactly `2 + len` bytes (tag, length, data) for
/// `len` < 128, so that sizes (and eviction) are predictable.
fn result(seed: u8, len: usize) -> ActionResult {
    let r = ActionResult {
        stdout_raw: vec![seed; len],
        ..Default::default()
    };
    if len < 128 {
        assert_eq!(r.encoded_len(), 2 + len);
    }
    r
}

fn action(name: &str) -> Digest {
    Digest::of(format!("Action {name}").as_bytes())
}

/// Where the module documentation says a result is stored.
fn file_of(root: &Path, action: &Digest) -> PathBuf {
    root.join(format!(
        "action-cache/objects/sha256/{}/{}-{}",
        &action.hash()[..2],
        action.hash(),
        action.size_bytes()
    ))
}

fn files_under(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        files_under(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

fn counter(ac: &DiskActionCache, name: &str) -> u64 {
    let mut m: Vec<NodeMetrics> = Vec::new();
    ac.metrics(&mut m);
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m[0].kind, "disk");
    m[0].get(name)
        .unwrap_or_else(|| panic!("no counter {name} in {m:?}"))
}

async fn stored(ac: &DiskActionCache, a: &Digest) -> bool {
    match ac.get_action_result(a).await {
        Ok(_) => true,
        Err(e) if e.code() == Code::NotFound => false,
        Err(e) => panic!("{e}"),
    }
}

/// Sets a file's modification time to `secs_ago` seconds before now.
fn age(path: &Path, secs_ago: u64) {
    let f = std::fs::File::options().append(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(secs_ago))
        .unwrap();
}

#[tokio::test]
async fn round_trip_replacement_and_missing_results() {
    let dir = tempfile::tempdir().unwrap();
    let ac = DiskActionCache::open("ac-disk", dir.path(), 1 << 20).unwrap();
    let (a, b) = (action("a"), action("b"));

    let err = ac.get_action_result(&a).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.to_string().contains(a.hash()), "{err}");
    assert!(err.to_string().contains("ac-disk"), "{err}");

    let first = ActionResult {
        exit_code: 3,
        stdout_raw: b"compiled".to_vec(),
        stderr_raw: b"a warning".to_vec(),
        ..Default::default()
    };
    ac.update_action_result(&a, &first).await.unwrap();
    assert_eq!(ac.get_action_result(&a).await.unwrap(), first);
    // The file is where the module documentation says, holding the encoded result.
    let path = file_of(dir.path(), &a);
    assert_eq!(std::fs::read(&path).unwrap(), first.encode_to_vec());
    // Another action is still missing.
    assert_eq!(
        ac.get_action_result(&b).await.unwrap_err().code(),
        Code::NotFound
    );

    // A second update replaces the first, in the same file.
    let second = result(9, 40);
    ac.update_action_result(&a, &second).await.unwrap();
    assert_eq!(ac.get_action_result(&a).await.unwrap(), second);
    assert_eq!(std::fs::read(&path).unwrap(), second.encode_to_vec());
    assert_eq!(files_under(&dir.path().join("action-cache/objects")), 1);
    assert_eq!(files_under(&dir.path().join("action-cache/tmp")), 0);

    assert_eq!(counter(&ac, "hits"), 2);
    assert_eq!(counter(&ac, "misses"), 2);
    assert_eq!(counter(&ac, "updates"), 2);
    assert_eq!(counter(&ac, "evictions"), 0);

    // The empty result is a result too.
    let empty = ActionResult::default();
    ac.update_action_result(&b, &empty).await.unwrap();
    assert_eq!(ac.get_action_result(&b).await.unwrap(), empty);
}

#[tokio::test]
async fn results_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let actions: Vec<Digest> = (0..5).map(|i| action(&i.to_string())).collect();
    {
        let ac = DiskActionCache::open("disk", dir.path(), 1 << 20).unwrap();
        for (i, a) in actions.iter().enumerate() {
            ac.update_action_result(a, &result(i as u8, 10 + i))
                .await
                .unwrap();
        }
        // Replaced before the restart: the replacement is what survives.
        ac.update_action_result(&actions[0], &result(100, 7))
            .await
            .unwrap();
    }
    let ac = DiskActionCache::open("disk", dir.path(), 1 << 20).unwrap();
    assert_eq!(
        ac.get_action_result(&actions[0]).await.unwrap(),
        result(100, 7)
    );
    for (i, a) in actions.iter().enumerate().skip(1) {
        assert_eq!(
            ac.get_action_result(a).await.unwrap(),
            result(i as u8, 10 + i)
        );
    }
    assert!(!stored(&ac, &action("never written")).await);
}

/// Room for three small results: each costs a whole 4 KiB block on disk.
const MAX: u64 = 3 * 4096 + 2048;

#[tokio::test]
async fn evicts_the_least_recently_used_beyond_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    // Each small result costs one 4 KiB block: three fit.
    let ac = DiskActionCache::open("disk", dir.path(), MAX).unwrap();
    let [a, b, c, d] = ["a", "b", "c", "d"].map(action);
    for (i, x) in [&a, &b, &c].into_iter().enumerate() {
        ac.update_action_result(x, &result(i as u8, 98))
            .await
            .unwrap();
    }
    // `a` read: `b` is now the least recently used.
    ac.get_action_result(&a).await.unwrap();
    ac.update_action_result(&d, &result(3, 98)).await.unwrap();
    assert!(!stored(&ac, &b).await);
    assert!(!file_of(dir.path(), &b).exists());
    for x in [&a, &c, &d] {
        assert!(stored(&ac, x).await, "{x}");
    }
    assert_eq!(counter(&ac, "evictions"), 1);
    assert_eq!(files_under(&dir.path().join("action-cache/objects")), 3);

    // The reads above made `a` the least recently used; a larger result
    // (still one block) evicts just it.
    let e = action("e");
    ac.update_action_result(&e, &result(4, 120)).await.unwrap();
    assert!(!stored(&ac, &a).await);
    for x in [&c, &d, &e] {
        assert!(stored(&ac, x).await, "{x}");
    }
    assert_eq!(counter(&ac, "evictions"), 2);

    // A result larger than the whole cache is refused, as the CAS refuses such
    // a blob, rather than flushing every other result and then itself.
    let too_big = action("too big");
    let err = ac
        .update_action_result(&too_big, &result(5, 15_000))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert_eq!(err.digest(), Some(&too_big));
    assert_eq!(err.backend(), Some("disk"));
    for x in [&c, &d, &e] {
        assert!(stored(&ac, x).await, "{x} was evicted for a refused result");
    }
    assert!(!stored(&ac, &too_big).await);
    assert_eq!(counter(&ac, "evictions"), 2);
    assert_eq!(files_under(&dir.path().join("action-cache/objects")), 3);
}

#[tokio::test]
async fn recency_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let [a, b, c, d] = ["a", "b", "c", "d"].map(action);
    {
        let ac = DiskActionCache::open("disk", dir.path(), MAX).unwrap();
        for (i, x) in [&a, &b, &c].into_iter().enumerate() {
            ac.update_action_result(x, &result(i as u8, 98))
                .await
                .unwrap();
        }
        // Written long ago, `a` first: unambiguous whatever the clock's resolution.
        for (x, secs) in [(&a, 300), (&b, 200), (&c, 100)] {
            age(&file_of(dir.path(), x), secs);
        }
    }
    {
        // Read after the restart: `a` is the most recently used, and that must
        // be on disk for the next restart to know.
        let ac = DiskActionCache::open("disk", dir.path(), MAX).unwrap();
        ac.get_action_result(&a).await.unwrap();
    }
    let ac = DiskActionCache::open("disk", dir.path(), MAX).unwrap();
    ac.update_action_result(&d, &result(3, 98)).await.unwrap();
    assert!(!stored(&ac, &b).await, "b was the least recently used");
    for x in [&a, &c, &d] {
        assert!(stored(&ac, x).await, "{x}");
    }

    // A smaller limit on reopening evicts down to it, least recent first:
    // `a`, `c` and `d` were just read in that order.
    drop(ac);
    let ac = DiskActionCache::open("disk", dir.path(), 2 * 4096).unwrap();
    assert_eq!(counter(&ac, "evictions"), 1);
    assert!(!file_of(dir.path(), &a).exists());
    assert!(!stored(&ac, &a).await);
    assert!(stored(&ac, &c).await && stored(&ac, &d).await);
}

#[tokio::test]
async fn a_corrupted_result_is_not_found_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let ac = DiskActionCache::open("disk", dir.path(), 1 << 20).unwrap();
    let a = action("a");
    let good = result(1, 50);
    ac.update_action_result(&a, &good).await.unwrap();

    // Garbage: a length-delimited field longer than the data, then bytes that
    // are no protobuf at all.
    let garbage = b"\x0a\x7fthis is not an ActionResult\xff\xff\xff";
    assert!(ActionResult::decode(&garbage[..]).is_err());
    let path = file_of(dir.path(), &a);
    std::fs::write(&path, garbage).unwrap();

    let err = ac.get_action_result(&a).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    assert!(err.to_string().contains(a.hash()), "{err}");
    assert!(!path.exists(), "the corrupted file was kept");
    assert_eq!(counter(&ac, "corrupted"), 1);
    // Forgotten: the next read is a plain miss, not another corruption.
    assert!(!stored(&ac, &a).await);
    assert_eq!(counter(&ac, "corrupted"), 1);

    // Stored again, it reads fine.
    ac.update_action_result(&a, &good).await.unwrap();
    assert_eq!(ac.get_action_result(&a).await.unwrap(), good);

    // Corrupted while the cache was closed: found on open, removed on read.
    drop(ac);
    std::fs::write(&path, garbage).unwrap();
    let ac = DiskActionCache::open("disk", dir.path(), 1 << 20).unwrap();
    let err = ac.get_action_result(&a).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    assert!(!path.exists());

    // A file deleted behind the cache's back is NOT_FOUND, not an I/O error.
    ac.update_action_result(&a, &good).await.unwrap();
    std::fs::remove_file(&path).unwrap();
    let err = ac.get_action_result(&a).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
}

#[tokio::test]
async fn leftovers_are_removed_and_strangers_ignored_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let a = action("a");
    {
        let ac = DiskActionCache::open("disk", dir.path(), 1 << 20).unwrap();
        ac.update_action_result(&a, &result(1, 20)).await.unwrap();
    }
    // What a crash mid-write leaves, and strangers' files among the results
    // and among the temp files (not ours: left alone).
    let tmp = dir.path().join("action-cache/tmp");
    std::fs::write(tmp.join(".blob-access-AbCdEf"), b"half a result").unwrap();
    std::fs::create_dir_all(tmp.join("sub")).unwrap();
    std::fs::write(tmp.join("sub/.blob-access-2"), b"more").unwrap();
    let stranger = dir.path().join("action-cache/objects/README");
    std::fs::write(&stranger, b"not a result").unwrap();

    let ac = DiskActionCache::open("disk", dir.path(), 1 << 20).unwrap();
    assert!(!tmp.join(".blob-access-AbCdEf").exists());
    assert_eq!(files_under(&tmp), 1, "a stranger's directory was emptied");
    assert!(tmp.is_dir(), "the temp directory must exist for writes");
    assert_eq!(ac.get_action_result(&a).await.unwrap(), result(1, 20));
    assert!(stranger.exists(), "a file that is not ours was deleted");
    // Writes still work after the clean-up.
    ac.update_action_result(&action("b"), &result(2, 20))
        .await
        .unwrap();
    assert!(stored(&ac, &action("b")).await);
}

#[tokio::test]
async fn a_cas_and_an_action_cache_on_the_same_path_keep_apart() {
    let dir = tempfile::tempdir().unwrap();
    let blob = bytes::Bytes::from(vec![7u8; 5000]);
    let d = Digest::of(&blob);
    let a = action("a");
    {
        let cas = DiskBlobAccess::open("cas", dir.path(), 1 << 20).unwrap();
        let ac = DiskActionCache::open("ac", dir.path(), 1 << 20).unwrap();
        cas.put(&d, once(blob.clone())).await.unwrap();
        ac.update_action_result(&a, &result(1, 50)).await.unwrap();
        // Opening either again while the other is in use disturbs nothing.
        let cas2 = DiskBlobAccess::open("cas", dir.path(), 1 << 20).unwrap();
        let ac2 = DiskActionCache::open("ac", dir.path(), 1 << 20).unwrap();
        assert!(stored(&ac, &a).await && stored(&ac2, &a).await);
        assert_eq!(cas2.size_bytes(), 5000, "the CAS counted action results");
        assert!(cas
            .find_missing(std::slice::from_ref(&d))
            .await
            .unwrap()
            .is_empty());
    }
    // Temp leftovers of each: each open removes its own only.
    let cas_tmp = dir.path().join("tmp/.blob-access-cas");
    let ac_tmp = dir.path().join("action-cache/tmp/.blob-access-ac");
    std::fs::write(&cas_tmp, b"x").unwrap();
    std::fs::write(&ac_tmp, b"y").unwrap();

    // The CAS opened first, with a limit so small it evicts all it has: the
    // action result stays, and its leftover too.
    let cas = DiskBlobAccess::open("cas", dir.path(), 100).unwrap();
    assert_eq!(cas.size_bytes(), 0);
    assert!(!cas_tmp.exists());
    assert!(
        ac_tmp.exists(),
        "the CAS removed the action cache's temp files"
    );
    assert!(file_of(dir.path(), &a).exists());
    drop(cas);

    // Both back; now the action cache with room for its one result only
    // (had it counted the CAS's files, it would evict its own result).
    let cas = DiskBlobAccess::open("cas", dir.path(), 1 << 20).unwrap();
    cas.put(&d, once(blob.clone())).await.unwrap();
    std::fs::write(&cas_tmp, b"x").unwrap();
    let ac = DiskActionCache::open("ac", dir.path(), 4096).unwrap();
    assert!(!ac_tmp.exists());
    assert!(
        cas_tmp.exists(),
        "the action cache removed the CAS's temp files"
    );
    assert_eq!(ac.get_action_result(&a).await.unwrap(), result(1, 50));
    assert_eq!(counter(&ac, "evictions"), 0);
    // An action cache with no room at all evicts its results, not blobs.
    drop(ac);
    let ac = DiskActionCache::open("ac", dir.path(), 0).unwrap();
    assert!(!stored(&ac, &a).await);
    let cas = DiskBlobAccess::open("cas", dir.path(), 1 << 20).unwrap();
    let data = read_to_bytes(&cas, &d, ReadRange::FULL, 1 << 20)
        .await
        .unwrap();
    assert_eq!(data, blob);
}

#[tokio::test]
async fn errors_name_the_action_and_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    let ac = DiskActionCache::open("top.ac", dir.path(), 1 << 30).unwrap();
    let a = action("a");

    // Larger than any action cache keeps.
    let huge = ActionResult {
        stdout_raw: vec![0; blob_access::action_cache::MAX_ACTION_RESULT_SIZE + 1],
        ..Default::default()
    };
    let err = ac.update_action_result(&a, &huge).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(err.backend(), Some("top.ac"));
    assert_eq!(err.digest(), Some(&a));
    assert!(!stored(&ac, &a).await);

    // A write that cannot create its temp file.
    let tmp = dir.path().join("action-cache/tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, b"a file where the temp directory was").unwrap();
    let err = ac
        .update_action_result(&a, &result(1, 10))
        .await
        .unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    assert_eq!(err.backend(), Some("top.ac"), "{err}");
    assert_eq!(err.digest(), Some(&a), "{err}");
    assert!(err.to_string().contains(a.hash()), "{err}");
    assert!(!stored(&ac, &a).await);
    std::fs::remove_file(&tmp).unwrap();
    std::fs::create_dir(&tmp).unwrap();

    // A read that fails on something other than a missing file.
    ac.update_action_result(&a, &result(1, 10)).await.unwrap();
    let path = file_of(dir.path(), &a);
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    let err = ac.get_action_result(&a).await.unwrap_err();
    assert_eq!(err.backend(), Some("top.ac"), "{err}");
    assert_eq!(err.digest(), Some(&a), "{err}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_updates_and_reads_never_see_a_partial_result() {
    let dir = tempfile::tempdir().unwrap();
    let ac = Arc::new(DiskActionCache::open("disk", dir.path(), 1 << 20).unwrap());
    let a = action("shared");
    let candidates: Vec<ActionResult> = (0..8)
        .map(|i| ActionResult {
            exit_code: i,
            stdout_raw: vec![i as u8; 20_000 + i as usize],
            ..Default::default()
        })
        .collect();
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let (ac, a, candidates) = (ac.clone(), a.clone(), candidates.clone());
            tokio::spawn(async move {
                ac.update_action_result(&a, &candidates[i % 8])
                    .await
                    .unwrap();
                let got = ac.get_action_result(&a).await.unwrap();
                assert!(candidates.contains(&got), "a mixed or partial result");
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(files_under(&dir.path().join("action-cache/objects")), 1);
    assert_eq!(files_under(&dir.path().join("action-cache/tmp")), 0);
}

#[tokio::test]
async fn many_tiny_results_cost_at_least_a_block_each() {
    let dir = tempfile::tempdir().unwrap();
    let ac = DiskActionCache::open("disk", dir.path(), 64 << 10).unwrap();
    for i in 0..100u32 {
        let a = Digest::of(&i.to_le_bytes());
        ac.update_action_result(&a, &ActionResult::default())
            .await
            .unwrap();
    }
    // Empty results, yet no more files than 64 KiB of blocks.
    assert_eq!(files_under(&dir.path().join("action-cache/objects")), 16);
}
