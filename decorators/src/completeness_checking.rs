//! `completeness_checking`: an action cache that only reports hits a client
//! can use.
//!
//! A build tool takes an ActionCache hit as a promise that every output is in
//! the CAS. When the CAS has evicted one (it is a cache too), the client fails
//! the build or aborts the action's download half-way. This node reads the
//! result, gathers every blob it names (output files, stdout and stderr, each
//! output directory's `Tree` blob and every file in it) and asks the CAS for
//! them in `find_missing` calls; if any is missing the answer is NOT_FOUND, and
//! the client runs the action again, which uploads the outputs anew.
//!
//! Only for action cache trees; the CAS is the one the config pairs with it.
//! Put it at the top of the action cache tree (under `error_logging` at most):
//! a `read_caching` above it would serve its fast tier's results unchecked.
//!
//! ```
//! use blob_access::action_cache::{ActionCache, ActionResult};
//! use blob_access::memory::{MemoryActionCache, MemoryBlobAccess};
//! use blob_access::proto::OutputFile;
//! use blob_access::{util, BlobAccess, Code, Digest};
//! use blob_access_decorators::completeness_checking::CompletenessChecking;
//! use std::sync::Arc;
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let cas = Arc::new(MemoryBlobAccess::new("cas", 1 << 20));
//! let ac = CompletenessChecking::new("ac", Arc::new(MemoryActionCache::new("m", 1 << 20)), cas.clone(), 1 << 20);
//! let output = Digest::of(b"a.o");
//! let result = ActionResult {
//!     output_files: vec![OutputFile { path: "a.o".into(), digest: Some(output.to_proto()), ..Default::default() }],
//!     ..Default::default()
//! };
//! let action = Digest::of(b"an Action");
//! ac.update_action_result(&action, &result).await.unwrap();
//! // The output is not in the CAS: no hit.
//! assert_eq!(ac.get_action_result(&action).await.unwrap_err().code(), Code::NotFound);
//! cas.put(&output, util::once("a.o".into())).await.unwrap();
//! assert_eq!(ac.get_action_result(&action).await.unwrap(), result);
//! # });
//! ```

use blob_access::action_cache::{ActionCache, ActionResult};
use blob_access::config_types::ByteSize;
use blob_access::node::Counters;
use blob_access::proto::{self, Tree};
use blob_access::{
    util, BlobAccess, BuildContext, BuildNode, ChildNodes, Code, Digest, Error, NodeMetrics,
    ReadRange, Result,
};
use prost::Message;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Config node `completeness_checking: {backend: <node>, max_total_tree_size_bytes: 64MiB}`.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CompletenessCheckingConfig<N> {
    /// The action cache whose results are checked.
    pub backend: Box<N>,
    /// The `Tree` blobs of one result are read up to this total; a result
    /// with larger output directories is not served. Default 64MiB.
    #[serde(default = "default_max_tree")]
    pub max_total_tree_size_bytes: ByteSize,
}

fn default_max_tree() -> ByteSize {
    ByteSize(64 << 20)
}

impl<N: BuildNode> BuildNode for CompletenessCheckingConfig<N> {
    fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn BlobAccess>> {
        Err(Error::invalid_argument(format!(
            "{}: completeness_checking belongs in an action_cache tree",
            ctx.path()
        )))
    }

    fn build_action_cache(&self, ctx: &BuildContext) -> Result<Arc<dyn ActionCache>> {
        let cas = ctx.cas().cloned().ok_or_else(|| {
            Error::invalid_argument(format!(
                "{}: completeness_checking needs the content_addressable_storage tree of the same config",
                ctx.path()
            ))
        })?;
        let backend = self.backend.build_action_cache(&ctx.child("backend"))?;
        let max = self.max_total_tree_size_bytes.bytes();
        Ok(Arc::new(CompletenessChecking::new(
            ctx.path(),
            backend,
            cas,
            max,
        )))
    }
}

impl<N> ChildNodes<N> for CompletenessCheckingConfig<N> {
    fn child_nodes(&self) -> Vec<(String, &N)> {
        vec![("backend".into(), &*self.backend)]
    }
}

const COUNTERS: &[&str] = &["complete", "incomplete"];

/// Digests per `find_missing` call.
const FIND_MISSING_BATCH: usize = 10_000;

