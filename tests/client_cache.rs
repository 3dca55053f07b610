//! `examples/client-cache.yaml` against a real BuildGrid: a blob read once is
//! served from the disk tier after BuildGrid is gone, and failures show up in
//! the error_logging output naming the blob.

mod support;

use support::*;

#[test]
fn client_cache_serves_from_disk_once_the_remote_is_gone() {
    if !real_servers() {
        return;
    }
    let bg = BuildGrid::start();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let example = std::fs::read_to_string(root().join("examples/client-cache.yaml")).unwrap();
    let yaml = example
        .replace(
            "grpc://127.0.0.1:8980",
            &format!("grpc://127.0.0.1:{}", bg.port),
        )
        .replace("/tmp/blob-access-cache", cache.to_str().unwrap());
    assert_ne!(yaml, example, "the example's endpoint or path changed");
    let config_path = dir.path().join("client-cache.yaml");
    std::fs::write(&config_path, yaml).unwrap();
    let config = config_path.to_str().unwrap();

    let file = random_file(dir.path(), 20 << 20);
    let direct = grpc_config(dir.path(), "direct.yaml", bg.port);
    let digest = put_cli(&direct, &file);
    let digest = digest.as_str();

    // First read: from BuildGrid, copied into the disk tier on the way.
    let first = dir.path().join("first");
    get_cli(&config_path, digest, &first);
    assert!(files_equal(&file, &first));
    let (hash, size) = digest.split_once('/').unwrap();
    let on_disk = cache.join(format!("objects/sha256/{}/{hash}-{size}", &hash[..2]));
    assert!(files_equal(&file, &on_disk), "not cached at {on_disk:?}");

    // A blob BuildGrid does not have: NOT_FOUND, named, and logged by
    // error_logging (at info level, hence -v) with the node's path.
    let missing = format!("{}/5", "ab".repeat(32));
    let out = cli(&["get", "-v", "--config", config, &missing]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&missing) || err.contains(&"ab".repeat(32)),
        "{err}"
    );
    assert!(
        err.contains("not found") || err.contains("NotFound"),
        "{err}"
    );
    let logged = err
        .lines()
        .find(|l| l.contains("error_logging") && l.contains(&"ab".repeat(32)));
    assert!(logged.is_some(), "no error_logging line in: {err}");
    eprintln!("missing blob:\n{err}");

    // BuildGrid gone: the cached blob is still served, verified, from disk.
    bg.stop();
    let second = dir.path().join("second");
    get_cli(&config_path, digest, &second);
    assert!(files_equal(&file, &second));

    // An uncached blob now fails, naming the blob, and leaves no file.
    let third = dir.path().join("third");
    let out = cli(&[
        "get",
        "--config",
        config,
        &missing,
        "-o",
        third.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&"ab".repeat(32)), "{err}");
    assert!(!third.exists());
}
