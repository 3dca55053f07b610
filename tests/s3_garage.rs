//! The `s3` node on a real three-node Garage cluster (replication factor 3):
//! round trips of every size class (one PUT, multipart), find_missing, action
//! results per instance, a node down, two nodes down; reads and uploads
//! through a proxy that cuts every connection; wrong keys, a missing bucket,
//! objects truncated, corrupted or replaced under a resumed read; and no
//! multipart upload left behind by a failed or dropped upload.

mod support;

use blob_access::config_types::ByteSize;
use blob_access::grpc::HeaderValue;
use blob_access::{util, BlobAccess, BuildContext, BuildNode, Code, Digest, ReadRange};
use blob_access_chaos::{Faults, Kill, Proxy};
use blob_access_s3::{S3ActionCache, S3BlobAccess, S3Config};
use bytes::Bytes;
use futures::StreamExt;
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::{real_garage, Garage};

const MIB: usize = 1 << 20;

fn config(g: &Garage, endpoint: &str) -> S3Config {
    let mut c = S3Config::new("blob-access")
        .with_endpoint(endpoint)
        .with_region("garage");
    c.access_key_id = Some(HeaderValue::Literal(g.var("AWS_ACCESS_KEY_ID")));
    c.secret_access_key = Some(HeaderValue::Literal(g.var("AWS_SECRET_ACCESS_KEY")));
    c.part_size = ByteSize(5 << 20);
    c.initial_backoff = blob_access::config_types::Duration::from_millis(20);
    c
}

fn node(c: &S3Config) -> S3BlobAccess {
    S3BlobAccess::new("s3", c).unwrap()
}

/// Deterministic bytes that do not compress (xorshift).
fn blob(size: usize, seed: u64) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(size);
    out.into()
}

async fn put(n: &dyn BlobAccess, data: &Bytes) -> Digest {
    let d = Digest::of(data);
    n.put(&d, util::chunked(data.clone(), 64 * 1024))
        .await
        .unwrap();
    d
}

async fn read(n: &dyn BlobAccess, d: &Digest, range: ReadRange) -> blob_access::Result<Bytes> {
    util::read_to_bytes(n, d, range, 1 << 30).await
}

