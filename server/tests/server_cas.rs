//! ContentAddressableStorage and Capabilities of `server`, with plain tonic clients.

mod server_support;

use blob_access::proto::capabilities_client::CapabilitiesClient;
use blob_access::proto::{
    batch_update_blobs_request, compressor, BatchReadBlobsRequest, BatchUpdateBlobsRequest,
    FindMissingBlobsRequest, GetCapabilitiesRequest,
};
use blob_access::{util, BlobAccess, Code};
use blob_access_server::ServerConfig;
use server_support::*;

fn code_of(s: &Option<bazel_remote_apis::google::rpc::Status>) -> Code {
    Code::from(s.as_ref().unwrap().code)
}

#[tokio::test]
async fn find_missing_blobs() {
    let server = start(ServerConfig::default()).await;
    let mut cas = server.cas().await;
    let (a, da) = blob(10, 1);
    let (_, db) = blob(10, 2);
    server.memory.put(&da, util::once(a)).await.unwrap();
    let req = |digests: Vec<_>, function| FindMissingBlobsRequest {
        instance_name: "any/instance".into(),
        blob_digests: digests,
        digest_function: function,
    };
    let both = vec![da.to_proto(), db.to_proto()];
    for function in [0, 1] {
        let r = cas
            .find_missing_blobs(req(both.clone(), function))
            .await
            .unwrap();
        assert_eq!(r.into_inner().missing_blob_digests, vec![db.to_proto()]);
    }
    // SHA-256 hashes named SHA-1, a function not served, a malformed
    // digest: the caller's error, naming what is wrong.
    let err = cas
        .find_missing_blobs(req(both.clone(), 2))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("a sha1 hash has 40"), "{err:?}");
    let err = cas.find_missing_blobs(req(both, 8)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("8 (SHA256TREE) is not supported"),
        "{err:?}"
    );
    let mut bad = db.to_proto();
    bad.hash.truncate(10);
    let err = cas.find_missing_blobs(req(vec![bad], 0)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn batch_update_with_bad_blobs() {
    let server = start(ServerConfig::default()).await;
    let mut cas = server.cas().await;
    let (a, da) = blob(1000, 1);
    let (b, db) = blob(1000, 2);
    let (c, dc) = blob(100_000, 3);
    let (_, dd) = blob(100, 4);
    let one = |digest: &blob_access::Digest, data: &[u8], compressor| {
        batch_update_blobs_request::Request {
            digest: Some(digest.to_proto()),
            data: data.to_vec(),
            compressor,
        }
    };
    let zstd = compressor::Value::Zstd as i32;
    let requests = vec![
        one(&da, &a, 0),
        one(&db, &a, 0),                                       // wrong content
        one(&dc, &zstd::encode_all(&c[..], 3).unwrap(), zstd), // compressed
        one(&dd, b"not zstd at all", zstd),
        batch_update_blobs_request::Request {
            digest: None,
            data: b.to_vec(),
            compressor: 0,
        },
    ];
    let r = cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: String::new(),
            requests,
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<Code> = r.responses.iter().map(|r| code_of(&r.status)).collect();
    use Code::{InvalidArgument as Invalid, Ok};
    assert_eq!(codes, vec![Ok, Invalid, Ok, Invalid, Invalid]);
    assert_eq!(r.responses[1].digest, Some(db.to_proto()));
    assert!(server.stored(&da).await && server.stored(&dc).await);
    assert!(!server.stored(&db).await && !server.stored(&dd).await);
}

#[tokio::test]
async fn batch_read_with_missing_and_bad_blobs() {
    let server = start(ServerConfig::default()).await;
    let mut cas = server.cas().await;
    let (a, da) = blob(1000, 1);
    let (_, db) = blob(1000, 2);
    server.memory.put(&da, util::once(a.clone())).await.unwrap();
    let mut bad = db.to_proto();
    bad.size_bytes = -1;
    let req = BatchReadBlobsRequest {
        instance_name: String::new(),
        digests: vec![da.to_proto(), db.to_proto(), bad],
        acceptable_compressors: vec![],
        digest_function: 0,
    };
    let r = cas.batch_read_blobs(req).await.unwrap().into_inner();
    let codes: Vec<Code> = r.responses.iter().map(|r| code_of(&r.status)).collect();
    assert_eq!(codes, vec![Code::Ok, Code::NotFound, Code::InvalidArgument]);
    assert_eq!(r.responses[0].data, a.to_vec());
    assert_eq!(r.responses[0].compressor, 0);
    assert!(r.responses[1].data.is_empty());
}

#[tokio::test]
async fn batches_over_the_limit_are_refused() {
    let cfg = ServerConfig {
        max_batch_total_size_bytes: 1500,
        ..Default::default()
    };
    let server = start(cfg).await;
    let mut cas = server.cas().await;
    let (a, da) = blob(1000, 1);
    let (b, db) = blob(1000, 2);
    let requests = [(&da, &a), (&db, &b)]
        .iter()
        .map(|(d, data)| batch_update_blobs_request::Request {
            digest: Some(d.to_proto()),
            data: data.to_vec(),
            compressor: 0,
        })
        .collect();
    let req = BatchUpdateBlobsRequest {
        instance_name: String::new(),
        requests,
        digest_function: 0,
    };
    let err = cas.batch_update_blobs(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("max_batch_total_size_bytes"),
        "{err}"
    );
    assert!(!server.stored(&da).await);
    let req = BatchReadBlobsRequest {
        digests: vec![da.to_proto(), db.to_proto()],
        ..Default::default()
    };
    assert_eq!(
        cas.batch_read_blobs(req).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // Compressed, the two blobs are a few bytes on the wire; the limit is
    // on what they hold.
    let zeros = bytes::Bytes::from(vec![0u8; 1000]);
    let dz = blob_access::Digest::of(&zeros);
    let packed = zstd::encode_all(&zeros[..], 3).unwrap();
    assert!(packed.len() < 100);
    let request = batch_update_blobs_request::Request {
        digest: Some(dz.to_proto()),
        data: packed,
        compressor: compressor::Value::Zstd as i32,
    };
    let req = BatchUpdateBlobsRequest {
        instance_name: String::new(),
        requests: vec![request.clone(), request],
        digest_function: 0,
    };
    let err = cas.batch_update_blobs(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(!server.stored(&dz).await);
}

#[tokio::test]
async fn capabilities() {
    let server = start(ServerConfig::default()).await;
    let mut caps = CapabilitiesClient::new(server.channel().await);
    let req = GetCapabilitiesRequest {
        instance_name: "x".into(),
    };
    let r = caps.get_capabilities(req).await.unwrap().into_inner();
    let cache = r.cache_capabilities.unwrap();
    // SHA256, SHA1, MD5, SHA384, SHA512, BLAKE3.
    assert_eq!(cache.digest_functions, vec![1, 2, 3, 5, 6, 9]);
    assert_eq!(cache.max_batch_total_size_bytes, 4 << 20);
    assert_eq!(
        cache.supported_compressors,
        vec![compressor::Value::Zstd as i32]
    );
    assert!(r.execution_capabilities.is_none());
    let (low, high) = (r.low_api_version.unwrap(), r.high_api_version.unwrap());
    assert_eq!((low.major, low.minor, high.major, high.minor), (2, 0, 2, 3));
}

#[tokio::test]
async fn a_configured_instance_name_is_enforced() {
    let cfg = ServerConfig {
        instance_name: Some("main".into()),
        ..Default::default()
    };
    let server = start(cfg).await;
    let mut cas = server.cas().await;
    let mut caps = CapabilitiesClient::new(server.channel().await);
    let mut bs = server.bytestream().await;
    let (data, d) = blob(100, 1);
    for (instance, ok) in [("main", true), ("other", false), ("", false)] {
        let req = FindMissingBlobsRequest {
            instance_name: instance.into(),
            blob_digests: vec![d.to_proto()],
            digest_function: 0,
        };
        assert_eq!(cas.find_missing_blobs(req).await.is_ok(), ok, "{instance}");
        let req = GetCapabilitiesRequest {
            instance_name: instance.into(),
        };
        let r = caps.get_capabilities(req).await;
        assert_eq!(r.is_ok(), ok, "{instance}");
        let prefix = if instance.is_empty() {
            String::new()
        } else {
            format!("{instance}/")
        };
        let w = write(
            &mut bs,
            write_requests(&format!("{prefix}{}", write_name(&d)), &data, 64),
        )
        .await;
        assert_eq!(w.is_ok(), ok, "{instance}");
        if !ok {
            assert_eq!(w.unwrap_err().code(), Code::InvalidArgument);
        }
    }
    let (got, _) = read(&mut bs, &format!("main/{}", read_name(&d)), 0, 0)
        .await
        .unwrap();
    assert!(got == data);
}

#[tokio::test]
async fn the_empty_blob_is_never_missing_and_reads_back_empty() {
    let server = start(ServerConfig::default()).await;
    let mut cas = server.cas().await;
    let empty = blob_access::Digest::of(b"");
    let (_, other) = blob(10, 3);
    let r = cas
        .find_missing_blobs(FindMissingBlobsRequest {
            instance_name: "i".into(),
            blob_digests: vec![empty.to_proto(), other.to_proto(), empty.to_proto()],
            digest_function: 0,
        })
        .await
        .unwrap();
    assert_eq!(r.into_inner().missing_blob_digests, vec![other.to_proto()]);
    let r = cas
        .batch_read_blobs(BatchReadBlobsRequest {
            instance_name: String::new(),
            digests: vec![empty.to_proto()],
            acceptable_compressors: vec![],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code_of(&r.responses[0].status), Code::Ok);
    assert!(r.responses[0].data.is_empty());
}

/// Each function's blobs under their own name: named in the request or, for
/// a request that names none, told by the hash length.
#[tokio::test]
async fn every_digest_function_is_served_and_kept_apart() {
    use blob_access::DigestFunction;
    let server = start(ServerConfig::default()).await;
    let mut cas = server.cas().await;
    let data = b"one blob, six digests".to_vec();
    for function in DigestFunction::ALL {
        let d = blob_access::Digest::of_with(function, &data);
        // Named, except where the length tells (as clients before REAPI 2.3 send).
        let named = if function.named_in_resource_names() {
            function.to_proto()
        } else {
            0
        };
        let update = BatchUpdateBlobsRequest {
            instance_name: String::new(),
            requests: vec![batch_update_blobs_request::Request {
                digest: Some(d.to_proto()),
                data: data.clone(),
                compressor: 0,
            }],
            digest_function: named,
        };
        let r = cas.batch_update_blobs(update).await.unwrap().into_inner();
        assert_eq!(code_of(&r.responses[0].status), Code::Ok, "{function}");
        assert!(server.stored(&d).await, "{function}");
        let read = BatchReadBlobsRequest {
            instance_name: String::new(),
            digests: vec![d.to_proto()],
            acceptable_compressors: vec![],
            digest_function: function.to_proto(),
        };
        let r = cas.batch_read_blobs(read).await.unwrap().into_inner();
        assert_eq!(r.responses[0].data, data, "{function}");
    }
    // The same 64 hex characters as BLAKE3 name another blob than as SHA-256.
    let sha = blob_access::Digest::of(b"only under sha256");
    server
        .memory
        .put(&sha, util::once(b"only under sha256".to_vec().into()))
        .await
        .unwrap();
    let find = |function| FindMissingBlobsRequest {
        instance_name: String::new(),
        blob_digests: vec![sha.to_proto()],
        digest_function: function,
    };
    let r = cas.find_missing_blobs(find(9)).await.unwrap().into_inner();
    assert_eq!(r.missing_blob_digests, vec![sha.to_proto()]);
    let r = cas.find_missing_blobs(find(0)).await.unwrap().into_inner();
    assert!(r.missing_blob_digests.is_empty());
}
