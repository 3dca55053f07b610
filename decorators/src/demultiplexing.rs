//! `demultiplexing`: one server, several teams or projects, each instance name
//! on its own storage.
//!
//! REAPI clients name an instance on every request (Bazel's
//! `--remote_instance_name`); `serve` puts it on each digest it hands the tree
//! ([`Digest::instance_name`]). This node sends a call to the backend of the
//! longest configured prefix the instance name has, on `/` boundaries (`team-a`
//! takes `team-a` and `team-a/ci`, not `team-ab`; `""` takes everything left),
//! optionally replacing that prefix by another (`instance_name_prefix`) before
//! the backend sees it, e.g. for a remote that names its instances differently.
//! An instance name no prefix covers is INVALID_ARGUMENT naming it.
//!
//! Choices:
//! - The instance name travels in the digest (as in bb-storage) rather than as
//!   an extra argument of every `BlobAccess` call: decorators pass it through
//!   untouched, and existing trees, callers and tests keep their signatures.
//! - `find_missing` asks each backend once for its share (concurrently) and
//!   answers with the caller's digests, instance names as asked.
//! - `completeness_checking` looks for an action's outputs in the server's
//!   whole CAS tree under the instance name it sees: put it above this node,
//!   or below a route that keeps names as they are.
//! - In an action cache tree, `update_enabled` holds only if every backend's
//!   does (capabilities are the server's, not per instance, and Bazel fails a
//!   build whose uploads a cache refuses).
//!
//! ```
//! use blob_access::{memory::MemoryBlobAccess, util, BlobAccess, Digest};
//! use blob_access_decorators::demultiplexing::Demultiplexing;
//! use std::sync::Arc;
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let (a, other) = (Arc::new(MemoryBlobAccess::new("a", 1 << 20)), Arc::new(MemoryBlobAccess::new("other", 1 << 20)));
//! let demux = Demultiplexing::new("demultiplexing")
//!     .route("team-a", a.clone(), None)
//!     .route("", other.clone(), None);
//! let digest = Digest::of(b"x").with_instance_name("team-a/ci");
//! demux.put(&digest, util::once("x".into())).await.unwrap();
//! assert!(a.find_missing(&[Digest::of(b"x")]).await.unwrap().is_empty());
//! assert_eq!(other.find_missing(&[Digest::of(b"x")]).await.unwrap().len(), 1);
//! # });
//! ```

use blob_access::action_cache::{ActionCache, ActionResult};
use blob_access::instance_name::{has_prefix, replace_prefix};
use blob_access::{
    BlobAccess, BlobStream, BuildContext, BuildNode, ChildNodes, Digest, Error, NodeMetrics,
    ReadRange, Result,
};
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::Arc;

mod execution;
pub use execution::DemultiplexingExecution;

/// Config node
/// `demultiplexing: {instance_name_prefixes: {"": {backend: <node>}, team-a: {backend: <node>, instance_name_prefix: remote-a}}}`.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DemultiplexingConfig<N> {
    /// Where each instance-name prefix goes; `""` catches every name no other covers.
    #[serde(
        deserialize_with = "prefixes",
        bound(deserialize = "N: serde::Deserialize<'de>")
    )]
    pub instance_name_prefixes: BTreeMap<String, RouteConfig<N>>,
}

/// The backend of one instance-name prefix.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig<N> {
    pub backend: Box<N>,
    /// Replaces the matched prefix in the instance name the backend sees
    /// (`""` drops it); unset, the name goes on as it came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_name_prefix: Option<String>,
}

/// Why `prefix` cannot be an instance-name prefix, if it cannot.
fn bad_prefix(prefix: &str) -> Option<&'static str> {
    let empty_part = prefix.starts_with('/') || prefix.ends_with('/') || prefix.contains("//");
    (empty_part && !prefix.is_empty()).then_some(
        "has an empty part (a leading, trailing or double `/`), so it would match nothing",
    )
}

fn prefixes<'de, D, N>(d: D) -> std::result::Result<BTreeMap<String, RouteConfig<N>>, D::Error>
where
    D: serde::Deserializer<'de>,
    N: serde::Deserialize<'de>,
{
    use serde::de::Error as _;
    let map: BTreeMap<String, RouteConfig<N>> = serde::Deserialize::deserialize(d)?;
    if map.is_empty() {
        return Err(D::Error::custom(
            "no instance-name prefixes: give at least one (\"\" covers every name)",
        ));
    }
    for (prefix, route) in &map {
        let replacement = route.instance_name_prefix.as_deref().unwrap_or("");
        for (what, p) in [
            ("prefix", prefix.as_str()),
            ("its instance_name_prefix", replacement),
        ] {
            if let Some(why) = bad_prefix(p) {
                return Err(D::Error::custom(format!("{prefix:?}: {what} {p:?} {why}")));
            }
        }
    }
    Ok(map)
}

