//! `serve` with tokens, and mutual TLS, reached by the clients users have:
//! BuildGrid's `bgd cas` (TLS, client certificates, `--auth-token`) and Bazel
//! 4.2.3 (`--remote_header`). The private CAs are made with `openssl`, as an
//! administrator would.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use support::bazel::{real_bazel, Bazel};
use support::*;

/// A CA and, signed by it, a server certificate for localhost and a client one.
struct Pki {
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl missing");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pki(dir: &Path, name: &str) -> Pki {
    let file = |f: &str| dir.join(format!("{name}-{f}"));
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (ca, ca_key) = (file("ca.pem"), file("ca.key"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name} test CA"),
            "-keyout",
            &s(&ca_key),
            "-out",
            &s(&ca),
        ],
    );
    let leaf = |leaf: &str, ext: &str| {
        let (cert, key, csr, extfile) = (
            file(&format!("{leaf}.pem")),
            file(&format!("{leaf}.key")),
            file(&format!("{leaf}.csr")),
            file(&format!("{leaf}.ext")),
        );
        std::fs::write(&extfile, ext).unwrap();
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={leaf}"),
                "-keyout",
                &s(&key),
                "-out",
                &s(&csr),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &s(&csr),
                "-CA",
                &s(&ca),
                "-CAkey",
                &s(&ca_key),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &s(&extfile),
                "-out",
                &s(&cert),
            ],
        );
        (cert, key)
    };
    Pki {
        server: leaf(
            "server",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        client: leaf("client", "extendedKeyUsage=clientAuth\n"),
        ca,
    }
}

/// `serve` over mutual TLS with a write and a read token.
fn serve_mtls(dir: &Path, pki: &Pki, writer: &str, reader: &str) -> Serve {
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, format!("write {writer}\nread {reader}\n")).unwrap();
    Serve::start_with(
        None,
        &[
            "-vv",
            "--tls-cert",
            pki.server.0.to_str().unwrap(),
            "--tls-key",
            pki.server.1.to_str().unwrap(),
            "--tls-client-ca",
            pki.ca.to_str().unwrap(),
            "--auth-tokens",
            tokens.to_str().unwrap(),
        ],
    )
}

fn secret(what: &str) -> String {
    format!("{what}-{}", uuid::Uuid::new_v4().simple())
}

/// `bgd cas` with TLS options; its combined output (bgd exits 0 on most failures).
fn bgd_cas(port: u16, tls: &[(&str, &Path)], token: Option<&Path>, args: &[&str]) -> String {
    let mut cmd = Command::new(bgd());
    cmd.args(["cas", "--remote", &format!("https://localhost:{port}")]);
    for (flag, path) in tls {
        cmd.arg(flag).arg(path);
    }
    if let Some(t) = token {
        cmd.arg("--auth-token").arg(t);
    }
    let out = cmd.args(args).output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn buildgrid_client_over_mutual_tls_with_tokens() {
    if !real_servers() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (pki(dir.path(), "ours"), pki(dir.path(), "theirs"));
    let (writer, reader) = (secret("write"), secret("read"));
    let serve = serve_mtls(dir.path(), &ours, &writer, &reader);
    let token = |name: &str, value: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, value).unwrap();
        p
    };
    let (w, r, wrong) = (
        token("w.tok", &writer),
        token("r.tok", &reader),
        token("x.tok", "not-a-token"),
    );
    let mtls = [
        ("--server-cert", ours.ca.as_path()),
        ("--client-cert", ours.client.0.as_path()),
        ("--client-key", ours.client.1.as_path()),
    ];
    let blob = random_file(dir.path(), 200_000);
    let mut outputs = String::new();

    let out = bgd_cas(
        serve.port,
        &mtls,
        Some(&w),
        &["upload-file", blob.to_str().unwrap()],
    );
    assert!(out.contains("Success: Pushed"), "{out}");
    let digest = out
        .split("digest=[")
        .nth(1)
        .and_then(|s| s.split(']').next())
        .unwrap()
        .to_string();
    outputs += &out;

    // A read token reads; what it reads is the blob.
    let copy = dir.path().join("copy");
    let out = bgd_cas(
        serve.port,
        &mtls,
        Some(&r),
        &["download-file", &digest, copy.to_str().unwrap()],
    );
    assert!(out.contains("Success: Pulled"), "{out}");
    assert!(files_equal(&blob, &copy));
    outputs += &out;

    // A read token that writes; no token; a wrong token.
    let other = random_file(dir.path(), 1000);
    let out = bgd_cas(
        serve.port,
        &mtls,
        Some(&r),
        &["upload-file", other.to_str().unwrap()],
    );
    assert!(out.contains("needs a write token"), "{out}");
    outputs += &out;
    // bgd refuses to write over a file, and writes none when refused.
    let never = dir.path().join("never");
    let fetch = ["download-file", &digest, never.to_str().unwrap()];
    let out = bgd_cas(serve.port, &mtls, None, &fetch);
    assert!(
        out.contains("UNAUTHENTICATED") && out.contains("needs a token"),
        "{out}"
    );
    let out = bgd_cas(serve.port, &mtls, Some(&wrong), &fetch);
    assert!(
        out.contains("UNAUTHENTICATED") && out.contains("not valid"),
        "{out}"
    );

    // No client certificate; a client certificate of another CA; a server
    // certificate checked against another CA.
    let out = bgd_cas(serve.port, &mtls[..1], Some(&r), &fetch);
    assert!(
        !out.contains("Success") && out.contains("UNAVAILABLE"),
        "{out}"
    );
    let foreign = [
        ("--server-cert", ours.ca.as_path()),
        ("--client-cert", theirs.client.0.as_path()),
        ("--client-key", theirs.client.1.as_path()),
    ];
    let out = bgd_cas(serve.port, &foreign, Some(&r), &fetch);
    assert!(!out.contains("Success"), "{out}");
    let wrong_ca = [
        ("--server-cert", theirs.ca.as_path()),
        ("--client-cert", ours.client.0.as_path()),
        ("--client-key", ours.client.1.as_path()),
    ];
    let out = bgd_cas(serve.port, &wrong_ca, Some(&r), &fetch);
    assert!(out.contains("CERTIFICATE_VERIFY_FAILED"), "{out}");

    outputs += &serve.log();
    for s in [&writer, &reader] {
        assert!(
            !outputs.contains(s.as_str()),
            "a token was printed:\n{outputs}"
        );
    }
}

