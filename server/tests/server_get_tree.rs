//! GetTree over random trees: every directory arrives once per call, pages
//! respect `page_size`, page tokens continue a walk across calls (stateless),
//! one call's work is bounded, and broken trees get clear statuses.

mod server_support;

use blob_access::proto::{Directory, DirectoryNode, FileNode, GetTreeRequest};
use blob_access::{util, BlobAccess, Code, Digest};
use blob_access_server::ServerConfig;
use bytes::Bytes;
use futures::StreamExt;
use prost::Message;
use rand::{Rng, SeedableRng};
use server_support::*;
use std::collections::BTreeSet;

async fn store(server: &TestServer, dir: &Directory) -> Digest {
    let data = Bytes::from(dir.encode_to_vec());
    let d = Digest::of(&data);
    server.memory.put(&d, util::once(data)).await.unwrap();
    d
}

/// A random tree of about `n` directories, stored bottom-up; returns the root
/// and the set of all its distinct directories.
async fn random_tree(server: &TestServer, seed: u64, n: usize) -> (Digest, BTreeSet<Digest>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut made: Vec<Digest> = Vec::new();
    for i in 0..n {
        let mut dir = Directory::default();
        for f in 0..rng.random_range(0..3) {
            dir.files.push(FileNode {
                name: format!("f{f}"),
                digest: Some(Digest::of(format!("{seed}/{i}/{f}").as_bytes()).to_proto()),
                ..Default::default()
            });
        }
        // Children among the directories made so far (shared ones included).
        let mut names = 0;
        while !made.is_empty() && rng.random_bool(0.6) && names < 4 {
            let child = &made[rng.random_range(0..made.len())];
            dir.directories.push(DirectoryNode {
                name: format!("d{names}"),
                digest: Some(child.to_proto()),
            });
            names += 1;
        }
        dir.files.push(FileNode {
            name: format!("unique{i}"),
            digest: Some(Digest::of(&[i as u8]).to_proto()),
            ..Default::default()
        });
        made.push(store(server, &dir).await);
    }
    let root = Directory {
        directories: made
            .iter()
            .enumerate()
            .rev()
            .take(5)
            .map(|(i, d)| DirectoryNode {
                name: format!("top{i}"),
                digest: Some(d.to_proto()),
            })
            .collect(),
        ..Default::default()
    };
    let root = store(server, &root).await;
    let mut all = BTreeSet::from([root.clone()]);
    let mut todo = vec![root.clone()];
    while let Some(d) = todo.pop() {
        let data = util::read_to_bytes(&*server.memory, &d, Default::default(), 1 << 20)
            .await
            .unwrap();
        for c in Directory::decode(data).unwrap().directories {
            let c = Digest::from_proto(Default::default(), c.digest.as_ref().unwrap()).unwrap();
            if all.insert(c.clone()) {
                todo.push(c);
            }
        }
    }
    (root, all)
}

fn request(root: &Digest, page_size: i32, token: String) -> GetTreeRequest {
    GetTreeRequest {
        instance_name: String::new(),
        root_digest: Some(root.to_proto()),
        page_size,
        page_token: token,
        digest_function: 0,
    }
}

/// Calls GetTree, following tokens across calls until none is left; returns
/// the directories and the number of calls.
async fn walk(server: &TestServer, root: &Digest, page_size: i32) -> (Vec<Digest>, usize) {
    let mut cas = server.cas().await;
    let (mut got, mut calls, mut token) = (Vec::new(), 0, String::new());
    loop {
        calls += 1;
        let mut pages = cas
            .get_tree(request(root, page_size, token.clone()))
            .await
            .unwrap()
            .into_inner();
        let mut last = String::new();
        while let Some(page) = pages.next().await {
            let page = page.unwrap();
            if page_size > 0 {
                assert!(page.directories.len() <= page_size as usize);
            }
            let bytes: usize = page.directories.iter().map(|d| d.encoded_len()).sum();
            assert!(bytes <= 4 << 20, "a page of {bytes} bytes");
            got.extend(
                page.directories
                    .iter()
                    .map(|d| Digest::of(&d.encode_to_vec())),
            );
            last = page.next_page_token;
        }
        if last.is_empty() {
            return (got, calls);
        }
        token = last;
    }
}

#[tokio::test]
async fn random_trees_arrive_whole_in_pages() {
    let server = start(ServerConfig::default()).await;
    for seed in 0..6u64 {
        let (root, all) = random_tree(&server, seed, 40 + seed as usize * 30).await;
        for page_size in [0, 1, 3, 50] {
            let (got, _) = walk(&server, &root, page_size).await;
            let distinct: BTreeSet<Digest> = got.iter().cloned().collect();
            assert_eq!(distinct, all, "seed {seed} page_size {page_size}");
            assert_eq!(got[0], root, "breadth first: the root comes first");
        }
    }
}

