//! `completeness_checking`: a result is served only if every blob it names is
//! in the CAS; otherwise NOT_FOUND saying why. CAS errors keep their code,
//! existence checks are batched, and the config gives the node its CAS.

mod common;

use blob_access::action_cache::{ActionCache, ActionResult};
use blob_access::memory::MemoryBlobAccess;
use blob_access::proto::{Directory, DirectoryNode, FileNode, OutputDirectory, OutputFile, Tree};
use blob_access::{
    BlobAccess, BlobStream, BuildContext, Code, Digest, Error, NodeMetrics, ReadRange, Result,
};
use blob_access_decorators::completeness_checking::CompletenessChecking;
use bytes::Bytes;
use common::ac::{ac_counter, CallLog, TestAc};
use common::*;
use prost::Message;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

const MAX_TREE: u64 = 1 << 20;

fn action(name: &str) -> Digest {
    Digest::of(format!("Action {name}").as_bytes())
}

fn file(path: &str, d: &Digest) -> OutputFile {
    OutputFile {
        path: path.into(),
        digest: Some(d.to_proto()),
        ..Default::default()
    }
}

fn dir(path: &str, tree: &Digest) -> OutputDirectory {
    OutputDirectory {
        path: path.into(),
        tree_digest: Some(tree.to_proto()),
        ..Default::default()
    }
}

fn file_node(name: &str, d: &Digest) -> FileNode {
    FileNode {
        name: name.into(),
        digest: Some(d.to_proto()),
        ..Default::default()
    }
}

/// A Tree whose root holds `root_file` and a directory `sub` holding `child_file`.
fn tree(root_file: &Digest, child_file: &Digest) -> Bytes {
    let child = Directory {
        files: vec![file_node("inner.txt", child_file)],
        ..Default::default()
    };
    let root = Directory {
        files: vec![file_node("top.txt", root_file)],
        directories: vec![DirectoryNode {
            name: "sub".into(),
            digest: Some(Digest::of(&child.encode_to_vec()).to_proto()),
        }],
        ..Default::default()
    };
    Tree {
        root: Some(root),
        children: vec![child],
    }
    .encode_to_vec()
    .into()
}

async fn store(cas: &dyn BlobAccess, data: &Bytes) -> Digest {
    let d = Digest::of(data);
    cas.put(&d, blob_access::util::once(data.clone()))
        .await
        .unwrap();
    d
}

