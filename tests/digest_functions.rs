//! Every REAPI digest function end to end through the CLI and `serve`:
//! hashes as the reference tools print them, one blob under two functions
//! kept apart, BLAKE3 resumed through cuts with zstd, a mixed tree with two
//! functions at once, and the bad inputs each as a clear error.

mod support;

use blob_access::DigestFunction;
use blob_access_chaos::{Faults, Kill, Proxy};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::{cli, cli_ok, files_equal, grpc_config, random_file, Serve};

/// A config file of one `disk` node storing in `dir/store`: (config, store).
fn disk_config(dir: &Path, store: &str) -> (PathBuf, PathBuf) {
    let (config, store) = (dir.join(format!("{store}.yaml")), dir.join(store));
    let yaml = format!(
        "disk: {{path: {}, max_size_bytes: 1GiB}}\n",
        store.display()
    );
    std::fs::write(&config, yaml).unwrap();
    (config, store)
}

fn put(config: &Path, function: &str, file: &Path) -> String {
    let args: [&OsStr; 6] = [
        "put".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--digest-function".as_ref(),
        function.as_ref(),
        file.as_os_str(),
    ];
    cli_ok(&args).trim().to_string()
}

/// `get -v` (its summary, with the resumptions, on stderr).
fn get(config: &Path, function: &str, digest: &str, out: &Path) -> std::process::Output {
    let args: [&OsStr; 9] = [
        "-v".as_ref(),
        "get".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--digest-function".as_ref(),
        function.as_ref(),
        digest.as_ref(),
        "-o".as_ref(),
        out.as_os_str(),
    ];
    cli(&args)
}

fn find_missing(config: &Path, function: &str, digest: &str) -> String {
    let args: [&OsStr; 6] = [
        "find-missing".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--digest-function".as_ref(),
        function.as_ref(),
        digest.as_ref(),
    ];
    cli_ok(&args).trim().to_string()
}

/// The hash the reference tool prints for `file` (b3sum for BLAKE3, the
/// coreutils for the others), or `None` when it is not installed.
fn reference_hash(function: DigestFunction, file: &Path) -> Option<String> {
    let tool = match function {
        DigestFunction::Blake3 => "b3sum",
        DigestFunction::Sha256 => "sha256sum",
        DigestFunction::Sha1 => "sha1sum",
        DigestFunction::Md5 => "md5sum",
        DigestFunction::Sha384 => "sha384sum",
        DigestFunction::Sha512 => "sha512sum",
    };
    let out = Command::new(tool).arg(file).output().ok()?;
    assert!(out.status.success(), "{tool} failed");
    let text = String::from_utf8(out.stdout).unwrap();
    Some(text.split_whitespace().next().unwrap().to_string())
}

#[test]
fn every_function_round_trips_through_serve_and_hashes_as_the_reference_tools() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(None);
    let config = grpc_config(dir.path(), "serve.yaml", serve.port);
    // 3 MiB: BLAKE3's multi-threaded path, and ByteStream rather than a batch.
    let big = random_file(dir.path(), 3 << 20);
    let small = dir.path().join("small");
    std::fs::write(&small, b"hello, digest functions").unwrap();
    let have_b3sum = support::installed(
        "b3sum",
        Command::new("b3sum").arg("--version").output().is_ok(),
    );
    for function in DigestFunction::ALL {
        let name = function.name();
        for file in [&big, &small] {
            let digest = put(&config, name, file);
            let (hash, size) = digest.split_once('/').unwrap();
            assert_eq!(hash.len(), function.hex_len(), "{name}: {digest}");
            assert_eq!(size, std::fs::metadata(file).unwrap().len().to_string());
            match reference_hash(function, file) {
                Some(reference) => assert_eq!(hash, reference, "{name}"),
                None => assert!(function == DigestFunction::Blake3 && !have_b3sum),
            }
            let out = dir.path().join(format!("{name}.out"));
            let got = get(&config, name, &digest, &out);
            assert!(
                got.status.success(),
                "{}",
                String::from_utf8_lossy(&got.stderr)
            );
            assert!(files_equal(file, &out), "{name}");
            assert_eq!(find_missing(&config, name, &digest), "");
        }
    }
}