#[tokio::test]
async fn one_call_does_bounded_work_and_its_token_continues() {
    let server = start(ServerConfig {
        max_tree_directories_per_call: 4_000,
        ..Default::default()
    })
    .await;
    // A root with more children than one call sends.
    let mut root = Directory::default();
    for i in 0..10_050u32 {
        let child = Directory {
            files: vec![FileNode {
                name: "f".into(),
                digest: Some(Digest::of(&i.to_le_bytes()).to_proto()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let d = store(&server, &child).await;
        root.directories.push(DirectoryNode {
            name: format!("c{i}"),
            digest: Some(d.to_proto()),
        });
    }
    let root = store(&server, &root).await;
    let (got, calls) = walk(&server, &root, 0).await;
    assert_eq!(got.len(), 10_051);
    assert_eq!(got.iter().collect::<BTreeSet<_>>().len(), 10_051);
    assert_eq!(calls, 3, "one call sent more than its bound");
}

#[tokio::test]
async fn broken_trees_and_tokens_get_clear_statuses() {
    let server = start(ServerConfig::default()).await;
    let mut cas = server.cas().await;
    let first_error = |r: Result<tonic::Response<tonic::Streaming<_>>, tonic::Status>| async move {
        match r {
            Err(s) => s,
            Ok(resp) => {
                let mut s = resp.into_inner();
                loop {
                    match s.next().await {
                        Some(Err(e)) => return e,
                        Some(Ok(_)) => continue,
                        None => panic!("the walk succeeded"),
                    }
                }
            }
        }
    };
    let missing = Digest::of(b"not stored");
    let e = first_error(cas.get_tree(request(&missing, 0, String::new())).await).await;
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains(missing.hash()), "{e:?}");

    let not_a_dir = Bytes::from_static(&[0xff, 0xff, 0xff]);
    let bad = Digest::of(&not_a_dir);
    server
        .memory
        .put(&bad, util::once(not_a_dir))
        .await
        .unwrap();
    let e = first_error(cas.get_tree(request(&bad, 0, String::new())).await).await;
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // A missing subdirectory is left out (REAPI), the rest of the tree is sent.
    let present = store(&server, &Directory::default()).await;
    let parent = Directory {
        directories: vec![
            DirectoryNode {
                name: "gone".into(),
                digest: Some(missing.to_proto()),
            },
            DirectoryNode {
                name: "here".into(),
                digest: Some(present.to_proto()),
            },
        ],
        ..Default::default()
    };
    let parent = store(&server, &parent).await;
    let (got, _) = walk(&server, &parent, 0).await;
    assert_eq!(got, vec![parent.clone(), present]);

    for token in ["nonsense", "-1", "ab/1,", &format!("{}/x", "a".repeat(64))] {
        let e = first_error(cas.get_tree(request(&parent, 0, token.to_string())).await).await;
        assert_eq!(e.code(), Code::InvalidArgument, "{token}: {e:?}");
    }
}

/// Every page's token, given to a new call, continues right after that page:
/// what a client does after its stream was cut.
#[tokio::test]
async fn every_token_resumes_where_its_page_ended() {
    let server = start(ServerConfig::default()).await;
    let (root, _) = random_tree(&server, 42, 120).await;
    let mut cas = server.cas().await;
    let mut pages = Vec::new();
    let mut stream = cas
        .get_tree(request(&root, 3, String::new()))
        .await
        .unwrap()
        .into_inner();
    while let Some(page) = stream.next().await {
        let page = page.unwrap();
        let dirs: Vec<Digest> = page
            .directories
            .iter()
            .map(|d| Digest::of(&d.encode_to_vec()))
            .collect();
        pages.push((dirs, page.next_page_token));
    }
    assert!(pages.len() > 3, "too few pages to test: {}", pages.len());
    assert!(pages.last().unwrap().1.is_empty());
    for (i, (_, token)) in pages.iter().enumerate().take(pages.len() - 1) {
        let rest: Vec<Digest> = pages[i + 1..].iter().flat_map(|(d, _)| d.clone()).collect();
        let mut resumed = Vec::new();
        let mut stream = cas
            .get_tree(request(&root, 3, token.clone()))
            .await
            .unwrap()
            .into_inner();
        while let Some(page) = stream.next().await {
            let page = page.unwrap();
            resumed.extend(
                page.directories
                    .iter()
                    .map(|d| Digest::of(&d.encode_to_vec())),
            );
        }
        assert_eq!(resumed, rest, "resuming with token {token}");
    }
}

#[tokio::test]
async fn pages_stay_under_four_mebibytes() {
    let server = start(ServerConfig::default()).await;
    let mut root = Directory::default();
    for i in 0..9u32 {
        // About 1.5 MiB each: two per page at most.
        let files = (0..20_000u32)
            .map(|f| FileNode {
                name: format!("{i}-{f:05}-{}", "x".repeat(6)),
                digest: Some(Digest::of(&f.to_le_bytes()).to_proto()),
                ..Default::default()
            })
            .collect();
        let big = Directory {
            files,
            ..Default::default()
        };
        let d = store(&server, &big).await;
        root.directories.push(DirectoryNode {
            name: format!("big{i}"),
            digest: Some(d.to_proto()),
        });
    }
    let root = store(&server, &root).await;
    let mut cas = server.cas().await;
    let mut stream = cas
        .get_tree(request(&root, 0, String::new()))
        .await
        .unwrap()
        .into_inner();
    let (mut pages, mut dirs) = (0, 0);
    while let Some(page) = stream.next().await {
        let page = page.unwrap();
        let bytes: usize = page.directories.iter().map(|d| d.encoded_len()).sum();
        assert!(bytes <= 4 << 20, "a page of {bytes} bytes");
        pages += 1;
        dirs += page.directories.len();
    }
    assert_eq!(dirs, 10);
    assert!(pages >= 5, "{pages} pages for 9 directories of 1.5 MiB");
}
