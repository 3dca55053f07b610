//! A REAPI server (ContentAddressableStorage, ByteStream, ActionCache,
//! Capabilities) in front of any `Arc<dyn BlobAccess>` and, for the remote
//! cache of a build tool, an `Arc<dyn ActionCache>`, so that unmodified REAPI
//! clients gain whatever the trees do (retries, caching, logging).
//!
//! Every call goes straight to the backend: reads stream from `get` and are
//! re-chunked (and zstd-compressed on request) on the fly, writes stream into
//! `put` through a small channel, so memory does not grow with blob size.
//!
//! Instance names: by default every instance name is accepted and passed to the
//! tree on every digest of the request ([`Digest::instance_name`](blob_access::Digest::instance_name)):
//! ByteStream resource names, the CAS calls, GetTree and the action cache (whose
//! `completeness_checking` looks for an action's outputs under its name). Most
//! nodes ignore it, so a proxy in front of one tree serves clients configured
//! for any instance; `demultiplexing` routes by it and `grpc` forwards it.
//! [`ServerConfig::instance_name`] restricts the server to one name; requests
//! for others then fail with INVALID_ARGUMENT. Tokens limited to some instance
//! names are checked here too (see [`Tokens`]).
//!
//! ```no_run
//! use blob_access::memory::{MemoryActionCache, MemoryBlobAccess};
//! use blob_access_server::{self as server, Storage};
//! use std::sync::Arc;
//! # async fn run() -> blob_access::Result<()> {
//! // A remote cache for Bazel & co: a CAS and an action cache, in memory.
//! let storage = Storage::new(Arc::new(MemoryBlobAccess::new("memory", 1 << 30)))
//!     .with_action_cache(Arc::new(MemoryActionCache::new("memory", 64 << 20)));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let shutdown = async { let _ = tokio::signal::ctrl_c().await; };
//! server::serve_tcp(storage, server::ServerConfig::default(), listener, shutdown).await
//! # }
//! ```

mod action_cache;
mod auth;
mod bytestream;
mod capabilities;
mod cas;
mod empty_blob;
mod execution;
mod get_tree;
mod limits;
mod parked;
mod read_route;
mod rechunk;
mod tls;
mod upload;
mod zstd_stream;

pub use auth::{Auth, Grant, Permission, Tokens};
pub use blob_access::Storage;
use blob_access::{ActionCache, BlobAccess, Error, Result};
pub use parked::ParkingLimits;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
pub use tls::ServerTls;
use tokio::sync::{oneshot, watch};
use tonic::service::Routes;
use tonic::transport::server::{Connected, TcpIncoming};
use tonic::Status;
use tonic_health::ServingStatus;

/// How a server behaves; `ServerConfig::default()` suits most uses.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// `None` (the default) accepts every instance name; `Some(name)` accepts only `name`.
    pub instance_name: Option<String>,
    /// Largest sum of blob sizes in one BatchUpdateBlobs/BatchReadBlobs call (advertised).
    pub max_batch_total_size_bytes: u64,
    /// Largest gRPC message accepted or sent. A larger message is refused from
    /// its length prefix, before it is read; each stream may buffer one.
    pub max_message_size: usize,
    /// Streams one client connection may have open at once (HTTP/2
    /// SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
    /// ByteStream writes one client connection may run at once; more get
    /// RESOURCE_EXHAUSTED. Connections over Unix sockets are not limited.
    pub max_uploads_per_connection: usize,
    /// A request that sends nothing for this long while the server waits for it
    /// ends with DEADLINE_EXCEEDED (an upload is kept as a cut one), and a connection
    /// that sends no byte for this long after it was accepted is closed.
    pub idle_timeout: Duration,
    /// Largest payload of one ByteStream ReadResponse.
    pub read_chunk_size: usize,
    /// zstd level for `compressed-blobs/zstd` reads; low levels keep up with the network.
    pub zstd_level: i32,
    /// After the shutdown signal, how long running transfers may go on before they
    /// are ended with UNAVAILABLE.
    pub shutdown_grace: Duration,
    /// Directories one GetTree call sends at most; its last page's token continues.
    pub max_tree_directories_per_call: usize,
    /// Refuse UpdateActionResult (PERMISSION_DENIED) and advertise updates as
    /// disabled: clients read results others wrote, and upload none.
    pub action_cache_read_only: bool,
    /// Bearer tokens every caller must present (see [`Tokens`]); `None` (the
    /// default) serves everyone. Health checks never need one. Checked by
    /// [`serve_tcp`] and [`serve_unix`], not by the bare [`services`].
    pub auth: Option<Auth>,
    /// After the shutdown signal, how long to go on serving as before while the
    /// health service already answers NOT_SERVING, so that load balancers stop
    /// sending new calls before connections are closed. 0 (the default) starts
    /// closing at once.
    pub drain_delay: Duration,
    /// How long and how many ByteStream uploads cut before `finish_write`
    /// are kept for the client to resume them (QueryWriteStatus, then a
    /// Write at the committed offset).
    pub cut_uploads: ParkingLimits,
    /// Serve TLS (and, with a client CA, require client certificates signed by
    /// it) on [`serve_tcp`]; `None` (the default) serves plain HTTP/2.
    /// [`ServerTls::reload`] replaces the certificates while serving.
    pub tls: Option<ServerTls>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            instance_name: None,
            max_batch_total_size_bytes: 4 << 20,
            max_message_size: 16 << 20,
            max_concurrent_streams: 256,
            max_uploads_per_connection: 64,
            idle_timeout: Duration::from_secs(60),
            read_chunk_size: 1 << 20,
            zstd_level: 1,
            shutdown_grace: Duration::from_secs(30),
            max_tree_directories_per_call: 100_000,
            action_cache_read_only: false,
            auth: None,
            drain_delay: Duration::ZERO,
            cut_uploads: ParkingLimits::default(),
            tls: None,
        }
    }
}

