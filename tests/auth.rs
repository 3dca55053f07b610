//! `serve --auth-tokens`: plain tonic clients with and without
//! `authorization: Bearer TOKEN`, the CLI's own `grpc` node with the header in
//! its config, re-reading on SIGHUP, and secrets never in serve's `-vv` log.

mod support;

use blob_access::bytestream_proto::byte_stream_client::ByteStreamClient;
use blob_access::bytestream_proto::{ReadRequest, WriteRequest};
use blob_access::proto::action_cache_client::ActionCacheClient;
use blob_access::proto::capabilities_client::CapabilitiesClient;
use blob_access::proto::content_addressable_storage_client::ContentAddressableStorageClient;
use blob_access::proto::{
    batch_update_blobs_request, ActionResult, BatchReadBlobsRequest, BatchUpdateBlobsRequest,
    Digest, FindMissingBlobsRequest, GetActionResultRequest, GetCapabilitiesRequest,
    UpdateActionResultRequest,
};
use sha2::Digest as _;
use std::path::Path;
use support::*;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;

/// A token nobody could guess or find elsewhere in a log by chance.
fn secret(what: &str) -> String {
    format!("{what}-{}", uuid::Uuid::new_v4().simple())
}

fn digest_of(data: &[u8]) -> Digest {
    Digest {
        hash: hex::encode(sha2::Sha256::digest(data)),
        size_bytes: data.len() as i64,
    }
}

/// Adds `authorization: Bearer TOKEN` to every call (nothing without a token).
#[derive(Clone)]
struct Bearer(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(h) = &self.0 {
            r.metadata_mut().insert("authorization", h.clone());
        }
        Ok(r)
    }
}

type Authed = InterceptedService<Channel, Bearer>;

/// The four clients on one channel, each call carrying `token` (if any).
struct Clients {
    cas: ContentAddressableStorageClient<Authed>,
    bs: ByteStreamClient<Authed>,
    ac: ActionCacheClient<Authed>,
    caps: CapabilitiesClient<Authed>,
}

async fn clients(port: u16, token: Option<&str>) -> Clients {
    let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer = Bearer(token.map(|t| format!("Bearer {t}").parse().unwrap()));
    let svc = || InterceptedService::new(channel.clone(), bearer.clone());
    Clients {
        cas: ContentAddressableStorageClient::new(svc()),
        bs: ByteStreamClient::new(svc()),
        ac: ActionCacheClient::new(svc()),
        caps: CapabilitiesClient::new(svc()),
    }
}

/// The status code of every kind of call, one blob and one action result.
#[derive(Debug, PartialEq)]
struct Codes {
    find_missing: Code,
    batch_read: Code,
    bytestream_read: Code,
    capabilities: Code,
    get_action_result: Code,
    batch_update: Code,
    bytestream_write: Code,
    update_action_result: Code,
}

async fn try_everything(c: &mut Clients, blob: &[u8]) -> (Codes, Option<bool>) {
    try_everything_in(c, blob, "").await
}

/// As `try_everything`, every request naming `instance`.
async fn try_everything_in(c: &mut Clients, blob: &[u8], instance: &str) -> (Codes, Option<bool>) {
    fn code<T>(r: Result<T, tonic::Status>) -> Code {
        r.map(|_| Code::Ok).unwrap_or_else(|s| s.code())
    }
    let d = digest_of(blob);
    let batch_update = code(
        c.cas
            .batch_update_blobs(BatchUpdateBlobsRequest {
                requests: vec![batch_update_blobs_request::Request {
                    digest: Some(d.clone()),
                    data: blob.to_vec(),
                    compressor: 0,
                }],
                instance_name: instance.into(),
                ..Default::default()
            })
            .await,
    );
    let resource = format!(
        "{instance}/uploads/{}/blobs/{}/{}",
        uuid::Uuid::new_v4(),
        d.hash,
        d.size_bytes
    );
    let write = WriteRequest {
        resource_name: resource.trim_start_matches('/').to_string(),
        write_offset: 0,
        finish_write: true,
        data: blob.to_vec(),
    };
    let bytestream_write = code(c.bs.write(futures::stream::iter(vec![write])).await);
    let update_action_result = code(
        c.ac.update_action_result(UpdateActionResultRequest {
            action_digest: Some(d.clone()),
            action_result: Some(ActionResult {
                exit_code: 7,
                ..Default::default()
            }),
            instance_name: instance.into(),
            ..Default::default()
        })
        .await,
    );
    let find_missing = code(
        c.cas
            .find_missing_blobs(FindMissingBlobsRequest {
                blob_digests: vec![d.clone()],
                instance_name: instance.into(),
                ..Default::default()
            })
            .await,
    );
    let batch_read = code(
        c.cas
            .batch_read_blobs(BatchReadBlobsRequest {
                digests: vec![d.clone()],
                instance_name: instance.into(),
                ..Default::default()
            })
            .await,
    );
    let bytestream_read = code(
        c.bs.read(ReadRequest {
            resource_name: format!("{instance}/blobs/{}/{}", d.hash, d.size_bytes)
                .trim_start_matches('/')
                .to_string(),
            ..Default::default()
        })
        .await,
    );
    let get_action_result = code(
        c.ac.get_action_result(GetActionResultRequest {
            action_digest: Some(d.clone()),
            instance_name: instance.into(),
            ..Default::default()
        })
        .await,
    );
    let caps = c
        .caps
        .get_capabilities(GetCapabilitiesRequest {
            instance_name: instance.into(),
        })
        .await;
    let update_enabled = caps.as_ref().ok().map(|r| {
        r.get_ref()
            .cache_capabilities
            .as_ref()
            .unwrap()
            .action_cache_update_capabilities
            .unwrap()
            .update_enabled
    });
    let codes = Codes {
        find_missing,
        batch_read,
        bytestream_read,
        capabilities: code(caps),
        get_action_result,
        batch_update,
        bytestream_write,
        update_action_result,
    };
    (codes, update_enabled)
}

