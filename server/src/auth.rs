//! Bearer tokens with read or write permission, checked in a tower layer in
//! front of every service: no valid `authorization: Bearer TOKEN` header gives
//! UNAUTHENTICATED, a read token calling a write RPC PERMISSION_DENIED. The
//! caller's [`Grant`] goes on in the request's extensions: the services check
//! it against the request's instance name (a token may be limited to some
//! instance-name prefixes, which only the request body names), and
//! Capabilities tells a caller that may not write there not to upload results.
//!
//! Tokens are kept only as SHA-256 hashes and compared in constant time; no
//! token ever appears in a log line, an error message or `Debug` output.

use blob_access::instance_name::has_prefix;
use blob_access::{Error, Result};
use sha2::{Digest as _, Sha256};
use std::fmt;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use subtle::ConstantTimeEq;
use tonic::Status;

/// What a token allows; `Write` implies `Read`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Permission {
    Read,
    Write,
}

/// The RPCs that store something: they need a write token.
const WRITE_METHODS: &[&str] = &[
    "/google.bytestream.ByteStream/Write",
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs",
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/SpliceBlob",
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/RegisterChunkMapping",
    "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult",
    // An execution writes its result to the action cache.
    "/build.bazel.remote.execution.v2.Execution/Execute",
    "/google.longrunning.Operations/CancelOperation",
    "/google.longrunning.Operations/DeleteOperation",
];

/// Services anyone may call: a load balancer's health checks carry no token.
const OPEN_PREFIXES: &[&str] = &["/grpc.health.v1.Health/"];

/// The permission an RPC path needs, `None` for the open ones.
fn needed(path: &str) -> Option<Permission> {
    if OPEN_PREFIXES.iter().any(|p| path.starts_with(p)) {
        None
    } else if WRITE_METHODS.contains(&path) {
        Some(Permission::Write)
    } else {
        Some(Permission::Read)
    }
}

/// A set of tokens, as read from a tokens file: one `read TOKEN` or
/// `write TOKEN` a line, `#` comments and blank lines ignored. Instance-name
/// prefixes after the token (`write TOKEN team-a team-b/ci`) limit that line
/// to those instances (see [`has_prefix`]); without any, it covers them all.
/// A token on several lines gets the best permission each instance has.
#[derive(Clone)]
pub struct Tokens {
    entries: Vec<([u8; 32], Scope)>,
}

/// One line's permission and the instance-name prefixes it covers (none: all).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Scope {
    permission: Permission,
    prefixes: Vec<String>,
}

impl Scope {
    fn covers(&self, instance_name: &str) -> bool {
        self.prefixes.is_empty() || self.prefixes.iter().any(|p| has_prefix(instance_name, p))
    }
}

/// What the caller's token allows, put in each request's extensions by the
/// token check (absent when the server checks no tokens).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    scopes: Vec<Scope>,
}

impl Grant {
    /// The caller's permission on `instance_name`; `None`: none at all.
    pub fn permission_for(&self, instance_name: &str) -> Option<Permission> {
        self.scopes
            .iter()
            .filter(|s| s.covers(instance_name))
            .map(|s| s.permission)
            .max()
    }

    /// The best permission on any instance.
    fn best(&self) -> Option<Permission> {
        self.scopes.iter().map(|s| s.permission).max()
    }

    /// PERMISSION_DENIED unless the caller may do what `needed` says on `instance_name`.
    pub fn check(&self, instance_name: &str, needed: Permission) -> Result<(), Status> {
        match self.permission_for(instance_name) {
            Some(have) if have >= needed => Ok(()),
            Some(_) => Err(Status::permission_denied(format!(
                "this token may only read instance {instance_name:?}"
            ))),
            None => Err(Status::permission_denied(format!(
                "this token may not use instance {instance_name:?}"
            ))),
        }
    }
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let writers = self.writers();
        f.debug_struct("Tokens")
            .field("read", &(self.entries.len() - writers))
            .field("write", &writers)
            .finish()
    }
}