/// HTTP/2 flow-control windows: large enough that one stream can fill a fast
/// (loopback) link without waiting for WINDOW_UPDATEs.
const STREAM_WINDOW: u32 = 8 << 20;
const CONNECTION_WINDOW: u32 = 32 << 20;
const MAX_FRAME: u32 = 1 << 20;
/// HTTP/2 pings to idle clients, so connections of clients that vanished
/// (no FIN: a crashed machine, a dropped NAT entry) are closed.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long to wait for connections to close after transfers were ended.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// What every service shares: the tree, the config and the kill switch that
/// ends running transfers when the shutdown grace period is over.
#[derive(Clone)]
struct Shared {
    backend: Arc<dyn BlobAccess>,
    action_cache: Option<Arc<dyn ActionCache>>,
    execution: Option<Arc<dyn blob_access::Execution>>,
    cfg: Arc<ServerConfig>,
    kill: watch::Receiver<bool>,
    uploads: Arc<limits::UploadSlots>,
    /// Uploads in progress and those kept after a cut, by resource name.
    uploads_kept: Arc<parked::Uploads>,
}

impl Shared {
    /// INVALID_ARGUMENT for an instance name this server does not serve,
    /// PERMISSION_DENIED if the caller's token (its [`Grant`] in `extensions`)
    /// may not do what `needed` says there.
    fn check_instance(
        &self,
        name: &str,
        extensions: &tonic::Extensions,
        needed: Permission,
    ) -> Result<(), Status> {
        if let Some(served) = &self.cfg.instance_name {
            if served != name {
                return Err(Status::invalid_argument(format!(
                    "unknown instance name {name:?}; this server serves {served:?}"
                )));
            }
        }
        match extensions.get::<Grant>() {
            Some(grant) => grant.check(name, needed),
            None => Ok(()),
        }
    }

    /// Resolves once running transfers must end (never, for `services()`).
    fn killed(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut kill = self.kill.clone();
        async move {
            if kill.wait_for(|k| *k).await.is_err() {
                std::future::pending::<()>().await
            }
        }
    }
}

/// The digest function of a request: the one it names, or for a request
/// that names none (clients before REAPI 2.3) the one the length of its
/// first hash tells (64 characters: SHA-256).
fn digest_function(
    value: i32,
    first_hash: Option<&str>,
) -> Result<blob_access::DigestFunction, Status> {
    use blob_access::DigestFunction;
    if value == 0 {
        let by_length = first_hash.and_then(|h| DigestFunction::from_hex_len(h.len()));
        return Ok(by_length.unwrap_or_default());
    }
    DigestFunction::from_proto(value).ok_or_else(|| {
        let name = blob_access::proto::digest_function::Value::try_from(value)
            .map_or("unknown", |v| v.as_str_name());
        let served: Vec<_> = DigestFunction::ALL.iter().map(|f| f.name()).collect();
        Status::invalid_argument(format!(
            "digest function {value} ({name}) is not supported; this server serves {}",
            served.join(", ")
        ))
    })
}

fn status_shutting_down() -> Status {
    Status::unavailable("server is shutting down; transfer aborted after the grace period")
}

