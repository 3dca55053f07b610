//! `serve`: a REAPI remote cache (CAS, ActionCache) in front of any trees, so
//! unmodified build clients gain what the trees do (resuming reads, caching,
//! logging) without a code change.

use blob_access::metrics::{CallMetrics, NodeCounters};
use blob_access::BuildContext;
use blob_access_server::{self as server, Auth, ServerConfig, ServerTls, Tokens};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// The tree served when no `--config` is given.
const EMBEDDED_DEFAULT: &str = include_str!("../../examples/memory.yaml");

/// Where and how to serve.
pub struct ServeOptions {
    /// `host:port` or `unix:/path`.
    pub listen: String,
    /// `host:port` for Prometheus metrics, if any.
    pub metrics_listen: Option<String>,
    /// How long running transfers may go on after a shutdown signal.
    pub shutdown_grace: std::time::Duration,
    /// How long to go on serving, health NOT_SERVING, after a shutdown signal.
    pub drain_delay: std::time::Duration,
    /// Refuse action result uploads.
    pub action_cache_read_only: bool,
    /// Tokens file (`read TOKEN` / `write TOKEN` lines), re-read on SIGHUP.
    pub auth_tokens: Option<PathBuf>,
    /// Serve a non-loopback address without authentication.
    pub allow_unauthenticated: bool,
    /// Serve TLS, and with a client CA, mutual TLS.
    pub tls: Option<TlsFiles>,
    /// What one client may hold.
    pub limits: Limits,
}

/// Limits against clients that hold resources without using them (see
/// `blob_access_server::ServerConfig` for what each enforces).
#[derive(clap::Args, Clone, Debug)]
pub struct Limits {
    /// Largest gRPC message accepted or sent; a larger one is refused from its
    /// length prefix, before it is read.
    #[arg(long, default_value = "16MiB", value_parser = parse_size)]
    pub max_message_size: u64,
    /// Largest sum of blob sizes in one batch call (advertised to clients).
    #[arg(long, default_value = "4MiB", value_parser = parse_size)]
    pub max_batch_size: u64,
    /// Streams one client connection may have open at once.
    #[arg(long, default_value_t = 256, value_parser = parse_count::<u32>)]
    pub max_concurrent_streams: u32,
    /// ByteStream uploads one client connection may run at once.
    #[arg(long, default_value_t = 64, value_parser = parse_count::<usize>)]
    pub max_uploads_per_connection: usize,
    /// A request (or a new connection) that sends nothing for this long while
    /// the server waits for it is ended; a partial upload is kept as a cut one.
    #[arg(long, default_value = "60s", value_parser = parse_timeout)]
    pub idle_timeout: std::time::Duration,
    /// How long an upload cut before its end is kept for the client to resume
    /// (QueryWriteStatus reports its bytes; a Write at that offset goes on);
    /// 0 keeps none.
    #[arg(long, default_value = "60s", value_parser = parse_window)]
    pub upload_resume_window: std::time::Duration,
    /// Cut uploads kept at once; past it, a cut upload is discarded and its
    /// continuation gets RESOURCE_EXHAUSTED (starting again at 0 works). Each
    /// kept upload into a `disk` store holds one of 512 blocking threads.
    #[arg(long, default_value_t = 256, value_parser = parse_count::<usize>)]
    pub max_kept_uploads: usize,
    /// Bytes held by the cut uploads kept at once (memory for a `memory`
    /// tree, temp files for `disk`), with the same effect past it.
    #[arg(long, default_value = "8GiB", value_parser = parse_size)]
    pub max_kept_upload_bytes: u64,
}

fn parse_window(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text).map_err(|e| e.to_string())
}

fn parse_size(text: &str) -> Result<u64, String> {
    match text.parse::<blob_access::config_types::ByteSize>()? {
        b if b.bytes() > 0 => Ok(b.bytes()),
        _ => Err("must be more than 0 bytes".into()),
    }
}

