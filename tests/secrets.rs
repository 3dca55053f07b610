//! Credentials out of config files: a `grpc` node's header value as
//! `{env: NAME}` or `{file: PATH}`, end to end through the CLI against
//! `serve --auth-tokens`; a `serve` proxy picks up a changed file; no secret in
//! any output at `-vv`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use support::*;

fn secret(what: &str) -> String {
    format!("{what}-{}", uuid::Uuid::new_v4().simple())
}

fn config(dir: &Path, name: &str, port: u16, value: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "grpc:\n  endpoint: grpc://127.0.0.1:{port}\n  instance_name: \"\"\n  headers:\n    authorization: {value}\n"
        ),
    )
    .unwrap();
    path
}

/// The CLI at `-vv` with `env` set; its stdout, stderr and whether it succeeded.
fn run(args: &[&str], env: &[(&str, &str)]) -> (String, String, bool) {
    let out = Command::new(bin())
        .arg("-vv")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

#[test]
fn header_values_from_the_environment_and_from_files() {
    let (writer, reader) = (secret("write"), secret("read"));
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("write {writer}\nread {reader}\n")).unwrap();
    let serve = Serve::start_with(None, &["-vv", "--auth-tokens", tokens.to_str().unwrap()]);
    let blob = random_file(dir.path(), 100_000);
    let mut outputs = String::new();

    // {env: NAME}
    let env_cfg = config(dir.path(), "env.yaml", serve.port, "{env: BA_TEST_TOKEN}");
    let bearer = format!("Bearer {writer}");
    let (digest, err, ok) = run(
        &[
            "put",
            "--config",
            env_cfg.to_str().unwrap(),
            blob.to_str().unwrap(),
        ],
        &[("BA_TEST_TOKEN", &bearer)],
    );
    assert!(ok, "{err}");
    outputs += &err;
    let digest = digest.trim().to_string();
    // Unset: a clear error naming the variable.
    let (_, err, ok) = run(
        &[
            "find-missing",
            "--config",
            env_cfg.to_str().unwrap(),
            &digest,
        ],
        &[],
    );
    assert!(!ok);
    assert!(
        err.contains("environment variable BA_TEST_TOKEN is not set"),
        "{err}"
    );

    // {file: PATH}, with the trailing newline a text editor leaves.
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("Bearer {reader}\n")).unwrap();
    let file_cfg = config(
        dir.path(),
        "file.yaml",
        serve.port,
        &format!("{{file: {}}}", token_file.display()),
    );
    let out = dir.path().join("out");
    let (_, err, ok) = run(
        &[
            "get",
            "--config",
            file_cfg.to_str().unwrap(),
            &digest,
            "-o",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(ok, "{err}");
    outputs += &err;
    assert!(files_equal(&blob, &out));
    // A read token from the file may not write.
    let other = random_file(dir.path(), 1000);
    let (_, err, ok) = run(
        &[
            "put",
            "--config",
            file_cfg.to_str().unwrap(),
            other.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!ok && err.contains("PermissionDenied"), "{err}");
    outputs += &err;
    let missing = dir.path().join("absent");
    let absent_cfg = config(
        dir.path(),
        "absent.yaml",
        serve.port,
        &format!("{{file: {}}}", missing.display()),
    );
    let (_, err, ok) = run(
        &[
            "find-missing",
            "--config",
            absent_cfg.to_str().unwrap(),
            &digest,
        ],
        &[],
    );
    assert!(
        !ok && err.contains("cannot read") && err.contains("absent"),
        "{err}"
    );

    // `validate` and the schema accept the forms.
    let (_, err, ok) = run(
        &[
            "validate",
            env_cfg.to_str().unwrap(),
            file_cfg.to_str().unwrap(),
        ],
        &[],
    );
    assert!(ok, "{err}");

    outputs += &serve.log();
    for s in [&writer, &reader] {
        assert!(
            !outputs.contains(s.as_str()),
            "a secret was printed:\n{outputs}"
        );
    }
}

/// A long-running `serve` proxy whose `grpc` node reads its token from a file
/// takes up a new token when the file changes, and keeps the last good one
/// while the file is missing.
#[test]
fn a_proxy_rereads_a_header_file_when_it_changes() {
    let (first, second) = (secret("first"), secret("second"));
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("write {first}\n")).unwrap();
    let upstream = Serve::start_with(None, &["-vv", "--auth-tokens", tokens.to_str().unwrap()]);
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("Bearer {first}\n")).unwrap();
    let proxy_cfg = config(
        dir.path(),
        "proxy.yaml",
        upstream.port,
        &format!("{{file: {}}}", token_file.display()),
    );
    let proxy = Serve::start_with(Some(&proxy_cfg), &["-vv"]);
    let client = grpc_config(dir.path(), "client.yaml", proxy.port);
    let find_missing = || {
        let absent = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae/3";
        run(
            &["find-missing", "--config", client.to_str().unwrap(), absent],
            &[],
        )
    };
    let (_, err, ok) = find_missing();
    assert!(ok, "{err}");

    // The upstream now wants the second token; the proxy's file still has the first.
    std::fs::write(&tokens, format!("write {second}\n")).unwrap();
    upstream.signal("HUP");
    upstream.wait_for_log("SIGHUP: 1 tokens");
    let (_, err, ok) = find_missing();
    assert!(!ok && err.contains("Unauthenticated"), "{err}");

    std::fs::write(&token_file, format!("Bearer {second}\n")).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, err, ok) = find_missing();
        if ok {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never re-read: {err}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // A file that disappears (a secret being rotated) keeps the last good value.
    std::fs::remove_file(&token_file).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let (_, err, ok) = find_missing();
    assert!(ok, "{err}");
    proxy.wait_for_log("keeping the previous header value");

    let log = upstream.log() + &proxy.log();
    for s in [&first, &second] {
        assert!(!log.contains(s.as_str()), "a secret was logged:\n{log}");
    }
}

