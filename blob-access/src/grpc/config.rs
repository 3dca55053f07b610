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
    #[serde(deserialize_with = "super::checks::deserialize_endpoint")]
    #[schemars(regex(
        pattern = r"^(grpcs?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~-]+):([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])/?|unix:[^\x00-\x1f\x7f]+)$"
    ))]
    pub endpoint: String,
    /// REAPI instance name; may be empty or contain slashes.
    #[serde(default)]
    pub instance_name: String,
    /// Extra request headers sent with every call, e.g. `authorization: "Bearer ..."`.
    /// A value may instead come from the environment (`{env: NAME}`) or a file
    /// (`{file: PATH}`, trailing newline trimmed, re-read when it changes), which
    /// keeps credentials out of config files. Values are never logged.
    #[serde(default, skip_serializing_if = "Headers::is_empty")]
    pub headers: Headers,
    /// A credential helper (Bazel's protocol): run as `HELPER get` with
    /// `{"uri": ENDPOINT}` on stdin, it prints the headers to send and when
    /// they expire; they are fetched again before then. `headers` given here
    /// take precedence over the helper's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_helper: Option<String>,
    /// PEM file of an extra CA to trust for `grpcs://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// PEM certificate presented to a `grpcs://` server that requires client
    /// certificates (mutual TLS); needs `tls_client_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_client_cert: Option<String>,
    /// PEM private key of `tls_client_cert`. Never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_client_key: Option<String>,
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

/// Request headers; `Debug` shows names and where values come from (a literal as
/// `<redacted>`), never a value, so credentials never reach a log.
// Deserialized in `super::checks`, which refuses names and literals that cannot be sent.
#[derive(Clone, Default, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct Headers(pub BTreeMap<String, HeaderValue>);

/// A header value: a literal string, `{env: NAME}` or `{file: PATH}`.
// Deserialized in `super::checks`.
#[derive(Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum HeaderValue {
    /// The value itself (a credential then sits in the config file).
    Literal(String),
    /// The value of an environment variable, read when the tree is built.
    Env(FromEnv),
    /// The contents of a file, trailing newline trimmed; re-read when the file changes.
    File(FromFile),
}

/// `{env: NAME}`: a header value from the environment variable NAME.
#[derive(Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FromEnv {
    pub env: String,
}

/// `{file: PATH}`: a header value from a file (e.g. a mounted secret).
#[derive(Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FromFile {
    pub file: String,
}

impl From<String> for HeaderValue {
    fn from(value: String) -> Self {
        HeaderValue::Literal(value)
    }
}

impl From<&str> for HeaderValue {
    fn from(value: &str) -> Self {
        HeaderValue::Literal(value.to_string())
    }
}

/// Where a value comes from, never the value.
impl fmt::Debug for HeaderValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderValue::Literal(_) => f.write_str("<redacted>"),
            HeaderValue::Env(e) => write!(f, "{{env: {:?}}}", e.env),
            HeaderValue::File(p) => write!(f, "{{file: {:?}}}", p.file),
        }
    }
}

impl Headers {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.iter()).finish()
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

    fn build_execution(&self, ctx: &BuildContext) -> Result<Arc<dyn crate::Execution>> {
        let conn = super::GrpcConnection::new(ctx.path(), self)?;
        Ok(Arc::new(super::GrpcExecution::new(conn)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_parse_and_never_show_in_debug() {
        let json = r#"{"endpoint": "grpc://x:1", "headers": {"a": "Bearer lit3ral",
            "b": {"env": "TOKEN_VAR"}, "c": {"file": "/run/secrets/tok"}}}"#;
        let cfg: GrpcConfig = serde_json::from_str(json).unwrap();
        assert_eq!(cfg.headers.0["a"], HeaderValue::from("Bearer lit3ral"));
        assert_eq!(
            cfg.headers.0["b"],
            HeaderValue::Env(FromEnv {
                env: "TOKEN_VAR".into()
            })
        );
        let debug = format!("{cfg:?}");
        assert!(!debug.contains("lit3ral"), "{debug}");
        assert!(
            debug.contains("TOKEN_VAR") && debug.contains("/run/secrets/tok"),
            "{debug}"
        );
        assert!(serde_json::from_str::<GrpcConfig>(
            r#"{"endpoint": "grpc://x:1", "headers": {"a": {"env": "X", "file": "Y"}}}"#
        )
        .is_err());
    }
}