/// A result naming one blob of each kind, and those blobs by kind.
fn full_result() -> (ActionResult, Vec<(&'static str, Bytes)>) {
    let blob = |s: &str| Bytes::from(s.to_string());
    let (out, stdout, stderr) = (blob("a.o"), blob("out"), blob("err"));
    let (root_file, child_file) = (blob("top"), blob("inner"));
    let tree_blob = tree(&Digest::of(&root_file), &Digest::of(&child_file));
    let result = ActionResult {
        output_files: vec![file("out/a.o", &Digest::of(&out))],
        output_directories: vec![dir("out/dir", &Digest::of(&tree_blob))],
        stdout_digest: Some(Digest::of(&stdout).to_proto()),
        stderr_digest: Some(Digest::of(&stderr).to_proto()),
        exit_code: 0,
        ..Default::default()
    };
    let blobs = vec![
        ("an output file", out),
        ("stdout", stdout),
        ("stderr", stderr),
        ("the Tree blob", tree_blob),
        ("a file in the Tree's root", root_file),
        ("a file in a Tree's child", child_file),
    ];
    (result, blobs)
}

struct Setup {
    cas: Arc<Counting>,
    backend: Arc<TestAc>,
    cc: CompletenessChecking,
}

fn setup(max_tree: u64) -> Setup {
    setup_over(Arc::new(MemoryBlobAccess::new("cas", 256 << 20)), max_tree)
}

fn setup_over(cas: Arc<dyn BlobAccess>, max_tree: u64) -> Setup {
    let cas = Counting::new(cas);
    let log = CallLog::default();
    let backend = TestAc::new("results", &log);
    let cc = CompletenessChecking::new("top.cc", backend.clone(), cas.clone(), max_tree);
    Setup { cas, backend, cc }
}

impl Setup {
    async fn with(&self, a: &Digest, result: &ActionResult) {
        self.backend.update_action_result(a, result).await.unwrap();
    }
    fn counter(&self, name: &str) -> u64 {
        ac_counter(&self.cc, "completeness_checking", name)
    }
}

#[tokio::test]
async fn complete_results_are_served() {
    let s = setup(MAX_TREE);
    let (result, blobs) = full_result();
    let mut named = BTreeSet::new();
    for (what, data) in &blobs {
        let d = store(&*s.cas, data).await;
        if *what != "the Tree blob" {
            named.insert(d);
        }
    }
    let a = action("a");
    s.with(&a, &result).await;
    assert_eq!(s.cc.get_action_result(&a).await.unwrap(), result);
    // One existence check, of every blob named but the Tree (which was read).
    let asked = s.cas.asked();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].iter().cloned().collect::<BTreeSet<_>>(), named);
    assert_eq!(asked[0].len(), named.len(), "a digest was asked twice");
    assert_eq!(s.cas.gets(), 1);
    assert_eq!(s.counter("complete"), 1);
    assert_eq!(s.counter("incomplete"), 0);

    // A result naming nothing needs no CAS at all.
    let bare = ActionResult {
        exit_code: 2,
        stdout_raw: b"inline".to_vec(),
        ..Default::default()
    };
    s.with(&action("bare"), &bare).await;
    assert_eq!(s.cc.get_action_result(&action("bare")).await.unwrap(), bare);
    assert_eq!(s.cas.asked().len(), 1);
    assert_eq!(s.cas.gets(), 1);

    // A miss of the backend is its own NOT_FOUND, not an incomplete result.
    let err = s.cc.get_action_result(&action("none")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.backend(), Some("results"), "{err}");
    assert_eq!(s.counter("incomplete"), 0);
}

#[tokio::test]
async fn each_missing_reference_is_a_miss_saying_why() {
    let (result, blobs) = full_result();
    for (i, (missing, data)) in blobs.iter().enumerate() {
        let s = setup(MAX_TREE);
        for (j, (_, other)) in blobs.iter().enumerate() {
            if i != j {
                store(&*s.cas, other).await;
            }
        }
        let a = action(missing);
        s.with(&a, &result).await;
        let err = s.cc.get_action_result(&a).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{missing}: {err}");
        assert_eq!(err.digest(), Some(&a), "{missing}: {err}");
        assert_eq!(err.backend(), Some("top.cc"), "{missing}: {err}");
        assert!(err.message().contains("incomplete"), "{missing}: {err}");
        // It names the blob that is missing.
        let d = Digest::of(data);
        assert!(
            err.message().contains(&d.to_string()),
            "{missing} ({d}): {err}"
        );
        if *missing == "the Tree blob" {
            assert!(err.message().contains("out/dir"), "{err}");
        } else {
            assert!(err.message().contains("not in the CAS"), "{err}");
        }
        assert_eq!(s.counter("incomplete"), 1);
        assert_eq!(s.counter("complete"), 0);
        // Stored again, the result is served.
        store(&*s.cas, data).await;
        assert_eq!(s.cc.get_action_result(&a).await.unwrap(), result);
    }
}