/// Bazel's credential helper protocol on a `grpc` node: the helper's header
/// gets through `serve --auth-tokens`, it runs once per process, a failing
/// helper is a clear error naming it, and its token is in no output.
#[test]
fn headers_from_a_credential_helper() {
    use std::os::unix::fs::PermissionsExt;
    let writer = secret("write");
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("write {writer}\n")).unwrap();
    let serve = Serve::start_with(None, &["-vv", "--auth-tokens", tokens.to_str().unwrap()]);
    let helper = dir.path().join("helper");
    let runs = dir.path().join("runs");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\ncat >> {runs}\necho >> {runs}\nprintf '{{\"headers\": {{\"authorization\": [\"Bearer %s\"]}}}}' \"$CAS_TOKEN\"\n",
            runs = runs.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = dir.path().join("helper.yaml");
    std::fs::write(
        &cfg,
        format!(
            "grpc:\n  endpoint: grpc://127.0.0.1:{}\n  credential_helper: {}\n",
            serve.port,
            helper.display()
        ),
    )
    .unwrap();
    let blob = random_file(dir.path(), 300_000);
    let (digest, err, ok) = run(
        &[
            "put",
            "--config",
            cfg.to_str().unwrap(),
            blob.to_str().unwrap(),
        ],
        &[("CAS_TOKEN", &writer)],
    );
    assert!(ok, "{err}");
    let mut outputs = err;
    let out = dir.path().join("out");
    let (_, err, ok) = run(
        &[
            "get",
            "--config",
            cfg.to_str().unwrap(),
            digest.trim(),
            "-o",
            out.to_str().unwrap(),
        ],
        &[("CAS_TOKEN", &writer)],
    );
    assert!(ok, "{err}");
    outputs += &err;
    assert!(files_equal(&blob, &out));
    // It was asked about the endpoint, once per process.
    let asked = std::fs::read_to_string(&runs).unwrap();
    let uri = format!("{{\"uri\":\"grpc://127.0.0.1:{}\"}}", serve.port);
    assert_eq!(asked.lines().filter(|l| *l == uri).count(), 2, "{asked}");
    // A helper giving a wrong token: UNAUTHENTICATED, as with any header.
    let (_, err, ok) = run(
        &[
            "find-missing",
            "--config",
            cfg.to_str().unwrap(),
            digest.trim(),
        ],
        &[("CAS_TOKEN", "wrong")],
    );
    assert!(!ok && err.contains("Unauthenticated"), "{err}");
    // A helper that fails: the node cannot be built, the error names it.
    std::fs::write(
        &helper,
        "#!/bin/sh\necho 'please log in first' >&2\nexit 1\n",
    )
    .unwrap();
    let (_, err, ok) = run(
        &[
            "find-missing",
            "--config",
            cfg.to_str().unwrap(),
            digest.trim(),
        ],
        &[],
    );
    assert!(!ok, "{err}");
    assert!(
        err.contains("credential_helper") && err.contains("please log in first"),
        "{err}"
    );
    outputs += &serve.log();
    assert!(
        !outputs.contains(&writer),
        "a secret was printed:\n{outputs}"
    );
}
