mod common;

use blob_access::action_cache::ActionResult;
use blob_access::memory::MemoryActionCache;
use blob_access::{util, ActionCache, BlobAccess, BuildContext, Code, Digest, ReadRange};
use blob_access_config::{load_str, Format};
use blob_access_decorators::demultiplexing::{Demultiplexing, DemultiplexingActionCache};
use common::*;
use std::sync::Arc;

/// Three backends: `""`, `team-a`, and `team-a/ci` renamed to `remote-ci`.
fn demux() -> (Demultiplexing, [Arc<Counting>; 3]) {
    let backends = [Counting::memory(), Counting::memory(), Counting::memory()];
    let [all, a, ci] = backends.clone();
    let node = Demultiplexing::new("demux")
        .route("", all, None)
        .route("team-a", a, None)
        .route("team-a/ci", ci, Some("remote-ci"));
    (node, backends)
}

fn stored(b: &Counting, d: &Digest) -> bool {
    futures::executor::block_on(b.find_missing(std::slice::from_ref(&d.without_instance_name())))
        .unwrap()
        .is_empty()
}

#[tokio::test]
async fn the_longest_prefix_on_slash_boundaries_wins() {
    let (node, [all, a, ci]) = demux();
    for (instance, want) in [
        ("", 0),
        ("team-ab", 0),
        ("team-a", 1),
        ("team-a/x", 1),
        ("team-a/cix", 1),
        ("team-a/ci", 2),
        ("team-a/ci/linux", 2),
    ] {
        let (d, data) = blob(&format!("blob of {instance:?}"));
        let d = d.with_instance_name(instance);
        node.put(&d, util::once(data.clone())).await.unwrap();
        let got: Vec<bool> = [&all, &a, &ci].iter().map(|b| stored(b, &d)).collect();
        let mut expected = vec![false; 3];
        expected[want] = true;
        assert_eq!(got, expected, "{instance:?}");
        let read = util::read_to_bytes(&node, &d, ReadRange::FULL, 1 << 20).await;
        assert_eq!(read.unwrap(), data, "{instance:?}");
    }
}

#[tokio::test]
async fn the_prefix_is_replaced_and_answers_keep_the_callers_names() {
    let (node, [_, a, ci]) = demux();
    let (x, _) = blob("x");
    let (y, data) = blob("y");
    node.put(&y.with_instance_name("team-a/ci/linux"), util::once(data))
        .await
        .unwrap();
    let asked = vec![
        x.with_instance_name("team-a/ci/linux"),
        y.with_instance_name("team-a/ci/linux"),
        x.with_instance_name("team-a/other"),
    ];
    let missing = node.find_missing(&asked).await.unwrap();
    assert_eq!(missing, vec![asked[0].clone(), asked[2].clone()]);
    // Each backend was asked once, under the name it knows.
    assert_eq!(
        ci.asked(),
        vec![vec![
            x.with_instance_name("remote-ci/linux"),
            y.with_instance_name("remote-ci/linux")
        ]]
    );
    assert_eq!(a.asked(), vec![vec![x.with_instance_name("team-a/other")]]);
}

#[tokio::test]
async fn an_instance_no_prefix_covers_is_invalid_argument_naming_it() {
    let a = Counting::memory();
    let node = Demultiplexing::new("demux").route("team-a", a.clone(), None);
    let (d, data) = blob("z");
    let d = d.with_instance_name("team-b/x");
    let e = node.put(&d, util::once(data)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let text = e.to_string();
    assert!(
        text.contains("\"team-b/x\"") && text.contains("\"team-a\""),
        "{text}"
    );
    let e = util::read_to_bytes(&node, &d, ReadRange::FULL, 10)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let e = node.find_missing(&[d]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(a.asked().is_empty());
}

#[tokio::test]
async fn action_results_are_routed_and_renamed() {
    let (a, b) = (
        Arc::new(MemoryActionCache::new("a", 1 << 20)),
        Arc::new(MemoryActionCache::new("b", 1 << 20)),
    );
    let node = DemultiplexingActionCache::new("demux")
        .route("team-a", a.clone(), Some(""))
        .route("team-b", b.clone(), None);
    let action = Digest::of(b"an Action");
    let result = ActionResult {
        exit_code: 7,
        ..Default::default()
    };
    node.update_action_result(&action.with_instance_name("team-a"), &result)
        .await
        .unwrap();
    // team-a's prefix is dropped: its backend holds the result under the default instance.
    assert_eq!(a.get_action_result(&action).await.unwrap(), result);
    assert_eq!(
        b.get_action_result(&action.with_instance_name("team-b"))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let e = node.get_action_result(&action).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(node.update_enabled().await);
}

const CONFIG: &str = r#"
content_addressable_storage:
  demultiplexing:
    instance_name_prefixes:
      "": {backend: {memory: {max_size_bytes: 1MiB}}}
      team-a:
        backend: {memory: {max_size_bytes: 1MiB}}
        instance_name_prefix: remote-a
action_cache:
  demultiplexing:
    instance_name_prefixes:
      team-a: {backend: {memory: {max_size_bytes: 1MiB}}}
"#;

#[tokio::test]
async fn built_from_a_config_in_both_trees() {
    let config = load_str(CONFIG, Format::Yaml, "inline").unwrap();
    let storage = config.build(&BuildContext::root()).unwrap();
    let (d, data) = blob("config");
    storage
        .cas
        .put(&d.with_instance_name("team-a"), util::once(data))
        .await
        .unwrap();
    let missing = storage.cas.find_missing(std::slice::from_ref(&d)).await;
    assert_eq!(missing.unwrap(), vec![d.clone()]);
    let ac = storage.action_cache.unwrap();
    let e = ac.get_action_result(&d).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let e = ac
        .get_action_result(&d.with_instance_name("team-a"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
}

#[test]
fn config_errors_name_the_place() {
    let nested = CONFIG.replace(
        "team-a: {backend: {memory: {max_size_bytes: 1MiB}}}",
        "team-a: {backend: {existence_caching: {backend: {memory: {max_size_bytes: 1MiB}}}}}",
    );
    let e = load_str(&nested, Format::Yaml, "f.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("action_cache.demultiplexing.instance_name_prefixes.\"team-a\".backend.existence_caching"),
        "{e}"
    );
    for (from, to, why) in [
        ("team-a:", "team-a/:", "\"team-a/\""),
        ("prefix: remote-a", "prefix: /x", "\"/x\""),
    ] {
        let text = CONFIG.replacen(from, to, 1);
        let e = load_str(&text, Format::Yaml, "f.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("instance_name_prefixes") && e.contains(why) && e.contains("empty part"),
            "{e}"
        );
    }
    let empty = "demultiplexing: {instance_name_prefixes: {}}";
    let e = load_str(empty, Format::Yaml, "f.yaml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("no instance-name prefixes"), "{e}");
}
