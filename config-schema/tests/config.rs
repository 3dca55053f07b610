//! Config loading, error reporting, the checked-in schema and the examples.

use blob_access_config::{json_schema, load_file, load_str, ConfigError, Format};
use std::path::{Path, PathBuf};

fn yaml_err(text: &str) -> ConfigError {
    load_str(text, Format::Yaml, "t.yaml").unwrap_err()
}

#[test]
fn yaml_and_json_give_the_same_tree() {
    let y = load_str("memory: {max_size_bytes: 1GiB}", Format::Yaml, "y").unwrap();
    let j = load_str(
        r#"{"memory": {"max_size_bytes": 1073741824}}"#,
        Format::Json,
        "j",
    )
    .unwrap();
    assert_eq!(
        serde_json::to_value(&y).unwrap(),
        serde_json::to_value(&j).unwrap()
    );
    assert_eq!(y.content_addressable_storage.kind(), "memory");
    assert!(y.action_cache.is_none());
}

#[test]
fn errors_name_path_line_and_column() {
    let e = yaml_err("memory:\n  max_size_bytes: lots\n");
    assert_eq!(e.path, "memory.max_size_bytes");
    assert_eq!((e.line, e.column), (Some(2), Some(19)));
    assert!(e.message.contains("size in bytes"), "{e}");
    assert!(
        !e.message.contains("memory.max_size_bytes"),
        "path printed twice: {e}"
    );
    assert!(
        e.to_string()
            .starts_with("t.yaml:2:19: at memory.max_size_bytes: "),
        "{e}"
    );

    let e = yaml_err("memory:\n  max_size_bytes: 1\n  colour: red\n");
    assert_eq!(e.path, "memory.colour");
    assert!(e.message.contains("unknown field `colour`"), "{e}");
    assert_eq!(e.line, Some(3));

    let e = yaml_err("memroy: {max_size_bytes: 1}\n");
    assert!(
        e.message.contains("unknown key `memroy`") && e.message.contains("memory"),
        "{e}"
    );
    // A misspelled tree is told apart from a misspelled node kind.
    let e = yaml_err("content_adressable_storage: {memory: {max_size_bytes: 1}}\n");
    assert!(e.message.contains("content_addressable_storage"), "{e}");
    // Below the top, a misspelled kind is named as one.
    let e = yaml_err("error_logging: {backend: {memroy: {max_size_bytes: 1}}}\n");
    assert_eq!(e.path, "error_logging.backend");
    assert!(e.message.contains("unknown variant `memroy`"), "{e}");

    let e = yaml_err("memory: {}\n");
    assert!(e.message.contains("missing field `max_size_bytes`"), "{e}");

    let e = load_str(
        "{\"memory\": {\"max_size_bytes\": -5}}",
        Format::Json,
        "t.json",
    )
    .unwrap_err();
    assert_eq!(e.path, "memory.max_size_bytes");
    assert_eq!(e.line, Some(1));

    let e = load_str("{\"memory\": ", Format::Json, "t.json").unwrap_err();
    assert!(e.message.contains("EOF"), "{e}");
}

#[test]
fn unreadable_file_is_a_clear_error() {
    let e = load_file(Path::new("/nonexistent/blob-access.yaml")).unwrap_err();
    assert!(
        e.to_string()
            .contains("/nonexistent/blob-access.yaml: cannot read"),
        "{e}"
    );
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn checked_in_schema_is_current() {
    let path = root().join("config-schema/blob-access.schema.json");
    let current = serde_json::to_string_pretty(&json_schema()).unwrap() + "\n";
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(&path, &current).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == current,
        "{} is stale; regenerate it with `BLESS=1 cargo test -p blob-access-config` or `cargo run -- schema > {}`",
        path.display(),
        path.display()
    );
}

fn example_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_loads_and_matches_the_schema() {
    let validator = jsonschema::validator_for(&json_schema()).expect("schema compiles");
    let files = example_files();
    assert!(!files.is_empty(), "no examples found");
    for file in files {
        load_file(&file).unwrap_or_else(|e| panic!("{e}"));
        let text = std::fs::read_to_string(&file).unwrap();
        let value: serde_json::Value = serde_yaml_ng::from_str(&text).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&value)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{}: {errors:?}", file.display());
    }
}

#[test]
fn schema_rejects_what_the_loader_rejects() {
    let validator = jsonschema::validator_for(&json_schema()).unwrap();
    for bad in [
        r#"{"memory": {"max_size_bytes": "lots"}}"#,
        r#"{"memory": {"max_size_bytes": 1, "colour": "red"}}"#,
        r#"{"memroy": {"max_size_bytes": 1}}"#,
        r#"{"memory": {}}"#,
    ] {
        let v: serde_json::Value = serde_json::from_str(bad).unwrap();
        assert!(!validator.is_valid(&v), "schema accepted {bad}");
        assert!(
            load_str(bad, Format::Json, "t").is_err(),
            "loader accepted {bad}"
        );
    }
}

