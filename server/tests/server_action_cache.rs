//! The ActionCache service and the capabilities that announce it, with plain
//! tonic clients: round trips, every kind of bad input, a read-only cache and a
//! server without one.

mod server_support;

use blob_access::memory::{MemoryActionCache, MemoryBlobAccess};
use blob_access::proto::action_cache_client::ActionCacheClient;
use blob_access::proto::{
    ActionResult, GetActionResultRequest, OutputFile, UpdateActionResultRequest,
};
use blob_access::{Code, Digest, Storage};
use blob_access_server::ServerConfig;
use server_support::*;
use std::sync::Arc;
use tonic::transport::Channel;

async fn start_with_ac(cfg: ServerConfig) -> TestServer {
    let memory = Arc::new(MemoryBlobAccess::new("memory", 1 << 30));
    let storage = Storage::new(memory.clone())
        .with_action_cache(Arc::new(MemoryActionCache::new("ac", 64 << 20)));
    start_over(storage, memory, cfg).await
}

async fn ac(server: &TestServer) -> ActionCacheClient<Channel> {
    ActionCacheClient::new(server.channel().await).max_encoding_message_size(64 << 20)
}

fn get(action: Option<blob_access::proto::Digest>) -> GetActionResultRequest {
    GetActionResultRequest {
        instance_name: "main".into(),
        action_digest: action,
        ..Default::default()
    }
}

fn update(
    action: Option<blob_access::proto::Digest>,
    result: Option<ActionResult>,
) -> UpdateActionResultRequest {
    UpdateActionResultRequest {
        instance_name: "main".into(),
        action_digest: action,
        action_result: result,
        ..Default::default()
    }
}

fn result_with_output(hash: &str, size: i64) -> ActionResult {
    ActionResult {
        output_files: vec![OutputFile {
            path: "out/a.o".into(),
            digest: Some(blob_access::proto::Digest {
                hash: hash.into(),
                size_bytes: size,
            }),
            is_executable: true,
            ..Default::default()
        }],
        exit_code: 0,
        stdout_raw: b"compiled".to_vec(),
        ..Default::default()
    }
}

