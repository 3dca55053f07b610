//! `sharding`: the owner choice (shares follow weights, adding a shard moves
//! only what it now owns, draining one moves only its own), and the node over
//! memory backends and in config trees.

mod common;

use blob_access::memory::MemoryBlobAccess;
use blob_access::{BlobAccess, BlobStream, BuildContext, Digest, DigestFunction};
use blob_access::{Code, Error, ReadRange, Result};
use blob_access_decorators::sharding::{Rendezvous, Shard, ShardSpec, Sharding};
use common::{put, read};
use proptest::prelude::*;
use std::sync::Arc;

fn spec(key: &str, weight: u32) -> ShardSpec {
    ShardSpec {
        key: key.into(),
        weight,
        drained: false,
    }
}

/// `n` digests of random-looking hashes (what SHA-256 hashes are), from `seed`.
fn digests(seed: u64, n: usize) -> Vec<Digest> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let hash: String = (0..32)
                .map(|_| format!("{:02x}", rng.random::<u8>()))
                .collect();
            Digest::new(DigestFunction::Sha256, hash, rng.random_range(0..1 << 20)).unwrap()
        })
        .collect()
}

fn owners(r: &Rendezvous, ds: &[Digest]) -> Vec<usize> {
    ds.iter().map(|d| r.owner(d)).collect()
}

const N: usize = 20_000;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Each shard gets its weight's share of the blobs, within 15 % of it.
    #[test]
    fn shares_follow_weights(weights in prop::collection::vec(1u32..=4, 1..=5), seed: u64) {
        let specs: Vec<_> = weights.iter().enumerate().map(|(i, w)| spec(&i.to_string(), *w)).collect();
        let r = Rendezvous::new(&specs).unwrap();
        let mut counts = vec![0usize; specs.len()];
        for o in owners(&r, &digests(seed, N)) {
            counts[o] += 1;
        }
        let total: u32 = weights.iter().sum();
        for (i, w) in weights.iter().enumerate() {
            let expected = N as f64 * f64::from(*w) / f64::from(total);
            let got = counts[i] as f64;
            prop_assert!((got - expected).abs() <= 0.15 * expected, "shard {i} (weight {w}) got {got}, expected {expected}");
        }
    }

    /// Adding a shard moves blobs only to it, and about its share of them.
    #[test]
    fn adding_a_shard_moves_only_its_share(weights in prop::collection::vec(1u32..=4, 1..=4), new_weight in 1u32..=4, seed: u64) {
        let before: Vec<_> = weights.iter().enumerate().map(|(i, w)| spec(&i.to_string(), *w)).collect();
        let mut after = before.clone();
        after.push(spec(&before.len().to_string(), new_weight));
        let ds = digests(seed, N);
        let (a, b) = (owners(&Rendezvous::new(&before).unwrap(), &ds), owners(&Rendezvous::new(&after).unwrap(), &ds));
        let moved: Vec<usize> = a.iter().zip(&b).filter(|(x, y)| x != y).map(|(_, y)| *y).collect();
        prop_assert!(moved.iter().all(|&to| to == before.len()), "a blob moved between old shards");
        let share = f64::from(new_weight) / f64::from(weights.iter().sum::<u32>() + new_weight);
        let frac = moved.len() as f64 / N as f64;
        prop_assert!((frac - share).abs() <= 0.15 * share, "moved {frac}, share {share}");
    }

    /// Draining (or removing, with keys) a shard moves only the blobs it had.
    #[test]
    fn draining_a_shard_moves_only_its_own(weights in prop::collection::vec(1u32..=4, 2..=5), pick: prop::sample::Index, seed: u64) {
        let before: Vec<_> = weights.iter().enumerate().map(|(i, w)| spec(&format!("shard-{i}"), *w)).collect();
        let gone = pick.index(before.len());
        let mut drained = before.clone();
        drained[gone].drained = true;
        let mut removed = before.clone();
        removed.remove(gone);
        let ds = digests(seed, 5000);
        let a = owners(&Rendezvous::new(&before).unwrap(), &ds);
        let b = owners(&Rendezvous::new(&drained).unwrap(), &ds);
        let c = owners(&Rendezvous::new(&removed).unwrap(), &ds);
        for i in 0..ds.len() {
            prop_assert!(b[i] != gone);
            if a[i] != gone {
                prop_assert_eq!(a[i], b[i]);
            }
            // Removed from a list with keys: the same owners, by key.
            prop_assert_eq!(&removed[c[i]].key, &before[b[i]].key);
        }
    }
}

