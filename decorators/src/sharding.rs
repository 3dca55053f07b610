//! `sharding`: spreads blobs over several backends, each digest to one.
//!
//! When one storage server is not enough (disk, memory, network), a cluster
//! of them holds the blobs between them. Every digest has one owner, chosen
//! by weighted rendezvous hashing, so that all clients with the same list
//! agree without talking to each other, and a change of the list moves few
//! blobs: adding a shard moves only the blobs it now owns (about its share
//! of the weight), removing or draining one moves only its own blobs.
//!
//! Choices:
//! - The owner of a digest is the shard with the smallest `-ln(u) / weight`,
//!   `u` in (0, 1) from a keyed hash of the shard's key and the digest: an
//!   exponential race, won by each shard with probability weight / total.
//!   A shard's score does not depend on the other shards, which is what
//!   bounds the movement.
//! - A shard's key is its `key`, or its position in the list (`"0"`, `"1"`...).
//!   Positions are stable when shards are appended; to take one out of the
//!   middle of a list without keys, mark it `drained: true` (it stays in the
//!   list, gets nothing, and the shards after it keep their positions).
//! - The hash is fixed (not `std`'s randomly seeded one, not a crate's that
//!   may change): a new release must not move every blob.
//! - `get`/`put` go to the owner, `find_missing` is split by owner and the
//!   parts asked in parallel. A failure names the shard (its path in the
//!   tree, e.g. `sharding.shards[2].backend`). No fallback to another shard:
//!   the owner is the only one that has the blob.
//! - In an action cache tree ([`ShardingActionCache`]) the action digest
//!   picks the shard.

use blob_access::action_cache::{ActionCache, ActionResult};
use blob_access::{
    BlobAccess, BlobStream, BuildContext, BuildNode, ChildNodes, Digest, Error, NodeMetrics,
    ReadRange, Result,
};
use futures::StreamExt;
use std::num::NonZeroU32;
use std::sync::Arc;

/// Config node `sharding: {shards: [{weight: 1, backend: <node>}, ...]}`.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ShardingConfig<N> {
    /// The shards; each digest belongs to one of those not drained. Keys
    /// (given, or positions) must be unique; at least one shard must not be
    /// drained.
    #[serde(
        deserialize_with = "checked_shards",
        bound(deserialize = "N: serde::Deserialize<'de>")
    )]
    #[schemars(length(min = 1))]
    pub shards: Vec<ShardConfig<N>>,
}

/// One shard of a `sharding` node.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig<N> {
    /// The backend holding this shard's blobs.
    pub backend: Box<N>,
    /// Relative share of the blobs (at least 1). Default 1.
    #[serde(default = "one")]
    pub weight: NonZeroU32,
    /// What the hash is keyed on. Default: the shard's position in the list
    /// (`"0"`, `"1"`...). Changing it moves the shard's blobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Kept in the list but given no blobs: what removing a shard from the
    /// middle of a list without keys should be. Default false.
    #[serde(default)]
    pub drained: bool,
}

fn one() -> NonZeroU32 {
    NonZeroU32::MIN
}

impl<N> ShardConfig<N> {
    fn spec(&self, index: usize) -> ShardSpec {
        ShardSpec {
            key: self.key.clone().unwrap_or_else(|| index.to_string()),
            weight: self.weight.get(),
            drained: self.drained,
        }
    }
}

/// Refuses, when the file is loaded, a list that could not be built.
fn checked_shards<'de, D, N>(d: D) -> std::result::Result<Vec<ShardConfig<N>>, D::Error>
where
    D: serde::Deserializer<'de>,
    N: serde::Deserialize<'de>,
{
    let shards: Vec<ShardConfig<N>> = serde::Deserialize::deserialize(d)?;
    let specs: Vec<ShardSpec> = shards.iter().enumerate().map(|(i, s)| s.spec(i)).collect();
    Rendezvous::new(&specs).map_err(serde::de::Error::custom)?;
    Ok(shards)
}

impl<N> ChildNodes<N> for ShardingConfig<N> {
    fn child_nodes(&self) -> Vec<(String, &N)> {
        self.shards
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("shards[{i}].backend"), &*s.backend))
            .collect()
    }
}