/// See the module documentation.
pub struct CompletenessChecking {
    name: String,
    backend: Arc<dyn ActionCache>,
    cas: Arc<dyn BlobAccess>,
    max_tree_size: u64,
    /// KiB of Tree and Directory blobs read at once by all requests: bounds
    /// memory when many clients look up results with large outputs.
    in_flight: tokio::sync::Semaphore,
    in_flight_kib: u32,
    counters: Counters,
}

impl CompletenessChecking {
    pub fn new(
        name: &str,
        backend: Arc<dyn ActionCache>,
        cas: Arc<dyn BlobAccess>,
        max_total_tree_size_bytes: u64,
    ) -> Self {
        // Four results' worth of trees at once, at least 16 MiB.
        let in_flight_kib = (max_total_tree_size_bytes.saturating_mul(4) / 1024)
            .clamp(16 << 10, u32::MAX as u64 / 2) as u32;
        CompletenessChecking {
            name: name.to_string(),
            backend,
            cas,
            max_tree_size: max_total_tree_size_bytes,
            in_flight: tokio::sync::Semaphore::new(in_flight_kib as usize),
            in_flight_kib,
            counters: Counters::new(COUNTERS),
        }
    }

    fn incomplete(&self, action: &Digest, why: String) -> Error {
        self.counters.inc("incomplete");
        tracing::info!(node = %self.name, %action, why, "not serving an incomplete action result");
        Error::not_found(format!("action result is incomplete: {why}"))
            .with_backend(self.name.clone())
            .with_digest(action)
    }

    /// A CAS failure while checking the result of `action`, with its code.
    fn cas_error(&self, action: &Digest, e: Error) -> Error {
        let e = Error::new(
            e.code(),
            format!("checking the outputs of an action result: {e}"),
        );
        e.with_backend(self.name.clone()).with_digest(action)
    }

    /// Every blob `result` names, reading its output directories' trees; `Err`
    /// says why the result cannot be served.
    /// Blobs are looked for under the action's instance name.
    async fn referenced(
        &self,
        action: &Digest,
        result: &ActionResult,
    ) -> Result<BTreeSet<Digest>, Unusable> {
        let instance = action.instance_name();
        let mut digests = BTreeSet::new();
        let mut add = |what: &str, d: Option<&proto::Digest>| -> Result<(), String> {
            let d = d.ok_or_else(|| format!("{what} has no digest"))?;
            let d = Digest::from_proto(action.function(), d)
                .map_err(|e| format!("{what} has a bad digest: {e}"))?
                .with_instance_name(instance);
            digests.insert(d);
            Ok(())
        };
        for f in &result.output_files {
            add(&format!("output file {:?}", f.path), f.digest.as_ref())?;
        }
        for (what, d) in [
            ("stdout", &result.stdout_digest),
            ("stderr", &result.stderr_digest),
        ] {
            if d.is_some() {
                add(what, d.as_ref())?;
            }
        }
        // Each distinct Tree, and each Directory hierarchy named by a
        // `root_directory_digest` (REAPI 2.3), read once, within the budget.
        let (mut trees, mut roots) = (BTreeMap::new(), BTreeMap::new());
        for dir in &result.output_directories {
            let what = format!("output directory {:?}", dir.path);
            let parse = |d: &proto::Digest, field: &str| {
                Digest::from_proto(action.function(), d)
                    .map(|d| d.with_instance_name(instance))
                    .map_err(|e| format!("{what} has a bad {field}: {e}"))
            };
            let tree = dir.tree_digest.as_ref().map(|d| parse(d, "tree digest"));
            let root = dir.root_directory_digest.as_ref();
            let root = root.map(|d| parse(d, "root directory digest"));
            if tree.is_none() && root.is_none() {
                return Err(
                    format!("{what} has neither a tree nor a root directory digest").into(),
                );
            }
            if let Some(t) = tree {
                trees.entry(t?).or_insert_with(|| what.clone());
            }
            if let Some(r) = root {
                roots.entry(r?).or_insert(what);
            }
        }
        let mut budget = self.max_tree_size;
        for (tree, what) in &trees {
            let data = self
                .read(tree, &format!("tree {tree} of {what}"), &mut budget)
                .await?;
            let tree_msg = Tree::decode(data)
                .map_err(|e| format!("tree {tree} of {what} does not parse: {e}"))?;
            for d in tree_msg.root.iter().chain(&tree_msg.children) {
                for f in &d.files {
                    add(&format!("file {:?} in {what}", f.name), f.digest.as_ref())?;
                }
            }
        }
        for (root, what) in roots {
            let (mut todo, mut seen) = (vec![root.clone()], BTreeSet::from([root]));
            while let Some(d) = todo.pop() {
                let data = self
                    .read(&d, &format!("directory {d} of {what}"), &mut budget)
                    .await?;
                let dir = proto::Directory::decode(data)
                    .map_err(|e| format!("directory {d} of {what} does not parse: {e}"))?;
                for f in &dir.files {
                    add(&format!("file {:?} in {what}", f.name), f.digest.as_ref())?;
                }
                for sub in &dir.directories {
                    let sub = sub
                        .digest
                        .as_ref()
                        .ok_or_else(|| format!("{what} has a subdirectory without digest"))?;
                    let sub = Digest::from_proto(action.function(), sub)
                        .map_err(|e| format!("{what} has a subdirectory with a bad digest: {e}"))?
                        .with_instance_name(instance);
                    if seen.insert(sub.clone()) {
                        todo.push(sub);
                    }
                }
            }
        }
        Ok(digests)
    }
}

