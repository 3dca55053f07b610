//! `blob-access fetch-tree` against `serve` over memory: files, executable
//! bits, symlinks, nested directories; a missing blob and a hostile name.

mod support;

use blob_access::proto::{Directory, DirectoryNode, FileNode, SymlinkNode};
use blob_access::{util, BlobAccess, BuildContext, BuildNode, Digest};
use bytes::Bytes;
use prost::Message;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use support::*;

struct Cas {
    rt: tokio::runtime::Runtime,
    cas: Arc<dyn BlobAccess>,
    config: std::path::PathBuf,
    _serve: Serve,
}

impl Cas {
    fn start(dir: &Path) -> Cas {
        let serve = Serve::start(None);
        let config = grpc_config(dir, "c.yaml", serve.port);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let node = blob_access_config::load_file(&config).unwrap();
        let cas = rt
            .block_on(async { node.build(&BuildContext::root()) })
            .unwrap();
        Cas {
            rt,
            cas,
            config,
            _serve: serve,
        }
    }
    fn put(&self, data: impl Into<Bytes>) -> Digest {
        let data = data.into();
        let d = Digest::of(&data);
        self.rt
            .block_on(self.cas.put(&d, util::once(data)))
            .unwrap();
        d
    }
    fn put_dir(&self, dir: &Directory) -> Digest {
        self.put(dir.encode_to_vec())
    }
    fn fetch(&self, root: &Digest, out: &Path) -> std::process::Output {
        cli(&[
            "fetch-tree",
            "--config",
            self.config.to_str().unwrap(),
            &root.to_string(),
            out.to_str().unwrap(),
        ])
    }
}

fn file(name: &str, d: &Digest, executable: bool) -> FileNode {
    FileNode {
        name: name.into(),
        digest: Some(d.to_proto()),
        is_executable: executable,
        ..Default::default()
    }
}

fn dir(name: &str, d: &Digest) -> DirectoryNode {
    DirectoryNode {
        name: name.into(),
        digest: Some(d.to_proto()),
    }
}

/// A tree with a nested 3 MiB file; `upload_big: false` leaves that blob out.
fn tree(cas: &Cas, big: &[u8], upload_big: bool) -> Digest {
    let big_digest = if upload_big {
        cas.put(big.to_vec())
    } else {
        Digest::of(big)
    };
    let empty = cas.put(Bytes::new());
    let deeper = cas.put_dir(&Directory {
        files: vec![
            file("big.bin", &big_digest, false),
            file("empty", &empty, false),
        ],
        ..Default::default()
    });
    let sub = cas.put_dir(&Directory {
        directories: vec![dir("deeper", &deeper)],
        ..Default::default()
    });
    let script = cas.put(&b"#!/bin/sh\necho hi\n"[..]);
    let bin = cas.put_dir(&Directory {
        files: vec![file("run.sh", &script, true)],
        ..Default::default()
    });
    let hello = cas.put(&b"hello\n"[..]);
    cas.put_dir(&Directory {
        files: vec![file("a.txt", &hello, false)],
        directories: vec![dir("bin", &bin), dir("sub", &sub)],
        symlinks: vec![SymlinkNode {
            name: "link".into(),
            target: "a.txt".into(),
            ..Default::default()
        }],
        ..Default::default()
    })
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn fetches_files_modes_symlinks_and_nested_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let cas = Cas::start(tmp.path());
    let big = std::fs::read(random_file(tmp.path(), 3 << 20)).unwrap();
    let root = tree(&cas, &big, true);
    let out = tmp.path().join("out");
    let o = cas.fetch(&root, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    assert_eq!(std::fs::read(out.join("a.txt")).unwrap(), b"hello\n");
    assert_eq!(mode(&out.join("a.txt")), 0o644);
    assert_eq!(mode(&out.join("bin/run.sh")), 0o755);
    assert_eq!(std::fs::read(out.join("sub/deeper/big.bin")).unwrap(), big);
    assert_eq!(std::fs::read(out.join("sub/deeper/empty")).unwrap(), b"");
    assert_eq!(
        std::fs::read_link(out.join("link")).unwrap(),
        Path::new("a.txt")
    );
    let summary = String::from_utf8_lossy(&o.stderr);
    assert!(summary.contains("4 directories, 4 files"), "{summary}");
    // Fetching again over the result replaces it in place.
    assert!(cas.fetch(&root, &out).status.success());
}

#[test]
fn a_missing_blob_fails_naming_its_path_and_leaves_no_partial_file() {
    let tmp = tempfile::tempdir().unwrap();
    let cas = Cas::start(tmp.path());
    let big = vec![7u8; 3 << 20];
    let root = tree(&cas, &big, false);
    let out = tmp.path().join("out");
    let o = cas.fetch(&root, &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("sub/deeper/big.bin"), "{err}");
    assert!(err.contains(Digest::of(&big).hash()), "{err}");
    assert!(!out.join("sub/deeper/big.bin").exists());
    let leftovers: Vec<_> = std::fs::read_dir(out.join("sub/deeper"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn entry_names_that_escape_the_output_directory_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cas = Cas::start(tmp.path());
    let evil = cas.put(&b"owned"[..]);
    for name in ["..", "a/../../b", ""] {
        let root = cas.put_dir(&Directory {
            files: vec![file(name, &evil, false)],
            ..Default::default()
        });
        let out = tmp.path().join("out");
        let o = cas.fetch(&root, &out);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{name:?} accepted");
        assert!(err.contains("invalid entry name"), "{err}");
    }
    assert!(!tmp.path().join("b").exists());
    // Not a Directory message at all.
    let junk = cas.put(&b"\xff\xff\xff"[..]);
    let o = cas.fetch(&junk, &tmp.path().join("out2"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not a Directory message"), "{err}");
}
