//! `serve --tls-cert/--tls-key [--tls-client-ca]` with a private CA made here
//! (rcgen): tonic clients and the CLI's own `grpc` node over TLS, a client
//! trusting another CA fails, mutual TLS refuses a client without (or with a
//! foreign) certificate, and serve's `-vv` log never holds a key or a token.

mod support;

use blob_access::proto::content_addressable_storage_client::ContentAddressableStorageClient;
use blob_access::proto::FindMissingBlobsRequest;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use std::path::{Path, PathBuf};
use support::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A CA and, signed by it, a server and a client certificate, as PEM files.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn pki(dir: &Path, name: &str) -> Pki {
    let ca = ca(&format!("{name} test CA"));
    let leaf = |sans: Vec<String>, usage: ExtendedKeyUsagePurpose, file: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, file);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca).unwrap();
        (
            write(dir, &format!("{name}-{file}.pem"), &cert.pem()),
            write(dir, &format!("{name}-{file}.key"), &key.serialize_pem()),
        )
    };
    let (server_cert, server_key) = leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
        "server",
    );
    let (client_cert, client_key) = leaf(vec![], ExtendedKeyUsagePurpose::ClientAuth, "client");
    Pki {
        ca: write(dir, &format!("{name}-ca.pem"), &ca.as_ref().pem()),
        server_cert,
        server_key,
        client_cert,
        client_key,
    }
}

/// A line from the middle of a PEM key: secret material that must not be logged.
fn key_material(key: &Path) -> String {
    std::fs::read_to_string(key)
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .to_string()
}

/// FindMissingBlobs over `https://127.0.0.1:PORT` trusting `ca`, with an optional
/// client identity and token; the error text on failure.
async fn call(
    port: u16,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    token: Option<&str>,
) -> Result<(), String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    let chain = |e: &dyn std::error::Error| {
        let mut text = e.to_string();
        let mut cur = e.source();
        while let Some(s) = cur {
            text = format!("{text}: {s}");
            cur = s.source();
        }
        text
    };
    let channel = Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| chain(&e))?;
    let mut req = tonic::Request::new(FindMissingBlobsRequest::default());
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    ContentAddressableStorageClient::new(channel)
        .find_missing_blobs(req)
        .await
        .map(|_| ())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

#[test]
fn tls_serves_clients_trusting_its_ca_and_fails_others() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (pki(dir.path(), "ours"), pki(dir.path(), "theirs"));
    let token = format!("tok-{}", uuid::Uuid::new_v4().simple());
    let tokens = write(dir.path(), "tokens", &format!("write {token}\n"));
    let serve = Serve::start_with(
        None,
        &[
            "-vv",
            "--tls-cert",
            ours.server_cert.to_str().unwrap(),
            "--tls-key",
            ours.server_key.to_str().unwrap(),
            "--auth-tokens",
            tokens.to_str().unwrap(),
        ],
    );
    assert!(serve.log().contains(" over TLS on "), "{}", serve.log());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        assert_eq!(call(serve.port, &ours.ca, None, Some(&token)).await, Ok(()));
        let err = call(serve.port, &ours.ca, None, None).await.unwrap_err();
        assert!(err.starts_with("Unauthenticated"), "{err}");
        let err = call(serve.port, &theirs.ca, None, Some(&token))
            .await
            .unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");
        // Plain HTTP/2 to a TLS port gets nowhere.
        let plain = async {
            let ch = Channel::from_shared(format!("http://127.0.0.1:{}", serve.port))
                .unwrap()
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            ContentAddressableStorageClient::new(ch)
                .find_missing_blobs(FindMissingBlobsRequest::default())
                .await
                .map(|_| ())
                .map_err(|s| s.to_string())
        };
        assert!(plain.await.is_err());
    });

    // What a user does: the CLI's grpc node, grpcs:// with `ca_file` and the token.
    let config = |name: &str, ca: &Path| {
        write(
            dir.path(),
            name,
            &format!(
                "grpc:\n  endpoint: grpcs://127.0.0.1:{}\n  instance_name: \"\"\n  ca_file: {}\n  headers:\n    authorization: \"Bearer {token}\"\n",
                serve.port,
                ca.display()
            ),
        )
    };
    let good = config("good.yaml", &ours.ca);
    let blob = random_file(dir.path(), 2 << 20);
    let digest = put_cli(&good, &blob);
    let out = dir.path().join("out");
    get_cli(&good, &digest, &out);
    assert!(files_equal(&blob, &out));
    let wrong = config("wrong.yaml", &theirs.ca);
    let failed = cli(&["get", "--config", wrong.to_str().unwrap(), &digest]);
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success(), "{err}");
    assert!(!err.contains(&token), "{err}");

    let log = serve.log();
    assert!(!log.contains(&token), "{log}");
    assert!(!log.contains(&key_material(&ours.server_key)), "{log}");
}

/// A call that failed on its connection, not with an answer of the service.
fn refused(err: &str) -> bool {
    ["transport error", "Cancelled", "Unavailable", "connection"]
        .iter()
        .any(|w| err.contains(w))
}

