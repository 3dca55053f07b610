//! One lazily connected channel to a REAPI server, shared by every node built
//! on the same `grpc` settings, with the server's capabilities learnt once.

use super::checks::{header_name, header_value, parse_endpoint, Target};
use super::config::{Compression, GrpcConfig, HeaderValue};
use super::http_status::HttpStatusChannel;
use crate::bytestream_proto::byte_stream_client::ByteStreamClient;
use crate::proto::action_cache_client::ActionCacheClient;
use crate::proto::capabilities_client::CapabilitiesClient;
use crate::proto::content_addressable_storage_client::ContentAddressableStorageClient;
use crate::proto::{compressor, GetCapabilitiesRequest};
use crate::{Code, Error, Result};
use std::sync::Arc;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// The channel every call of a [`GrpcConnection`] goes over: a tonic channel
/// whose proxy error pages become gRPC statuses ([`super::http_status`]).
pub type GrpcChannel = HttpStatusChannel<Channel>;

/// Largest gRPC message we send or accept.
pub const MAX_MESSAGE: usize = 64 << 20;
/// Batch limit when the server does not say.
const DEFAULT_BATCH: u64 = 4 << 20;

/// What the server told GetCapabilities (or defaults if it would not).
#[derive(Clone, Debug)]
pub struct Capabilities {
    pub max_batch_total_size_bytes: u64,
    pub zstd: bool,
    /// Whether the server's action cache takes UpdateActionResult calls.
    pub action_cache_update_enabled: bool,
    /// The digest functions it lists (REAPI values); empty if it said none.
    pub digest_functions: Vec<i32>,
}

/// A shared, lazily connected channel with the node's instance name and headers.
#[derive(Clone)]
pub struct GrpcConnection {
    inner: Arc<Inner>,
}

type Connect = Box<dyn Fn() -> GrpcChannel + Send + Sync>;

struct Inner {
    name: String,
    channel: GrpcChannel,
    /// Makes another channel with the same settings (endpoint, TLS, keepalive).
    connect: Connect,
    instance_name: String,
    headers: Vec<(AsciiMetadataKey, HeaderSource)>,
    credentials: Option<Arc<super::credential_helper::CredentialHelper>>,
    compression: Compression,
    max_batch_override: Option<u64>,
    capabilities: tokio::sync::OnceCell<Capabilities>,
    /// The server answered a batch call UNIMPLEMENTED (a ByteStream-only
    /// server or proxy): blobs of every size go through ByteStream since.
    no_batch_calls: std::sync::atomic::AtomicBool,
}

/// A header value, ready to send: fixed, or re-read from its file when the file changes.
enum HeaderSource {
    Fixed(AsciiMetadataValue),
    File {
        path: std::path::PathBuf,
        state: std::sync::Mutex<FileState>,
    },
}

struct FileState {
    value: AsciiMetadataValue,
    /// Modification time and length of the file the value was read from.
    stamp: Option<(std::time::SystemTime, u64)>,
    checked: std::time::Instant,
}

/// How often a header file is looked at for changes (one `stat`).
const HEADER_FILE_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

fn file_stamp(path: &std::path::Path) -> Option<(std::time::SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn read_header_file(path: &std::path::Path) -> std::result::Result<AsciiMetadataValue, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    header_value(
        text.trim_end_matches(['\n', '\r']),
        &format!("the value in {}", path.display()),
    )
}

impl HeaderSource {
    fn new(value: &HeaderValue) -> std::result::Result<Self, String> {
        match value {
            HeaderValue::Literal(v) => Ok(HeaderSource::Fixed(header_value(v, "the value")?)),
            HeaderValue::Env(e) => {
                let v = std::env::var(&e.env).map_err(|why| match why {
                    std::env::VarError::NotPresent => {
                        format!("environment variable {} is not set", e.env)
                    }
                    std::env::VarError::NotUnicode(_) => {
                        format!("environment variable {} is not printable ASCII", e.env)
                    }
                })?;
                let what = format!("environment variable {}", e.env);
                Ok(HeaderSource::Fixed(header_value(&v, &what)?))
            }
            HeaderValue::File(f) => {
                let path = std::path::PathBuf::from(&f.file);
                let stamp = file_stamp(&path);
                let value = read_header_file(&path)?;
                Ok(HeaderSource::File {
                    path,
                    state: std::sync::Mutex::new(FileState {
                        value,
                        stamp,
                        checked: std::time::Instant::now(),
                    }),
                })
            }
        }
    }