impl Tokens {
    /// Parses a tokens file's text; `source` names it in errors (`source:LINE: ...`),
    /// which never quote the line (it may hold a token).
    pub fn parse(text: &str, source: &str) -> Result<Tokens> {
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| Error::invalid_argument(format!("{source}:{}: {why}", i + 1));
            let mut words = line.split_whitespace();
            let permission = match words.next() {
                Some("read") => Permission::Read,
                Some("write") => Permission::Write,
                _ => return Err(bad("expected `read TOKEN` or `write TOKEN`")),
            };
            let Some(token) = words.next() else {
                return Err(bad("the token is missing"));
            };
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad("a token must be printable ASCII"));
            }
            let mut prefixes = Vec::new();
            for prefix in words {
                // `team-a/` would never match (prefixes match on `/` boundaries).
                if prefix.starts_with('/') || prefix.ends_with('/') || prefix.contains("//") {
                    return Err(bad(&format!(
                        "instance-name prefix {prefix:?} has an empty part (leading, trailing or double `/`)"
                    )));
                }
                prefixes.push(prefix.to_string());
            }
            entries.push((
                hash(token.as_bytes()),
                Scope {
                    permission,
                    prefixes,
                },
            ));
        }
        if entries.is_empty() {
            return Err(Error::invalid_argument(format!(
                "{source}: no tokens (lines `read TOKEN` or `write TOKEN`)"
            )));
        }
        Ok(Tokens { entries })
    }

    /// Reads and parses a tokens file.
    pub fn load(path: &Path) -> Result<Tokens> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::invalid_argument(format!("cannot read tokens file {}: {e}", path.display()))
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// How many tokens there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Never true for parsed tokens: an empty file is refused.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many tokens may write.
    pub fn writers(&self) -> usize {
        self.entries
            .iter()
            .filter(|(_, s)| s.permission == Permission::Write)
            .count()
    }

    /// What `token` may do; every entry is compared, in constant time, whatever matches.
    fn grant(&self, token: &[u8]) -> Option<Grant> {
        let presented = hash(token);
        let mut scopes = Vec::new();
        for (stored, scope) in &self.entries {
            let matches: bool = stored.ct_eq(&presented).into();
            if matches {
                scopes.push(scope.clone());
            }
        }
        (!scopes.is_empty()).then_some(Grant { scopes })
    }

    #[cfg(test)]
    fn permission(&self, token: &[u8]) -> Option<Permission> {
        self.grant(token)?.best()
    }
}

fn hash(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// The tokens a server checks; cloned handles share them, so
/// [`Auth::replace`] (e.g. on SIGHUP) changes what a running server accepts.
#[derive(Clone)]
pub struct Auth {
    tokens: Arc<RwLock<Arc<Tokens>>>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Auth").field(&*self.current()).finish()
    }
}

impl Auth {
    pub fn new(tokens: Tokens) -> Auth {
        Auth {
            tokens: Arc::new(RwLock::new(Arc::new(tokens))),
        }
    }

    /// Accepts `tokens` from now on, instead of the previous ones.
    pub fn replace(&self, tokens: Tokens) {
        *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(tokens);
    }

    fn current(&self) -> Arc<Tokens> {
        self.tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// What the caller whose request carries `headers` may do, or the status
    /// to refuse it with.
    fn check(&self, headers: &http::HeaderMap) -> Result<Grant, Status> {
        let token = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| bearer(v.as_bytes()));
        match token.and_then(|t| self.current().grant(t)) {
            Some(p) => Ok(p),
            None if token.is_none() => Err(Status::unauthenticated(
                "this server needs a token: send `authorization: Bearer TOKEN`",
            )),
            None => Err(Status::unauthenticated("the bearer token is not valid")),
        }
    }

    /// Checks a request for `path` (whatever its instance: the services check
    /// that); on success, what the caller may do.
    fn authorize(&self, path: &str, headers: &http::HeaderMap) -> Result<Option<Grant>, Status> {
        let Some(needed) = needed(path) else {
            return Ok(None);
        };
        let grant = self.check(headers)?;
        if grant.best() < Some(needed) {
            return Err(Status::permission_denied(format!(
                "{path} needs a write token; this one may only read"
            )));
        }
        Ok(Some(grant))
    }
}

