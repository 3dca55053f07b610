mod common;

use blob_access::action_cache::{ActionCache, ActionResult};
use blob_access::{BlobAccess, Code, Digest};
use blob_access_decorators::error_logging::{ErrorLogging, Level, StatusCode};
use common::ac::{ac_counter, CallLog, TestAc};
use common::*;
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

/// Captures what tracing writes while `f` runs.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
    fn subscriber(&self) -> impl tracing::Subscriber {
        let me = self.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || me.clone())
            .finish()
    }
}

fn node(levels: &[(StatusCode, Level)]) -> ErrorLogging {
    let memory = Arc::new(blob_access::memory::MemoryBlobAccess::new("m", 1 << 20));
    let mut map = BTreeMap::from([(StatusCode::NotFound, Level::Info)]);
    map.extend(levels.iter().copied());
    ErrorLogging::new("top.error_logging", memory, map, Level::Error)
}

#[tokio::test]
async fn failures_are_logged_with_op_digest_path_code_and_passed_on() {
    let log = Captured::default();
    let _guard = tracing::subscriber::set_default(log.subscriber());
    let el = node(&[]);
    let (missing, _) = blob("not there");
    let err = read(&el, &missing).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // A put whose data does not match its digest.
    let (d, _) = blob("right");
    let err = el
        .put(&d, blob_access::util::once("wrong".into()))
        .await
        .unwrap_err();
    let text = log.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains(" INFO ") && lines[0].contains("op=\"get\""),
        "{text}"
    );
    assert!(lines[0].contains(&missing.to_string()) && lines[0].contains("NotFound"));
    assert!(lines[0].contains("node=top.error_logging") && lines[0].contains("duration_ms="));
    assert!(
        lines[1].contains(" ERROR ") && lines[1].contains("op=\"put\""),
        "{text}"
    );
    assert!(lines[1].contains(&format!("{:?}", err.code())));
    assert_eq!(counter(&el, "error_logging", "errors"), 2);
}

#[tokio::test]
async fn levels_are_configurable_and_successes_are_silent() {
    let log = Captured::default();
    let _guard = tracing::subscriber::set_default(log.subscriber());
    let el = node(&[(StatusCode::NotFound, Level::Off)]);
    let d = put(&el, "here").await;
    assert_eq!(read(&el, &d).await.unwrap(), b"here");
    let absent: Digest = blob("absent").0;
    assert_eq!(
        el.find_missing(std::slice::from_ref(&absent))
            .await
            .unwrap(),
        vec![absent.clone()]
    );
    assert!(read(&el, &absent).await.is_err());
    assert_eq!(log.text(), "");
}

#[tokio::test]
async fn headers_never_reach_the_log() {
    // A grpc backend with a credential, unreachable: the failure is logged
    // without the header's value.
    let log = Captured::default();
    let _guard = tracing::subscriber::set_default(log.subscriber());
    let yaml = r#"
error_logging:
  backend:
    grpc:
      endpoint: "grpc://127.0.0.1:1"
      headers: {authorization: "Bearer s3cr3t-t0k3n"}
      connect_timeout: 200ms
"#;
    let tree = blob_access_config::load_str(yaml, blob_access_config::Format::Yaml, "t").unwrap();
    let el = tree.build_cas(&blob_access::BuildContext::root()).unwrap();
    let (d, _) = blob("x");
    assert!(el.find_missing(std::slice::from_ref(&d)).await.is_err());
    assert!(read(&*el, &d).await.is_err());
    let text = log.text();
    assert!(text.contains("node=error_logging"), "{text}");
    assert!(
        text.contains("op=\"find_missing\"") && text.contains("op=\"get\""),
        "{text}"
    );
    assert!(!text.contains("s3cr3t"), "{text}");
}

fn ac_node(backend: Arc<TestAc>, levels: &[(StatusCode, Level)]) -> ErrorLogging<dyn ActionCache> {
    let mut map = BTreeMap::from([(StatusCode::NotFound, Level::Info)]);
    map.extend(levels.iter().copied());
    ErrorLogging::new("action_cache.error_logging", backend, map, Level::Error)
}

