//! Headers from a credential helper, Bazel's protocol: short-lived tokens
//! (cloud IAM, an SSO login) that no config file or environment variable can
//! hold. The helper is run as `HELPER get` with `{"uri": "ENDPOINT"}` on
//! stdin and prints `{"headers": {"name": ["value", ...]}, "expires": "RFC 3339"}`.
//! The headers are kept until `expires` (30 minutes when it is absent, as
//! Bazel's default) and fetched again in the background before then, so
//! calls never wait for the helper after the first time.
//!
//! Nothing the helper prints on stdout reaches a log line or an error.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};

/// How long headers without `expires` are kept (Bazel's
/// `--credential_helper_cache_duration` default).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(30 * 60);
/// How long the helper may run.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);
/// After a failed refresh, how long before the helper is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(5);

pub(crate) type HeaderList = Vec<(AsciiMetadataKey, AsciiMetadataValue)>;

/// A credential helper and the headers it last gave.
pub(crate) struct CredentialHelper {
    command: String,
    uri: String,
    state: Mutex<State>,
}

struct State {
    headers: Arc<HeaderList>,
    /// When to fetch again (before they expire).
    refresh_at: Instant,
    refreshing: bool,
}

#[derive(serde::Deserialize)]
struct Response {
    #[serde(default)]
    headers: std::collections::BTreeMap<String, Vec<String>>,
    #[serde(default)]
    expires: Option<String>,
}

impl CredentialHelper {
    /// Runs the helper once: a helper that fails here fails the node's build,
    /// with what it said on stderr.
    pub(crate) fn start(command: &str, uri: &str) -> Result<Arc<Self>, String> {
        let (headers, refresh_at) = fetch(command, uri)?;
        Ok(Arc::new(CredentialHelper {
            command: command.to_string(),
            uri: uri.to_string(),
            state: Mutex::new(State {
                headers: Arc::new(headers),
                refresh_at,
                refreshing: false,
            }),
        }))
    }

    /// The headers to send now; starts a refresh in the background when they
    /// are due for one. Until it succeeds, the previous ones are sent.
    pub(crate) fn headers(self: &Arc<Self>, node: &str) -> Arc<HeaderList> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if Instant::now() >= state.refresh_at && !state.refreshing {
            state.refreshing = true;
            let (helper, node) = (self.clone(), node.to_string());
            std::thread::spawn(move || helper.refresh(&node));
        }
        state.headers.clone()
    }

    fn refresh(&self, node: &str) {
        let fetched = fetch(&self.command, &self.uri);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.refreshing = false;
        match fetched {
            Ok((headers, refresh_at)) => {
                tracing::debug!(node, helper = %self.command, "credential helper gave new headers");
                state.headers = Arc::new(headers);
                state.refresh_at = refresh_at;
            }
            Err(e) => {
                tracing::warn!(node, "keeping the previous credentials: {e}");
                state.refresh_at = Instant::now() + RETRY_AFTER;
            }
        }
    }
}