    /// The value to send now. A file that changed is re-read; one that cannot be
    /// read (or holds a bad value) keeps the previous value, with a warning.
    fn value(&self, node: &str) -> AsciiMetadataValue {
        let (path, state) = match self {
            HeaderSource::Fixed(v) => return v.clone(),
            HeaderSource::File { path, state } => (path, state),
        };
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        if state.checked.elapsed() >= HEADER_FILE_RECHECK {
            state.checked = std::time::Instant::now();
            let stamp = file_stamp(path);
            if stamp != state.stamp {
                state.stamp = stamp;
                match read_header_file(path) {
                    Ok(v) => {
                        tracing::debug!(node, file = %path.display(), "header file changed; re-read");
                        state.value = v;
                    }
                    Err(e) => {
                        tracing::warn!(node, "keeping the previous header value: {e}");
                    }
                }
            }
        }
        state.value.clone()
    }
}

fn config_error(name: &str, field: &str, why: impl std::fmt::Display) -> Error {
    Error::invalid_argument(format!("{field}: {why}")).with_backend(name)
}

impl GrpcConnection {
    /// Prepares a channel; nothing connects until the first call. `name` is the
    /// node's path in the tree, used in errors and metrics.
    pub fn new(name: &str, cfg: &GrpcConfig) -> Result<Self> {
        let name = if name.is_empty() { "grpc" } else { name };
        let connect = connector(name, cfg)?;
        let channel = connect();
        let headers = cfg
            .headers
            .0
            .iter()
            .map(|(k, v)| {
                let field = format!("headers.{k}");
                let key = header_name(k).map_err(|e| config_error(name, &field, e))?;
                let value = HeaderSource::new(v).map_err(|e| config_error(name, &field, e))?;
                Ok((key, value))
            })
            .collect::<Result<_>>()?;
        let credentials = match &cfg.credential_helper {
            Some(command) => Some(
                super::credential_helper::CredentialHelper::start(command, &cfg.endpoint)
                    .map_err(|e| config_error(name, "credential_helper", e))?,
            ),
            None => None,
        };
        Ok(GrpcConnection {
            inner: Arc::new(Inner {
                name: name.to_string(),
                channel,
                connect,
                instance_name: cfg.instance_name.clone(),
                headers,
                credentials,
                compression: cfg.compression,
                max_batch_override: cfg.max_batch_size_bytes.map(|b| b.bytes()),
                no_batch_calls: Default::default(),
                capabilities: tokio::sync::OnceCell::new(),
            }),
        })
    }

    /// The node's name in errors and metrics.
    pub fn name(&self) -> &str {
        &self.inner.name
    }
    /// The configured instance name (capabilities are asked under it).
    pub fn instance_name(&self) -> &str {
        &self.inner.instance_name
    }
    /// The instance name a request about `digest` goes to: the configured one,
    /// followed by the digest's (a request's own, as `serve` sets it) if any,
    /// joined by `/`. So a proxy configured with `""` forwards names as they
    /// come, and a configured `"ci"` puts the clients' names below `ci/`.
    pub fn instance_name_for(&self, digest: &crate::Digest) -> String {
        crate::instance_name::join(&self.inner.instance_name, digest.instance_name())
    }
    /// The compression the config asks for (the server must also support it).
    pub fn compression(&self) -> Compression {
        self.inner.compression
    }
    pub fn channel(&self) -> GrpcChannel {
        self.inner.channel.clone()
    }

    /// A new lazily connected channel with the same endpoint, TLS and
    /// keepalive settings: its calls go over a connection of their own (for
    /// a caller that no longer trusts the shared one).
    pub fn new_channel(&self) -> GrpcChannel {
        (self.inner.connect)()
    }

