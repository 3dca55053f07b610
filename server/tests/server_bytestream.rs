//! ByteStream Read/Write of `server` over a memory backend, with plain tonic clients.

mod server_support;

use blob_access::bytestream_proto::{QueryWriteStatusRequest, ReadRequest};
use blob_access::{util, BlobAccess, Code, Digest};
use blob_access_server::ServerConfig;
use server_support::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const MIB: usize = 1 << 20;

#[tokio::test]
async fn write_then_read_at_edge_sizes() {
    let server = start(ServerConfig::default()).await;
    let mut c = server.bytestream().await;
    for (i, size) in [0, 1, MIB - 1, MIB + 1, 20 * MIB].into_iter().enumerate() {
        let (data, d) = blob(size, i as u64);
        let committed = write(&mut c, write_requests(&write_name(&d), &data, 256 * 1024))
            .await
            .unwrap();
        assert_eq!(committed, size as i64);
        // The empty blob is always present, so its upload ends at once.
        assert!(size == 0 || server.stored(&d).await, "{size}");
        let (got, sizes) = read(&mut c, &read_name(&d), 0, 0).await.unwrap();
        assert!(
            got == data,
            "read back {} of {size} bytes, content differs",
            got.len()
        );
        assert!(sizes.iter().all(|s| *s <= MIB), "{sizes:?}");
        // No tiny messages: all but the last carry at least 64 KiB.
        let (_, head) = sizes.split_last().unwrap_or((&0, &[]));
        assert!(head.iter().all(|s| *s >= 64 * 1024), "{sizes:?}");
    }
}

#[tokio::test]
async fn read_offset_and_limit() {
    let server = start(ServerConfig::default()).await;
    let mut c = server.bytestream().await;
    let (data, d) = blob(MIB + 1, 7);
    write(&mut c, write_requests(&write_name(&d), &data, MIB))
        .await
        .unwrap();
    let size = data.len() as i64;
    let cases = [
        (0, 0),
        (0, 10),
        (10, 0),
        (10, 20),
        (MIB as i64 - 5, 100),
        (5, size * 2),
        (0, size),
        (size - 1, 0),
        (size, 0),
        (size, 5),
    ];
    for (offset, limit) in cases {
        let (got, _) = read(&mut c, &read_name(&d), offset, limit).await.unwrap();
        let end = if limit == 0 {
            size
        } else {
            (offset + limit).min(size)
        };
        let want = &data[offset as usize..end as usize];
        assert!(
            got == want,
            "offset {offset} limit {limit}: got {} bytes",
            got.len()
        );
    }
    for (offset, limit, code) in [
        (size + 1, 0, Code::OutOfRange),
        (-1, 0, Code::OutOfRange),
        (0, -1, Code::InvalidArgument),
    ] {
        let err = read(&mut c, &read_name(&d), offset, limit)
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "offset {offset} limit {limit}: {err}");
    }
}

#[tokio::test]
async fn missing_blobs_and_bad_names() {
    let server = start(ServerConfig::default()).await;
    let mut c = server.bytestream().await;
    let (_, d) = blob(1000, 1);
    let err = read(&mut c, &read_name(&d), 0, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains(d.hash()), "{err}");
    for name in [
        "blobs/abc/3",
        "nothing",
        &format!("compressed-blobs/gzip/{}/1000", d.hash()),
    ] {
        let err = read(&mut c, name, 0, 0).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err}");
    }
}

#[tokio::test]
async fn bad_uploads_are_rejected_and_not_stored() {
    let server = start(ServerConfig::default()).await;
    let mut c = server.bytestream().await;
    let (data, d) = blob(300_000, 1);
    let (other, _) = blob(300_000, 2);
    // Same size, other content.
    let err = write(&mut c, write_requests(&write_name(&d), &other, 65536))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    // Too short, too long.
    for wrong in [&data[..1000], &[&data[..], b"x"].concat()[..]] {
        let err = write(&mut c, write_requests(&write_name(&d), wrong, 65536))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    }
    // A gap in the offsets, and a stream without finish_write.
    let mut reqs = write_requests(&write_name(&d), &data, 65536);
    reqs[2].write_offset += 1;
    let err = write(&mut c, reqs).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("write_offset"), "{err}");
    let mut reqs = write_requests(&write_name(&d), &data, 65536);
    reqs.last_mut().unwrap().finish_write = false;
    let err = write(&mut c, reqs).await.unwrap_err();
    assert!(err.message().contains("finish_write"), "{err}");
    assert!(!server.stored(&d).await);
    // A fresh write must start at 0.
    let mut reqs = write_requests(&write_name(&d), &data, 65536);
    reqs.remove(0);
    let err = write(&mut c, reqs).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(!server.stored(&d).await);
}