#[test]
fn schema_and_loader_agree_on_endpoints() {
    let validator = jsonschema::validator_for(&json_schema()).unwrap();
    for (endpoint, good) in [
        ("grpc://127.0.0.1:8980", true),
        ("grpcs://cache.example.com:443", true),
        ("grpc://[::1]:8980", true),
        ("unix:/run/cache.sock", true),
        ("http://127.0.0.1:8980", false),
        ("127.0.0.1:8980", false),
        ("grpc://127.0.0.1", false),
        ("grpcs://cache.example.com", false),
        ("unix:", false),
        ("", false),
        ("grpc://cache:8980/", true),
        ("grpc://cache:65535", true),
        ("grpc://cache:65536", false),
        ("grpc://cache:99999", false),
        ("grpc://cache:0", false),
        ("grpc://cache:08980", false),
        ("grpc://cache:+80", false),
        ("grpc://::1:8980", false),
        ("grpc://[zz]:8980", false),
        ("grpc://cache:8980:8980", false),
        ("grpc://caf\u{e9}:80", false),
        ("grpc://h%41:80", false),
        ("grpc://h\"x:80", false),
        ("grpc://user:pw@cache:8980", false),
        ("grpc://:8980", false),
        ("grpc://cache:8980/path", false),
        ("grpc://cache:8980//", false),
        ("grpc://cache:8980?x=1", false),
        ("grpc://cache:8980#f", false),
        ("GRPC://cache:8980", false),
        ("unix:/a\n", false),
        ("unix: ", true),
    ] {
        let config = serde_json::json!({"grpc": {"endpoint": endpoint}});
        assert_eq!(validator.is_valid(&config), good, "schema on {endpoint:?}");
        let loaded = load_str(&config.to_string(), Format::Json, "t");
        assert_eq!(loaded.is_ok(), good, "loader on {endpoint:?}: {loaded:?}");
    }
}

const TWO_TREES: &str = "
content_addressable_storage:
  memory: {max_size_bytes: 1GiB}