    /// A ByteStream client on the shared channel.
    pub fn bytestream_client(&self) -> ByteStreamClient<GrpcChannel> {
        ByteStreamClient::new(self.channel())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// ByteStream Read on the shared channel, its data not copied out of
    /// tonic's buffers.
    pub async fn read_chunks(
        &self,
        request: tonic::Request<crate::bytestream_proto::ReadRequest>,
    ) -> std::result::Result<tonic::Streaming<crate::read_chunk::ReadChunk>, tonic::Status> {
        crate::read_chunk::read(self.channel(), request, MAX_MESSAGE).await
    }

    /// A CAS client on the shared channel.
    pub fn cas_client(&self) -> ContentAddressableStorageClient<GrpcChannel> {
        ContentAddressableStorageClient::new(self.channel())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// An ActionCache client on the shared channel.
    pub fn action_cache_client(&self) -> ActionCacheClient<GrpcChannel> {
        ActionCacheClient::new(self.channel())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    /// Wraps a message in a request carrying the configured headers.
    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(helper) = &self.inner.credentials {
            for (k, v) in helper.headers(&self.inner.name).iter() {
                req.metadata_mut().append(k.clone(), v.clone());
            }
        }
        for (k, v) in &self.inner.headers {
            req.metadata_mut()
                .insert(k.clone(), v.value(&self.inner.name));
        }
        req
    }

    /// The server's capabilities, asked once. A server without the
    /// Capabilities service gets conservative defaults; a failure to reach it
    /// is not cached, so the next call asks again.
    pub fn capabilities(&self) -> futures::future::BoxFuture<'static, Result<Capabilities>> {
        let this = self.clone();
        Box::pin(async move {
            let fetch = || this.clone().fetch_capabilities();
            this.inner
                .capabilities
                .get_or_try_init(fetch)
                .await
                .cloned()
        })
    }

    async fn fetch_capabilities(self) -> Result<Capabilities> {
        let mut client = CapabilitiesClient::new(self.channel());
        let req = self.request(GetCapabilitiesRequest {
            instance_name: self.inner.instance_name.clone(),
        });
        match client.get_capabilities(req).await {
            Ok(r) => {
                let cache = r.into_inner().cache_capabilities.unwrap_or_default();
                let batch = match cache.max_batch_total_size_bytes {
                    n if n > 0 => n as u64,
                    _ => DEFAULT_BATCH,
                };
                Ok(Capabilities {
                    max_batch_total_size_bytes: batch,
                    zstd: cache
                        .supported_compressors
                        .contains(&(compressor::Value::Zstd as i32)),
                    action_cache_update_enabled: cache
                        .action_cache_update_capabilities
                        .is_some_and(|c| c.update_enabled),
                    digest_functions: cache.digest_functions,
                })
            }
            Err(s) if s.code() == Code::Unimplemented => {
                tracing::debug!(backend = %self.inner.name, "server has no Capabilities service; using defaults");
                Ok(Capabilities {
                    max_batch_total_size_bytes: DEFAULT_BATCH,
                    zstd: false,
                    // Nothing said otherwise; an update will tell.
                    action_cache_update_enabled: true,
                    digest_functions: Vec::new(),
                })
            }
            Err(s) => Err(Error::from(s).with_backend(self.inner.name.clone())),
        }
    }

    /// INVALID_ARGUMENT naming `function` when the server lists the digest
    /// functions it serves and that one is not among them: a clear answer
    /// where a server that ignores the function would say "data does not
    /// match hash". SHA-256, which every server takes, is not asked about;
    /// a server that cannot be asked is left to answer the call itself.
    pub async fn check_digest_function(&self, function: crate::DigestFunction) -> Result<()> {
        if function == crate::DigestFunction::Sha256 {
            return Ok(());
        }
        let Ok(caps) = self.capabilities().await else {
            return Ok(());
        };
        let listed = &caps.digest_functions;
        if listed.is_empty() || listed.contains(&function.to_proto()) {
            return Ok(());
        }
        let names: Vec<&str> = listed
            .iter()
            .filter_map(|v| crate::proto::digest_function::Value::try_from(*v).ok())
            .map(|v| v.as_str_name())
            .collect();
        Err(Error::invalid_argument(format!(
            "the server does not serve digest function {function} (its capabilities list {})",
            names.join(", ")
        ))
        .with_backend(self.inner.name.clone()))
    }

    /// Whether the server answered a batch call UNIMPLEMENTED.
    pub fn batch_calls_unimplemented(&self) -> bool {
        self.inner
            .no_batch_calls
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Notes that `e`, the failure of a whole batch call, says the server has
    /// no batch calls; returns whether it did (the blob should go through
    /// ByteStream instead).
    pub fn note_batch_failure(&self, e: &Error) -> bool {
        let unimplemented = e.code() == Code::Unimplemented;
        if unimplemented
            && !self
                .inner
                .no_batch_calls
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::info!(backend = %self.inner.name, "the server has no batch calls (UNIMPLEMENTED); using ByteStream for every blob");
        }
        unimplemented
    }

    /// Blobs up to this size use the batch calls.
    pub fn batch_limit(&self) -> futures::future::BoxFuture<'static, Result<u64>> {
        let (over, caps) = (self.inner.max_batch_override, self.capabilities());
        let unimplemented = self.batch_calls_unimplemented();
        Box::pin(async move {
            if unimplemented {
                return Ok(0);
            }
            if let Some(n) = over {
                return Ok(n);
            }
            // Leave room for the message's framing and digest fields.
            Ok(caps
                .await?
                .max_batch_total_size_bytes
                .saturating_sub(16 << 10))
        })
    }
}