/// Bazel with read and write tokens. Over plain gRPC on loopback: Debian's
/// Bazel 4.2.3 (bazel-bootstrap) cannot speak TLS at all (its Netty has no
/// ALPN on this JDK: "JDK provider does not support ALPN protocol", a crash
/// before any connection), so TLS is covered by `bgd` above.
#[test]
fn bazel_with_read_and_write_tokens() {
    if !real_bazel() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (writer, reader) = (secret("write"), secret("read"));
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("write {writer}\nread {reader}\n")).unwrap();
    let serve = Serve::start_with(None, &["-vv", "--auth-tokens", tokens.to_str().unwrap()]);
    let mut bazel = Bazel::new(&format!("grpc://127.0.0.1:{}", serve.port));
    let build = |bazel: &mut Bazel, token: Option<&str>, extra: &[&str]| {
        // A small "big" output: this test is about who may do what.
        let mut flags = vec!["--define=BIG_MIB=1".to_string()];
        if let Some(t) = token {
            flags.push(format!("--remote_header=authorization=Bearer {t}"));
        }
        flags.extend(extra.iter().map(|f| f.to_string()));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        bazel.build(&flags)
    };
    let first = build(&mut bazel, Some(&writer), &[]);
    assert!(first.success(), "{}", first.stderr);
    first.check_counts();
    assert_eq!(first.remote_cache_hits(), 0, "{first:#?}");
    let hashes = bazel.output_hashes();
    // The capabilities tell a read token's Bazel that it may not upload
    // results, and Bazel refuses to start a build that would.
    bazel.clean();
    let upload = build(&mut bazel, Some(&reader), &[]);
    assert!(!upload.success(), "{upload:#?}");
    assert!(
        upload.stderr.contains("not authorized to write"),
        "{}",
        upload.stderr
    );
    // A read token gets every result the writer stored.
    let second = build(
        &mut bazel,
        Some(&reader),
        &["--noremote_upload_local_results"],
    );
    assert!(second.success(), "{}", second.stderr);
    assert_eq!(second.executed(), 0, "not all hits: {second:#?}");
    assert_eq!(bazel.output_hashes(), hashes);
    // Without a token Bazel is refused, and says why.
    bazel.clean();
    let refused = build(&mut bazel, None, &[]);
    assert!(!refused.success(), "{refused:#?}");
    assert!(
        refused.stderr.contains("UNAUTHENTICATED"),
        "{}",
        refused.stderr
    );
    for s in [&writer, &reader] {
        assert!(
            !serve.log().contains(s.as_str()),
            "a token was printed by serve"
        );
    }
}