fn all(code: Code) -> Codes {
    Codes {
        find_missing: code,
        batch_read: code,
        bytestream_read: code,
        capabilities: code,
        get_action_result: code,
        batch_update: code,
        bytestream_write: code,
        update_action_result: code,
    }
}

#[test]
fn tokens_limited_to_instance_name_prefixes() {
    let (team, other) = (secret("team"), secret("other"));
    let dir = tempfile::tempdir().unwrap();
    // `team` writes team-a (and below), reads team-b; `other` reads everything.
    let file = tokens_file(
        dir.path(),
        &format!("write {team} team-a\nread {team} team-b\nread {other}\n"),
    );
    let serve = Serve::start_with(None, &["--auth-tokens", file.to_str().unwrap()]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut t = clients(serve.port, Some(&team)).await;
        for instance in ["team-a", "team-a/ci"] {
            let got = try_everything_in(&mut t, b"team blob", instance).await;
            assert_eq!(got, (all(Code::Ok), Some(true)), "{instance}");
        }
        // Reading team-b: the blob (content is shared), not team-a's action result.
        let (codes, update_enabled) = try_everything_in(&mut t, b"team blob", "team-b").await;
        let expected = Codes {
            batch_update: Code::PermissionDenied,
            bytestream_write: Code::PermissionDenied,
            update_action_result: Code::PermissionDenied,
            get_action_result: Code::NotFound,
            ..all(Code::Ok)
        };
        assert_eq!((codes, update_enabled), (expected, Some(false)));
        for instance in ["", "team-ab", "team-c"] {
            let got = try_everything_in(&mut t, b"team blob", instance).await;
            assert_eq!(got, (all(Code::PermissionDenied), None), "{instance:?}");
        }
        let e = t
            .caps
            .get_capabilities(GetCapabilitiesRequest {
                instance_name: "team-c".into(),
            })
            .await
            .unwrap_err();
        assert!(e.message().contains("\"team-c\""), "{e:?}");
        // A token without prefixes reads every instance, writes none.
        let mut o = clients(serve.port, Some(&other)).await;
        let (codes, _) = try_everything_in(&mut o, b"team blob", "team-a/ci").await;
        assert_eq!(
            (codes.get_action_result, codes.bytestream_write),
            (Code::Ok, Code::PermissionDenied)
        );
    });
}

fn tokens_file(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("tokens");
    std::fs::write(&path, text).unwrap();
    path
}

fn assert_no_secret(log: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!log.contains(s), "a secret is in serve's log:\n{log}");
    }
}

