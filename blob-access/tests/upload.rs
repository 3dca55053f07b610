//! `upload::put_files`: every file's digest in order, one `find_missing` for
//! all, and only the blobs the CAS lacks sent, each once.

use blob_access::memory::MemoryBlobAccess;
use blob_access::upload::{put_files, Progress};
use blob_access::{util, BlobAccess, BlobStream, Digest, DigestFunction, ReadRange, Result};
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Memory that counts the calls made to it.
struct Counting {
    inner: MemoryBlobAccess,
    puts: AtomicU64,
    find_missing: AtomicU64,
}

#[async_trait::async_trait]
impl BlobAccess for Counting {
    fn get(&self, digest: &Digest, range: ReadRange) -> BlobStream {
        self.inner.get(digest, range)
    }
    async fn put(&self, digest: &Digest, data: BlobStream) -> Result<()> {
        self.puts.fetch_add(1, Ordering::SeqCst);
        self.inner.put(digest, data).await
    }
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.find_missing.fetch_add(1, Ordering::SeqCst);
        self.inner.find_missing(digests).await
    }
}

#[tokio::test]
async fn present_and_repeated_blobs_are_not_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let cas = Arc::new(Counting {
        inner: MemoryBlobAccess::new("memory", 64 << 20),
        puts: AtomicU64::new(0),
        find_missing: AtomicU64::new(0),
    });
    // 30 files: 0..9 already stored, 10..19 new, 20..29 repeat 10..19; one large.
    let content = |i: usize| -> Vec<u8> {
        let i = if i >= 20 { i - 10 } else { i };
        if i == 15 {
            vec![b'L'; 3 << 20]
        } else {
            format!("file {i}\n").repeat(i + 1).into_bytes()
        }
    };
    let paths: Vec<_> = (0..30)
        .map(|i| {
            let p = dir.path().join(format!("f{i}"));
            std::fs::write(&p, content(i)).unwrap();
            p
        })
        .collect();
    for i in 0..10 {
        let data = Bytes::from(content(i));
        cas.inner
            .put(&Digest::of(&data), util::once(data))
            .await
            .unwrap();
    }
    let hashed = AtomicU64::new(0);
    let sent = AtomicU64::new(0);
    let progress = |p: Progress| match p {
        Progress::Hashed(_) => {
            hashed.fetch_add(1, Ordering::SeqCst);
        }
        Progress::Missing { files, .. } => assert_eq!(files, 10),
        Progress::Sent(_) => {
            sent.fetch_add(1, Ordering::SeqCst);
        }
    };
    let report = put_files(&*cas, &paths, DigestFunction::Sha256, 4, &progress)
        .await
        .unwrap();
    for (i, d) in report.digests.iter().enumerate() {
        assert_eq!(*d, Digest::of(&content(i)), "file {i}");
    }
    assert_eq!(cas.puts.load(Ordering::SeqCst), 10);
    assert_eq!(cas.find_missing.load(Ordering::SeqCst), 1);
    assert_eq!(report.sent_blobs, 10);
    assert_eq!(hashed.load(Ordering::SeqCst), 30);
    assert_eq!(sent.load(Ordering::SeqCst), 10);
    assert!(cas
        .inner
        .find_missing(&report.digests)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn a_missing_file_is_named() {
    let cas = MemoryBlobAccess::new("memory", 1 << 20);
    let e = put_files(
        &cas,
        &["/nonexistent/file".into()],
        DigestFunction::Sha256,
        4,
        &|_| {},
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("/nonexistent/file"), "{e}");
}

#[tokio::test]
async fn many_files_across_groups_keep_their_order() {
    // More files than one hand-off to a hashing or reading thread takes, of
    // sizes that also cut the reading groups by bytes.
    let dir = tempfile::tempdir().unwrap();
    let cas = MemoryBlobAccess::new("memory", 256 << 20);
    let content = |i: usize| -> Vec<u8> { vec![(i % 251) as u8; (i * 7919) % (600 << 10)] };
    let paths: Vec<_> = (0..300)
        .map(|i| {
            let p = dir.path().join(format!("f{i}"));
            std::fs::write(&p, content(i)).unwrap();
            p
        })
        .collect();
    let report = put_files(&cas, &paths, DigestFunction::Sha256, 8, &|_| {})
        .await
        .unwrap();
    assert_eq!(report.digests.len(), 300);
    for (i, d) in report.digests.iter().enumerate() {
        assert_eq!(*d, Digest::of(&content(i)), "file {i}");
    }
    assert!(cas.find_missing(&report.digests).await.unwrap().is_empty());
}

#[tokio::test]
async fn pipes_devices_and_directories_are_refused_naming_them() {
    // They cannot be read twice (hash, then send); a FIFO would block.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(made.unwrap().success());
    let cas = MemoryBlobAccess::new("memory", 1 << 20);
    for path in [fifo, "/dev/null".into(), dir.path().to_path_buf()] {
        let e = put_files(
            &cas,
            std::slice::from_ref(&path),
            DigestFunction::Sha256,
            4,
            &|_| {},
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), blob_access::Code::InvalidArgument, "{e}");
        let msg = e.to_string();
        assert!(msg.contains(&*path.to_string_lossy()), "{msg}");
        assert!(msg.contains("not a regular file"), "{msg}");
    }
}