impl CompletenessChecking {
    /// Reads a Tree or Directory blob, charged to `budget` (this result's
    /// share of `max_total_tree_size_bytes`) and to the node's bytes in flight.
    async fn read(
        &self,
        d: &Digest,
        what: &str,
        budget: &mut u64,
    ) -> Result<bytes::Bytes, Unusable> {
        if d.size_bytes() == 0 {
            // The empty blob is always present, as for the other blobs.
            return Ok(bytes::Bytes::new());
        }
        *budget = budget.checked_sub(d.size_bytes()).ok_or_else(|| {
            format!(
                "its output directories exceed max_total_tree_size_bytes ({})",
                self.max_tree_size
            )
        })?;
        let kib = (d.size_bytes().div_ceil(1024) as u32).min(self.in_flight_kib);
        let _permit = self.in_flight.acquire_many(kib).await;
        let size = d.size_bytes() as usize;
        util::read_to_bytes(&*self.cas, d, ReadRange::FULL, size)
            .await
            .map_err(|e| match e.code() {
                // Missing or unreadable: the result is incomplete.
                Code::NotFound | Code::DataLoss => Unusable::Incomplete(format!("{what}: {e}")),
                // The CAS could not say: as for find_missing, the caller learns why.
                _ => Unusable::Cas(e),
            })
    }
}

/// Why a result is not served: it is incomplete, or the CAS failed to answer.
enum Unusable {
    Incomplete(String),
    Cas(Error),
}

impl From<String> for Unusable {
    fn from(why: String) -> Self {
        Unusable::Incomplete(why)
    }
}

#[async_trait::async_trait]
impl ActionCache for CompletenessChecking {
    async fn get_action_result(&self, action: &Digest) -> Result<ActionResult> {
        let result = self.backend.get_action_result(action).await?;
        let digests = match self.referenced(action, &result).await {
            Ok(d) => d,
            Err(Unusable::Incomplete(why)) => return Err(self.incomplete(action, why)),
            Err(Unusable::Cas(e)) => return Err(self.cas_error(action, e)),
        };
        // The empty blob is always present (REAPI), whatever a server says of it.
        // Under the action's digest function: SHA-1's is da39a3ee.../0.
        let digests: Vec<Digest> = digests.into_iter().filter(|d| !d.is_empty_blob()).collect();
        for batch in digests.chunks(FIND_MISSING_BATCH) {
            let missing = self
                .cas
                .find_missing(batch)
                .await
                .map_err(|e| self.cas_error(action, e))?;
            if let Some(first) = missing.first() {
                let why = format!(
                    "{} of its blobs are not in the CAS, e.g. {first}",
                    missing.len()
                );
                return Err(self.incomplete(action, why));
            }
        }
        self.counters.inc("complete");
        Ok(result)
    }

    async fn update_action_result(&self, action: &Digest, result: &ActionResult) -> Result<()> {
        self.backend.update_action_result(action, result).await
    }

    async fn update_enabled(&self) -> bool {
        self.backend.update_enabled().await
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        out.push(self.counters.snapshot(&self.name, "completeness_checking"));
        self.backend.metrics(out);
    }
}