/// The hash is part of the data layout: a change would move every blob.
#[test]
fn owners_are_stable_across_releases() {
    let r = Rendezvous::new(&[spec("0", 1), spec("1", 1), spec("2", 2)]).unwrap();
    let got: Vec<usize> = (0..12)
        .map(|i| r.owner(&Digest::of(format!("blob {i}").as_bytes())))
        .collect();
    assert_eq!(got, [1, 0, 2, 2, 2, 1, 1, 2, 0, 2, 2, 0]);
}

#[test]
fn bad_lists_are_refused() {
    let dup = Rendezvous::new(&[spec("0", 1), spec("a", 1), spec("0", 2)]).unwrap_err();
    assert!(dup.contains("shards[0] and shards[2]"), "{dup}");
    let mut all = vec![spec("0", 1)];
    all[0].drained = true;
    let none = Rendezvous::new(&all).unwrap_err();
    assert!(none.contains("drained"), "{none}");
}

fn memory_shards(weights: &[u32]) -> (Vec<Arc<MemoryBlobAccess>>, Sharding) {
    let mems: Vec<_> = (0..weights.len())
        .map(|i| Arc::new(MemoryBlobAccess::new(&format!("m{i}"), 64 << 20)))
        .collect();
    let shards = mems
        .iter()
        .zip(weights)
        .enumerate()
        .map(|(i, (m, w))| Shard {
            spec: spec(&i.to_string(), *w),
            backend: m.clone() as Arc<dyn BlobAccess>,
            path: format!("sharding.shards[{i}].backend"),
        })
        .collect();
    (mems, Sharding::new("sharding", shards).unwrap())
}

