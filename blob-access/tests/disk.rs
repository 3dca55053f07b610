//! The `disk` backend: atomic writes, eviction, restarts, corruption, concurrency.

use blob_access::disk::DiskBlobAccess;
use blob_access::util::{chunked, once, read_to_bytes};
use blob_access::{BlobAccess, BlobStream, Code, Digest, Error, ReadRange};
use bytes::Bytes;
use futures::StreamExt;
use std::sync::Arc;

fn blob(seed: u8, len: usize) -> (Digest, Bytes) {
    let data: Bytes = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    (Digest::of(&data), data)
}

async fn put(disk: &DiskBlobAccess, seed: u8, len: usize) -> (Digest, Bytes) {
    let (d, data) = blob(seed, len);
    disk.put(&d, chunked(data.clone(), 1000)).await.unwrap();
    (d, data)
}

async fn read(disk: &DiskBlobAccess, d: &Digest, range: ReadRange) -> blob_access::Result<Bytes> {
    read_to_bytes(disk, d, range, 1 << 30).await
}

fn files_under(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        files_under(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn round_trip_ranges_and_missing() {
    let dir = tempfile::tempdir().unwrap();
    let disk = DiskBlobAccess::open("disk", dir.path(), 1 << 20).unwrap();
    let (d, data) = put(&disk, 1, 300_000).await;
    let (empty, _) = put(&disk, 0, 0).await;
    assert_eq!(read(&disk, &d, ReadRange::FULL).await.unwrap(), data);
    assert!(read(&disk, &empty, ReadRange::FULL)
        .await
        .unwrap()
        .is_empty());
    let part = read(&disk, &d, ReadRange::new(250_000, Some(10)))
        .await
        .unwrap();
    assert_eq!(part, data.slice(250_000..250_010));
    let tail = read(&disk, &d, ReadRange::new(299_990, None))
        .await
        .unwrap();
    assert_eq!(tail, data.slice(299_990..));
    let err = read(&disk, &d, ReadRange::new(300_001, None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);

    let (other, _) = blob(2, 10);
    assert_eq!(
        disk.find_missing(&[d.clone(), other.clone(), empty])
            .await
            .unwrap(),
        vec![other.clone()]
    );
    let err = read(&disk, &other, ReadRange::FULL).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.to_string().contains(other.hash()), "{err}");
    assert!(err.to_string().contains("disk"), "{err}");
    // The file is where the module documentation says.
    let path = disk.path_of(&d);
    assert!(path.ends_with(format!(
        "objects/sha256/{}/{}-300000",
        &d.hash()[..2],
        d.hash()
    )));
    assert_eq!(std::fs::read(path).unwrap(), data);
}

#[tokio::test]
async fn bad_or_cancelled_uploads_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let disk = DiskBlobAccess::open("disk", dir.path(), 1 << 20).unwrap();
    let (d, data) = blob(3, 100_000);
    let mut wrong = data.to_vec();
    wrong[5] ^= 1;
    let err = disk.put(&d, once(wrong.into())).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss);

    // A stream that fails half-way aborts the write.
    let failing: BlobStream = futures::stream::iter(vec![
        Ok(data.slice(..50_000)),
        Err(Error::unavailable("client went away")),
    ])
    .boxed();
    let err = disk.put(&d, failing).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);

    // A put whose caller gives up (the future dropped mid-way) stores nothing.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx).boxed();
    let put = tokio::spawn({
        let d = d.clone();
        let dir = dir.path().to_path_buf();
        async move {
            let disk = DiskBlobAccess::open("disk2", &dir, 1 << 20).unwrap();
            disk.put(&d, stream).await
        }
    });
    tx.send(Ok(data.slice(..50_000))).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    put.abort();
    let _ = put.await;
    drop(tx);
    // The blocking writer finishes on its own; give it time to (not) rename.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    assert_eq!(
        disk.find_missing(std::slice::from_ref(&d)).await.unwrap(),
        vec![d.clone()]
    );
    assert!(!disk.path_of(&d).exists());
    assert_eq!(files_under(&dir.path().join("objects")), 0);
    assert_eq!(disk.size_bytes(), 0);

    let too_big = blob(4, 2 << 20).0;
    let err = disk.put(&too_big, once(Bytes::new())).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
}