impl<N: BuildNode> ShardingConfig<N> {
    fn build_shards<B: ?Sized>(
        &self,
        ctx: &BuildContext,
        build: impl Fn(&N, &BuildContext) -> Result<Arc<B>>,
    ) -> Result<Vec<Shard<B>>> {
        self.shards
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let child = ctx.child(&format!("shards[{i}].backend"));
                Ok(Shard {
                    spec: s.spec(i),
                    backend: build(&s.backend, &child)?,
                    path: child.path().to_string(),
                })
            })
            .collect()
    }
}

impl<N: BuildNode> BuildNode for ShardingConfig<N> {
    fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn BlobAccess>> {
        let shards = self.build_shards(ctx, |n, c| n.build(c))?;
        Ok(Arc::new(Sharding::new(ctx.path(), shards)?))
    }

    fn build_action_cache(&self, ctx: &BuildContext) -> Result<Arc<dyn ActionCache>> {
        let shards = self.build_shards(ctx, |n, c| n.build_action_cache(c))?;
        Ok(Arc::new(ShardingActionCache::new(ctx.path(), shards)?))
    }
}

/// What the hash needs to know of a shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardSpec {
    pub key: String,
    pub weight: u32,
    pub drained: bool,
}

/// The choice of an owner among shards: weighted rendezvous hashing.
#[derive(Clone, Debug)]
pub struct Rendezvous {
    /// (position in the list, hash seed from the key, weight) of the shards
    /// not drained.
    active: Vec<(usize, u64, f64)>,
}

impl Rendezvous {
    /// Fails when no shard takes blobs or two shards share a key.
    pub fn new(shards: &[ShardSpec]) -> std::result::Result<Self, String> {
        for (i, a) in shards.iter().enumerate() {
            if let Some(j) = shards[..i].iter().position(|b| b.key == a.key) {
                return Err(format!(
                    "shards[{j}] and shards[{i}] have the same key {:?} (a shard's key is its `key`, or its position)",
                    a.key
                ));
            }
        }
        let active: Vec<_> = shards
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.drained && s.weight > 0)
            .map(|(i, s)| (i, hash64(0, s.key.as_bytes()), f64::from(s.weight)))
            .collect();
        if active.is_empty() {
            return Err("no shard takes blobs: at least one must not be drained".into());
        }
        Ok(Rendezvous { active })
    }

    /// The position in the list of the shard that owns `digest`.
    pub fn owner(&self, digest: &Digest) -> usize {
        let mut best = (f64::INFINITY, 0);
        for &(index, seed, weight) in &self.active {
            let h = hash64(seed ^ digest.size_bytes(), digest.hash().as_bytes());
            // 53 random bits, strictly inside (0, 1).
            let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let score = -u.ln() / weight;
            if score < best.0 {
                best = (score, index);
            }
        }
        best.1
    }
}