/// Zero would refuse every stream or upload.
fn parse_count<T: std::str::FromStr<Err = std::num::ParseIntError> + Default + PartialEq>(
    text: &str,
) -> Result<T, String> {
    match text.parse::<T>().map_err(|e| e.to_string())? {
        n if n == T::default() => Err("must be more than 0".into()),
        n => Ok(n),
    }
}

/// Zero would end every connection at once.
fn parse_timeout(text: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(text).map_err(|e| e.to_string())? {
        d if d.is_zero() => Err("must be more than 0 (e.g. 60s)".into()),
        d => Ok(d),
    }
}

/// PEM files of `--tls-cert`, `--tls-key` and `--tls-client-ca`.
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

pub async fn run(config: Option<&Path>, opts: &ServeOptions) -> Result<ExitCode, String> {
    let (listen, metrics_listen) = (opts.listen.as_str(), opts.metrics_listen.as_deref());
    let mut registry = prometheus_client::registry::Registry::default();
    let ctx = match metrics_listen {
        Some(_) => BuildContext::root().with_metrics(CallMetrics::register(&mut registry)),
        None => BuildContext::root(),
    };
    let (config, source) = match config {
        Some(path) => (
            blob_access_config::load_file(path).map_err(|e| e.to_string())?,
            path.display().to_string(),
        ),
        None => {
            let source = "embedded default (examples/memory.yaml)";
            let config = blob_access_config::load_str(
                EMBEDDED_DEFAULT,
                blob_access_config::Format::Yaml,
                source,
            )
            .map_err(|e| e.to_string())?;
            (config, source.to_string())
        }
    };
    let storage = config.build(&ctx).map_err(|e| format!("{source}: {e}"))?;
    let cache = match &storage.action_cache {
        Some(_) if opts.action_cache_read_only => "REAPI CAS and read-only ActionCache",
        Some(_) => "REAPI CAS and ActionCache",
        None => "REAPI CAS (no action cache)",
    };
    let what = match &storage.execution {
        Some(_) => format!("{cache}, Execution"),
        None => cache.to_string(),
    };
    if storage.action_cache.is_none() {
        // Bazel then fails every build that uploads results (its default).
        tracing::warn!(
            "{source} has no action_cache tree: build tools get no action cache and updates are \
             refused; name `content_addressable_storage:` and `action_cache:` trees to serve both"
        );
    }
    // Dropped (and so stopped) when serving ends.
    let _metrics = match metrics_listen {
        Some(addr) => {
            let counters = NodeCounters::new(storage.cas.clone(), storage.action_cache.clone())
                .with_execution(storage.execution.clone());
            registry.register_collector(Box::new(counters));
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?;
            let local = listener.local_addr().map_err(|e| e.to_string())?;
            eprintln!("blob-access: metrics on http://{local}/metrics");
            let task = tokio::spawn(super::metrics::serve(Arc::new(registry), listener));
            Some(AbortOnDrop(task))
        }
        None => None,
    };
    let auth = match &opts.auth_tokens {
        Some(path) => {
            let tokens = Tokens::load(path).map_err(|e| e.to_string())?;
            eprintln!(
                "blob-access: {} tokens ({} may write) from {}",
                tokens.len(),
                tokens.writers(),
                path.display()
            );
            Some(Auth::new(tokens))
        }
        None => None,
    };
    let tls = match &opts.tls {
        Some(f) => Some(
            ServerTls::load(&f.cert, &f.key, f.client_ca.as_deref()).map_err(|e| e.to_string())?,
        ),
        None => None,
    };
    let what = match &opts.tls {
        Some(TlsFiles {
            client_ca: Some(_), ..
        }) => format!("{what} over mutual TLS"),
        Some(_) => format!("{what} over TLS"),
        None => what.to_string(),
    };
    // Mutual TLS authenticates every client as well as tokens do.
    let authenticated = auth.is_some()
        || tls
            .as_ref()
            .is_some_and(ServerTls::requires_client_certificates);
    if tls.is_some() && listen.starts_with("unix:") {
        return Err("--tls-cert is for TCP addresses, not unix: sockets".into());
    }
    // Dropped (and so stopped) when serving ends.
    let _reload = if auth.is_some() || tls.is_some() {
        // Installed before serving starts: a SIGHUP would otherwise end the process.
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| format!("cannot handle SIGHUP: {e}"))?;
        let tokens = auth.clone().zip(opts.auth_tokens.clone());
        let task = tokio::spawn(reload_on_sighup(hup, tokens, tls.clone()));
        Some(AbortOnDrop(task))
    } else {
        None
    };
    let limits = &opts.limits;
    // A batch of the advertised size must fit in one message, with its digests.
    if limits.max_message_size < limits.max_batch_size + (1 << 20) {
        return Err(format!(
            "--max-message-size ({}) must exceed --max-batch-size ({}) by at least 1MiB: \
             clients send batches of the advertised size in one message",
            limits.max_message_size, limits.max_batch_size
        ));
    }
    let cfg = ServerConfig {
        tls,
        shutdown_grace: opts.shutdown_grace,
        drain_delay: opts.drain_delay,
        action_cache_read_only: opts.action_cache_read_only,
        auth,
        max_message_size: usize::try_from(limits.max_message_size).unwrap_or(usize::MAX),
        max_batch_total_size_bytes: limits.max_batch_size,
        max_concurrent_streams: limits.max_concurrent_streams,
        max_uploads_per_connection: limits.max_uploads_per_connection,
        idle_timeout: limits.idle_timeout,
        cut_uploads: blob_access_server::ParkingLimits {
            window: limits.upload_resume_window,
            max_uploads: limits.max_kept_uploads,
            max_bytes: limits.max_kept_upload_bytes,
        },
        ..ServerConfig::default()
    };
    let result = if let Some(path) = listen.strip_prefix("unix:") {
        let listener = server::bind_unix(Path::new(path))
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!("serving on unix:{path}");
        eprintln!("blob-access: serving {what} on unix:{path}");
        server::serve_unix_listener(storage, cfg, listener, shutdown_signal()).await
    } else {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        if !addr.ip().is_loopback() && !authenticated {
            if !opts.allow_unauthenticated {
                return Err(format!(
                    "refusing to serve {addr} without authentication: anyone who reaches a \
                     non-loopback address could read and write through this server; give \
                     --auth-tokens FILE or --tls-client-ca FILE (mutual TLS), or \
                     --allow-unauthenticated to serve anyone"
                ));
            }
            tracing::warn!(
                "serving {addr} WITHOUT authentication (--allow-unauthenticated): anyone who \
                 reaches it may read and write"
            );
        }
        eprintln!("blob-access: serving {what} on {addr}");
        server::serve_tcp(storage, cfg, listener, shutdown_signal()).await
    };
    result.map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Re-reads the tokens file and the TLS files on every SIGHUP; a file that
/// cannot be used keeps what is in force, with an error in the log.
async fn reload_on_sighup(
    mut hup: tokio::signal::unix::Signal,
    tokens: Option<(Auth, PathBuf)>,
    tls: Option<ServerTls>,
) {
    while hup.recv().await.is_some() {
        if let Some((auth, path)) = &tokens {
            match Tokens::load(path) {
                Ok(t) => {
                    eprintln!(
                        "blob-access: SIGHUP: {} tokens ({} may write) from {}",
                        t.len(),
                        t.writers(),
                        path.display()
                    );
                    auth.replace(t);
                }
                Err(e) => tracing::error!("SIGHUP: keeping the previous tokens: {e}"),
            }
        }
        if let Some(tls) = &tls {
            match tls.reload() {
                Ok(()) => eprintln!("blob-access: SIGHUP: TLS certificates re-read"),
                Err(e) => tracing::error!("SIGHUP: keeping the previous TLS certificates: {e}"),
            }
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    eprintln!("blob-access: shutting down, letting running transfers finish");
}
