//! A real Bazel (4.2.3) hashing with SHA-1 (`--host_jvm_args=
//! -Dbazel.DigestFunction=SHA1`) against `blob-access serve`: Bazel 4 sends
//! no digest function in its requests (REAPI 2.0), so serve must tell SHA-1
//! by the 40-character hashes, and advertise it, or Bazel stops at once with
//! "Cannot use hash function SHA1 with remote cache" (as it still does
//! against BuildGrid, which serves SHA-256 alone: the control).

mod support;

use blob_access::{Digest, DigestFunction};
use std::collections::BTreeMap;
use support::bazel::*;
use support::*;

const SHA1: &str = "--host_jvm_args=-Dbazel.DigestFunction=SHA1";

/// The refusal of a cache that does not list SHA-1 in its capabilities.
const REFUSED: &str = "Cannot use hash function SHA1 with remote cache";

/// Path (relative to bazel-bin) -> `HASH/SIZE` of what the spawns of `build`
/// produced, as the execution log gives them; every one must be SHA-1.
fn logged_sha1_outputs(build: &BuildSummary) -> BTreeMap<String, String> {
    let mut outputs = BTreeMap::new();
    for file in build.spawns.iter().flat_map(|s| &s.outputs) {
        assert_eq!(file.hash_function, "SHA-1", "{file:?}");
        assert_eq!(file.hash.len(), 40, "{file:?}");
        let name = file.path.rsplit("/bin/").next().unwrap().to_string();
        outputs.insert(name, format!("{}/{}", file.hash, file.size_bytes));
    }
    outputs
}

#[test]
fn sha1_bazel_gets_all_hits_from_serve() {
    if !real_bazel() {
        return;
    }
    // Writes named in the log (debug), and why an action result was not
    // served (info), for the assertions and for a failure's output.
    let log = "warn,blob_access_server::bytestream=debug,\
               blob_access_decorators::completeness_checking=info";
    let serve = Serve::start_env("127.0.0.1:0", None, &[], &[("RUST_LOG", log)]);
    let url = format!("grpc://127.0.0.1:{}", serve.port);
    let mut bazel = Bazel::new(&url).with_startup_options(&[SHA1]);
    let mut logged = BTreeMap::new();
    build_clean_build(
        &mut bazel,
        |_| {},
        |build| {
            let second = build();
            logged = logged_sha1_outputs(&second);
            assert!(!second.stderr.contains(REFUSED), "{}", second.stderr);
            second
        },
    );

    // Bazel hashed with SHA-1 (the log says so, and the small files' hashes
    // are ours), and the cache holds the outputs under those digests alone.
    let outputs = bazel.output_hashes();
    assert_eq!(
        logged.keys().collect::<Vec<_>>(),
        outputs.keys().collect::<Vec<_>>()
    );
    for (name, digest) in &logged {
        if name == "big.bin" {
            continue;
        }
        let data = std::fs::read(bazel.bazel_bin().join(name)).unwrap();
        let ours = Digest::of_with(DigestFunction::Sha1, &data);
        assert_eq!(&ours.to_string(), digest, "{name}");
    }
    let dir = tempfile::tempdir().unwrap();
    let config = grpc_config(dir.path(), "serve.yaml", serve.port);
    let config = config.to_str().unwrap();
    let mut args = vec![
        "find-missing",
        "--config",
        config,
        "--digest-function",
        "sha1",
    ];
    args.extend(logged.values().map(String::as_str));
    assert_eq!(cli_ok(&args), "", "outputs missing under SHA-1");
    let sha256: Vec<String> = outputs
        .iter()
        .map(|(name, hash)| {
            let size = std::fs::metadata(bazel.bazel_bin().join(name))
                .unwrap()
                .len();
            format!("{hash}/{size}")
        })
        .filter(|d| !d.ends_with("/0"))
        .collect();
    let mut args = vec!["find-missing", "--config", config];
    args.extend(sha256.iter().map(String::as_str));
    let missing = cli_ok(&args);
    assert_eq!(
        missing.lines().count(),
        sha256.len(),
        "SHA-256 digests of the outputs are stored: {missing}"
    );

    // serve saw SHA-1 names only, and served every result it had.
    let log = serve.log();
    let writes: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split("write resource=").nth(1))
        .collect();
    assert!(!writes.is_empty(), "no ByteStream write logged: {log}");
    for w in &writes {
        let hash = w.rsplit('/').nth(1).unwrap();
        assert_eq!(hash.len(), 40, "not a SHA-1 name: {w}");
    }
    assert!(
        !log.contains("not serving an incomplete action result"),
        "{log}"
    );
}

/// The control: the same Bazel against a cache that serves SHA-256 alone
/// fails before building, as it did against serve before SHA-1 was served.
#[test]
fn sha1_bazel_is_refused_by_a_sha256_only_cache() {
    if !real_bazel() {
        return;
    }
    let bg = start_buildgrid_with_action_cache();
    let url = format!("grpc://127.0.0.1:{}", bg.port);
    let mut bazel = Bazel::new(&url).with_startup_options(&[SHA1]);
    let build = bazel.build(&[]);
    assert!(!build.success(), "{}", build.stderr);
    assert!(build.stderr.contains(REFUSED), "{}", build.stderr);
    assert!(build.spawns.is_empty(), "{build:#?}");
}
