//! Config trees for blob-access: each node is a single key naming a backend or
//! decorator, e.g.
//!
//! ```yaml
//! existence_caching:
//!   ttl: 5m
//!   backend:
//!     grpc: {endpoint: "grpc://127.0.0.1:8980", instance_name: ""}
//! ```
//!
//! The same tree loads from YAML and JSON; errors name the path in the tree,
//! the line and the column. [`Node`] implements [`BuildNode`], which turns a
//! tree into an `Arc<dyn BlobAccess>`.
//!
//! ```
//! use blob_access_config::{load_str, Format};
//! use blob_access::{BlobAccess, BuildNode, BuildContext};
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let node = load_str("memory: {max_size_bytes: 64MiB}", Format::Yaml, "inline").unwrap();
//! let cas = node.build(&BuildContext::root()).unwrap();
//! assert!(cas.find_missing(&[]).await.unwrap().is_empty());
//! # });
//! ```
//!
//! Adding a node kind is one file (its config struct implementing `BuildNode`)
//! plus one line in the `nodes!` list below.

mod load;
mod schema;

pub use load::{load_file, load_str, ConfigError, Format};
pub use schema::json_schema;

use blob_access::{BlobAccess, BuildContext, BuildNode, Result};
use std::sync::Arc;

macro_rules! nodes {
    ($( $(#[$doc:meta])* $key:literal => $variant:ident($ty:ty), )*) => {
        /// A node of a config tree: one backend or decorator, named by its single key.
        #[derive(Clone, Debug, serde::Serialize, schemars::JsonSchema)]
        pub enum Node {
            $( $(#[$doc])* #[serde(rename = $key)] $variant($ty), )*
        }

        impl Node {
            /// The keys naming node kinds.
            pub const KINDS: &'static [&'static str] = &[$($key),*];

            /// The key naming this node's kind, e.g. `memory`.
            pub fn kind(&self) -> &'static str {
                match self { $( Node::$variant(_) => $key, )* }
            }

            fn deserialize_kind<'de, A: serde::de::MapAccess<'de>>(
                kind: &str,
                map: &mut A,
            ) -> std::result::Result<Node, A::Error> {
                match kind {
                    $( $key => map.next_value().map(Node::$variant), )*
                    other => Err(serde::de::Error::unknown_variant(other, Self::KINDS)),
                }
            }
        }

        impl BuildNode for Node {
            fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn BlobAccess>> {
                let ctx = ctx.child(self.kind());
                let built = match self { $( Node::$variant(c) => c.build(&ctx), )* };
                built.map(|node| ctx.instrument(node))
            }
        }
    };
}

/// A node is a map with exactly one key, in YAML and JSON alike (serde_yaml's
/// default would want YAML tags such as `!memory`, which no user writes).
impl<'de> serde::Deserialize<'de> for Node {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(
                    f,
                    "a map with a single key naming a node kind, one of {}",
                    Node::KINDS.join(", ")
                )
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Node, A::Error> {
                use serde::de::Error;
                let kind: String = map.next_key()?.ok_or_else(|| {
                    A::Error::custom(format!(
                        "empty node: expected one key, one of {}",
                        Node::KINDS.join(", ")
                    ))
                })?;
                let node = Node::deserialize_kind(&kind, &mut map)?;
                if let Some(extra) = map.next_key::<String>()? {
                    return Err(A::Error::custom(format!(
                        "node `{kind}` has a second key `{extra}`; a node is a map with exactly one key"
                    )));
                }
                Ok(node)
            }
        }
        d.deserialize_map(V)
    }
}

nodes! {
    /// An in-memory CAS bounded by size, evicting the least recently used blobs.
    "memory" => Memory(blob_access::memory::MemoryConfig),
    /// A CAS in a local directory, bounded by size, surviving restarts.
    "disk" => Disk(blob_access::disk::DiskConfig),
    /// A remote REAPI CAS; a stream cut in the middle fails the read.
    "grpc" => Grpc(blob_access::grpc::GrpcConfig),
    /// A remote REAPI CAS whose reads resume at `read_offset` when a stream is cut.
    "resumable_grpc" => ResumableGrpc(blob_access_decorators::resumable_grpc::ResumableGrpcConfig),
    /// Remembers for `ttl` the digests `find_missing` found present.
    "existence_caching" => ExistenceCaching(blob_access_decorators::existence_caching::ExistenceCachingConfig<Node>),
    /// Reads a fast tier first; on a miss streams from the slow one while copying into the fast.
    "read_caching" => ReadCaching(blob_access_decorators::read_caching::ReadCachingConfig<Node>),
    /// Logs every failed call with its operation, digest, node path, code and duration.
    "error_logging" => ErrorLogging(blob_access_decorators::error_logging::ErrorLoggingConfig<Node>),
}

/// Loads a config file and builds its tree.
pub fn build_file(path: &std::path::Path) -> std::result::Result<Arc<dyn BlobAccess>, BuildError> {
    let node = load_file(path).map_err(BuildError::Config)?;
    node.build(&BuildContext::root()).map_err(BuildError::Build)
}

/// Why a config file did not yield a `BlobAccess`.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Config(ConfigError),
    #[error("{0}")]
    Build(blob_access::Error),
}