#[test]
fn mutual_tls_refuses_clients_without_a_certificate_from_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (pki(dir.path(), "ours"), pki(dir.path(), "theirs"));
    // Mutual TLS authenticates: a non-loopback address needs nothing more.
    let serve = Serve::start_on(
        "0.0.0.0:0",
        None,
        &[
            "-vv",
            "--tls-cert",
            ours.server_cert.to_str().unwrap(),
            "--tls-key",
            ours.server_key.to_str().unwrap(),
            "--tls-client-ca",
            ours.ca.to_str().unwrap(),
        ],
    );
    assert!(
        serve.log().contains(" over mutual TLS on "),
        "{}",
        serve.log()
    );
    assert!(!serve.log().contains("WITHOUT"), "{}", serve.log());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ours_id = Some((ours.client_cert.as_path(), ours.client_key.as_path()));
        assert_eq!(call(serve.port, &ours.ca, ours_id, None).await, Ok(()));
        let err = call(serve.port, &ours.ca, None, None).await.unwrap_err();
        // TLS 1.3: the server's refusal reaches the client with its first call,
        // as a broken connection (how it is worded depends on timing).
        assert!(refused(&err), "no certificate: {err}");
        let theirs_id = Some((theirs.client_cert.as_path(), theirs.client_key.as_path()));
        let err = call(serve.port, &ours.ca, theirs_id, None)
            .await
            .unwrap_err();
        assert!(refused(&err), "foreign certificate: {err}");
    });
    // What a user does: the CLI's grpc node with its own client certificate.
    let config = |name: &str, identity: Option<&Pki>| {
        let mut text = format!(
            "grpc:\n  endpoint: grpcs://127.0.0.1:{}\n  instance_name: \"\"\n  ca_file: {}\n",
            serve.port,
            ours.ca.display()
        );
        if let Some(p) = identity {
            text += &format!(
                "  tls_client_cert: {}\n  tls_client_key: {}\n",
                p.client_cert.display(),
                p.client_key.display()
            );
        }
        write(dir.path(), name, &text)
    };
    let blob = random_file(dir.path(), 1 << 20);
    let with_cert = config("with-cert.yaml", Some(&ours));
    let digest = put_cli(&with_cert, &blob);
    let out = dir.path().join("out");
    get_cli(&with_cert, &digest, &out);
    assert!(files_equal(&blob, &out));
    for (name, identity) in [("no-cert.yaml", None), ("foreign.yaml", Some(&theirs))] {
        let cfg = config(name, identity);
        let failed = cli(&["get", "--config", cfg.to_str().unwrap(), &digest]);
        let err = String::from_utf8_lossy(&failed.stderr);
        assert!(!failed.status.success(), "{name}: {err}");
        assert!(!err.contains(&key_material(&theirs.client_key)), "{err}");
    }

    let log = serve.log();
    assert!(log.contains("peer sent no certificates"), "{log}");
    assert!(
        log.contains("invalid peer certificate: UnknownIssuer"),
        "{log}"
    );
    for key in [&ours.server_key, &ours.client_key, &theirs.client_key] {
        // Keys are read by path; their contents never appear.
        assert!(!log.contains(&key_material(key)), "{log}");
    }
}

#[test]
fn a_bad_certificate_or_key_is_a_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let ours = pki(dir.path(), "ours");
    let garbage = write(dir.path(), "garbage.pem", "not a key\n");
    let out = cli(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        ours.server_cert.to_str().unwrap(),
        "--tls-key",
        garbage.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("TLS") && err.contains("garbage.pem"), "{err}");
    let out = cli(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        ours.server_cert.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "--tls-cert needs --tls-key");
}

/// Certificate rotation without a restart: SIGHUP re-reads the files; a bad
/// file keeps the certificate in force. A client that connects and never
/// starts its handshake holds up nobody.
#[test]
fn sighup_rereads_the_certificate_and_a_silent_client_blocks_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (pki(dir.path(), "old"), pki(dir.path(), "new"));
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(&old.server_cert, &cert).unwrap();
    std::fs::copy(&old.server_key, &key).unwrap();
    let serve = Serve::start_with(
        None,
        &[
            "-vv",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Connected, silent, for the whole test.
    let _silent = std::net::TcpStream::connect(("127.0.0.1", serve.port)).unwrap();
    assert_eq!(rt.block_on(call(serve.port, &old.ca, None, None)), Ok(()));

    std::fs::copy(&new.server_cert, &cert).unwrap();
    std::fs::copy(&new.server_key, &key).unwrap();
    serve.signal("HUP");
    serve.wait_for_log("SIGHUP: TLS certificates re-read");
    assert_eq!(rt.block_on(call(serve.port, &new.ca, None, None)), Ok(()));
    let err = rt
        .block_on(call(serve.port, &old.ca, None, None))
        .unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");

    std::fs::write(&key, "not a key\n").unwrap();
    serve.signal("HUP");
    serve.wait_for_log("keeping the previous TLS certificates");
    assert_eq!(rt.block_on(call(serve.port, &new.ca, None, None)), Ok(()));
    let log = serve.log();
    for k in [&old.server_key, &new.server_key] {
        assert!(!log.contains(&key_material(k)), "{log}");
    }
}
