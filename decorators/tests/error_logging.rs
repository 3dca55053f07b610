mod common;

use blob_access::{BlobAccess, Code, Digest};
use blob_access_decorators::error_logging::{ErrorLogging, Level, StatusCode};
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