/// The services (CAS, ByteStream, ActionCache, Execution, Operations,
/// Capabilities), ready to add to a `tonic` server (e.g. next to others).
/// Transfers started through these routes are never cut by a shutdown grace period;
/// [`serve_tcp`] and [`serve_unix`] do that.
pub fn services(storage: impl Into<Storage>, cfg: ServerConfig) -> Routes {
    let (_never, kill) = watch::channel(false);
    routes(Shared::new(storage.into(), cfg, kill))
}

impl Shared {
    fn new(storage: Storage, cfg: ServerConfig, kill: watch::Receiver<bool>) -> Self {
        Shared {
            backend: Arc::new(empty_blob::EmptyBlobAlwaysPresent(storage.cas)),
            action_cache: storage.action_cache,
            execution: storage.execution,
            uploads: limits::UploadSlots::new(cfg.max_uploads_per_connection),
            uploads_kept: Arc::new(parked::Uploads::new(cfg.cut_uploads)),
            cfg: Arc::new(cfg),
            kill,
        }
    }
}

/// The services [`routes`] serves, by their gRPC names (as the health service knows them).
const SERVICE_NAMES: [&str; 6] = [
    "build.bazel.remote.execution.v2.ContentAddressableStorage",
    "google.bytestream.ByteStream",
    "build.bazel.remote.execution.v2.ActionCache",
    "build.bazel.remote.execution.v2.Capabilities",
    "build.bazel.remote.execution.v2.Execution",
    "google.longrunning.Operations",
];

fn routes(shared: Shared) -> Routes {
    use blob_access::execution::longrunning_proto::operations_server::OperationsServer;
    use blob_access::proto::action_cache_server::ActionCacheServer;
    use blob_access::proto::capabilities_server::CapabilitiesServer;
    use blob_access::proto::content_addressable_storage_server::ContentAddressableStorageServer;
    use blob_access::proto::execution_server::ExecutionServer;
    let max = shared.cfg.max_message_size;
    let cas = ContentAddressableStorageServer::new(cas::Cas(shared.clone()))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let bytestream =
        read_route::ByteStreamService::new(bytestream::ByteStream(shared.clone()), max);
    let ac = ActionCacheServer::new(action_cache::ActionCacheService(shared.clone()))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let execution = ExecutionServer::new(execution::ExecutionService(shared.clone()))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let operations = OperationsServer::new(execution::OperationsService(shared.clone()))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let caps = CapabilitiesServer::new(capabilities::Capabilities(shared));
    Routes::new(cas)
        .add_service(bytestream)
        .add_service(ac)
        .add_service(execution)
        .add_service(operations)
        .add_service(caps)
}

/// Serves on `listener` until `shutdown` resolves, then stops accepting, lets
/// running transfers finish for up to `cfg.shutdown_grace`, ends the rest with
/// UNAVAILABLE and returns.
pub async fn serve_tcp(
    storage: impl Into<Storage>,
    cfg: ServerConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    match cfg.tls.clone() {
        Some(tls) => {
            let incoming = tls::incoming(listener, tls);
            serve_incoming(storage.into(), cfg, incoming, shutdown).await
        }
        None => {
            let idle = cfg.idle_timeout;
            let incoming =
                limits::speaking(TcpIncoming::from(listener).with_nodelay(Some(true)), idle);
            serve_incoming(storage.into(), cfg, incoming, shutdown).await
        }
    }
}

/// Like [`serve_tcp`], on a Unix domain socket created at `path`. A stale socket
/// file (nobody listening) is replaced; the socket file is removed on return.
pub async fn serve_unix(
    storage: impl Into<Storage>,
    cfg: ServerConfig,
    path: impl AsRef<Path>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    no_tls_on_unix(&cfg)?;
    let listener = bind_unix(path.as_ref()).await?;
    serve_unix_listener(storage, cfg, listener, shutdown).await
}

fn no_tls_on_unix(cfg: &ServerConfig) -> Result<()> {
    match cfg.tls {
        Some(_) => Err(Error::invalid_argument(
            "TLS is served on TCP listeners only; a Unix socket is reached only on its machine",
        )),
        None => Ok(()),
    }
}