#[tokio::test]
async fn action_cache_failures_are_logged_and_passed_on_unchanged() {
    let log = Captured::default();
    let _guard = tracing::subscriber::set_default(log.subscriber());
    let backend = TestAc::new("results", &CallLog::default());
    let el = ac_node(backend.clone(), &[]);
    let (a, b) = (Digest::of(b"Action a"), Digest::of(b"Action b"));

    // A miss: NOT_FOUND at info, the backend's error as it was.
    let err = el.get_action_result(&a).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.backend(), Some("results"), "{err}");
    assert_eq!(err.digest(), Some(&a));
    // A failed update: the injected error, unchanged, at error level.
    backend.fail_updates(Some(Code::PermissionDenied));
    let result = ActionResult {
        exit_code: 1,
        ..Default::default()
    };
    let err = el.update_action_result(&b, &result).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(err.message(), "injected PermissionDenied");
    assert_eq!(err.backend(), Some("results"));
    assert_eq!(err.digest(), Some(&b));

    let text = log.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].contains(" INFO "), "{text}");
    assert!(lines[0].contains("op=\"get_action_result\""), "{text}");
    assert!(lines[0].contains(&a.to_string()), "{text}");
    assert!(lines[0].contains("NotFound"), "{text}");
    assert!(lines[1].contains(" ERROR "), "{text}");
    assert!(lines[1].contains("op=\"update_action_result\""), "{text}");
    assert!(lines[1].contains(&b.to_string()), "{text}");
    assert!(lines[1].contains("PermissionDenied"), "{text}");
    for line in &lines {
        assert!(line.contains("node=action_cache.error_logging"), "{text}");
        assert!(line.contains("duration_ms="), "{text}");
    }
    let counted = ac_counter(&el, "error_logging", "errors");
    assert_eq!(counted, 2);
}

#[tokio::test]
async fn action_cache_successes_are_silent_and_levels_apply() {
    let log = Captured::default();
    let _guard = tracing::subscriber::set_default(log.subscriber());
    let backend = TestAc::new("results", &CallLog::default());
    let el = ac_node(backend.clone(), &[(StatusCode::NotFound, Level::Off)]);
    let a = Digest::of(b"Action");
    let result = ActionResult {
        stdout_raw: b"ok".to_vec(),
        ..Default::default()
    };
    el.update_action_result(&a, &result).await.unwrap();
    assert_eq!(el.get_action_result(&a).await.unwrap(), result);
    // A miss, turned off.
    let other = Digest::of(b"Other");
    assert!(el.get_action_result(&other).await.is_err());
    assert_eq!(log.text(), "");
    // update_enabled is the backend's.
    assert!(el.update_enabled().await);
    backend.set_update_enabled(false);
    assert!(!el.update_enabled().await);

    backend.fail_gets(Some(Code::Unavailable));
    let err = el.get_action_result(&a).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    let text = log.text();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.contains(" ERROR ") && text.contains("Unavailable"),
        "{text}"
    );
}

#[tokio::test]
async fn an_action_cache_tree_from_yaml_logs_with_its_path() {
    let log = Captured::default();
    let _guard = tracing::subscriber::set_default(log.subscriber());
    let yaml = "
content_addressable_storage:
  memory: {max_size_bytes: 1MiB}
action_cache:
  error_logging:
    backend:
      completeness_checking:
        backend:
          memory: {max_size_bytes: 1MiB}
";
    let config = blob_access_config::load_str(yaml, blob_access_config::Format::Yaml, "t").unwrap();
    let storage = config.build(&blob_access::BuildContext::root()).unwrap();
    let ac = storage.action_cache.unwrap();
    let a = Digest::of(b"Action");
    let missing_output = Digest::of(b"never uploaded");
    let result = ActionResult {
        output_files: vec![blob_access::proto::OutputFile {
            path: "a.o".into(),
            digest: Some(missing_output.to_proto()),
            ..Default::default()
        }],
        ..Default::default()
    };
    ac.update_action_result(&a, &result).await.unwrap();
    let err = ac.get_action_result(&a).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let text = log.text();
    let logged: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("op=\"get_action_result\""))
        .collect();
    assert_eq!(logged.len(), 1, "{text}");
    assert!(
        logged[0].contains("node=action_cache.error_logging"),
        "{text}"
    );
    // A miss is what most lookups of a cold build get: not worth more than debug.
    assert!(logged[0].contains("DEBUG"), "{text}");
    // Why the result was not served reaches the log.
    assert!(logged[0].contains(&missing_output.to_string()), "{text}");
}
