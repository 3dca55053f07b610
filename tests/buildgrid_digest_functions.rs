//! BuildGrid 0.4.4 and the digest functions, through our `grpc` node.
//! BuildGrid hashes with SHA-256 alone: its function is fixed in
//! `buildgrid/server/settings.py` (`HASH = hashlib.sha256`, no config
//! option), its capabilities name SHA256 only, and it speaks REAPI 2.2, so
//! the `digest_function` fields of 2.3 requests are ignored and every hash is
//! judged as SHA-256 (BatchUpdateBlobs would answer "Data does not match
//! hash", ByteStream "Invalid digest [...]", and FindMissingBlobs of a BLAKE3
//! hash equal to a stored SHA-256 one "present"). So the `grpc` node reads the
//! capabilities first: SHA-256 round trips, and any other function is refused
//! before a call, naming the function and what the server lists.

mod support;

use blob_access::proto::capabilities_client::CapabilitiesClient;
use blob_access::proto::{digest_function, GetCapabilitiesRequest};
use blob_access::{Digest, DigestFunction};
use std::ffi::OsStr;
use std::path::Path;
use std::process::Output;
use support::*;

/// Under BuildGrid's batch limit (4 MiB - 1 KiB): BatchUpdateBlobs/BatchReadBlobs.
const SMALL: u64 = 1000;
/// Over it: ByteStream.
const BIG: u64 = (4 << 20) + 1;

/// `blob-access COMMAND --config CONFIG --digest-function FUNCTION ARGS...`.
fn run(command: &str, config: &Path, function: &str, args: &[&OsStr]) -> Output {
    let mut all: Vec<&OsStr> = vec![
        command.as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--digest-function".as_ref(),
        function.as_ref(),
    ];
    all.extend_from_slice(args);
    cli(&all)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn digest_of(function: DigestFunction, file: &Path) -> String {
    Digest::of_with(function, &std::fs::read(file).unwrap()).to_string()
}

#[test]
fn buildgrid_advertises_sha256_alone() {
    if !real_servers() {
        return;
    }
    let bg = BuildGrid::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let caps = rt.block_on(async {
        let mut client = CapabilitiesClient::new(channel(bg.port).await);
        let req = GetCapabilitiesRequest {
            instance_name: String::new(),
        };
        client.get_capabilities(req).await.unwrap().into_inner()
    });
    let cache = caps.cache_capabilities.unwrap();
    let sha256 = digest_function::Value::Sha256 as i32;
    assert_eq!(cache.digest_functions, vec![sha256]);
    let high = caps.high_api_version.unwrap();
    assert_eq!((high.major, high.minor), (2, 2), "{high:?}");
}

#[test]
fn sha256_named_explicitly_round_trips() {
    if !real_servers() {
        return;
    }
    let bg = BuildGrid::start();
    let dir = tempfile::tempdir().unwrap();
    let config = grpc_config(dir.path(), "bg.yaml", bg.port);
    for size in [SMALL, BIG] {
        let file = random_file(dir.path(), size);
        let put = run("put", &config, "sha256", &[file.as_os_str()]);
        assert!(put.status.success(), "{}", stderr(&put));
        let digest = String::from_utf8(put.stdout).unwrap().trim().to_string();
        assert_eq!(digest, digest_of(DigestFunction::Sha256, &file));
        let found = run("find-missing", &config, "sha256", &[digest.as_ref()]);
        assert!(found.status.success(), "{}", stderr(&found));
        assert_eq!(String::from_utf8_lossy(&found.stdout), "", "size {size}");
        let out = dir.path().join(format!("out-{size}"));
        let args = [digest.as_ref(), "-o".as_ref(), out.as_os_str()];
        let got = run("get", &config, "sha256", &args);
        assert!(got.status.success(), "{}", stderr(&got));
        assert!(files_equal(&file, &out), "size {size}");
    }
}

#[test]
fn other_functions_are_refused_naming_the_function_and_the_blob() {
    if !real_servers() {
        return;
    }
    let bg = BuildGrid::start();
    let dir = tempfile::tempdir().unwrap();
    let config = grpc_config(dir.path(), "bg.yaml", bg.port);
    let small = random_file(dir.path(), SMALL);
    let big = random_file(dir.path(), BIG);
    let others = DigestFunction::ALL
        .into_iter()
        .filter(|&f| f != DigestFunction::Sha256);
    for function in others {
        let name = function.name();
        let refusal = format!(
            "the server does not serve digest function {name} (its capabilities list SHA256)"
        );
        for file in [&small, &big] {
            let digest = digest_of(function, file);
            let put = run("put", &config, name, &[file.as_os_str()]);
            let err = stderr(&put);
            assert!(!put.status.success(), "{name} {digest} was stored: {err}");
            assert!(
                err.contains("InvalidArgument") && err.contains(&digest) && err.contains(&refusal),
                "{name}: {err}"
            );
            // Not answered "missing" (or "present") by a server that would
            // judge the hash as SHA-256: refused the same way.
            let found = run("find-missing", &config, name, &[digest.as_ref()]);
            assert!(!found.status.success());
            assert!(stderr(&found).contains(&refusal), "{}", stderr(&found));
            let out = dir.path().join(format!("{name}.out"));
            let args = [digest.as_ref(), "-o".as_ref(), out.as_os_str()];
            let got = run("get", &config, name, &args);
            let err = stderr(&got);
            assert!(!got.status.success(), "{name}: read {digest}");
            assert!(
                err.contains(&digest) && err.contains(&refusal),
                "{name}: {err}"
            );
            assert!(!out.exists(), "a failed read left {}", out.display());
        }
        // A hash of another length than the function's is refused here,
        // before any call, naming the function.
        if function.hex_len() != 64 {
            let sha256 = digest_of(DigestFunction::Sha256, &small);
            let found = run("find-missing", &config, name, &[sha256.as_ref()]);
            let err = stderr(&found);
            assert!(!found.status.success());
            let expected = format!("a {name} hash has {}", function.hex_len());
            assert!(err.contains(&expected), "{err}");
        }
    }
}

/// BuildGrid ignores the digest function of a request: a BLAKE3 read of the
/// hash of a stored SHA-256 blob would get that blob, and FindMissingBlobs
/// would call it present. Both are refused before any call.
#[test]
fn a_blake3_read_of_a_stored_sha256_hash_is_refused() {
    if !real_servers() {
        return;
    }
    let bg = BuildGrid::start();
    let dir = tempfile::tempdir().unwrap();
    let config = grpc_config(dir.path(), "bg.yaml", bg.port);
    let refusal = "does not serve digest function blake3";
    for size in [SMALL, BIG] {
        let file = random_file(dir.path(), size);
        let digest = put_cli(&config, &file);
        let out = dir.path().join(format!("blake3-{size}"));
        let args = [digest.as_ref(), "-o".as_ref(), out.as_os_str()];
        let got = run("get", &config, "blake3", &args);
        let err = stderr(&got);
        assert!(!got.status.success(), "size {size}: {err}");
        assert!(err.contains(&digest) && err.contains(refusal), "{err}");
        assert!(!out.exists(), "a refused read left {}", out.display());
        let found = run("find-missing", &config, "blake3", &[digest.as_ref()]);
        assert!(!found.status.success(), "called present");
        assert!(stderr(&found).contains(refusal), "{}", stderr(&found));
    }
}
