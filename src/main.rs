//! `blob-access`: read, write and serve REAPI blobs through a config tree.

mod cmd;
mod progress;

use blob_access::DigestFunction;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "blob-access", version, about, propagate_version = true)]
struct Cli {
    /// More logging (-v: info and transfer summaries, -vv: debug). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// No progress bars.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

/// `--digest-function`, on the commands that name blobs.
#[derive(clap::Args)]
struct FunctionArg {
    /// Digest function of the blobs: sha256, blake3, sha1, md5, sha384, sha512.
    #[arg(long = "digest-function", default_value = "sha256")]
    function: DigestFunction,
}

#[derive(Subcommand)]
enum Command {
    /// Check config files; prints each error with file, line, column and path in the tree.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the JSON Schema of config files.
    Schema,
    /// Upload files; prints HASH/SIZE of each on stdout, in order. Files are
    /// hashed in parallel and only the blobs the CAS lacks are sent (one
    /// FindMissingBlobs first); a summary goes to stderr unless --quiet.
    Put {
        #[arg(short, long)]
        config: PathBuf,
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Files sent at once (a `grpc` node batches small ones together).
        #[arg(short, long, default_value_t = 64, value_parser = at_least_one)]
        jobs: usize,
        #[command(flatten)]
        digest_function: FunctionArg,
    },
    /// Download a blob to a file (atomically) or to stdout.
    Get {
        #[arg(short, long)]
        config: PathBuf,
        /// HASH/SIZE
        digest: String,
        /// Output file; `-` or absent for stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        digest_function: FunctionArg,
    },
    /// Print the digests that are not stored, one a line.
    FindMissing {
        #[arg(short, long)]
        config: PathBuf,
        /// HASH/SIZE... ; none (or `-`) reads them from stdin, one a line.
        digests: Vec<String>,
        #[command(flatten)]
        digest_function: FunctionArg,
    },
    /// The main job on embedded defaults: a large blob read through a proxy that
    /// kills connections, once plainly (fails) and once resuming (succeeds).
    Demo {
        /// Size of the generated blob in MiB.
        #[arg(long, default_value_t = 256)]
        size_mib: u64,
        /// The proxy kills each connection after this long...
        #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration)]
        kill_every: std::time::Duration,
        /// ...or after this many MiB sent to the client, whichever comes first.
        #[arg(long, default_value_t = 64)]
        kill_after_mib: u64,
    },
    /// Download a REAPI Directory tree into OUTDIR: files (with their executable
    /// bits) and symlinks, verified, each written atomically.
    FetchTree {
        #[arg(short, long)]
        config: PathBuf,
        /// `HASH/SIZE` of the root `Directory` message.
        digest: String,
        /// Created if absent. After a failure it may hold part of the tree, but
        /// never a partially written file.
        outdir: PathBuf,
        /// Large files (over 1 MiB) and Directory messages downloaded at once;
        /// small files go 256 at a time (a `grpc` node batches them).
        #[arg(short, long, default_value_t = 8, value_parser = at_least_one)]
        jobs: usize,
        /// Also fsync each file before renaming it into place (slower); by
        /// default the filesystem is synced once at the end.
        #[arg(long)]
        fsync: bool,
        #[command(flatten)]
        digest_function: FunctionArg,
    },
    /// Serve a config's trees as a REAPI remote cache (ContentAddressableStorage,
    /// ByteStream, ActionCache, Capabilities) for Bazel and other build tools.
    Serve {
        /// Config of the trees to serve; an in-memory CAS and action cache when absent.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// `host:port` or `unix:/path`.
        #[arg(short, long)]
        listen: String,
        /// Also serve Prometheus metrics at `http://ADDR/metrics` (`host:port`).
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<String>,
        /// On SIGINT/SIGTERM, how long running transfers may go on before they are ended.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        shutdown_grace: std::time::Duration,
        /// On SIGINT/SIGTERM, first report NOT_SERVING on the grpc.health.v1 service
        /// and go on serving for this long, so load balancers drain this server.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        drain_delay: std::time::Duration,
        /// Serve action results but refuse uploads of new ones (PERMISSION_DENIED);
        /// the capabilities then tell clients not to upload.
        #[arg(long)]
        action_cache_read_only: bool,
        /// Require `authorization: Bearer TOKEN` on every call but health checks:
        /// FILE has one `read TOKEN` or `write TOKEN` a line (`#` comments), optionally
        /// followed by the instance-name prefixes it is limited to; re-read on SIGHUP.
        #[arg(long, value_name = "FILE")]
        auth_tokens: Option<PathBuf>,
        /// Serve a non-loopback TCP address without any authentication (no
        /// --auth-tokens): anyone who reaches it may read and write.
        #[arg(long)]
        allow_unauthenticated: bool,
        /// Serve TLS with this certificate chain (PEM); needs --tls-key. Re-read on SIGHUP.
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The private key (PEM) of --tls-cert.
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Mutual TLS: require client certificates signed by this CA (PEM).
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_client_ca: Option<PathBuf>,
        #[command(flatten)]
        limits: Box<cmd::serve::Limits>,
    },
}

/// A count such as `--jobs`: 1 or more.
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only for a person at a terminal, not in CI logs or files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("blob-access: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ui = progress::Ui::new(cli.quiet);
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Validate { files } => cmd::validate::run(&files),
            Command::Schema => cmd::validate::schema(),
            Command::Put {
                config,
                files,
                jobs,
                digest_function,
            } => cmd::transfer::put(&config, &files, jobs, digest_function.function, &ui).await,
            Command::Get {
                config,
                digest,
                output,
                digest_function,
            } => {
                let output = output.as_deref();
                let function = digest_function.function;
                cmd::transfer::get(&config, &digest, function, output, &ui).await
            }
            Command::FindMissing {
                config,
                digests,
                digest_function,
            } => cmd::transfer::find_missing(&config, &digests, digest_function.function).await,
            Command::Demo {
                size_mib,
                kill_every,
                kill_after_mib,
            } => {
                let opts = cmd::demo::DemoOptions {
                    size_mib,
                    every: kill_every,
                    bytes_mib: kill_after_mib,
                };
                cmd::demo::run(opts).await
            }
            Command::FetchTree {
                config,
                digest,
                outdir,
                jobs,
                fsync,
                digest_function,
            } => {
                let opts = cmd::fetch_tree::Options {
                    jobs,
                    fsync,
                    function: digest_function.function,
                };
                cmd::fetch_tree::run(&config, &digest, &outdir, opts, &ui).await
            }
            Command::Serve {
                config,
                listen,
                metrics_listen,
                shutdown_grace,
                drain_delay,
                action_cache_read_only,
                auth_tokens,
                allow_unauthenticated,
                tls_cert,
                tls_key,
                tls_client_ca,
                limits,
            } => {
                let opts = cmd::serve::ServeOptions {
                    listen,
                    metrics_listen,
                    shutdown_grace,
                    drain_delay,
                    action_cache_read_only,
                    auth_tokens,
                    allow_unauthenticated,
                    tls: tls_cert
                        .zip(tls_key)
                        .map(|(cert, key)| cmd::serve::TlsFiles {
                            cert,
                            key,
                            client_ca: tls_client_ca,
                        }),
                    limits: *limits,
                };
                cmd::serve::run(config.as_deref(), &opts).await
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("blob-access: {message}");
            ExitCode::FAILURE
        }
    }
}
