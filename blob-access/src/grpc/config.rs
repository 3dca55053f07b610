//! The `grpc` config node: where the remote CAS is and how to talk to it.

use crate::action_cache::{ActionCache, GrpcActionCache};
use crate::config_types::{ByteSize, Duration};
use crate::{BlobAccess, BuildContext, BuildNode, Result};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// Config node `grpc: {endpoint: "grpc://127.0.0.1:8980", instance_name: ""}`.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    /// `grpc://host:port` (plain HTTP/2), `grpcs://host:port` (TLS with the system's roots,
    /// plus `ca_file` if set) or `unix:/path/to/socket`.
    pub endpoint: String,
    /// REAPI instance name; may be empty or contain slashes.
    #[serde(default)]
    pub instance_name: String,
    /// Extra request headers sent with every call, e.g. `authorization: "Bearer ..."`.
    /// Their values are never logged.
    #[serde(default, skip_serializing_if = "Headers::is_empty")]
    pub headers: Headers,
    /// PEM file of an extra CA to trust for `grpcs://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// How long to wait for a connection. Default 10s.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Duration,
    /// Send HTTP/2 pings this often to keep idle connections through middleboxes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_interval: Option<Duration>,
    /// Close a connection whose ping is not answered within this. Default 20s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_timeout: Option<Duration>,
    /// Also ping while no call is active. Default: true when `keepalive_interval`
    /// is set (`resumable_grpc`, which pings by default, does not ping idle
    /// connections unless told: servers count idle pings as abuse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_while_idle: Option<bool>,
    /// `zstd` transfers ByteStream reads as `compressed-blobs/zstd` when the server
    /// advertises it (used by `resumable_grpc`). Default `none`.
    #[serde(default)]
    pub compression: Compression,
    /// Overrides the batch limit learnt from the server's capabilities: blobs up
    /// to this size go through BatchUpdateBlobs/BatchReadBlobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch_size_bytes: Option<ByteSize>,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}

/// Wire compression of ByteStream transfers.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Deserialize,
    serde::Serialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    #[default]
    None,
    Zstd,
}

/// Request headers; `Debug` shows names only, so credentials never reach a log.
#[derive(
    Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(transparent)]
pub struct Headers(pub BTreeMap<String, String>);

impl Headers {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "<redacted>")))
            .finish()
    }
}

impl<N> crate::ChildNodes<N> for GrpcConfig {}

impl BuildNode for GrpcConfig {
    fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn BlobAccess>> {
        let conn = super::GrpcConnection::new(ctx.path(), self)?;
        Ok(Arc::new(super::GrpcBlobAccess::new(conn)))
    }

    fn build_action_cache(&self, ctx: &BuildContext) -> Result<Arc<dyn ActionCache>> {
        let conn = super::GrpcConnection::new(ctx.path(), self)?;
        Ok(Arc::new(GrpcActionCache::new(conn)))
    }
}