/// [`serve_unix`] on a socket already bound by [`bind_unix`] (so a caller can
/// say it listens only once it does); the socket file is removed on return.
pub async fn serve_unix_listener(
    storage: impl Into<Storage>,
    cfg: ServerConfig,
    listener: tokio::net::UnixListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf));
    let result = match no_tls_on_unix(&cfg) {
        Ok(()) => {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            serve_incoming(storage.into(), cfg, incoming, shutdown).await
        }
        Err(e) => Err(e),
    };
    if let Some(path) = path {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Creates a Unix socket at `path` for [`serve_unix_listener`], replacing a
/// stale socket file (nobody listening).
pub async fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener> {
    let context = |e: std::io::Error| {
        let code = Error::from(std::io::Error::new(e.kind(), "")).code();
        Error::new(code, format!("listening on unix:{}: {e}", path.display()))
    };
    match tokio::net::UnixListener::bind(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(context(e));
            }
            // Only a socket left behind by a server that died (nobody answers
            // on it) is removed; any other file there is not ours to delete.
            use std::os::unix::fs::FileTypeExt;
            let is_socket =
                std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
            if !is_socket {
                return Err(Error::invalid_argument(format!(
                    "listening on unix:{}: the path exists and is not a socket; \
                     remove it or choose another path",
                    path.display()
                )));
            }
            std::fs::remove_file(path).map_err(context)?;
            tokio::net::UnixListener::bind(path).map_err(context)
        }
        other => other.map_err(context),
    }
}

async fn serve_incoming<I, IO, IE>(
    storage: Storage,
    cfg: ServerConfig,
    incoming: I,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()>
where
    I: futures::Stream<Item = std::result::Result<IO, IE>>,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Connected + Unpin + Send + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (grace, drain_delay) = (cfg.shutdown_grace, cfg.drain_delay);
    let (kill_tx, kill) = watch::channel(false);
    let shared = Shared::new(storage, cfg, kill);
    let (draining_tx, draining) = oneshot::channel::<()>();
    let (mut health, health_service) = tonic_health::server::health_reporter();
    for name in SERVICE_NAMES {
        health
            .set_service_status(name, ServingStatus::Serving)
            .await;
    }
    let signal = async move {
        shutdown.await;
        // Balancers learn first, while everything still works.
        for name in SERVICE_NAMES.iter().chain(&[""]) {
            health
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        if !drain_delay.is_zero() {
            tracing::info!(
                ?drain_delay,
                "shutting down: health is NOT_SERVING, still serving for the drain delay"
            );
            tokio::time::sleep(drain_delay).await;
        }
        // Ends health Watch streams (after their NOT_SERVING), which would
        // otherwise hold the server open for the whole grace period.
        for name in SERVICE_NAMES.iter().chain(&[""]) {
            health.clear_service_status(name).await;
        }
        tracing::info!("shutting down: no new connections, running transfers may finish");
        let _ = draining_tx.send(());
    };
    let auth = auth::AuthLayer(shared.cfg.auth.clone());
    let idle = limits::IdleLayer(shared.cfg.idle_timeout);
    let server = tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        // Uploads arrive in frames up to this size (16 KiB by default): fewer
        // frames, fewer writes on the client and wakeups here.
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(shared.cfg.max_concurrent_streams)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .layer(auth)
        .layer(idle)
        .add_routes(routes(shared).add_service(health_service))
        .serve_with_incoming_shutdown(incoming, signal);
    tokio::pin!(server);
    let transport = |e: tonic::transport::Error| {
        Error::unavailable(format!("serving: {}", blob_access::error::error_chain(&e)))
    };
    tokio::select! {
        biased;
        r = &mut server => return r.map_err(transport),
        _ = draining => {}
    }
    if let Ok(r) = tokio::time::timeout(grace, &mut server).await {
        return r.map_err(transport);
    }
    tracing::warn!(
        ?grace,
        "transfers still running after the grace period; ending them"
    );
    let _ = kill_tx.send(true);
    match tokio::time::timeout(KILL_WAIT, &mut server).await {
        Ok(r) => r.map_err(transport),
        Err(_) => {
            tracing::warn!("connections still open; returning anyway");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::server::NamedService;

    #[test]
    fn health_knows_the_services_by_their_grpc_names() {
        use blob_access::bytestream_proto::byte_stream_server::ByteStreamServer;
        use blob_access::execution::longrunning_proto::operations_server::OperationsServer;
        use blob_access::proto::action_cache_server::ActionCacheServer;
        use blob_access::proto::capabilities_server::CapabilitiesServer;
        use blob_access::proto::content_addressable_storage_server::ContentAddressableStorageServer;
        use blob_access::proto::execution_server::ExecutionServer;
        assert_eq!(
            SERVICE_NAMES,
            [
                <ContentAddressableStorageServer<cas::Cas> as NamedService>::NAME,
                <ByteStreamServer<bytestream::ByteStream> as NamedService>::NAME,
                <ActionCacheServer<action_cache::ActionCacheService> as NamedService>::NAME,
                <CapabilitiesServer<capabilities::Capabilities> as NamedService>::NAME,
                <ExecutionServer<execution::ExecutionService> as NamedService>::NAME,
                <OperationsServer<execution::OperationsService> as NamedService>::NAME,
            ]
        );
    }
}