impl<N> DemultiplexingConfig<N> {
    /// Each route with the context of its backend, `instance_name_prefixes."team-a".backend`.
    fn routes<'a>(
        &'a self,
        ctx: &BuildContext,
    ) -> impl Iterator<Item = (&'a str, &'a RouteConfig<N>, BuildContext)> + 'a {
        let ctx = ctx.child("instance_name_prefixes");
        self.instance_name_prefixes.iter().map(move |(prefix, r)| {
            let at = ctx.child(&format!("{prefix:?}")).child("backend");
            (prefix.as_str(), r, at)
        })
    }
}

impl<N: BuildNode> BuildNode for DemultiplexingConfig<N> {
    fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn BlobAccess>> {
        let mut node = Demultiplexing::new(ctx.path());
        for (prefix, r, at) in self.routes(ctx) {
            let backend = r.backend.build(&at)?;
            node = node.route(prefix, backend, r.instance_name_prefix.as_deref());
        }
        Ok(Arc::new(node))
    }

    fn build_action_cache(&self, ctx: &BuildContext) -> Result<Arc<dyn ActionCache>> {
        let mut node = DemultiplexingActionCache::new(ctx.path());
        for (prefix, r, at) in self.routes(ctx) {
            let backend = r.backend.build_action_cache(&at)?;
            node = node.route(prefix, backend, r.instance_name_prefix.as_deref());
        }
        Ok(Arc::new(node))
    }

    fn build_execution(&self, ctx: &BuildContext) -> Result<Arc<dyn blob_access::Execution>> {
        let mut node = DemultiplexingExecution::new(ctx.path());
        for (prefix, r, at) in self.routes(ctx) {
            let backend = r.backend.build_execution(&at)?;
            node = node.route(prefix, backend, r.instance_name_prefix.as_deref());
        }
        Ok(Arc::new(node))
    }
}

impl<N> ChildNodes<N> for DemultiplexingConfig<N> {
    fn child_nodes(&self) -> Vec<(String, &N)> {
        let routes = self.instance_name_prefixes.iter();
        routes
            .map(|(p, r)| (format!("instance_name_prefixes.{p:?}.backend"), &*r.backend))
            .collect()
    }
}

/// Backends by instance-name prefix, longest first.
pub(crate) struct Routes<T: ?Sized> {
    name: String,
    routes: Vec<Route<T>>,
}

pub(crate) struct Route<T: ?Sized> {
    prefix: String,
    replacement: Option<String>,
    backend: Arc<T>,
}

impl<T: ?Sized> Routes<T> {
    fn new(name: &str) -> Self {
        Routes {
            name: name.to_string(),
            routes: Vec::new(),
        }
    }

    fn add(&mut self, prefix: &str, backend: Arc<T>, replacement: Option<&str>) {
        self.routes.retain(|r| r.prefix != prefix);
        self.routes.push(Route {
            prefix: prefix.to_string(),
            replacement: replacement.map(str::to_string),
            backend,
        });
        // The longest prefix that matches is the most specific one.
        self.routes
            .sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
    }

    /// The backend for `digest` and the digest as that backend must see it.
    fn route(&self, digest: &Digest) -> Result<(&Arc<T>, Digest)> {
        let (r, instance) = self.route_name(digest.instance_name())?;
        let digest = match instance {
            Some(to) => digest.with_instance_name(&to),
            None => digest.clone(),
        };
        Ok((&r.backend, digest))
    }

    /// The route of `instance` and, if it renames it, the name its backend sees.
    fn route_name(&self, instance: &str) -> Result<(&Route<T>, Option<String>)> {
        let Some(r) = self.routes.iter().find(|r| has_prefix(instance, &r.prefix)) else {
            let known: Vec<String> = self
                .routes
                .iter()
                .map(|r| format!("{:?}", r.prefix))
                .collect();
            return Err(Error::invalid_argument(format!(
                "unknown instance name {instance:?}: no instance-name prefix covers it (there are {})",
                known.join(", ")
            ))
            .with_backend(&self.name));
        };
        let renamed = r
            .replacement
            .as_ref()
            .map(|to| replace_prefix(instance, &r.prefix, to));
        Ok((r, renamed))
    }
}

