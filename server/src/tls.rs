//! TLS for [`super::serve_tcp`] whose certificate, key and client CA can be
//! re-read while serving ([`ServerTls::reload`], e.g. on SIGHUP): connections
//! accepted afterwards use the new files, running ones keep theirs.
//!
//! Handshakes run concurrently, each with a time limit, so a client that
//! connects and sends nothing holds up nobody else.

use blob_access::{Error, Result};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore};
use tokio_rustls::TlsAcceptor;

/// How long a client may take to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A server certificate chain and key (PEM files), and optionally the CA
/// (PEM) whose certificates clients must present (mutual TLS).
#[derive(Clone)]
pub struct ServerTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    acceptor: Arc<RwLock<TlsAcceptor>>,
}

/// Paths only: never the key.
impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("client_ca", &self.client_ca)
            .finish()
    }
}

impl ServerTls {
    /// Reads and checks the files now: a bad one is an error here rather than
    /// failed handshakes later. Errors name the file, never its contents.
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<ServerTls> {
        let (cert, key, client_ca) = (
            cert.to_path_buf(),
            key.to_path_buf(),
            client_ca.map(Path::to_path_buf),
        );
        let acceptor = acceptor(&cert, &key, client_ca.as_deref())?;
        Ok(ServerTls {
            cert,
            key,
            client_ca,
            acceptor: Arc::new(RwLock::new(acceptor)),
        })
    }

    /// Re-reads the files; on an error the previous ones stay in force.
    pub fn reload(&self) -> Result<()> {
        let new = acceptor(&self.cert, &self.key, self.client_ca.as_deref())?;
        *self.acceptor.write().unwrap_or_else(|e| e.into_inner()) = new;
        Ok(())
    }

    /// Whether clients must present a certificate signed by the client CA.
    pub fn requires_client_certificates(&self) -> bool {
        self.client_ca.is_some()
    }

    fn current(&self) -> TlsAcceptor {
        self.acceptor
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn read(what: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        Error::invalid_argument(format!("TLS {what}: cannot read {}: {e}", path.display()))
    })
}

fn certificates(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bad =
        |why: String| Error::invalid_argument(format!("TLS {what} {}: {why}", path.display()));
    let certs = CertificateDer::pem_slice_iter(&read(what, path)?)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    Ok(certs)
}

fn acceptor(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates("certificate", cert)?;
    // The parser's error could quote the file: say only which file is wrong.
    let key_der = PrivateKeyDer::from_pem_slice(&read("key", key)?).map_err(|_| {
        Error::invalid_argument(format!(
            "TLS key {}: holds no PEM private key",
            key.display()
        ))
    })?;
    let tls_error = |e: rustls::Error| Error::invalid_argument(format!("TLS: {e}"));
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certificates("client CA", ca)? {
                roots.add(c).map_err(|e| {
                    Error::invalid_argument(format!("TLS client CA {}: {e}", ca.display()))
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| {
                    Error::invalid_argument(format!("TLS client CA {}: {e}", ca.display()))
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key_der).map_err(|e| {
        Error::invalid_argument(format!(
            "TLS certificate {} and key {}: {e}",
            cert.display(),
            key.display()
        ))
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// TLS connections accepted on `listener`, each handshake on its own task.
/// Accepting stops when the stream is dropped.
pub(super) fn incoming(
    listener: tokio::net::TcpListener,
    tls: ServerTls,
) -> impl futures::Stream<Item = std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>>
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => break,
                r = listener.accept() => r,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // E.g. out of file descriptors: wait rather than spin.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (tls.current(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