#[tokio::test]
async fn each_blob_lives_on_its_owner_only() {
    let (mems, sharding) = memory_shards(&[1, 1, 2]);
    let mut stored = Vec::new();
    for i in 0..300 {
        stored.push(put(&sharding, &format!("blob {i}")).await);
    }
    for d in &stored {
        let owner = sharding.owner(d);
        for (i, m) in mems.iter().enumerate() {
            let missing = m.find_missing(std::slice::from_ref(d)).await.unwrap();
            assert_eq!(
                missing.is_empty(),
                i == owner,
                "blob {d} on shard {i}, owner {owner}"
            );
        }
        assert_eq!(
            read(&sharding, d).await.unwrap(),
            read(&*mems[owner], d).await.unwrap()
        );
    }
    let absent = Digest::of(b"never stored");
    let mut ask = stored.clone();
    ask.push(absent.clone());
    assert_eq!(
        sharding.find_missing(&ask).await.unwrap(),
        vec![absent.clone()]
    );
    let e = read(&sharding, &absent).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

/// A backend that is down.
struct Down;

#[async_trait::async_trait]
impl BlobAccess for Down {
    fn get(&self, _: &Digest, _: ReadRange) -> BlobStream {
        blob_access::util::failed(Error::unavailable("connection refused"))
    }
    async fn put(&self, _: &Digest, _: BlobStream) -> Result<()> {
        Err(Error::unavailable("connection refused"))
    }
    async fn find_missing(&self, _: &[Digest]) -> Result<Vec<Digest>> {
        Err(Error::unavailable("connection refused"))
    }
}

#[tokio::test]
async fn a_failing_shard_is_named_and_the_others_go_on() {
    let up = Arc::new(MemoryBlobAccess::new("m0", 1 << 20));
    let shards = vec![
        Shard {
            spec: spec("0", 1),
            backend: up as Arc<dyn BlobAccess>,
            path: "sharding.shards[0].backend".into(),
        },
        Shard {
            spec: spec("1", 1),
            backend: Arc::new(Down) as Arc<dyn BlobAccess>,
            path: "sharding.shards[1].backend".into(),
        },
    ];
    let sharding = Sharding::new("sharding", shards).unwrap();
    let (mut ok, mut failed) = (0, 0);
    for i in 0..40 {
        let (d, data) = common::blob(&format!("blob {i}"));
        let r = sharding.put(&d, blob_access::util::once(data)).await;
        if sharding.owner(&d) == 0 {
            r.unwrap();
            read(&sharding, &d).await.unwrap();
            ok += 1;
        } else {
            let e = r.unwrap_err();
            assert!(e.to_string().contains("sharding.shards[1].backend"), "{e}");
            let e = read(&sharding, &d).await.unwrap_err();
            assert!(e.to_string().contains("sharding.shards[1].backend"), "{e}");
            failed += 1;
        }
    }
    assert!(ok > 0 && failed > 0);
    let e = sharding
        .find_missing(&[Digest::of(b"x"), Digest::of(b"y"), Digest::of(b"z")])
        .await;
    // Whichever shard the three belong to, a failure names shard 1.
    if let Err(e) = e {
        assert!(e.to_string().contains("shards[1]"), "{e}");
    }
}

fn load(
    yaml: &str,
) -> std::result::Result<blob_access_config::Config, blob_access_config::ConfigError> {
    blob_access_config::load_str(yaml, blob_access_config::Format::Yaml, "t.yaml")
}

#[test]
fn config_errors_name_the_shard() {
    let e = load("sharding: {shards: [{backend: {memory: {max_size_bytes: 1MiB}}}, {weight: 0, backend: {memory: {max_size_bytes: 1MiB}}}]}").unwrap_err();
    assert_eq!(e.path, "sharding.shards[1].weight", "{e}");
    let e = load("sharding: {shards: [{backend: {memory: {max_size_bytes: 1MiB}}}, {backend: {memroy: {}}}]}").unwrap_err();
    assert_eq!(e.path, "sharding.shards[1].backend", "{e}");
    let e =
        load("sharding: {shards: [{drained: true, backend: {memory: {max_size_bytes: 1MiB}}}]}")
            .unwrap_err();
    assert!(e.message.contains("drained"), "{e}");
    let e = load("sharding: {shards: [{key: '1', backend: {memory: {max_size_bytes: 1MiB}}}, {backend: {memory: {max_size_bytes: 1MiB}}}]}").unwrap_err();
    assert!(e.message.contains("same key"), "{e}");
    let e = load(
        "
content_addressable_storage: {memory: {max_size_bytes: 1MiB}}
action_cache:
  sharding:
    shards:
      - backend: {memory: {max_size_bytes: 1MiB}}
      - backend: {existence_caching: {backend: {memory: {max_size_bytes: 1MiB}}}}
",
    )
    .unwrap_err();
    assert_eq!(
        e.path, "action_cache.sharding.shards[1].backend.existence_caching",
        "{e}"
    );
}

#[tokio::test]
async fn config_trees_shard_the_cas_and_the_action_cache() {
    let yaml = "
content_addressable_storage:
  sharding:
    shards:
      - backend: {memory: {max_size_bytes: 1MiB}}
      - {weight: 3, backend: {memory: {max_size_bytes: 1MiB}}}
action_cache:
  sharding:
    shards:
      - backend: {memory: {max_size_bytes: 1MiB}}
      - backend: {memory: {max_size_bytes: 1MiB}}
";
    let storage = load(yaml).unwrap().build(&BuildContext::root()).unwrap();
    let d = put(&*storage.cas, "hello").await;
    assert_eq!(read(&*storage.cas, &d).await.unwrap(), b"hello");
    let ac = storage.action_cache.unwrap();
    let result = blob_access::action_cache::ActionResult {
        exit_code: 3,
        ..Default::default()
    };
    for i in 0..20 {
        let action = Digest::of(format!("action {i}").as_bytes());
        ac.update_action_result(&action, &result).await.unwrap();
        assert_eq!(ac.get_action_result(&action).await.unwrap(), result);
    }
    assert!(ac.update_enabled().await);
    let mut out = Vec::new();
    storage.cas.metrics(&mut out);
    let paths: Vec<_> = out.iter().map(|m| m.path.as_str()).collect();
    assert!(
        paths.contains(&"content_addressable_storage.sharding.shards[1].backend.memory"),
        "{paths:?}"
    );
}