#[tokio::test]
async fn malformed_results_and_trees_are_not_served() {
    let s = setup(MAX_TREE);
    let garbage = Bytes::from_static(b"\x0a\x7fnot a Tree at all");
    assert!(Tree::decode(garbage.clone()).is_err());
    let bad_tree = store(&*s.cas, &garbage).await;
    let cases = [
        (
            ActionResult {
                output_directories: vec![dir("out/dir", &bad_tree)],
                ..Default::default()
            },
            "does not parse",
        ),
        (
            ActionResult {
                output_files: vec![OutputFile {
                    path: "no/digest".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            "no/digest",
        ),
        (
            ActionResult {
                output_directories: vec![OutputDirectory {
                    path: "no/tree".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            "no/tree",
        ),
        (
            ActionResult {
                stdout_digest: Some(blob_access::proto::Digest {
                    hash: "xyz".into(),
                    size_bytes: 3,
                }),
                ..Default::default()
            },
            "stdout",
        ),
    ];
    for (i, (result, why)) in cases.iter().enumerate() {
        let a = action(&i.to_string());
        s.with(&a, result).await;
        let err = s.cc.get_action_result(&a).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{why}: {err}");
        assert_eq!(err.digest(), Some(&a));
        assert!(err.message().contains(why), "{why}: {err}");
    }
    assert_eq!(s.counter("incomplete"), cases.len() as u64);
}

#[tokio::test]
async fn trees_beyond_the_limit_are_not_served() {
    let (f1, f2) = (Bytes::from("one"), Bytes::from("two"));
    let (t1, t2) = (
        tree(&Digest::of(&f1), &Digest::of(&f2)),
        tree(&Digest::of(&f2), &Digest::of(&f1)),
    );
    let limit = (t1.len() + t2.len()) as u64;
    for (max, served) in [(limit, true), (limit - 1, false)] {
        let s = setup(max);
        for data in [&f1, &f2, &t1, &t2] {
            store(&*s.cas, data).await;
        }
        let result = ActionResult {
            output_directories: vec![dir("a", &Digest::of(&t1)), dir("b", &Digest::of(&t2))],
            ..Default::default()
        };
        let a = action("a");
        s.with(&a, &result).await;
        let got = s.cc.get_action_result(&a).await;
        if served {
            assert_eq!(got.unwrap(), result);
        } else {
            let err = got.unwrap_err();
            assert_eq!(err.code(), Code::NotFound, "{err}");
            assert!(err.message().contains("max_total_tree_size_bytes"), "{err}");
            // The first tree was read, not the one over the limit.
            assert_eq!(s.cas.gets(), 1);
        }
    }
    // A single tree over the limit is not even read.
    let s = setup(t1.len() as u64 - 1);
    store(&*s.cas, &t1).await;
    let a = action("big");
    let result = ActionResult {
        output_directories: vec![dir("a", &Digest::of(&t1))],
        ..Default::default()
    };
    s.with(&a, &result).await;
    let err = s.cc.get_action_result(&a).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(s.cas.gets(), 0);
}

#[tokio::test]
async fn the_empty_blob_is_never_missing() {
    // Nothing stored: the memory CAS reports even the empty blob missing.
    let s = setup(MAX_TREE);
    let empty = Digest::of(b"");
    assert_eq!(
        s.cas
            .find_missing(std::slice::from_ref(&empty))
            .await
            .unwrap(),
        vec![empty.clone()]
    );
    let t = tree(&empty, &empty);
    let tree_d = store(&*s.cas, &t).await;
    let result = ActionResult {
        output_files: vec![file("empty.txt", &empty)],
        output_directories: vec![dir("d", &tree_d)],
        stdout_digest: Some(empty.to_proto()),
        stderr_digest: Some(empty.to_proto()),
        ..Default::default()
    };
    let a = action("a");
    s.with(&a, &result).await;
    assert_eq!(s.cc.get_action_result(&a).await.unwrap(), result);
    let asked: Vec<Digest> = s.cas.asked()[1..].concat();
    assert!(!asked.contains(&empty), "asked about the empty blob");

    // An output directory whose Tree is the empty blob (an empty Tree message).
    let result = ActionResult {
        output_directories: vec![dir("nothing", &empty)],
        ..Default::default()
    };
    s.with(&a, &result).await;
    assert_eq!(s.cc.get_action_result(&a).await.unwrap(), result);
    assert_eq!(s.counter("incomplete"), 0);
}

#[tokio::test]
async fn existence_checks_are_batched() {
    let s = setup(MAX_TREE);
    let n = 25_000;
    let mut output_files = Vec::with_capacity(n);
    for i in 0..n {
        let d = store(&*s.cas, &Bytes::from(format!("output {i}"))).await;
        output_files.push(file(&format!("out/{i}"), &d));
    }
    // Named twice: asked once.
    output_files.push(output_files[7].clone());
    // A tree whose files are among the outputs.
    let t = tree(
        &output_files[0].digest.clone().unwrap().try_into_digest(),
        &output_files[1].digest.clone().unwrap().try_into_digest(),
    );
    let tree_d = store(&*s.cas, &t).await;
    let result = ActionResult {
        output_files,
        output_directories: vec![dir("d", &tree_d)],
        ..Default::default()
    };
    let a = action("a");
    s.with(&a, &result).await;
    let gets_before = s.cas.gets();
    let asked_before = s.cas.asked().len();
    assert_eq!(s.cc.get_action_result(&a).await.unwrap(), result);
    let asked = &s.cas.asked()[asked_before..];
    let sizes: Vec<usize> = asked.iter().map(Vec::len).collect();
    assert_eq!(sizes, [10_000, 10_000, 5_000]);
    let distinct: BTreeSet<&Digest> = asked.iter().flatten().collect();
    assert_eq!(distinct.len(), n);
    // Only the Tree was read.
    assert_eq!(s.cas.gets() - gets_before, 1);

    // A missing blob sorted first ends the checks with the first batch.
    let s2 = setup_over(s.cas.inner.clone(), MAX_TREE);
    let gone = (0..)
        .map(|i| Digest::of(format!("never stored {i}").as_bytes()))
        .find(|d| d.hash().starts_with("00"))
        .unwrap();
    let mut missing_result = result.clone();
    missing_result.output_files[5] = file("gone", &gone);
    s2.with(&a, &missing_result).await;
    let err = s2.cc.get_action_result(&a).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("1 of its blobs"), "{err}");
    assert!(err.message().contains(&gone.to_string()), "{err}");
    assert_eq!(s2.cas.asked().len(), 1);
}

trait IntoDigest {
    fn try_into_digest(self) -> Digest;
}
impl IntoDigest for blob_access::proto::Digest {
    fn try_into_digest(self) -> Digest {
        Digest::from_proto(blob_access::DigestFunction::Sha256, &self).unwrap()
    }
}

/// A CAS whose calls fail as told.
struct Failing {
    inner: MemoryBlobAccess,
    find_missing: Mutex<Option<Code>>,
    get: Mutex<Option<Code>>,
    calls: AtomicUsize,
}

#[async_trait::async_trait]
impl BlobAccess for Failing {
    fn get(&self, digest: &Digest, range: ReadRange) -> BlobStream {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let fail = *self.get.lock().unwrap();
        match fail {
            Some(code) => blob_access::util::failed(Error::new(code, "injected get failure")),
            None => self.inner.get(digest, range),
        }
    }
    async fn put(&self, digest: &Digest, data: BlobStream) -> Result<()> {
        self.inner.put(digest, data).await
    }
    async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let fail = *self.find_missing.lock().unwrap();
        match fail {
            Some(code) => Err(Error::new(code, "injected find_missing failure")),
            None => self.inner.find_missing(digests).await,
        }
    }
    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        self.inner.metrics(out)
    }
}

#[tokio::test]
async fn cas_errors_keep_their_code() {
    let failing = Arc::new(Failing {
        inner: MemoryBlobAccess::new("cas", 1 << 20),
        find_missing: Mutex::new(None),
        get: Mutex::new(None),
        calls: AtomicUsize::new(0),
    });
    let s = setup_over(failing.clone(), MAX_TREE);
    let (result, blobs) = full_result();
    for (_, data) in &blobs {
        store(&*s.cas, data).await;
    }
    let a = action("a");
    s.with(&a, &result).await;
    assert_eq!(s.cc.get_action_result(&a).await.unwrap(), result);

    for code in [Code::Unavailable, Code::PermissionDenied, Code::Internal] {
        *failing.find_missing.lock().unwrap() = Some(code);
        let err = s.cc.get_action_result(&a).await.unwrap_err();
        assert_eq!(err.code(), code, "{err}");
        assert_eq!(err.digest(), Some(&a), "{err}");
        assert!(err.message().contains("injected"), "{err}");
        *failing.find_missing.lock().unwrap() = None;

        // Reading a Tree fails the same way: a CAS that cannot answer is not
        // a CAS that lacks the Tree.
        *failing.get.lock().unwrap() = Some(code);
        let err = s.cc.get_action_result(&a).await.unwrap_err();
        assert_eq!(err.code(), code, "reading the tree: {err}");
        assert_eq!(err.digest(), Some(&a), "{err}");
        assert!(err.message().contains("injected"), "{err}");
        *failing.get.lock().unwrap() = None;
    }
    assert_eq!(s.counter("incomplete"), 0);

    // A Tree the CAS has but cannot deliver intact is as good as missing.
    *failing.get.lock().unwrap() = Some(Code::DataLoss);
    let err = s.cc.get_action_result(&a).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    assert!(err.message().contains("incomplete"), "{err}");
    assert_eq!(s.counter("incomplete"), 1);
    *failing.get.lock().unwrap() = None;

    // The backend's own errors pass unchanged, without asking the CAS.
    let calls = failing.calls.load(Ordering::SeqCst);
    s.backend.fail_gets(Some(Code::Unavailable));
    let err = s.cc.get_action_result(&a).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(err.backend(), Some("results"));
    assert_eq!(failing.calls.load(Ordering::SeqCst), calls);
}

#[tokio::test]
async fn updates_and_update_enabled_pass_through() {
    let s = setup(MAX_TREE);
    let (result, _) = full_result();
    let a = action("a");
    // Not checked on the way in: clients upload outputs and results in any order.
    s.cc.update_action_result(&a, &result).await.unwrap();
    assert_eq!(s.backend.stored(&a).await, Some(result));
    assert!(s.cas.asked().is_empty());
    assert_eq!(s.cas.gets(), 0);

    s.backend.fail_updates(Some(Code::ResourceExhausted));
    let err =
        s.cc.update_action_result(&a, &ActionResult::default())
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);

    assert!(s.cc.update_enabled().await);
    s.backend.set_update_enabled(false);
    assert!(!s.cc.update_enabled().await);
    // The backend's counters are reported below the node's own.
    let mut m = Vec::new();
    s.cc.metrics(&mut m);
    let kinds: Vec<&str> = m.iter().map(|m| m.kind).collect();
    assert_eq!(kinds, ["completeness_checking", "memory"]);
}

#[tokio::test]
async fn built_from_config_it_checks_the_cas_of_the_same_config() {
    let yaml = "
content_addressable_storage:
  memory: {max_size_bytes: 1MiB}
action_cache:
  completeness_checking:
    backend:
      memory: {max_size_bytes: 1MiB}
    max_total_tree_size_bytes: 1KiB
";
    let config = blob_access_config::load_str(yaml, blob_access_config::Format::Yaml, "t").unwrap();
    let storage = config.build(&BuildContext::root()).unwrap();
    let ac = storage.action_cache.expect("an action cache");
    let output = Bytes::from_static(b"a.o");
    let result = ActionResult {
        output_files: vec![file("a.o", &Digest::of(&output))],
        ..Default::default()
    };
    let a = action("a");
    ac.update_action_result(&a, &result).await.unwrap();
    let err = ac.get_action_result(&a).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(
        err.backend(),
        Some("action_cache.completeness_checking"),
        "{err}"
    );
    // Stored in the config's CAS, the output makes the result complete.
    store(&*storage.cas, &output).await;
    assert_eq!(ac.get_action_result(&a).await.unwrap(), result);

    // The limit from the config: a tree over 1KiB is not served.
    let mut root = Directory::default();
    for i in 0..40 {
        root.files
            .push(file_node(&format!("file-{i:03}"), &Digest::of(&output)));
    }
    let big: Bytes = Tree {
        root: Some(root),
        children: vec![],
    }
    .encode_to_vec()
    .into();
    assert!(big.len() > 1024);
    let big_d = store(&*storage.cas, &big).await;
    let result = ActionResult {
        output_directories: vec![dir("d", &big_d)],
        ..Default::default()
    };
    ac.update_action_result(&a, &result).await.unwrap();
    let err = ac.get_action_result(&a).await.unwrap_err();
    assert!(err.message().contains("max_total_tree_size_bytes"), "{err}");
}

/// REAPI 2.3 results may name an output directory by its root `Directory`
/// (`root_directory_digest`) instead of a Tree: the whole hierarchy of
/// Directory blobs and the files in it must then be in the CAS.
#[tokio::test]
async fn root_directory_digests_are_walked() {
    let s = setup(MAX_TREE);
    let blob = |t: &str| Bytes::from(t.to_string());
    let (top, inner) = (blob("top file"), blob("inner file"));
    let child = Directory {
        files: vec![file_node("inner.txt", &Digest::of(&inner))],
        ..Default::default()
    };
    let child_blob = Bytes::from(child.encode_to_vec());
    let root = Directory {
        files: vec![file_node("top.txt", &Digest::of(&top))],
        directories: vec![
            DirectoryNode {
                name: "sub".into(),
                digest: Some(Digest::of(&child_blob).to_proto()),
            },
            // The same subdirectory twice: walked once.
            DirectoryNode {
                name: "again".into(),
                digest: Some(Digest::of(&child_blob).to_proto()),
            },
        ],
        ..Default::default()
    };
    let root_blob = Bytes::from(root.encode_to_vec());
    let result = ActionResult {
        output_directories: vec![OutputDirectory {
            path: "out/dir".into(),
            root_directory_digest: Some(Digest::of(&root_blob).to_proto()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let a = action("dir only");
    s.with(&a, &result).await;
    let all = [
        ("the root Directory", &root_blob),
        ("a child Directory", &child_blob),
        ("a file in the root", &top),
        ("a file in a child", &inner),
    ];
    for (missing, _) in all {
        let cas = MemoryBlobAccess::new("cas", 1 << 20);
        for (name, data) in all {
            if name != missing {
                store(&cas, data).await;
            }
        }
        let cc = CompletenessChecking::new("cc", s.backend.clone(), Arc::new(cas), MAX_TREE);
        let e = cc.get_action_result(&a).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{missing}: {e}");
        assert!(e.to_string().contains("incomplete"), "{missing}: {e}");
    }
    for (_, data) in all {
        store(&*s.cas, data).await;
    }
    let gets = s.cas.gets();
    assert_eq!(s.cc.get_action_result(&a).await.unwrap(), result);
    assert_eq!(s.cas.gets() - gets, 2, "each Directory read once");

    // Neither digest: not servable.
    let bare = ActionResult {
        output_directories: vec![OutputDirectory {
            path: "x".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    s.with(&a, &bare).await;
    let e = s.cc.get_action_result(&a).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("neither a tree nor a root directory digest"),
        "{e}"
    );
}

/// Output directories sharing one Tree read it once and charge it once.
#[tokio::test]
async fn a_tree_named_twice_is_read_once() {
    let (mut result, blobs) = full_result();
    let tree_d = result.output_directories[0].tree_digest.clone().unwrap();
    result.output_directories.push(OutputDirectory {
        path: "out/again".into(),
        tree_digest: Some(tree_d),
        ..Default::default()
    });
    let tree_size = blobs
        .iter()
        .find(|(n, _)| *n == "the Tree blob")
        .unwrap()
        .1
        .len() as u64;
    // Room for the Tree once, not twice.
    let s = setup(tree_size + tree_size / 2);
    for (_, data) in &blobs {
        store(&*s.cas, data).await;
    }
    let a = action("twice");
    s.with(&a, &result).await;
    let gets = s.cas.gets();
    assert_eq!(s.cc.get_action_result(&a).await.unwrap(), result);
    assert_eq!(s.cas.gets() - gets, 1);
}