#[test]
fn one_blob_under_two_functions_is_two_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, store) = disk_config(dir.path(), "store");
    let file = random_file(dir.path(), 100_000);
    let sha256 = put(&disk, "sha256", &file);
    // The BLAKE3 digest of the same bytes is not stored until put under it.
    let bytes = std::fs::read(&file).unwrap();
    let blake3 = blob_access::Digest::of_with(DigestFunction::Blake3, &bytes).to_string();
    assert_eq!(sha256, blob_access::Digest::of(&bytes).to_string());
    assert_eq!(find_missing(&disk, "blake3", &blake3), blake3);
    // A 64-character hash read as BLAKE3 names another blob than as SHA-256.
    let (sha_hash, size) = sha256.split_once('/').unwrap();
    assert_eq!(find_missing(&disk, "blake3", &sha256), sha256);
    assert_eq!(find_missing(&disk, "sha256", &sha256), "");
    assert_eq!(put(&disk, "blake3", &file), blake3);
    assert_eq!(find_missing(&disk, "blake3", &blake3), "");
    for (function, digest) in [("sha256", &sha256), ("blake3", &blake3)] {
        let out = dir.path().join(function);
        let got = get(&disk, function, digest, &out);
        assert!(
            got.status.success(),
            "{}",
            String::from_utf8_lossy(&got.stderr)
        );
        assert!(files_equal(&file, &out));
    }
    // Kept apart on disk: one directory per function, as documented.
    for function in ["sha256", "blake3"] {
        assert!(store.join("objects").join(function).is_dir(), "{function}");
    }
    let sha_file = store
        .join("objects/sha256")
        .join(&sha_hash[..2])
        .join(format!("{sha_hash}-{size}"));
    assert!(sha_file.is_file(), "{}", sha_file.display());
}

#[test]
fn blake3_resumes_through_cuts_with_zstd_into_a_mixed_tree() {
    let dir = tempfile::tempdir().unwrap();
    // serve keeps blobs on disk; the client reads through a proxy cutting
    // every connection, with zstd, into a read_caching tree with a disk tier.
    let (serve_config, store) = disk_config(dir.path(), "serve-store");
    let serve = Serve::start(Some(&serve_config));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cuts = Faults {
        after_bytes: Some(8 << 20),
        ..Faults::time(Kill::Rst, Duration::from_millis(100))
    };
    let proxy = rt
        .block_on(Proxy::start(
            ([127, 0, 0, 1], serve.port).into(),
            Some(cuts),
        ))
        .unwrap();
    let fast = dir.path().join("fast");
    let config = dir.path().join("client.yaml");
    std::fs::write(
        &config,
        format!(
            "read_caching:\n  fast: {{disk: {{path: {}, max_size_bytes: 1GiB}}}}\n  slow:\n    resumable_grpc:\n      grpc: {{endpoint: \"grpc://{}\", instance_name: \"\", compression: zstd}}\n      max_attempts_without_progress: 10\n",
            fast.display(),
            proxy.addr
        ),
    )
    .unwrap();
    let file = random_file(dir.path(), 64 << 20);
    let sha256 = put(&config, "sha256", &file);
    let blake3 = put(&config, "blake3", &file);
    let kills = proxy.kills.load(std::sync::atomic::Ordering::Relaxed);
    assert!(kills >= 1, "no connection was cut during the uploads");
    // Read from serve (not the local tier): a fresh client tier.
    std::fs::remove_dir_all(&fast).unwrap();
    for (function, digest) in [("blake3", &blake3), ("sha256", &sha256)] {
        let out = dir.path().join(function);
        let got = get(&config, function, digest, &out);
        let log = String::from_utf8_lossy(&got.stderr);
        assert!(got.status.success(), "{log}");
        assert!(files_equal(&file, &out), "{function}");
        let resumptions = support::logged_resumptions(&log);
        eprintln!("{function}: {resumptions} resumptions");
        assert!(resumptions >= 1, "{function} read never cut: {log}");
    }
    // serve's disk holds both, each under its function.
    for function in ["sha256", "blake3"] {
        assert!(store.join("objects").join(function).is_dir(), "{function}");
    }
}