/// `aws s3api put-object` of `data` under `key`: an object this node did not write.
fn put_object(g: &Garage, key: &str, data: &[u8]) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), data).unwrap();
    let body = file.path().to_str().unwrap();
    let out = g.aws(&[
        "s3api",
        "put-object",
        "--bucket",
        "blob-access",
        "--key",
        key,
        "--body",
        body,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn cas_key(d: &Digest) -> String {
    format!("cas/sha256/{}-{}", d.hash(), d.size_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_trips_and_a_node_down() {
    if !real_garage() {
        return;
    }
    let g = Garage::start();
    let c = config(&g, &g.endpoint(1));
    // Built as a config file builds it: the bucket is checked first.
    let built = c.build(&BuildContext::root().child("s3")).unwrap();
    let n = node(&c);
    let sizes = [0, 1, 5 * MIB - 1, 5 * MIB, 5 * MIB + 1, 23 * MIB];
    let mut stored = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let data = blob(size, i as u64);
        let d = put(&n, &data).await;
        assert_eq!(
            read(&*built, &d, ReadRange::FULL).await.unwrap(),
            data,
            "{size}"
        );
        if size > 2000 {
            let part = read(&n, &d, ReadRange::new(7, Some(1000))).await.unwrap();
            assert_eq!(part, data.slice(7..1007));
        }
        stored.push(d);
    }
    assert_eq!(n.counter("multipart_uploads"), 2, "5MiB+1 and 23MiB");
    assert_eq!(n.counter("parts"), 2 + 5);

    // Stored blobs are not sent again.
    put(&n, &blob(23 * MIB, 5)).await;
    assert_eq!(n.counter("already_stored"), 1);
    assert_eq!(n.counter("multipart_uploads"), 2);

    // An upload whose bytes are not the digest's: refused, nothing visible or left.
    let claimed = Digest::of(&blob(12 * MIB, 77));
    let e = n
        .put(&claimed, util::chunked(blob(12 * MIB, 78), 64 * 1024))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e}");
    assert!(e.to_string().contains(&claimed.to_string()), "{e}");
    assert_eq!(
        n.find_missing(std::slice::from_ref(&claimed))
            .await
            .unwrap(),
        vec![claimed]
    );
    assert_eq!(g.open_multipart_uploads(), 0);

    // find_missing of 1,000 digests, 6 of them stored: the others, in order.
    let mut asked: Vec<Digest> = (0..994)
        .map(|i| Digest::of(format!("absent {i}").as_bytes()))
        .collect();
    let absent = asked.clone();
    for (i, d) in stored.iter().enumerate() {
        asked.insert(i * 150, d.clone());
    }
    let started = std::time::Instant::now();
    assert_eq!(n.find_missing(&asked).await.unwrap(), absent);
    eprintln!("find_missing of 1,000 digests: {:?}", started.elapsed());

    // Action results, per instance.
    let ac = S3ActionCache::new("s3-ac", &c).unwrap();
    use blob_access::action_cache::{ActionCache, ActionResult};
    let action = Digest::of(b"an action");
    let team = action.with_instance_name("team/x");
    assert_eq!(
        ac.get_action_result(&action).await.unwrap_err().code(),
        Code::NotFound
    );
    let result = |code| ActionResult {
        exit_code: code,
        ..Default::default()
    };
    ac.update_action_result(&action, &result(1)).await.unwrap();
    ac.update_action_result(&team, &result(2)).await.unwrap();
    assert_eq!(ac.get_action_result(&action).await.unwrap(), result(1));
    assert_eq!(ac.get_action_result(&team).await.unwrap(), result(2));

    // One node of three down: quorum holds, reads and writes go on.
    g.stop_node(3);
    let data = blob(12 * MIB, 100);
    let d = put(&n, &data).await;
    assert_eq!(read(&n, &d, ReadRange::FULL).await.unwrap(), data);
    assert_eq!(
        read(&n, &stored[5], ReadRange::FULL).await.unwrap().len(),
        23 * MIB
    );
    ac.update_action_result(&action, &result(3)).await.unwrap();

    // Two down: no quorum. A clear error naming the node and the blob.
    g.stop_node(2);
    let started = std::time::Instant::now();
    let data = blob(MIB, 101);
    let d = Digest::of(&data);
    let e = n.put(&d, util::once(data)).await.unwrap_err();
    eprintln!("put with two nodes down: {:?}: {e}", started.elapsed());
    assert!(
        e.to_string().contains("s3") && e.to_string().contains(&d.to_string()),
        "{e}"
    );
    assert!(matches!(e.code(), Code::Unavailable), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_600_mib_blob_through_a_proxy_cutting_every_300ms() {
    if !real_garage() {
        return;
    }
    let g = Garage::start();
    let upstream = ([127, 0, 0, 1], g.port).into();
    let cuts = Faults::time(Kill::Rst, Duration::from_millis(300));
    let proxy = Proxy::start(upstream, Some(cuts)).await.unwrap();
    let c = config(&g, &format!("http://{}", proxy.addr));
    let n = node(&c);
    let dir = tempfile::tempdir().unwrap();
    let file = support::random_file(dir.path(), 600 << 20);

    let started = std::time::Instant::now();
    let d = util::put_file(&n, &file).await.unwrap();
    let kills = proxy.kills.load(Ordering::Relaxed);
    eprintln!(
        "600 MiB put through cuts every 300 ms: {:?}, {kills} connections killed, {} parts",
        started.elapsed(),
        n.counter("parts")
    );
    assert!(kills >= 1, "no connection was cut during the upload");

    let started = std::time::Instant::now();
    let mut s = n.get(&d, ReadRange::FULL);
    let mut got = 0u64;
    while let Some(c) = s.next().await {
        got += c.unwrap().len() as u64;
    }
    assert_eq!(got, 600 << 20);
    let resumptions = n.counter("resumptions");
    eprintln!(
        "600 MiB get through cuts every 300 ms: {:?}, {} connections killed, {resumptions} resumptions",
        started.elapsed(),
        proxy.kills.load(Ordering::Relaxed) - kills
    );
    assert!(resumptions >= 1, "the read was never cut");
    assert_eq!(n.counter("give_ups"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_credentials_buckets_and_objects_are_clear_errors() {
    if !real_garage() {
        return;
    }
    let g = Garage::start();
    let ctx = BuildContext::root().child("cache").child("s3");
    let build_error = |c: S3Config| match c.build(&ctx) {
        Ok(_) => panic!("built"),
        Err(e) => e.to_string(),
    };
    let mut wrong = config(&g, &g.endpoint(1));
    wrong.secret_access_key = Some(HeaderValue::Literal("0".repeat(64)));
    let e = build_error(wrong);
    assert!(
        e.contains("cache.s3") && e.contains("credentials were refused"),
        "{e}"
    );
    let mut missing = config(&g, &g.endpoint(1));
    missing.bucket = "no-such-bucket".into();
    let e = build_error(missing);
    assert!(
        e.contains("cache.s3") && e.contains("does not exist"),
        "{e}"
    );
    let mut unset = config(&g, &g.endpoint(1));
    unset.access_key_id = Some(HeaderValue::Env(blob_access::grpc::FromEnv {
        env: "BLOB_ACCESS_TEST_UNSET_KEY".into(),
    }));
    let e = build_error(unset);
    assert!(e.contains("BLOB_ACCESS_TEST_UNSET_KEY is not set"), "{e}");
    let mut small = config(&g, &g.endpoint(1));
    small.part_size = ByteSize(1 << 20);
    assert!(build_error(small).contains("part_size"));

    let n = node(&config(&g, &g.endpoint(1)));
    // Missing: NOT_FOUND naming the blob.
    let d = Digest::of(b"never stored");
    let e = read(&n, &d, ReadRange::FULL).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    assert!(e.to_string().contains(&d.to_string()), "{e}");
    // Shorter than its digest says, or other bytes of the same length: DATA_LOSS.
    let data = blob(3 * MIB, 1);
    let d = Digest::of(&data);
    put_object(&g, &cas_key(&d), &data[..MIB]);
    let e = read(&n, &d, ReadRange::FULL).await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e}");
    assert!(e.to_string().contains("holds 1048576 bytes"), "{e}");
    // An empty object: the store refuses any range of it (416), also DATA_LOSS.
    put_object(&g, &cas_key(&d), b"");
    let e = read(&n, &d, ReadRange::FULL).await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e}");
    let e = read(&n, &d, ReadRange::new(MIB as u64, None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e}");
    // A put replaces an object of the wrong size; one of the right size
    // but other bytes (HEAD cannot tell) is refused on every read.
    n.put(&d, util::once(data.clone())).await.unwrap();
    assert_eq!(n.counter("already_stored"), 0);
    assert_eq!(read(&n, &d, ReadRange::FULL).await.unwrap(), data);
    put_object(&g, &cas_key(&d), &blob(3 * MIB, 2));
    let e = read(&n, &d, ReadRange::FULL).await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e}");
    assert!(e.to_string().contains("hashes to"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_object_replaced_under_a_resumed_read_is_never_spliced() {
    if !real_garage() {
        return;
    }
    let g = Garage::start();
    let upstream = ([127, 0, 0, 1], g.port).into();
    let proxy = Proxy::start(upstream, None).await.unwrap();
    let n = node(&config(&g, &format!("http://{}", proxy.addr)));
    let data = blob(64 * MIB, 3);
    let d = put(&n, &data).await;
    // The next connection is reset after 16 MiB; before the read gets there,
    // the object is replaced (same key, other bytes: another ETag).
    proxy.set(Some(Faults::bytes(Kill::Rst, 16 << 20).times(1)));
    let reader = node(&config(&g, &format!("http://{}", proxy.addr)));
    let mut s = reader.get(&d, ReadRange::FULL);
    let mut got = s.next().await.unwrap().unwrap().len();
    put_object(&g, &cas_key(&d), &blob(64 * MIB, 4));
    let e = loop {
        match s.next().await {
            Some(Ok(c)) => got += c.len(),
            Some(Err(e)) => break e,
            None => panic!("a read across two objects ended cleanly after {got} bytes"),
        }
    };
    assert_eq!(e.code(), Code::DataLoss, "{e}");
    assert!(got < 64 * MIB, "{got}");
    eprintln!("after {got} bytes: {e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_upload_leaves_no_multipart_upload_behind() {
    if !real_garage() {
        return;
    }
    let g = Garage::start();
    let n = std::sync::Arc::new(node(&config(&g, &g.endpoint(1))));
    let data = blob(40 * MIB, 9);
    let d = Digest::of(&data);
    // 12 MiB arrive, then the client goes quiet; the caller gives up on it.
    let (tx, rx) = tokio::sync::mpsc::channel::<blob_access::Result<Bytes>>(4);
    let source = tokio_stream::wrappers::ReceiverStream::new(rx).boxed();
    let upload = tokio::spawn({
        let (n, d) = (n.clone(), d.clone());
        async move { n.put(&d, source).await }
    });
    for c in 0..12 {
        tx.send(Ok(data.slice(c * MIB..(c + 1) * MIB)))
            .await
            .unwrap();
    }
    let open = wait_for(|| g.open_multipart_uploads() == 1).await;
    assert!(open, "the upload never started a multipart upload");
    upload.abort();
    assert!(upload.await.unwrap_err().is_cancelled());
    let gone = wait_for(|| g.open_multipart_uploads() == 0).await;
    assert!(gone, "a dropped upload left its multipart upload open");
    assert_eq!(n.counter("aborted_uploads"), 1);
    assert_eq!(
        n.find_missing(std::slice::from_ref(&d)).await.unwrap(),
        vec![d]
    );
}

/// Polls `ok` for up to 10 s.
async fn wait_for(mut ok: impl FnMut() -> bool) -> bool {
    for _ in 0..100 {
        if ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// `examples/s3.yaml` as a user runs it (credentials from the environment):
/// put, find-missing and get through the CLI; the bucket keeps the blob
/// under the documented key, the disk tier a copy after the read.
#[test]
fn the_s3_example_round_trips_through_the_cli() {
    if !real_garage() {
        return;
    }
    let g = Garage::start();
    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(support::root().join("examples/s3.yaml")).unwrap();
    let cache = dir.path().join("cache");
    let config = dir.path().join("s3.yaml");
    let text = example
        .replace("build-cache", "blob-access")
        .replace("http://127.0.0.1:3900", &g.endpoint(2))
        .replace("/var/cache/blob-access/cas", cache.to_str().unwrap());
    std::fs::write(&config, text).unwrap();
    let file = support::random_file(dir.path(), 40 << 20);
    let cli = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(support::bin())
            .args(args)
            .envs(g.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{args:?}: {err}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let c = config.as_os_str();
    let digest = cli(&["put".as_ref(), "--config".as_ref(), c, file.as_os_str()]);
    let missing = cli(&[
        "find-missing".as_ref(),
        "--config".as_ref(),
        c,
        digest.as_ref(),
    ]);
    assert!(missing.is_empty(), "{missing}");
    let (hash, size) = digest.split_once('/').unwrap();
    let key = format!("cache/cas/sha256/{hash}-{size}");
    let head = g.aws(&[
        "s3api",
        "head-object",
        "--bucket",
        "blob-access",
        "--key",
        &key,
    ]);
    assert!(head.status.success(), "{key} is not in the bucket");
    let back = dir.path().join("back");
    cli(&[
        "get".as_ref(),
        "--config".as_ref(),
        c,
        digest.as_ref(),
        "-o".as_ref(),
        back.as_os_str(),
    ]);
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&file).unwrap());
    assert!(holds_file_named(&cache, hash), "the disk tier kept no copy");

    // Without credentials the bucket check fails at once, naming the node.
    let out = std::process::Command::new(support::bin())
        .args([
            "find-missing".as_ref(),
            "--config".as_ref(),
            c,
            digest.as_ref(),
        ])
        .env("AWS_ACCESS_KEY_ID", "GK000000000000000000000000")
        .env("AWS_SECRET_ACCESS_KEY", "0".repeat(64))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("read_caching.slow.s3") && err.contains("credentials were refused"),
        "{err}"
    );
}

fn holds_file_named(dir: &std::path::Path, part: &str) -> bool {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            let path = e.path();
            path.is_dir() && holds_file_named(&path, part)
                || e.file_name().to_string_lossy().contains(part)
        })
}