/// Checks `cfg` and returns what makes lazily connecting channels to `cfg.endpoint`.
fn connector(name: &str, cfg: &GrpcConfig) -> Result<Connect> {
    let Target {
        endpoint: mut ep,
        tls,
        unix,
    } = parse_endpoint(&cfg.endpoint).map_err(|e| config_error(name, "endpoint", e))?;
    ep = ep
        .connect_timeout(cfg.connect_timeout.get())
        .tcp_nodelay(true)
        // Windows bound what a slow consumer leaves buffered in memory (the
        // 64 MiB RSS goal) while keeping loopback and LAN links full.
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(8 << 20)
        .max_frame_size(1 << 20);
    if let Some(i) = cfg.keepalive_interval {
        ep = ep
            .http2_keep_alive_interval(i.get())
            .keep_alive_while_idle(cfg.keepalive_while_idle.unwrap_or(true));
    }
    if let Some(t) = cfg.keepalive_timeout {
        ep = ep.keep_alive_timeout(t.get());
    }
    if !tls && (cfg.tls_client_cert.is_some() || cfg.tls_client_key.is_some()) {
        return Err(config_error(
            name,
            "tls_client_cert",
            "needs a grpcs:// endpoint",
        ));
    }
    if tls {
        let mut tls_cfg = ClientTlsConfig::new().with_native_roots();
        if let Some(ca) = &cfg.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| config_error(name, "ca_file", format!("{ca}: {e}")))?;
            tls_cfg = tls_cfg.ca_certificate(Certificate::from_pem(pem));
        }
        match (&cfg.tls_client_cert, &cfg.tls_client_key) {
            (Some(cert), Some(key)) => {
                let read = |field: &str, path: &str| {
                    std::fs::read(path)
                        .map_err(|e| config_error(name, field, format!("{path}: {e}")))
                };
                tls_cfg = tls_cfg.identity(tonic::transport::Identity::from_pem(
                    read("tls_client_cert", cert)?,
                    read("tls_client_key", key)?,
                ));
            }
            (None, None) => {}
            (Some(_), None) => return Err(config_error(name, "tls_client_key", "is missing")),
            (None, Some(_)) => return Err(config_error(name, "tls_client_cert", "is missing")),
        }
        ep = ep
            .tls_config(tls_cfg)
            .map_err(|e| config_error(name, "endpoint", e))?;
    }
    Ok(match unix {
        None => Box::new(move || HttpStatusChannel::new(ep.connect_lazy())),
        Some(path) => Box::new(move || {
            let path = path.clone();
            HttpStatusChannel::new(ep.connect_with_connector_lazy(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            })))
        }),
    })
}