#[test]
fn bad_functions_and_hashes_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(None);
    let config = grpc_config(dir.path(), "serve.yaml", serve.port);
    let out = dir.path().join("out");
    // An unknown name: the flag lists the names.
    let sha = blob_access::Digest::of(b"x").to_string();
    let got = get(&config, "blake2", &sha, &out);
    let err = String::from_utf8_lossy(&got.stderr);
    assert!(!got.status.success());
    assert!(
        err.contains("sha256, sha1, md5, sha384, sha512, blake3"),
        "{err}"
    );
    // A hash of the wrong length for the named function, on every command.
    let got = get(&config, "sha1", &sha, &out);
    let err = String::from_utf8_lossy(&got.stderr);
    assert!(!got.status.success());
    assert!(err.contains("a sha1 hash has 40"), "{err}");
    let args: [&OsStr; 6] = [
        "find-missing".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--digest-function".as_ref(),
        "sha512".as_ref(),
        sha.as_ref(),
    ];
    let err = String::from_utf8_lossy(&cli(&args).stderr).to_string();
    assert!(err.contains("a sha512 hash has 128"), "{err}");
    assert!(!out.exists());
}

/// A tree whose every digest is BLAKE3 (files, a subdirectory, the root),
/// fetched with `fetch-tree --digest-function blake3`; read as SHA-256 the
/// same root is a digest nobody stored.
#[test]
fn fetch_tree_walks_a_blake3_tree() {
    use blob_access::proto::{Directory, DirectoryNode, FileNode};
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let (disk, _) = disk_config(dir.path(), "store");
    let big = random_file(dir.path(), 2 << 20);
    let small = dir.path().join("small");
    std::fs::write(&small, b"small").unwrap();
    let proto = |digest: &str| {
        let d = blob_access::Digest::parse_with(DigestFunction::Blake3, digest).unwrap();
        Some(d.to_proto())
    };
    let file = |name: &str, path: &Path| FileNode {
        name: name.into(),
        digest: proto(&put(&disk, "blake3", path)),
        is_executable: false,
        ..Default::default()
    };
    let sub = Directory {
        files: vec![file("small", &small)],
        ..Default::default()
    };
    let sub_path = dir.path().join("sub.dir");
    std::fs::write(&sub_path, sub.encode_to_vec()).unwrap();
    let root = Directory {
        files: vec![file("big", &big)],
        directories: vec![DirectoryNode {
            name: "sub".into(),
            digest: proto(&put(&disk, "blake3", &sub_path)),
        }],
        ..Default::default()
    };
    let root_path = dir.path().join("root.dir");
    std::fs::write(&root_path, root.encode_to_vec()).unwrap();
    let root_digest = put(&disk, "blake3", &root_path);
    let out = dir.path().join("out");
    let fetch = |function: &str| {
        let args: [&OsStr; 7] = [
            "fetch-tree".as_ref(),
            "--config".as_ref(),
            disk.as_os_str(),
            "--digest-function".as_ref(),
            function.as_ref(),
            root_digest.as_ref(),
            out.as_os_str(),
        ];
        cli(&args)
    };
    let got = fetch("blake3");
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert!(files_equal(&big, &out.join("big")));
    assert!(files_equal(&small, &out.join("sub/small")));
    let got = fetch("sha256");
    let err = String::from_utf8_lossy(&got.stderr);
    assert!(!got.status.success() && err.contains(&root_digest), "{err}");
}