/// See the module documentation.
pub struct Demultiplexing {
    routes: Routes<dyn BlobAccess>,
}

impl Demultiplexing {
    /// A node without routes; `name` identifies it in errors.
    pub fn new(name: &str) -> Self {
        Demultiplexing {
            routes: Routes::new(name),
        }
    }

    /// Sends instance names under `prefix` to `backend`, with `prefix` replaced
    /// by `replacement` if given. A later route for the same prefix replaces it.
    pub fn route(
        mut self,
        prefix: &str,
        backend: Arc<dyn BlobAccess>,
        replacement: Option<&str>,
    ) -> Self {
        self.routes.add(prefix, backend, replacement);
        self
    }
}

#[async_trait::async_trait]
impl BlobAccess for Demultiplexing {
    fn get(&self, digest: &Digest, range: ReadRange) -> BlobStream {
        match self.routes.route(digest) {
            Ok((backend, d)) => backend.get(&d, range),
            Err(e) => {
                let e = e.with_digest(digest);
                futures::stream::once(async move { Err(e) }).boxed()
            }
        }
    }

    async fn put(&self, digest: &Digest, data: BlobStream) -> Result<()> {
        let (backend, d) = self
            .routes
            .route(digest)
            .map_err(|e| e.with_digest(digest))?;
        backend.put(&d, data).await
    }

    async fn put_reopenable(&self, digest: &Digest, open: blob_access::Reopen) -> Result<()> {
        let (backend, d) = self
            .routes
            .route(digest)
            .map_err(|e| e.with_digest(digest))?;
        backend.put_reopenable(&d, open).await
    }

    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        // One group per instance name (`serve` gives a call one): one route each.
        let mut groups: Vec<(&str, Vec<Digest>)> = Vec::new();
        for d in digests {
            let i = match groups.iter().position(|(i, _)| *i == d.instance_name()) {
                Some(i) => i,
                None => {
                    groups.push((d.instance_name(), Vec::new()));
                    groups.len() - 1
                }
            };
            groups[i].1.push(d.clone());
        }
        let asks = groups.into_iter().map(|(instance, ds)| async move {
            let (backend, _) = self.routes.route(&ds[0])?;
            let routed: Vec<Digest> = ds
                .iter()
                .map(|d| self.routes.route(d).map(|(_, d)| d))
                .collect::<Result<_>>()?;
            let missing = backend.find_missing(&routed).await?;
            // Answered under the instance name the caller asked with.
            Ok::<_, Error>(
                missing
                    .iter()
                    .map(|d| d.with_instance_name(instance))
                    .collect::<Vec<_>>(),
            )
        });
        let answers = futures::future::try_join_all(asks).await?;
        Ok(answers.into_iter().flatten().collect())
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        for r in &self.routes.routes {
            r.backend.metrics(out);
        }
    }
}

/// `demultiplexing` in an action cache tree: results are routed by the
/// action's instance name, like blobs.
pub struct DemultiplexingActionCache {
    routes: Routes<dyn ActionCache>,
}

impl DemultiplexingActionCache {
    pub fn new(name: &str) -> Self {
        DemultiplexingActionCache {
            routes: Routes::new(name),
        }
    }

    /// As [`Demultiplexing::route`].
    pub fn route(
        mut self,
        prefix: &str,
        backend: Arc<dyn ActionCache>,
        replacement: Option<&str>,
    ) -> Self {
        self.routes.add(prefix, backend, replacement);
        self
    }
}

#[async_trait::async_trait]
impl ActionCache for DemultiplexingActionCache {
    async fn get_action_result(&self, action: &Digest) -> Result<ActionResult> {
        let (backend, a) = self
            .routes
            .route(action)
            .map_err(|e| e.with_digest(action))?;
        backend.get_action_result(&a).await
    }

    async fn update_action_result(&self, action: &Digest, result: &ActionResult) -> Result<()> {
        let (backend, a) = self
            .routes
            .route(action)
            .map_err(|e| e.with_digest(action))?;
        backend.update_action_result(&a, result).await
    }

    async fn update_enabled(&self) -> bool {
        for r in &self.routes.routes {
            if !r.backend.update_enabled().await {
                return false;
            }
        }
        true
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        for r in &self.routes.routes {
            r.backend.metrics(out);
        }
    }
}