#[test]
fn tokens_gate_every_rpc_and_never_reach_the_log() {
    let (reader, writer, wrong) = (secret("read"), secret("write"), secret("wrong"));
    let dir = tempfile::tempdir().unwrap();
    let file = tokens_file(
        dir.path(),
        &format!("# CI writes, developers read\n\nread {reader}\nwrite   {writer}\n"),
    );
    let serve = Serve::start_with(None, &["-vv", "--auth-tokens", file.to_str().unwrap()]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut anon = clients(serve.port, None).await;
        assert_eq!(
            try_everything(&mut anon, b"anonymous").await,
            (all(Code::Unauthenticated), None)
        );
        let mut bad = clients(serve.port, Some(&wrong)).await;
        assert_eq!(
            try_everything(&mut bad, b"wrong").await,
            (all(Code::Unauthenticated), None)
        );

        let mut w = clients(serve.port, Some(&writer)).await;
        let (codes, update_enabled) = try_everything(&mut w, b"written").await;
        assert_eq!((codes, update_enabled), (all(Code::Ok), Some(true)));

        // A read token reads what the writer stored, and may store nothing.
        let mut r = clients(serve.port, Some(&reader)).await;
        let (codes, update_enabled) = try_everything(&mut r, b"written").await;
        let expected = Codes {
            batch_update: Code::PermissionDenied,
            bytestream_write: Code::PermissionDenied,
            update_action_result: Code::PermissionDenied,
            ..all(Code::Ok)
        };
        assert_eq!((codes, update_enabled), (expected, Some(false)));
        let (codes, _) = try_everything(&mut r, b"never written").await;
        assert_eq!(
            (
                codes.batch_update,
                codes.bytestream_read,
                codes.get_action_result
            ),
            (Code::PermissionDenied, Code::NotFound, Code::NotFound)
        );
    });
    assert!(
        serve.log().contains("2 tokens (1 may write)"),
        "{}",
        serve.log()
    );
    assert_no_secret(&serve.log(), &[&reader, &writer, &wrong]);
}

/// What a user does: the CLI's `grpc` node sends the header from its config.
#[test]
fn cli_put_and_get_with_a_token_in_the_grpc_config() {
    let (reader, writer) = (secret("read"), secret("write"));
    let dir = tempfile::tempdir().unwrap();
    let file = tokens_file(dir.path(), &format!("read {reader}\nwrite {writer}\n"));
    let serve = Serve::start_with(None, &["-vv", "--auth-tokens", file.to_str().unwrap()]);
    let config = |name: &str, token: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "grpc:\n  endpoint: grpc://127.0.0.1:{}\n  instance_name: \"\"\n  headers:\n    authorization: \"Bearer {token}\"\n",
                serve.port
            ),
        )
        .unwrap();
        path
    };
    let (w, r) = (config("w.yaml", &writer), config("r.yaml", &reader));
    let blob = random_file(dir.path(), 3 << 20);
    let digest = put_cli(&w, &blob);
    let out = dir.path().join("out");
    get_cli(&r, &digest, &out);
    assert!(files_equal(&blob, &out));

    let other = random_file(dir.path(), 1000);
    let refused = cli(&[
        "put",
        "--config",
        r.to_str().unwrap(),
        other.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("PermissionDenied"),
        "{err}"
    );
    assert!(!err.contains(&reader), "{err}");
    let anon = grpc_config(dir.path(), "anon.yaml", serve.port);
    let refused = cli(&["get", "--config", anon.to_str().unwrap(), &digest]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("Unauthenticated"),
        "{err}"
    );
    assert_no_secret(&serve.log(), &[&reader, &writer]);
}

#[test]
fn sighup_rereads_tokens_and_a_bad_file_keeps_the_old_ones() {
    let (old, new) = (secret("old"), secret("new"));
    let dir = tempfile::tempdir().unwrap();
    let file = tokens_file(dir.path(), &format!("write {old}\n"));
    let serve = Serve::start_with(None, &["-vv", "--auth-tokens", file.to_str().unwrap()]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let find_missing = |token: &str| {
        rt.block_on(async {
            let mut c = clients(serve.port, Some(token)).await;
            c.cas
                .find_missing_blobs(FindMissingBlobsRequest::default())
                .await
                .map(|_| ())
                .map_err(|s| s.code())
        })
    };
    assert_eq!(find_missing(&old), Ok(()));
    assert_eq!(find_missing(&new), Err(Code::Unauthenticated));

    std::fs::write(&file, format!("read {new}\n")).unwrap();
    serve.signal("HUP");
    serve.wait_for_log("SIGHUP: 1 tokens (0 may write)");
    assert_eq!(find_missing(&new), Ok(()));
    assert_eq!(find_missing(&old), Err(Code::Unauthenticated));

    // A broken file (here a line with an unknown permission) changes nothing.
    std::fs::write(&file, format!("admin {old}\n")).unwrap();
    serve.signal("HUP");
    serve.wait_for_log("keeping the previous tokens");
    assert!(
        serve.log().contains(&format!("{}:1: ", file.display())),
        "{}",
        serve.log()
    );
    assert_eq!(find_missing(&new), Ok(()));
    assert_eq!(find_missing(&old), Err(Code::Unauthenticated));
    assert_no_secret(&serve.log(), &[&old, &new]);
}

#[test]
fn a_malformed_tokens_file_is_a_startup_error_naming_file_and_line() {
    let token = secret("tok");
    let dir = tempfile::tempdir().unwrap();
    let file = tokens_file(dir.path(), &format!("# ok\nread {token}\nadmin {token}\n"));
    let out = cli(&[
        "serve",
        "-vv",
        "--listen",
        "127.0.0.1:0",
        "--auth-tokens",
        file.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "{}:3: expected `read TOKEN` or `write TOKEN`",
            file.display()
        )),
        "{err}"
    );
    assert!(!err.contains(&token), "{err}");
    let missing = dir.path().join("absent");
    let out = cli(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--auth-tokens",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read tokens file"));
}