#[tokio::test]
async fn zstd_reads_and_writes() {
    let server = start(ServerConfig::default()).await;
    let mut c = server.bytestream().await;
    let (data, d) = blob(3 * MIB + 17, 3);
    let compressed = zstd::encode_all(&data[..], 3).unwrap();
    assert!(compressed.len() < data.len() / 2);
    let name = format!(
        "uploads/u/compressed-blobs/zstd/{}/{}",
        d.hash(),
        d.size_bytes()
    );
    let committed = write(&mut c, write_requests(&name, &compressed, 100_000))
        .await
        .unwrap();
    assert_eq!(committed, compressed.len() as i64);
    assert!(server.stored(&d).await);
    let read_z = format!("compressed-blobs/zstd/{}/{}", d.hash(), d.size_bytes());
    for offset in [0, 1, 1000, MIB + 3, data.len()] {
        let (got, _) = read(&mut c, &read_z, offset as i64, 0).await.unwrap();
        let plain = zstd::decode_all(&got[..]).unwrap();
        assert!(
            plain == data[offset..],
            "offset {offset}: {} bytes",
            plain.len()
        );
    }
    let err = read(&mut c, &read_z, 0, 10).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // The same blob again returns at once with -1 (REAPI's "already there").
    assert_eq!(
        write(&mut c, write_requests(&name, &compressed, MIB))
            .await
            .unwrap(),
        -1
    );
    // Garbage and truncated frames.
    let (data2, d2) = blob(100_000, 4);
    let name2 = format!(
        "uploads/u/compressed-blobs/zstd/{}/{}",
        d2.hash(),
        d2.size_bytes()
    );
    let c2 = zstd::encode_all(&data2[..], 3).unwrap();
    for bad in [&data2[..5000], &c2[..c2.len() - 4]] {
        let err = write(&mut c, write_requests(&name2, bad, 1000))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    }
    assert!(!server.stored(&d2).await);
}

#[tokio::test]
async fn existing_blob_write_ends_early_and_query_write_status() {
    let server = start(ServerConfig::default()).await;
    let mut c = server.bytestream().await;
    let (data, d) = blob(200_000, 5);
    let name = write_name(&d);
    let status = |name: &str| QueryWriteStatusRequest {
        resource_name: name.to_string(),
    };
    let s = c
        .query_write_status(status(&name))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((s.committed_size, s.complete), (0, false));
    server
        .memory
        .put(&d, util::once(data.clone()))
        .await
        .unwrap();
    // Only the first message is ever looked at.
    let mut reqs = write_requests(&name, &data, 1000);
    reqs[1].write_offset = 12345;
    assert_eq!(write(&mut c, reqs).await.unwrap(), 200_000);
    let s = c
        .query_write_status(status(&name))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((s.committed_size, s.complete), (200_000, true));
}

async fn faulty_server(fault: Fault) -> (TestServer, Digest, Arc<AtomicBool>) {
    let memory = Arc::new(blob_access::memory::MemoryBlobAccess::new(
        "memory",
        1 << 30,
    ));
    let (data, d) = blob(2 * MIB, 9);
    memory.put(&d, util::once(data)).await.unwrap();
    let dropped = Arc::new(AtomicBool::new(false));
    let backend = Arc::new(Faulty {
        memory: memory.clone(),
        fault,
        dropped: dropped.clone(),
    });
    (
        start_over(backend, memory, ServerConfig::default()).await,
        d,
        dropped,
    )
}

#[tokio::test]
async fn backend_error_mid_stream_ends_the_read_with_its_code() {
    let (server, d, _) = faulty_server(Fault::FailAfter(100_000)).await;
    let mut c = server.bytestream().await;
    let req = ReadRequest {
        resource_name: read_name(&d),
        read_offset: 0,
        read_limit: 0,
    };
    let mut s = c.read(req).await.unwrap().into_inner();
    let first = s.message().await.unwrap().unwrap();
    assert_eq!(first.data.len(), 100_000);
    let err = s.message().await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(err.message().contains("injected failure"), "{err}");
}

#[tokio::test]
async fn cancelled_read_drops_the_backend_stream() {
    let (server, d, dropped) = faulty_server(Fault::StallAfter(100_000)).await;
    let mut c = server.bytestream().await;
    let req = ReadRequest {
        resource_name: read_name(&d),
        read_offset: 0,
        read_limit: 0,
    };
    let mut s = c.read(req).await.unwrap().into_inner();
    assert_eq!(s.message().await.unwrap().unwrap().data.len(), 100_000);
    assert!(!dropped.load(Ordering::SeqCst));
    drop(s);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !dropped.load(Ordering::SeqCst) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "backend stream still alive"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn the_empty_blob_is_always_present() {
    // REAPI: servers behave as though the empty blob is always available,
    // even if it was never uploaded (clients never upload it).
    let server = start(ServerConfig::default()).await;
    let mut c = server.bytestream().await;
    let empty = Digest::of(b"");
    assert!(!server.stored(&empty).await, "nothing was uploaded");
    let (got, _) = read(&mut c, &read_name(&empty), 0, 0).await.unwrap();
    assert!(got.is_empty());
    let zstd = format!("compressed-blobs/zstd/{}/0", empty.hash());
    let (got, _) = read(&mut c, &zstd, 0, 0).await.unwrap();
    assert!(zstd::decode_all(&got[..]).unwrap().is_empty());
    let err = read(&mut c, &read_name(&empty), 1, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
}
