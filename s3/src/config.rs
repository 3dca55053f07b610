//! The `s3` node of a config file, and the clients it builds.

use blob_access::config_types::{ByteSize, Duration};
use blob_access::grpc::HeaderValue;
use blob_access::{ActionCache, BlobAccess, BuildContext, BuildNode, Error, Result};
use blob_access_decorators::resumable_grpc::RetryPolicy;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::{BackoffConfig, ClientOptions, RetryConfig};
use std::sync::Arc;

/// Config node `s3: {bucket: NAME, endpoint: URL, region: NAME, prefix: PATH}`.
///
/// Credentials: `access_key_id` and `secret_access_key` (a string, `{env:
/// NAME}` or `{file: PATH}`), or else the usual chain: `AWS_ACCESS_KEY_ID` /
/// `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`, web identity
/// (`AWS_WEB_IDENTITY_TOKEN_FILE`), container credentials, instance metadata.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// The bucket; it must exist (it is checked when the tree is built).
    pub bucket: String,
    /// Keys start with this (e.g. `team-a`): several caches can share a bucket.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
    /// For anything but AWS, e.g. `http://127.0.0.1:3900` (Garage, MinIO, Ceph).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Default `us-east-1`; S3-compatible stores have their own (Garage: `garage`).
    #[serde(default = "default_region")]
    pub region: String,
    /// Path-style addressing (`ENDPOINT/BUCKET/KEY`) rather than
    /// `BUCKET.ENDPOINT/KEY`. Default: on with an `endpoint`, off for AWS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_style: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<HeaderValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key: Option<HeaderValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_token: Option<HeaderValue>,
    /// Blobs up to this size are one PUT; larger ones a multipart upload of
    /// parts this large (5MiB to 5GiB, as S3 allows). Default 16MiB.
    #[serde(default = "default_part_size")]
    pub part_size: ByteSize,
    /// Parts of one upload sent at once. Default 4.
    #[serde(default = "default_parts_in_flight")]
    pub parts_in_flight: usize,
    /// HEAD requests of one `find_missing` at once. Default 64.
    #[serde(default = "default_concurrent_heads")]
    pub concurrent_heads: usize,
    /// A read cut mid-body goes on with a ranged GET; this many attempts in a
    /// row without a byte before it gives up. Default 5.
    #[serde(default = "default_max_attempts")]
    pub max_attempts_without_progress: u32,
    /// Wait after the first attempt without progress, doubled after each
    /// further one (with jitter); also what a throttled (503) read waits. Default 50ms.
    #[serde(default = "default_initial_backoff")]
    pub initial_backoff: Duration,
    /// Upper bound of that wait. Default 5s.
    #[serde(default = "default_max_backoff")]
    pub max_backoff: Duration,
    /// No new attempt of a read later than this after it began. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Duration>,
    /// A response that brings no byte for this long is dropped and the read
    /// resumed on a new connection. Default 30s.
    #[serde(default = "default_stall_timeout")]
    pub stall_timeout: Duration,
}

fn default_region() -> String {
    "us-east-1".into()
}
fn default_part_size() -> ByteSize {
    ByteSize(16 << 20)
}
fn default_parts_in_flight() -> usize {
    4
}
fn default_concurrent_heads() -> usize {
    64
}
fn default_max_attempts() -> u32 {
    RetryPolicy::default().max_attempts_without_progress
}
fn default_initial_backoff() -> Duration {
    Duration(RetryPolicy::default().initial_backoff)
}
fn default_max_backoff() -> Duration {
    Duration(RetryPolicy::default().max_backoff)
}
fn default_stall_timeout() -> Duration {
    Duration(RetryPolicy::default().stall_timeout)
}

/// What a client is for: it decides who retries and what times out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ClientUse {
    /// GETs, resumed by [`crate::read`] on its own terms: no retries here.
    Reads,
    /// Parts of multipart uploads, retried alone by [`crate::write`].
    Parts,
    /// Everything else (HEAD, PUT, create, complete, abort, listing): the
    /// client repeats a failed request itself, with its own backoff.
    Requests,
}

/// How often the client repeats a failed request of [`ClientUse::Requests`].
const LIBRARY_RETRIES: usize = 5;

/// S3's limits on the size of one part of a multipart upload.
const MIN_PART: u64 = 5 << 20;
pub(crate) const MAX_PART: u64 = 5 << 30;