/// A fixed keyed 64-bit hash (splitmix64 rounds over 8-byte words). Never
/// change it: every blob would move to another shard.
fn hash64(seed: u64, bytes: &[u8]) -> u64 {
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    let mut h = mix(seed ^ (bytes.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    for chunk in bytes.chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        h = mix(h.wrapping_add(0x9e37_79b9_7f4a_7c15) ^ u64::from_le_bytes(word));
    }
    h
}

/// A built shard: its key and weight, its backend, and its path in the tree.
pub struct Shard<B: ?Sized> {
    pub spec: ShardSpec,
    pub backend: Arc<B>,
    /// Named in errors, e.g. `sharding.shards[2].backend`.
    pub path: String,
}

struct Shards<B: ?Sized> {
    shards: Vec<Shard<B>>,
    ring: Rendezvous,
}

impl<B: ?Sized> Shards<B> {
    fn new(name: &str, shards: Vec<Shard<B>>) -> Result<Self> {
        let specs: Vec<ShardSpec> = shards.iter().map(|s| s.spec.clone()).collect();
        let ring =
            Rendezvous::new(&specs).map_err(|e| Error::invalid_argument(format!("{name}: {e}")))?;
        Ok(Shards { shards, ring })
    }
    fn owner(&self, digest: &Digest) -> &Shard<B> {
        &self.shards[self.ring.owner(digest)]
    }
}

/// Names the shard in an error, unless a node below it already did.
fn named(e: Error, shard: &str) -> Error {
    e.with_backend(shard)
}

/// See the module documentation.
pub struct Sharding {
    shards: Shards<dyn BlobAccess>,
}

impl Sharding {
    /// Fails when no shard takes blobs or two shards share a key.
    pub fn new(name: &str, shards: Vec<Shard<dyn BlobAccess>>) -> Result<Self> {
        Ok(Sharding {
            shards: Shards::new(name, shards)?,
        })
    }

    /// The position of the shard owning `digest`.
    pub fn owner(&self, digest: &Digest) -> usize {
        self.shards.ring.owner(digest)
    }
}

#[async_trait::async_trait]
impl BlobAccess for Sharding {
    fn get(&self, digest: &Digest, range: ReadRange) -> BlobStream {
        let shard = self.shards.owner(digest);
        let path = shard.path.clone();
        let digest = digest.clone();
        shard
            .backend
            .get(&digest, range)
            .map(move |r| r.map_err(|e| named(e, &path).with_digest(&digest)))
            .boxed()
    }

    async fn put(&self, digest: &Digest, data: BlobStream) -> Result<()> {
        let shard = self.shards.owner(digest);
        shard
            .backend
            .put(digest, data)
            .await
            .map_err(|e| named(e, &shard.path).with_digest(digest))
    }

    async fn put_reopenable(&self, digest: &Digest, open: blob_access::Reopen) -> Result<()> {
        let shard = self.shards.owner(digest);
        shard
            .backend
            .put_reopenable(digest, open)
            .await
            .map_err(|e| named(e, &shard.path).with_digest(digest))
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let mut parts: Vec<Vec<Digest>> = vec![Vec::new(); self.shards.shards.len()];
        for d in digests {
            parts[self.shards.ring.owner(d)].push(d.clone());
        }
        let asks = parts
            .iter()
            .zip(&self.shards.shards)
            .filter(|(part, _)| !part.is_empty())
            .map(|(part, shard)| async move {
                shard
                    .backend
                    .find_missing(part)
                    .await
                    .map_err(|e| named(e, &shard.path))
            });
        let missing = futures::future::try_join_all(asks).await?;
        Ok(missing.into_iter().flatten().collect())
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        for s in &self.shards.shards {
            s.backend.metrics(out);
        }
    }
}

/// `sharding` in an action cache tree: the action digest picks the shard.
pub struct ShardingActionCache {
    shards: Shards<dyn ActionCache>,
}

impl ShardingActionCache {
    /// Fails when no shard takes results or two shards share a key.
    pub fn new(name: &str, shards: Vec<Shard<dyn ActionCache>>) -> Result<Self> {
        Ok(ShardingActionCache {
            shards: Shards::new(name, shards)?,
        })
    }
}

#[async_trait::async_trait]
impl ActionCache for ShardingActionCache {
    async fn get_action_result(&self, action: &Digest) -> Result<ActionResult> {
        let shard = self.shards.owner(action);
        shard
            .backend
            .get_action_result(action)
            .await
            .map_err(|e| named(e, &shard.path).with_digest(action))
    }

    async fn update_action_result(&self, action: &Digest, result: &ActionResult) -> Result<()> {
        let shard = self.shards.owner(action);
        shard
            .backend
            .update_action_result(action, result)
            .await
            .map_err(|e| named(e, &shard.path).with_digest(action))
    }

    /// Updates succeed only if every shard that takes results accepts them.
    async fn update_enabled(&self) -> bool {
        let active = self.shards.ring.active.iter().map(|&(i, _, _)| i);
        let asks = active.map(|i| self.shards.shards[i].backend.update_enabled());
        futures::future::join_all(asks).await.into_iter().all(|x| x)
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        for s in &self.shards.shards {
            s.backend.metrics(out);
        }
    }
}