/// The token of an `authorization: Bearer TOKEN` value (the scheme is case-insensitive).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// A tower layer checking tokens before any service sees a request; `None`
/// lets every request through unchanged.
#[derive(Clone, Debug, Default)]
pub(crate) struct AuthLayer(pub(crate) Option<Auth>);

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            auth: self.0.clone(),
            inner,
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct AuthService<S> {
    auth: Option<Auth>,
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        futures::future::Either<S::Future, futures::future::Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        use futures::future::Either;
        if let Some(auth) = &self.auth {
            let path = request.uri().path().to_string();
            match auth.authorize(&path, request.headers()) {
                Ok(Some(grant)) => {
                    request.extensions_mut().insert(grant);
                }
                Ok(None) => {}
                Err(status) => {
                    tracing::debug!(rpc = %path, code = ?status.code(), "refused: {}", status.message());
                    return Either::Right(futures::future::ready(Ok(status.into_http())));
                }
            }
        }
        Either::Left(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_comments_blank_lines_and_permissions() {
        let t = Tokens::parse("# team\n\nread r1\n  write   w1  \n", "f").unwrap();
        assert_eq!((t.len(), t.writers()), (2, 1));
        assert_eq!(t.permission(b"r1"), Some(Permission::Read));
        assert_eq!(t.permission(b"w1"), Some(Permission::Write));
        assert_eq!(t.permission(b"w"), None);
        assert_eq!(t.permission(b""), None);
        assert_eq!(format!("{t:?}"), "Tokens { read: 1, write: 1 }");
    }

    #[test]
    fn a_bad_line_names_file_and_line_but_not_the_token() {
        for (text, why) in [
            ("read r3ad0nly\nadmin s3cret\n", "expected `read TOKEN`"),
            ("read r3ad0nly\nwrite\n", "missing"),
        ] {
            let e = Tokens::parse(text, "tokens.txt").unwrap_err().to_string();
            assert!(e.contains("tokens.txt:2: ") && e.contains(why), "{e}");
            assert!(!e.contains("s3cret") && !e.contains("r3ad0nly"), "{e}");
        }
        let e = Tokens::parse("# nothing\n", "t").unwrap_err().to_string();
        assert!(e.contains("no tokens"), "{e}");
    }

    #[test]
    fn lines_may_be_limited_to_instance_name_prefixes() {
        let text = "write t team-a team-b/ci\nread t\nread r team-b\n";
        let t = Tokens::parse(text, "f").unwrap();
        let (both, reader) = (t.grant(b"t").unwrap(), t.grant(b"r").unwrap());
        for (instance, writer_may, reader_may) in [
            ("team-a", Some(Permission::Write), None),
            ("team-a/x", Some(Permission::Write), None),
            ("team-ab", Some(Permission::Read), None),
            ("team-b", Some(Permission::Read), Some(Permission::Read)),
            (
                "team-b/ci/x",
                Some(Permission::Write),
                Some(Permission::Read),
            ),
            ("", Some(Permission::Read), None),
        ] {
            assert_eq!(both.permission_for(instance), writer_may, "{instance:?}");
            assert_eq!(reader.permission_for(instance), reader_may, "{instance:?}");
        }
        let denied = |r: Result<(), Status>| r.unwrap_err().code();
        assert_eq!(
            denied(reader.check("team-b", Permission::Write)),
            tonic::Code::PermissionDenied
        );
        let e = reader.check("team-c", Permission::Read).unwrap_err();
        assert!(e.message().contains("\"team-c\""), "{e:?}");
        let e = Tokens::parse("read s3cret team-a/\n", "f")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("f:1: ") && e.contains("team-a/") && !e.contains("s3cret"),
            "{e}"
        );
    }

    #[test]
    fn bearer_header() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"abc"), None);
    }

    #[test]
    fn write_rpcs_need_write_health_needs_nothing() {
        let auth = Auth::new(Tokens::parse("read r\nwrite w\n", "f").unwrap());
        let headers = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("authorization", v.parse().unwrap());
            h
        };
        let write = "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult";
        let read = "/build.bazel.remote.execution.v2.ActionCache/GetActionResult";
        let code = |r: Result<Option<Grant>, Status>| {
            r.map(|g| g.and_then(|g| g.best())).map_err(|s| s.code())
        };
        assert_eq!(
            code(auth.authorize(read, &headers("Bearer r"))),
            Ok(Some(Permission::Read))
        );
        assert_eq!(
            code(auth.authorize(write, &headers("Bearer r"))),
            Err(tonic::Code::PermissionDenied)
        );
        assert_eq!(
            code(auth.authorize(write, &headers("Bearer w"))),
            Ok(Some(Permission::Write))
        );
        assert_eq!(
            code(auth.authorize(read, &headers("Bearer x"))),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            code(auth.authorize(read, &http::HeaderMap::new())),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            code(auth.authorize("/grpc.health.v1.Health/Check", &http::HeaderMap::new())),
            Ok(None)
        );
        auth.replace(Tokens::parse("read x\n", "f").unwrap());
        assert_eq!(
            code(auth.authorize(read, &headers("Bearer x"))),
            Ok(Some(Permission::Read))
        );
        assert_eq!(
            code(auth.authorize(read, &headers("Bearer r"))),
            Err(tonic::Code::Unauthenticated)
        );
        assert!(!format!("{auth:?}").contains('x'), "{auth:?}");
    }
}