action_cache:
  completeness_checking:
    backend:
      read_caching:
        fast: {memory: {max_size_bytes: 1MiB}}
        slow: {resumable_grpc: {grpc: {endpoint: \"grpc://127.0.0.1:1\"}}}
";

#[test]
fn a_file_names_a_cas_and_an_action_cache() {
    let c = load_str(TWO_TREES, Format::Yaml, "t").unwrap();
    assert_eq!(c.content_addressable_storage.kind(), "memory");
    assert_eq!(
        c.action_cache.as_ref().unwrap().kind(),
        "completeness_checking"
    );
    // The action cache alone is not a config: a server always has a CAS.
    let e = yaml_err("action_cache: {memory: {max_size_bytes: 1}}\n");
    assert!(
        e.message
            .contains("missing field `content_addressable_storage`"),
        "{e}"
    );
    let e = yaml_err("content_addressable_storage: {memory: {max_size_bytes: 1}}\nscheduler: {}\n");
    assert!(e.message.contains("unknown field `scheduler`"), "{e}");
    let e = yaml_err("content_addressable_storage:\n  memory: {max_size_bytes: x}\n");
    assert_eq!(e.path, "content_addressable_storage.memory.max_size_bytes");
    assert_eq!(e.line, Some(2));
}

/// An execution tree takes grpc, resumable_grpc, demultiplexing and
/// error_logging; any other kind is refused at load time with its path.
#[tokio::test]
async fn an_execution_tree_takes_only_forwarding_nodes() {
    let ok = "content_addressable_storage: {memory: {max_size_bytes: 1}}
execution:
  error_logging:
    backend:
      demultiplexing:
        instance_name_prefixes:
          \"\": {backend: {resumable_grpc: {grpc: {endpoint: \"grpc://127.0.0.1:1\"}, execution_stall_timeout: 2m}}}
          team-a: {backend: {grpc: {endpoint: \"grpc://127.0.0.1:2\"}}}
";
    let c = load_str(ok, Format::Yaml, "t").unwrap();
    assert_eq!(c.execution.as_ref().unwrap().kind(), "error_logging");
    let storage = c.build(&blob_access::BuildContext::root()).unwrap();
    assert!(storage.execution.is_some() && storage.action_cache.is_none());
    for kind in ["memory: {max_size_bytes: 1}", "disk: {path: /tmp/x, max_size_bytes: 1}",
        "read_caching: {fast: {grpc: {endpoint: \"grpc://h:1\"}}, slow: {grpc: {endpoint: \"grpc://h:2\"}}}",
        "completeness_checking: {backend: {grpc: {endpoint: \"grpc://h:1\"}}}"] {
        let yaml = format!("content_addressable_storage: {{memory: {{max_size_bytes: 1}}}}\nexecution:\n  error_logging: {{backend: {{{kind}}}}}\n");
        let e = yaml_err(&yaml);
        let name = kind.split(':').next().unwrap();
        assert_eq!(e.path, format!("execution.error_logging.backend.{name}"), "{e}");
        assert!(
            e.message.contains("cannot be part of an execution tree")
                && e.message.contains("grpc, resumable_grpc, error_logging, demultiplexing"),
            "{e}"
        );
    }
}

#[test]
fn nodes_that_make_no_sense_in_a_tree_are_refused_with_their_path() {
    let e = yaml_err(
        "content_addressable_storage: {memory: {max_size_bytes: 1}}
action_cache:
  error_logging:
    backend:
      existence_caching: {backend: {memory: {max_size_bytes: 1}}}
",
    );
    assert_eq!(
        e.path,
        "action_cache.error_logging.backend.existence_caching"
    );
    assert!(
        e.message
            .contains("`existence_caching` cannot be part of an action_cache tree")
            && e.message.contains("completeness_checking"),
        "{e}"
    );
    let e = yaml_err("read_caching:\n  fast: {memory: {max_size_bytes: 1}}\n  slow: {completeness_checking: {backend: {memory: {max_size_bytes: 1}}}}\n");
    assert_eq!(e.path, "read_caching.slow.completeness_checking");
    assert!(
        e.message.contains("content_addressable_storage tree"),
        "{e}"
    );
}

#[test]
fn schema_takes_both_forms_and_rejects_bad_trees() {
    let validator = jsonschema::validator_for(&json_schema()).unwrap();
    let ok: serde_json::Value = serde_yaml_ng::from_str(TWO_TREES).unwrap();
    assert!(validator.is_valid(&ok));
    for bad in [
        r#"{"action_cache": {"memory": {"max_size_bytes": 1}}}"#,
        r#"{"content_addressable_storage": {"memory": {"max_size_bytes": 1}}, "x": {}}"#,
        r#"{"content_addressable_storage": {"memory": {}}}"#,
        r#"{"read_caching": {"fast": {"content_addressable_storage": {"memory": {"max_size_bytes": 1}}}, "slow": {"memory": {"max_size_bytes": 1}}}}"#,
    ] {
        let v: serde_json::Value = serde_json::from_str(bad).unwrap();
        assert!(!validator.is_valid(&v), "schema accepted {bad}");
        assert!(
            load_str(bad, Format::Json, "t").is_err(),
            "loader accepted {bad}"
        );
    }
}

/// Settings of a `grpc` node that could never work are refused at load time,
/// where line and column are known, not when the tree is built.
#[test]
fn grpc_settings_that_cannot_work_are_refused_with_line_and_column() {
    let e = yaml_err("grpc:\n  endpoint: \"not a url\"\n");
    assert_eq!(e.path, "grpc.endpoint");
    assert_eq!((e.line, e.column), (Some(2), Some(13)));
    assert!(e.message.contains("must start with grpc://"), "{e}");

    let e = yaml_err("resumable_grpc:\n  grpc:\n    endpoint: grpc://cas\n");
    assert_eq!(e.path, "resumable_grpc.grpc.endpoint");
    assert_eq!(e.line, Some(3));
    assert!(e.message.contains("has no port"), "{e}");

    let e = yaml_err("grpc:\n  endpoint: grpc://cas:1\n  headers:\n    x y: v\n");
    assert!(e.path.starts_with("grpc.headers"), "{e}");
    assert_eq!((e.line, e.column), (Some(4), Some(5)));
    assert!(e.message.contains("\"x y\""), "{e}");

    let e = yaml_err("grpc:\n  endpoint: grpc://cas:1\n  headers:\n    a: \"x\\ny\"\n");
    assert_eq!(e.path, "grpc.headers.a");
    assert_eq!((e.line, e.column), (Some(4), Some(8)));
    assert!(e.message.contains("printable ASCII"), "{e}");
    assert!(!e.message.contains("x\ny"), "a value may be a secret: {e}");

    let e = load_str(r#"{"grpc": {"endpoint": "unix:"}}"#, Format::Json, "t.json").unwrap_err();
    assert_eq!(e.path, "grpc.endpoint");
    assert_eq!(e.line, Some(1));
    assert!(e.message.contains("no socket path"), "{e}");

    // Values that come from elsewhere, and every endpoint form, still load.
    let e = yaml_err("grpc:\n  endpoint: grpc://cas:1\n  headers: {a: {env: X, file: Y}}\n");
    assert_eq!(e.path, "grpc.headers.a");
    for endpoint in [
        "grpc://cas:1",
        "grpcs://cas.example.com:443",
        "unix:/run/cas.sock",
    ] {
        let text = format!(
            "grpc:\n  endpoint: {endpoint}\n  headers:\n    authorization: Bearer x\n    b: {{env: B}}\n    c: {{file: /c}}\n"
        );
        load_str(&text, Format::Yaml, "t").unwrap_or_else(|e| panic!("{e}"));
    }
}