#[test]
fn a_non_loopback_address_needs_tokens_or_an_explicit_allow_unauthenticated() {
    let out = cli(&["serve", "--listen", "0.0.0.0:0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("refusing to serve 0.0.0.0:")
            && err.contains("without authentication")
            && err.contains("--allow-unauthenticated"),
        "{err}"
    );

    let serve = Serve::start_on("0.0.0.0:0", None, &["--allow-unauthenticated"]);
    assert!(
        serve.log().contains("WITHOUT authentication"),
        "{}",
        serve.log()
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut anon = rt.block_on(clients(serve.port, None));
    let (codes, _) = rt.block_on(try_everything(&mut anon, b"anyone"));
    assert_eq!(codes, all(Code::Ok));
    drop(serve);

    let token = secret("write");
    let dir = tempfile::tempdir().unwrap();
    let file = tokens_file(dir.path(), &format!("write {token}\n"));
    let serve = Serve::start_on(
        "0.0.0.0:0",
        None,
        &["-vv", "--auth-tokens", file.to_str().unwrap()],
    );
    assert!(!serve.log().contains("WITHOUT"), "{}", serve.log());
    let mut anon = rt.block_on(clients(serve.port, None));
    assert_eq!(
        rt.block_on(try_everything(&mut anon, b"anyone")).0,
        all(Code::Unauthenticated)
    );
    let mut w = rt.block_on(clients(serve.port, Some(&token)));
    assert_eq!(
        rt.block_on(try_everything(&mut w, b"writer")).0,
        all(Code::Ok)
    );
    assert_no_secret(&serve.log(), &[&token]);

    // Loopback and Unix sockets stay as they were: no tokens needed.
    let serve = Serve::start(None);
    assert!(!serve.log().contains("WITHOUT"), "{}", serve.log());
}

/// At the most verbose logging (every HTTP/2 frame, every library's traces),
/// neither serve nor the CLI prints a token.
#[test]
fn no_token_at_rust_log_trace() {
    let (reader, writer, wrong) = (secret("read"), secret("write"), secret("wrong"));
    let dir = tempfile::tempdir().unwrap();
    let file = tokens_file(dir.path(), &format!("read {reader}\nwrite {writer}\n"));
    let trace = [("RUST_LOG", "trace")];
    let serve = Serve::start_env(
        "127.0.0.1:0",
        None,
        &["--auth-tokens", file.to_str().unwrap()],
        &trace,
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (i, token) in [&reader, &writer, &wrong].into_iter().enumerate() {
        let mut c = rt.block_on(clients(serve.port, Some(token)));
        rt.block_on(try_everything(&mut c, format!("blob {i}").as_bytes()));
    }
    let config = dir.path().join("c.yaml");
    std::fs::write(
        &config,
        format!(
            "grpc:\n  endpoint: grpc://127.0.0.1:{}\n  instance_name: \"\"\n  headers:\n    authorization: {{env: TOKEN}}\n",
            serve.port
        ),
    )
    .unwrap();
    let blob = random_file(dir.path(), 5000);
    let bearer = format!("Bearer {writer}");
    let out = std::process::Command::new(bin())
        .args([
            "put",
            "--config",
            config.to_str().unwrap(),
            blob.to_str().unwrap(),
        ])
        .envs([("RUST_LOG", "trace"), ("TOKEN", bearer.as_str())])
        .output()
        .unwrap();
    let cli_log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cli_log}");
    let log = serve.log();
    assert!(log.contains("TRACE"), "not at trace level");
    assert_no_secret(&format!("{log}{cli_log}"), &[&reader, &writer, &wrong]);
}
