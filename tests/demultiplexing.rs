//! `serve` with a `demultiplexing` config in front of two backends, one per
//! team's instance name: the CLI (a `grpc` node naming the instance) and plain
//! tonic clients put and look up blobs and action results through it, and the
//! backends are asked directly where things landed.

mod support;

use blob_access::proto::action_cache_client::ActionCacheClient;
use blob_access::proto::content_addressable_storage_client::ContentAddressableStorageClient;
use blob_access::proto::{
    ActionResult, Digest, FindMissingBlobsRequest, GetActionResultRequest,
    UpdateActionResultRequest,
};
use std::path::{Path, PathBuf};
use support::*;
use tonic::Code;

/// Routes `team-a` to `a` and `team-b` to `b`, each backend seeing the default
/// instance (BuildGrid serves only that).
fn front_config(dir: &Path, a: u16, b: u16, action_cache: bool) -> PathBuf {
    let tree = format!(
        "
  demultiplexing:
    instance_name_prefixes:
      team-a:
        backend: {{grpc: {{endpoint: \"grpc://127.0.0.1:{a}\", instance_name: \"\"}}}}
        instance_name_prefix: \"\"
      team-b:
        backend: {{grpc: {{endpoint: \"grpc://127.0.0.1:{b}\", instance_name: \"\"}}}}
        instance_name_prefix: \"\"
"
    );
    let mut text = format!("content_addressable_storage:{tree}");
    if action_cache {
        text.push_str(&format!("action_cache:{tree}"));
    }
    let path = dir.join("front.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A CLI config reaching `port` as `instance`.
fn client_config(dir: &Path, port: u16, instance: &str) -> PathBuf {
    let path = dir.join(format!("client-{}.yaml", instance.replace('/', "_")));
    let text =
        format!("grpc: {{endpoint: \"grpc://127.0.0.1:{port}\", instance_name: \"{instance}\"}}\n");
    std::fs::write(&path, text).unwrap();
    path
}

fn proto_digest(text: &str) -> Digest {
    let (hash, size) = text.split_once('/').unwrap();
    Digest {
        hash: hash.into(),
        size_bytes: size.parse().unwrap(),
    }
}

/// Whether the server on `port` has `d` under `instance`, or the status it answered.
async fn has(port: u16, instance: &str, d: &Digest) -> Result<bool, tonic::Status> {
    let mut cas = ContentAddressableStorageClient::new(channel(port).await);
    let r = cas
        .find_missing_blobs(FindMissingBlobsRequest {
            instance_name: instance.into(),
            blob_digests: vec![d.clone()],
            ..Default::default()
        })
        .await?;
    Ok(r.into_inner().missing_blob_digests.is_empty())
}

/// Blobs put by the CLI under each team land in that team's backend only; an
/// instance no prefix covers is INVALID_ARGUMENT naming it.
fn blobs_go_to_their_teams_backend(front: &Serve, a: u16, b: u16) {
    let dir = tempfile::tempdir().unwrap();
    let put = |instance: &str, size| {
        let file = random_file(dir.path(), size);
        let config = client_config(dir.path(), front.port, instance);
        proto_digest(&put_cli(&config, &file))
    };
    // One batch-sized blob and one streamed through ByteStream.
    let (small_a, large_a) = (put("team-a", 1000), put("team-a", 6 << 20));
    // (Names below a prefix reach the backend as `x` for `team-a/x`: BuildGrid
    // serves only "", so they are tried on `serve` backends alone.)
    let small_b = put("team-b", 2000);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for d in [&small_a, &large_a] {
            assert!(has(a, "", d).await.unwrap(), "{d:?} in A");
            assert!(!has(b, "", d).await.unwrap(), "{d:?} in B");
            assert!(has(front.port, "team-a", d).await.unwrap());
            assert!(!has(front.port, "team-b", d).await.unwrap());
        }
        assert!(has(b, "", &small_b).await.unwrap());
        assert!(!has(a, "", &small_b).await.unwrap());

        let e = has(front.port, "team-c", &small_a).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("\"team-c\""), "{e:?}");
        let e = has(front.port, "team-ab", &small_a).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    });
    // The CLI says so too, naming the instance.
    let file = random_file(dir.path(), 10);
    let config = client_config(dir.path(), front.port, "team-c");
    let out = cli(&[
        "put".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        file.as_os_str(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("team-c"), "{err}");
}

#[test]
fn two_teams_on_two_serve_backends_blobs_and_action_results() {
    let (a, b) = (Serve::start(None), Serve::start(None));
    let dir = tempfile::tempdir().unwrap();
    let front = Serve::start(Some(&front_config(dir.path(), a.port, b.port, true)));
    blobs_go_to_their_teams_backend(&front, a.port, b.port);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Below a prefix, the rest of the name reaches the backend (serve keeps
        // blobs by content whatever the instance).
        let dir = tempfile::tempdir().unwrap();
        let file = random_file(dir.path(), 3000);
        let config = client_config(dir.path(), front.port, "team-b/ci");
        let d = proto_digest(&put_cli(&config, &file));
        assert!(has(b.port, "ci", &d).await.unwrap());
        assert!(!has(a.port, "", &d).await.unwrap());

        let ac = |port| async move { ActionCacheClient::new(channel(port).await) };
        let action = proto_digest(&format!("{}/12", "ab".repeat(32)));
        let result = ActionResult {
            exit_code: 3,
            ..Default::default()
        };
        ac(front.port)
            .await
            .update_action_result(UpdateActionResultRequest {
                instance_name: "team-a/linux".into(),
                action_digest: Some(action.clone()),
                action_result: Some(result.clone()),
                ..Default::default()
            })
            .await
            .unwrap();
        let get = |port, instance: &str| {
            let (action, instance) = (action.clone(), instance.to_string());
            async move {
                ac(port)
                    .await
                    .get_action_result(GetActionResultRequest {
                        instance_name: instance,
                        action_digest: Some(action),
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|s| s.code())
            }
        };
        // Backend A keeps it under the name it sees: the prefix replaced by "".
        assert_eq!(get(a.port, "linux").await, Ok(result.clone()));
        assert_eq!(get(front.port, "team-a/linux").await, Ok(result));
        assert_eq!(get(b.port, "linux").await, Err(Code::NotFound));
        assert_eq!(get(front.port, "team-b/linux").await, Err(Code::NotFound));
        assert_eq!(get(front.port, "linux").await, Err(Code::InvalidArgument));
    });
}

#[test]
fn two_teams_on_two_buildgrid_servers() {
    if !real_servers() {
        eprintln!("skipped: set BLOB_ACCESS_REAL_SERVERS=1 to run against BuildGrid");
        return;
    }
    let (a, b) = (BuildGrid::start(), BuildGrid::start());
    let dir = tempfile::tempdir().unwrap();
    let front = Serve::start(Some(&front_config(dir.path(), a.port, b.port, false)));
    blobs_go_to_their_teams_backend(&front, a.port, b.port);
}