/// Runs `command get` for `uri`: the headers, and when to fetch them again.
fn fetch(command: &str, uri: &str) -> Result<(HeaderList, Instant), String> {
    let fail = |why: String| format!("credential helper {command}: {why}");
    let mut child = Command::new(command)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run it: {e}")))?;
    let request = serde_json::json!({ "uri": uri }).to_string();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        // A helper that does not read its input may close it: not an error.
        let _ = stdin.write_all(request.as_bytes());
    }
    let started = Instant::now();
    let out = loop {
        match child.try_wait() {
            Ok(Some(_)) => break child.wait_with_output(),
            Ok(None) if started.elapsed() < HELPER_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!(
                    "no answer within {}",
                    humantime::format_duration(HELPER_TIMEOUT)
                )));
            }
            Err(e) => return Err(fail(e.to_string())),
        }
    }
    .map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let said: String = stderr.trim().chars().take(300).collect();
        return Err(fail(format!("{}: {said}", out.status)));
    }
    // Its stdout holds secrets: errors say what is wrong, never what it printed.
    let response: Response = serde_json::from_slice(&out.stdout).map_err(|e| {
        fail(format!(
            "its output is not a credential helper response ({} at line {} column {})",
            e.classify_name(),
            e.line(),
            e.column()
        ))
    })?;
    let mut headers = HeaderList::new();
    for (name, values) in &response.headers {
        let key = name
            .parse::<AsciiMetadataKey>()
            .map_err(|_| fail(format!("header name {name:?} is not valid")))?;
        for value in values {
            let value = value
                .parse::<AsciiMetadataValue>()
                .map_err(|_| fail(format!("a value of header {name} is not printable ASCII")))?;
            headers.push((key.clone(), value));
        }
    }
    let lifetime = match &response.expires {
        None => DEFAULT_LIFETIME,
        Some(text) => {
            let expires = humantime::parse_rfc3339_weak(text)
                .map_err(|e| fail(format!("expires {text:?} is not an RFC 3339 time: {e}")))?;
            expires
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        }
    };
    // Fetch again when 80% of the lifetime is over, and at least a minute
    // before expiry when the lifetime allows.
    let early = (lifetime / 5).max(Duration::from_secs(60).min(lifetime / 2));
    Ok((headers, Instant::now() + lifetime.saturating_sub(early)))
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "cannot read it",
            serde_json::error::Category::Syntax => "not JSON",
            serde_json::error::Category::Data => "JSON of the wrong shape",
            serde_json::error::Category::Eof => "JSON cut short",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A helper script that counts its runs in `dir/runs`, records its stdin
    /// and prints `output`.
    fn helper(dir: &std::path::Path, output: &str) -> String {
        let path = dir.join("helper");
        let script = format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 2\ncat > {dir}/stdin\necho run >> {dir}/runs\ncat <<'EOF'\n{output}\nEOF\n",
            dir = dir.display()
        );
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.display().to_string()
    }

    fn runs(dir: &std::path::Path) -> usize {
        std::fs::read_to_string(dir.join("runs"))
            .unwrap_or_default()
            .lines()
            .count()
    }

    #[test]
    fn headers_are_fetched_once_and_kept_until_they_are_due() {
        let dir = tempfile::tempdir().unwrap();
        let cmd = helper(
            dir.path(),
            r#"{"headers": {"authorization": ["Bearer s3cret"], "x-two": ["a", "b"]}}"#,
        );
        let h = CredentialHelper::start(&cmd, "grpcs://cas.example.com:443").unwrap();
        let stdin = std::fs::read_to_string(dir.path().join("stdin")).unwrap();
        assert_eq!(stdin, r#"{"uri":"grpcs://cas.example.com:443"}"#);
        for _ in 0..100 {
            let headers = h.headers("n");
            assert_eq!(headers.len(), 3);
            assert_eq!(headers[0].1, "Bearer s3cret");
        }
        assert_eq!(runs(dir.path()), 1);
    }

    #[test]
    fn headers_about_to_expire_are_refreshed_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let expires = humantime::format_rfc3339(SystemTime::now() + Duration::from_secs(2));
        let cmd = helper(
            dir.path(),
            &format!(r#"{{"headers": {{"authorization": ["Bearer 1"]}}, "expires": "{expires}"}}"#),
        );
        let h = CredentialHelper::start(&cmd, "grpc://x:1").unwrap();
        assert_eq!(runs(dir.path()), 1);
        // Due after 80% of 2 s; the call that finds them due still gets them.
        std::thread::sleep(Duration::from_millis(1700));
        assert_eq!(h.headers("n")[0].1, "Bearer 1");
        let deadline = Instant::now() + Duration::from_secs(10);
        while runs(dir.path()) < 2 {
            assert!(Instant::now() < deadline, "never refreshed");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn failures_name_the_helper_and_never_show_its_output() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope").display().to_string();
        let err = CredentialHelper::start(&missing, "grpc://x:1")
            .err()
            .unwrap();
        assert!(
            err.contains(&missing) && err.contains("cannot run it"),
            "{err}"
        );

        let cmd = helper(
            dir.path(),
            r#"{"headers": {"authorization": "Bearer s3cret"}}"#,
        );
        let err = CredentialHelper::start(&cmd, "grpc://x:1").err().unwrap();
        assert!(err.contains("JSON of the wrong shape"), "{err}");
        assert!(!err.contains("s3cret"), "{err}");

        let cmd = helper(dir.path(), "s3cret not json");
        let err = CredentialHelper::start(&cmd, "grpc://x:1").err().unwrap();
        assert!(err.contains("not JSON") && !err.contains("s3cret"), "{err}");

        let cmd = helper(
            dir.path(),
            r#"{"headers": {"a": ["x"]}, "expires": "tomorrow"}"#,
        );
        let err = CredentialHelper::start(&cmd, "grpc://x:1").err().unwrap();
        assert!(err.contains("not an RFC 3339 time"), "{err}");

        let failing = dir.path().join("failing");
        std::fs::write(
            &failing,
            "#!/bin/sh\necho 'not logged in: run sso login' >&2\nexit 3\n",
        )
        .unwrap();
        std::fs::set_permissions(&failing, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = CredentialHelper::start(failing.to_str().unwrap(), "grpc://x:1")
            .err()
            .unwrap();
        assert!(
            err.contains("exit status: 3: not logged in: run sso login"),
            "{err}"
        );
    }
}