#[tokio::test]
async fn evicts_least_recently_used_within_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let disk = DiskBlobAccess::open("disk", dir.path(), 1000).unwrap();
    let (a, _) = put(&disk, 1, 400).await;
    let (b, _) = put(&disk, 2, 400).await;
    // Read `a` so that `b` is the least recently used.
    read(&disk, &a, ReadRange::FULL).await.unwrap();
    let (c, _) = put(&disk, 3, 400).await;
    assert_eq!(
        disk.find_missing(&[a.clone(), b.clone(), c.clone()])
            .await
            .unwrap(),
        vec![b.clone()]
    );
    assert!(!disk.path_of(&b).exists());
    assert_eq!(disk.size_bytes(), 800);
    assert_eq!(files_under(&dir.path().join("objects")), 2);
}

#[tokio::test]
async fn survives_restarts_and_cleans_up_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (a, data_a, b) = {
        let disk = DiskBlobAccess::open("disk", dir.path(), 1 << 20).unwrap();
        let (a, data_a) = put(&disk, 1, 5000).await;
        let (b, _) = put(&disk, 2, 5000).await;
        (a, data_a, b)
    };
    // What a crash mid-write leaves: a temp file. And a file truncated by
    // something else, and a stranger's file.
    std::fs::write(dir.path().join("tmp/.blob-access-partial"), b"half a blob").unwrap();
    let path_b = dir.path().join(format!(
        "objects/sha256/{}/{}-5000",
        &b.hash()[..2],
        b.hash()
    ));
    std::fs::write(&path_b, b"short").unwrap();
    std::fs::write(dir.path().join("objects/README"), b"not a blob").unwrap();

    let disk = DiskBlobAccess::open("disk", dir.path(), 1 << 20).unwrap();
    assert_eq!(read(&disk, &a, ReadRange::FULL).await.unwrap(), data_a);
    assert_eq!(disk.find_missing(&[a, b.clone()]).await.unwrap(), vec![b]);
    assert!(!path_b.exists());
    assert_eq!(files_under(&dir.path().join("tmp")), 0);
    assert_eq!(
        std::fs::read(dir.path().join("objects/README")).unwrap(),
        b"not a blob"
    );
    assert_eq!(disk.size_bytes(), 5000);

    // A smaller limit on reopening evicts down to it.
    drop(disk);
    let disk = DiskBlobAccess::open("disk", dir.path(), 100).unwrap();
    assert_eq!(disk.size_bytes(), 0);
}