#[tokio::test]
async fn results_round_trip_and_updates_are_announced() {
    let server = start_with_ac(ServerConfig::default()).await;
    assert!(server.update_enabled().await);
    let mut client = ac(&server).await;
    let action = Digest::of(b"Action").to_proto();
    let err = client
        .get_action_result(get(Some(action.clone())))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let output = Digest::of(b"a.o");
    let result = result_with_output(output.hash(), 3);
    let echoed = client
        .update_action_result(update(Some(action.clone()), Some(result.clone())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(echoed, result);
    let got = client.get_action_result(get(Some(action))).await.unwrap();
    assert_eq!(got.into_inner(), result);
}

/// `result` with its first output file changed by `f`.
fn with_file(result: &ActionResult, f: impl FnOnce(&mut OutputFile)) -> ActionResult {
    let mut r = result.clone();
    f(&mut r.output_files[0]);
    r
}

#[tokio::test]
async fn bad_requests_get_clear_statuses_and_store_nothing() {
    let server = start_with_ac(ServerConfig::default()).await;
    let mut client = ac(&server).await;
    let action = Digest::of(b"Action").to_proto();
    let good = result_with_output(Digest::of(b"x").hash(), 1);
    let malformed = blob_access::proto::Digest {
        hash: "xyz".into(),
        size_bytes: 1,
    };
    // Malformed or absent action digests, on both calls.
    for d in [None, Some(malformed.clone())] {
        let e = client.get_action_result(get(d.clone())).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("action_digest"), "{e:?}");
        let e = client
            .update_action_result(update(d, Some(good.clone())))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    let cases = [
        (None, "action_result is missing"),
        (Some(result_with_output("xyz", 1)), "output_files[0]"),
        (
            Some(result_with_output(Digest::of(b"x").hash(), -1)),
            "output_files[0]",
        ),
        (
            Some(ActionResult {
                stdout_digest: Some(malformed.clone()),
                ..Default::default()
            }),
            "stdout_digest",
        ),
        (
            Some(with_file(&good, |f| f.path = "/etc/passwd".into())),
            "output paths are relative",
        ),
        (
            Some(with_file(&good, |f| f.contents = b"not x".to_vec())),
            "contents: the inlined bytes are",
        ),
        (
            Some(ActionResult {
                stdout_digest: Some(Digest::of(b"out").to_proto()),
                stdout_raw: b"other".to_vec(),
                ..Default::default()
            }),
            "stdout_raw",
        ),
    ];
    for (result, names) in cases {
        let e = client
            .update_action_result(update(Some(action.clone()), result))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(names), "{names}: {e:?}");
    }
    // Larger than an action cache keeps, smaller than a gRPC message.
    let huge = ActionResult {
        stdout_raw: vec![7; 5 << 20],
        ..Default::default()
    };
    let e = client
        .update_action_result(update(Some(action.clone()), Some(huge)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // A digest function this server does not serve, and a SHA-256 action named SHA-1.
    for function in [8, 2] {
        let mut req = get(Some(action.clone()));
        req.digest_function = function;
        let e = client.get_action_result(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    // None of it was stored.
    let e = client
        .get_action_result(get(Some(action)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test]
async fn a_read_only_cache_serves_results_and_refuses_updates() {
    let memory = Arc::new(MemoryBlobAccess::new("memory", 1 << 20));
    let results = Arc::new(MemoryActionCache::new("ac", 1 << 20));
    let action = Digest::of(b"Action");
    let result = result_with_output(Digest::of(b"x").hash(), 1);
    use blob_access::ActionCache;
    // Stored under the instance name the client asks with (`get` says "main").
    results
        .update_action_result(&action.with_instance_name("main"), &result)
        .await
        .unwrap();
    let storage = Storage::new(memory.clone()).with_action_cache(results);
    let cfg = ServerConfig {
        action_cache_read_only: true,
        ..Default::default()
    };
    let server = start_over(storage, memory, cfg).await;
    assert!(!server.update_enabled().await);
    let mut client = ac(&server).await;
    let got = client
        .get_action_result(get(Some(action.to_proto())))
        .await
        .unwrap();
    assert_eq!(got.into_inner(), result);
    let e = client
        .update_action_result(update(
            Some(action.to_proto()),
            Some(ActionResult::default()),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let got = client
        .get_action_result(get(Some(action.to_proto())))
        .await
        .unwrap();
    assert_eq!(
        got.into_inner(),
        result,
        "the refused update changed the result"
    );
}

#[tokio::test]
async fn without_an_action_cache_the_service_is_unimplemented() {
    let server = start(ServerConfig::default()).await;
    assert!(!server.update_enabled().await);
    let mut client = ac(&server).await;
    let action = Some(Digest::of(b"Action").to_proto());
    let e = client
        .get_action_result(get(action.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
    assert!(e.message().contains("action_cache"), "{e:?}");
    let e = client
        .update_action_result(update(action, Some(ActionResult::default())))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
}

/// Sends raw bytes as a request message, for bodies no generated client sends.
#[derive(Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

#[tokio::test]
async fn an_update_that_does_not_parse_is_refused_and_the_server_goes_on() {
    let server = start_with_ac(ServerConfig::default()).await;
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult",
    );
    // Field 3 (action_result) announced as 100 bytes long, with 2 present.
    let garbage = vec![0x1a, 100, 1, 2];
    let e = grpc
        .unary(tonic::Request::new(garbage), path, RawCodec)
        .await
        .unwrap_err();
    // tonic answers a request it cannot decode with INTERNAL, saying so.
    assert_ne!(e.code(), Code::Ok);
    assert!(e.message().contains("decode"), "{e:?}");
    let mut client = ac(&server).await;
    let action = Digest::of(b"Action").to_proto();
    let result = result_with_output(Digest::of(b"x").hash(), 1);
    client
        .update_action_result(update(Some(action.clone()), Some(result.clone())))
        .await
        .unwrap();
    let got = client.get_action_result(get(Some(action))).await.unwrap();
    assert_eq!(got.into_inner(), result);
}

/// A result under another digest function: its inlined bytes are checked
/// under that function, and it is kept apart from the SHA-256 action's.
#[tokio::test]
async fn inlined_bytes_are_checked_under_the_actions_digest_function() {
    use blob_access::DigestFunction;
    let server = start_with_ac(ServerConfig::default()).await;
    let mut client = ac(&server).await;
    for function in [DigestFunction::Sha1, DigestFunction::Blake3] {
        let action = Digest::of_with(function, b"Action").to_proto();
        let stdout = b"compiled".to_vec();
        let mut result = result_with_output(Digest::of_with(function, b"a.o").hash(), 3);
        result.stdout_digest = Some(Digest::of_with(function, &stdout).to_proto());
        let mut req = update(Some(action.clone()), Some(result.clone()));
        req.digest_function = function.to_proto();
        let echoed = client.update_action_result(req).await.unwrap().into_inner();
        assert_eq!(echoed, result, "{function}");
        let mut get_req = get(Some(action.clone()));
        get_req.digest_function = function.to_proto();
        let got = client
            .get_action_result(get_req)
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.stdout_raw, stdout, "{function}");
        // Inlined bytes that are not what the digest says, under this function.
        let mut bad = result.clone();
        bad.stdout_digest = Some(Digest::of(&stdout).to_proto());
        let mut req = update(Some(action), Some(bad));
        req.digest_function = function.to_proto();
        let e = client.update_action_result(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{function}: {e:?}");
    }
}