impl S3Config {
    /// A config for `bucket` with every other field at its default.
    pub fn new(bucket: &str) -> Self {
        S3Config {
            bucket: bucket.into(),
            prefix: String::new(),
            endpoint: None,
            region: default_region(),
            path_style: None,
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            part_size: default_part_size(),
            parts_in_flight: default_parts_in_flight(),
            concurrent_heads: default_concurrent_heads(),
            max_attempts_without_progress: default_max_attempts(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
            deadline: None,
            stall_timeout: default_stall_timeout(),
        }
    }

    pub fn with_endpoint(mut self, endpoint: &str) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    pub fn with_region(mut self, region: &str) -> Self {
        self.region = region.into();
        self
    }

    pub fn with_prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The read retry rules, as `resumable_grpc` has them.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts_without_progress: self.max_attempts_without_progress,
            initial_backoff: self.initial_backoff.get(),
            max_backoff: self.max_backoff.get(),
            deadline: self.deadline.map(Duration::get),
            stall_timeout: self.stall_timeout.get(),
        }
    }

    /// Refuses values S3 would refuse later, naming the field.
    pub(crate) fn check(&self, node: &str) -> Result<()> {
        let bad = |what: String| Err(Error::invalid_argument(format!("{node}: {what}")));
        if self.bucket.trim().is_empty() {
            return bad("`bucket` is empty".into());
        }
        let part = self.part_size.bytes();
        if !(MIN_PART..=MAX_PART).contains(&part) {
            return bad(format!(
                "`part_size` {} is outside the 5MiB..5GiB that S3 allows for a part",
                self.part_size
            ));
        }
        if self.parts_in_flight == 0 || self.concurrent_heads == 0 {
            return bad("`parts_in_flight` and `concurrent_heads` must be at least 1".into());
        }
        if self.max_attempts_without_progress == 0 {
            return bad("`max_attempts_without_progress` must be at least 1".into());
        }
        if let Some(e) = &self.endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return bad(format!(
                    "`endpoint` {e:?} is not an http:// or https:// URL"
                ));
            }
        }
        Ok(())
    }

    /// A client of the bucket for `use_`.
    pub(crate) fn client(&self, node: &str, use_: ClientUse) -> Result<Arc<AmazonS3>> {
        self.check(node)?;
        // No whole-request timeout: a large GET or part may take minutes.
        // A read stalls when no byte comes for `stall_timeout`; reqwest's
        // read timeout would also count the time spent sending a body, so
        // only reads have it. Set first: `with_allow_http` below changes these.
        let mut options = ClientOptions::new()
            .with_timeout_disabled()
            .with_connect_timeout(std::time::Duration::from_secs(10));
        if use_ == ClientUse::Reads {
            options = options.with_read_timeout(self.stall_timeout.get());
        }
        let library_retries = match use_ {
            ClientUse::Reads | ClientUse::Parts => 0,
            ClientUse::Requests => LIBRARY_RETRIES,
        };
        // The chain first (environment, web identity, metadata), then the
        // config's own values over it.
        let mut b = AmazonS3Builder::from_env()
            .with_client_options(options)
            .with_bucket_name(&self.bucket)
            .with_region(&self.region);
        if let Some(endpoint) = &self.endpoint {
            b = b
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        let path_style = self.path_style.unwrap_or(self.endpoint.is_some());
        b = b.with_virtual_hosted_style_request(!path_style);
        if let Some(v) = &self.access_key_id {
            b = b.with_access_key_id(secret(v, node, "access_key_id")?);
        }
        if let Some(v) = &self.secret_access_key {
            b = b.with_secret_access_key(secret(v, node, "secret_access_key")?);
        }
        if let Some(v) = &self.session_token {
            b = b.with_token(secret(v, node, "session_token")?);
        }
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: self.initial_backoff.get(),
                max_backoff: self.max_backoff.get(),
                base: 2.0,
            },
            max_retries: library_retries,
            retry_timeout: std::time::Duration::from_secs(180),
        };
        b.with_retry(retry)
            .build()
            .map(Arc::new)
            .map_err(|e| Error::invalid_argument(format!("{node}: {e}")))
    }
}

/// A credential's value from the config, the environment or a file; errors
/// name the field and where the value should have come from, never the value.
fn secret(v: &HeaderValue, node: &str, field: &str) -> Result<String> {
    let missing = |why: String| Error::invalid_argument(format!("{node}: `{field}`: {why}"));
    match v {
        HeaderValue::Literal(s) => Ok(s.clone()),
        HeaderValue::Env(e) => std::env::var(&e.env)
            .map_err(|_| missing(format!("environment variable {} is not set", e.env))),
        HeaderValue::File(f) => std::fs::read_to_string(&f.file)
            .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
            .map_err(|e| missing(format!("cannot read {}: {e}", f.file))),
    }
}

impl<N> blob_access::ChildNodes<N> for S3Config {}

impl BuildNode for S3Config {
    fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn BlobAccess>> {
        let node = crate::S3BlobAccess::new(ctx.path(), self)?;
        crate::startup::check_bucket(self, ctx.path())?;
        Ok(Arc::new(node))
    }

    fn build_action_cache(&self, ctx: &BuildContext) -> Result<Arc<dyn ActionCache>> {
        let node = crate::S3ActionCache::new(ctx.path(), self)?;
        crate::startup::check_bucket(self, ctx.path())?;
        Ok(Arc::new(node))
    }
}