#[tokio::test]
async fn a_corrupted_file_is_never_served_and_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let disk = DiskBlobAccess::open("disk", dir.path(), 1 << 20).unwrap();
    for range in [ReadRange::FULL, ReadRange::new(10, Some(10))] {
        let (d, data) = put(&disk, 7, 200_000).await;
        let mut bad = data.to_vec();
        bad[150_000] ^= 0xff;
        std::fs::write(disk.path_of(&d), &bad).unwrap();

        let mut s = disk.get(&d, range);
        let mut delivered = 0;
        let mut last = None;
        while let Some(item) = s.next().await {
            match item {
                Ok(c) => delivered += c.len() as u64,
                Err(e) => last = Some(e),
            }
        }
        let err = last.expect("a corrupted read must fail");
        assert_eq!(err.code(), Code::NotFound, "{err}");
        assert!(err.to_string().contains("corrupted"), "{err}");
        assert!(delivered < range.len_in(d.size_bytes()).unwrap());
        assert!(!disk.path_of(&d).exists());
        assert_eq!(
            disk.find_missing(std::slice::from_ref(&d)).await.unwrap(),
            vec![d.clone()]
        );
        // Stored again, it reads fine.
        disk.put(&d, once(data.clone())).await.unwrap();
        assert_eq!(read(&disk, &d, ReadRange::FULL).await.unwrap(), data);
        std::fs::write(disk.path_of(&d), b"").unwrap();
        let _ = read(&disk, &d, ReadRange::FULL).await.unwrap_err();
    }
    // A file deleted behind the store's back is NOT_FOUND, not an I/O error.
    let (d, _) = put(&disk, 8, 1000).await;
    std::fs::remove_file(disk.path_of(&d)).unwrap();
    let err = read(&disk, &d, ReadRange::FULL).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_and_readers_of_the_same_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(DiskBlobAccess::open("disk", dir.path(), 1 << 22).unwrap());
    let tasks: Vec<_> = (0..48u32)
        .map(|i| {
            let disk = disk.clone();
            tokio::spawn(async move {
                // Eight blobs, each written and read by six tasks at once.
                let (d, data) = blob((i % 8) as u8, 100_000 + (i % 8) as usize);
                disk.put(&d, chunked(data.clone(), 4096)).await.unwrap();
                let got = read_to_bytes(&*disk, &d, ReadRange::FULL, 1 << 20).await;
                // Another writer of the same blob never makes a reader see a
                // partial file: either the whole blob or (after eviction) NOT_FOUND.
                match got {
                    Ok(got) => assert_eq!(got, data),
                    Err(e) => assert_eq!(e.code(), Code::NotFound, "{e}"),
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(files_under(&dir.path().join("objects")), 8);
    assert_eq!(files_under(&dir.path().join("tmp")), 0);
    assert_eq!(disk.size_bytes(), (0..8).map(|i| 100_000 + i).sum::<u64>());
}

/// A store whose path is a symlink to a directory works, and what is in its
/// directory but not the store's (a user's files in `tmp/`, symlinks and
/// FIFOs among the objects, even under a blob's name) is never deleted,
/// replaced or followed, across reopening and eviction.
#[tokio::test]
async fn what_is_not_the_store_s_is_left_alone() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let store = dir.path().join("store");
    symlink(&real, &store).unwrap();
    let outside = dir.path().join("outside");
    std::fs::write(&outside, b"a user's file").unwrap();

    let disk = DiskBlobAccess::open("disk", &store, 1 << 20).unwrap();
    let (a, data_a) = put(&disk, 1, 5000).await;
    drop(disk);
    let (b, _) = blob(2, 5000);
    let b_dir = real.join(format!("objects/sha256/{}", &b.hash()[..2]));
    std::fs::create_dir_all(&b_dir).unwrap();
    let b_link = b_dir.join(format!("{}-5000", b.hash()));
    symlink(&outside, &b_link).unwrap();
    symlink(dir.path(), real.join("objects/sha256/up")).unwrap();
    std::fs::write(real.join("tmp/notes.txt"), b"mine").unwrap();
    let fifo = std::ffi::CString::new(real.join("objects/fifo").to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);

    let disk = DiskBlobAccess::open("disk", &store, 1 << 20).unwrap();
    assert_eq!(read(&disk, &a, ReadRange::FULL).await.unwrap(), data_a);
    assert_eq!(
        disk.find_missing(std::slice::from_ref(&b)).await.unwrap(),
        vec![b.clone()]
    );
    drop(disk);
    // Evicting everything leaves the strangers too.
    let disk = DiskBlobAccess::open("disk", &store, 10).unwrap();
    assert_eq!(disk.size_bytes(), 0);
    assert!(std::fs::symlink_metadata(&b_link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(std::fs::symlink_metadata(real.join("objects/sha256/up")).is_ok());
    assert_eq!(std::fs::read(real.join("tmp/notes.txt")).unwrap(), b"mine");
    assert_eq!(std::fs::read(&outside).unwrap(), b"a user's file");
    assert!(std::fs::symlink_metadata(real.join("objects/fifo")).is_ok());
    assert!(std::fs::symlink_metadata(&store)
        .unwrap()
        .file_type()
        .is_symlink());
}
