//! `resumable_grpc` in an action cache tree: calls through a real server,
//! retried when a small in-process ActionCache server fails them (UNAVAILABLE
//! and the like) or a proxy kills the connection, not retried when the answer
//! is about the request, within the retry budget; headers and the instance
//! name reach the remote on every attempt.

mod common;

use blob_access::action_cache::{ActionCache, ActionResult, GrpcActionCache};
use blob_access::grpc::{GrpcConfig, GrpcConnection, Headers};
use blob_access::memory::{MemoryActionCache, MemoryBlobAccess};
use blob_access::proto::action_cache_server::{self, ActionCacheServer};
use blob_access::proto::capabilities_server::{self, CapabilitiesServer};
use blob_access::proto::{
    ActionCacheUpdateCapabilities, CacheCapabilities, GetActionResultRequest,
    GetCapabilitiesRequest, ServerCapabilities, UpdateActionResultRequest,
};
use blob_access::{BuildContext, Code, Digest, DigestFunction, Storage};
use blob_access_chaos::{Faults, Kill, Proxy};
use blob_access_decorators::resumable_grpc::{ResumableGrpcActionCache, RetryPolicy};
use blob_access_server::{serve_tcp, ServerConfig};
use common::ac::ac_counter;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::{Request, Response, Status};

fn policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts_without_progress: max_attempts,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        deadline: None,
        ..Default::default()
    }
}

fn grpc_config(endpoint: &str) -> GrpcConfig {
    // From text, as users write it: new optional fields need no change here.
    let yaml = format!("{{endpoint: \"{endpoint}\", connect_timeout: 2s}}");
    serde_yaml_ng::from_str(&yaml).unwrap()
}

fn resumable(cfg: &GrpcConfig, policy: RetryPolicy) -> ResumableGrpcActionCache {
    let conn = GrpcConnection::new("ac.resumable_grpc", cfg).unwrap();
    ResumableGrpcActionCache::new(GrpcActionCache::new(conn), policy)
}

fn counter(ac: &dyn ActionCache, kind: &str, name: &str) -> u64 {
    ac_counter(ac, kind, name)
}

fn a_result(code: i32) -> ActionResult {
    ActionResult {
        exit_code: code,
        stdout_raw: b"compiled".to_vec(),
        ..Default::default()
    }
}

/// `serve` over a memory CAS and a memory action cache; stops when dropped.
struct RealServer {
    addr: SocketAddr,
    results: Arc<MemoryActionCache>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl RealServer {
    async fn start(cfg: ServerConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let results = Arc::new(MemoryActionCache::new("remote", 1 << 20));
        let storage = Storage::new(Arc::new(MemoryBlobAccess::new("cas", 1 << 20)))
            .with_action_cache(results.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve_tcp(storage, cfg, listener, async move {
            let _ = stopped.await;
        }));
        RealServer {
            addr,
            results,
            _stop: stop,
        }
    }
    fn endpoint(&self) -> String {
        format!("grpc://{}", self.addr)
    }
}

/// What the flaky server saw of one call.
#[derive(Clone, Debug)]
struct Seen {
    method: &'static str,
    instance_name: String,
    authorization: Option<String>,
}

#[derive(Default)]
struct FlakyState {
    results: Option<MemoryActionCache>,
    /// The next `n` ActionCache calls fail with this code.
    fail_next: Mutex<(u32, Option<Code>)>,
    /// Every ActionCache call fails with this code, once `fail_next` is used up.
    fail_always: Mutex<Option<Code>>,
    ac_calls: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
    update_enabled: bool,
}

/// A tonic ActionCache + Capabilities server whose ActionCache calls fail on
/// demand and which records the instance name and headers of each call.
#[derive(Clone)]
struct Flaky(Arc<FlakyState>);

struct FlakyServer {
    addr: SocketAddr,
    state: Arc<FlakyState>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl FlakyServer {
    async fn start(update_enabled: bool) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(FlakyState {
            results: Some(MemoryActionCache::new("flaky", 1 << 20)),
            update_enabled,
            ..Default::default()
        });
        let svc = Flaky(state.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let router = tonic::transport::Server::builder()
            .add_service(ActionCacheServer::new(svc.clone()))
            .add_service(CapabilitiesServer::new(svc));
        tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            let _ = stopped.await;
        }));
        FlakyServer {
            addr,
            state,
            _stop: stop,
        }
    }
    fn endpoint(&self) -> String {
        format!("grpc://{}", self.addr)
    }
    fn fail_next(&self, n: u32, code: Code) {
        *self.state.fail_next.lock().unwrap() = (n, Some(code));
    }
    fn fail_always(&self, code: Option<Code>) {
        *self.state.fail_always.lock().unwrap() = code;
    }
    /// ActionCache calls so far (failed ones included).
    fn calls(&self) -> usize {
        self.state.ac_calls.load(Ordering::SeqCst)
    }
    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }
    fn results(&self) -> &MemoryActionCache {
        self.state.results.as_ref().unwrap()
    }
}

impl Flaky {
    fn record<T>(&self, method: &'static str, req: &Request<T>, instance_name: &str) {
        let authorization = req
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_string());
        self.0.seen.lock().unwrap().push(Seen {
            method,
            instance_name: instance_name.to_string(),
            authorization,
        });
    }

    /// The injected failure of this ActionCache call, if any.
    fn fault(&self) -> Result<(), Status> {
        self.0.ac_calls.fetch_add(1, Ordering::SeqCst);
        let mut next = self.0.fail_next.lock().unwrap();
        let code = match *next {
            (n, Some(code)) if n > 0 => {
                next.0 -= 1;
                Some(code)
            }
            _ => *self.0.fail_always.lock().unwrap(),
        };
        match code {
            Some(code) => Err(Status::new(code, format!("injected {code:?}"))),
            None => Ok(()),
        }
    }
}

fn action_of(d: Option<&blob_access::proto::Digest>) -> Result<Digest, Status> {
    let d = d.ok_or_else(|| Status::invalid_argument("no action_digest"))?;
    Digest::from_proto(DigestFunction::Sha256, d)
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

#[tonic::async_trait]
impl action_cache_server::ActionCache for Flaky {
    async fn get_action_result(
        &self,
        req: Request<GetActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        self.record("get", &req, &req.get_ref().instance_name);
        self.fault()?;
        let action = action_of(req.get_ref().action_digest.as_ref())?;
        let results = self.0.results.as_ref().unwrap();
        Ok(Response::new(results.get_action_result(&action).await?))
    }

    async fn update_action_result(
        &self,
        req: Request<UpdateActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        self.record("update", &req, &req.get_ref().instance_name);
        self.fault()?;
        let action = action_of(req.get_ref().action_digest.as_ref())?;
        let result = req.into_inner().action_result.unwrap_or_default();
        let results = self.0.results.as_ref().unwrap();
        results.update_action_result(&action, &result).await?;
        Ok(Response::new(result))
    }
}

#[tonic::async_trait]
impl capabilities_server::Capabilities for Flaky {
    async fn get_capabilities(
        &self,
        req: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<ServerCapabilities>, Status> {
        self.record("capabilities", &req, &req.get_ref().instance_name);
        Ok(Response::new(ServerCapabilities {
            cache_capabilities: Some(CacheCapabilities {
                action_cache_update_capabilities: Some(ActionCacheUpdateCapabilities {
                    update_enabled: self.0.update_enabled,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }
}

#[tokio::test]
async fn a_tree_from_yaml_round_trips_through_a_real_server() {
    let server = RealServer::start(ServerConfig {
        instance_name: Some("ci/main".into()),
        ..Default::default()
    })
    .await;
    let yaml = format!(
        "
content_addressable_storage:
  memory: {{max_size_bytes: 1MiB}}
action_cache:
  resumable_grpc:
    grpc: {{endpoint: \"{}\", instance_name: ci/main}}
    max_attempts_without_progress: 3
    initial_backoff: 1ms
",
        server.endpoint()
    );
    let config =
        blob_access_config::load_str(&yaml, blob_access_config::Format::Yaml, "t").unwrap();
    let ac = config
        .build(&BuildContext::root())
        .unwrap()
        .action_cache
        .unwrap();
    let a = Digest::of(b"Action");

    let err = ac.get_action_result(&a).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    assert_eq!(err.digest(), Some(&a));
    assert_eq!(err.backend(), Some("action_cache.resumable_grpc"), "{err}");
    ac.update_action_result(&a, &a_result(1)).await.unwrap();
    // The server keeps it under the instance name it was asked for.
    let stored = server
        .results
        .get_action_result(&a.with_instance_name("ci/main"))
        .await;
    assert_eq!(stored.unwrap(), a_result(1));
    assert_eq!(ac.get_action_result(&a).await.unwrap(), a_result(1));
    assert!(ac.update_enabled().await);

    assert_eq!(counter(&*ac, "resumable_grpc", "retries"), 0);
    assert_eq!(counter(&*ac, "grpc", "hits"), 1);
    assert_eq!(counter(&*ac, "grpc", "misses"), 1);
    assert_eq!(counter(&*ac, "grpc", "updates"), 1);

    // A read-only server: updates disabled, and refused without retries.
    let read_only = RealServer::start(ServerConfig {
        action_cache_read_only: true,
        ..Default::default()
    })
    .await;
    read_only
        .results
        .update_action_result(&a, &a_result(2))
        .await
        .unwrap();
    let ac = resumable(&grpc_config(&read_only.endpoint()), policy(5));
    assert!(!ac.update_enabled().await);
    assert_eq!(ac.get_action_result(&a).await.unwrap(), a_result(2));
    let err = ac.update_action_result(&a, &a_result(3)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert_eq!(counter(&ac, "resumable_grpc", "retries"), 0);
}

#[tokio::test]
async fn transient_failures_are_retried_and_counted() {
    let server = FlakyServer::start(true).await;
    let a = Digest::of(b"Action");
    server
        .results()
        .update_action_result(&a, &a_result(1))
        .await
        .unwrap();
    let ac = resumable(&grpc_config(&server.endpoint()), policy(5));

    server.fail_next(2, Code::Unavailable);
    assert_eq!(ac.get_action_result(&a).await.unwrap(), a_result(1));
    assert_eq!(server.calls(), 3);
    assert_eq!(counter(&ac, "resumable_grpc", "retries"), 2);

    server.fail_next(3, Code::Aborted);
    ac.update_action_result(&a, &a_result(2)).await.unwrap();
    assert_eq!(server.calls(), 3 + 4);
    assert_eq!(
        server.results().get_action_result(&a).await.unwrap(),
        a_result(2)
    );
    assert_eq!(counter(&ac, "resumable_grpc", "retries"), 5);

    // RESOURCE_EXHAUSTED without a RetryInfo is a full or refusing store:
    // an answer, not retried.
    server.fail_next(1, Code::ResourceExhausted);
    let err = ac.get_action_result(&a).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert_eq!(server.calls(), 3 + 4 + 1);
    assert_eq!(counter(&ac, "resumable_grpc", "retries"), 5);
    assert_eq!(counter(&ac, "resumable_grpc", "give_ups"), 0);
    assert_eq!(ac.get_action_result(&a).await.unwrap(), a_result(2));
    // Each call counted once, whatever its attempts.
    assert_eq!(counter(&ac, "grpc", "hits"), 2);
    assert_eq!(counter(&ac, "grpc", "updates"), 1);
    assert_eq!(counter(&ac, "grpc", "errors"), 1);
}

#[tokio::test]
async fn answers_about_the_request_are_not_retried() {
    let server = FlakyServer::start(true).await;
    let ac = resumable(&grpc_config(&server.endpoint()), policy(5));
    let a = Digest::of(b"Action");

    // A miss is an answer.
    let err = ac.get_action_result(&a).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    assert_eq!(server.calls(), 1);

    for (i, code) in [
        Code::NotFound,
        Code::InvalidArgument,
        Code::PermissionDenied,
        Code::FailedPrecondition,
        // Sent by the server (not made up by the client from a broken
        // transport): its considered answer.
        Code::Internal,
    ]
    .into_iter()
    .enumerate()
    {
        server.fail_next(1, code);
        let err = ac.get_action_result(&a).await.unwrap_err();
        assert_eq!(err.code(), code, "{err}");
        assert_eq!(err.digest(), Some(&a), "{err}");
        assert_eq!(err.backend(), Some("ac.resumable_grpc"), "{err}");
        assert_eq!(server.calls(), 2 + i * 2, "{code:?} was retried");
        server.fail_next(1, code);
        let err = ac.update_action_result(&a, &a_result(1)).await.unwrap_err();
        assert_eq!(err.code(), code, "{err}");
        assert_eq!(server.calls(), 3 + i * 2, "{code:?} was retried");
    }
    assert_eq!(counter(&ac, "resumable_grpc", "retries"), 0);
    assert_eq!(counter(&ac, "resumable_grpc", "give_ups"), 0);
    assert!(server.results().get_action_result(&a).await.is_err());
}

#[tokio::test]
async fn the_retry_budget_is_respected() {
    let server = FlakyServer::start(true).await;
    server.fail_always(Some(Code::Unavailable));
    let ac = resumable(&grpc_config(&server.endpoint()), policy(3));
    let a = Digest::of(b"Action");

    let err = ac.get_action_result(&a).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert_eq!(err.digest(), Some(&a));
    assert_eq!(err.backend(), Some("ac.resumable_grpc"));
    assert!(
        err.message()
            .starts_with("GetActionResult: gave up after 3 attempts: "),
        "{err}"
    );
    assert_eq!(server.calls(), 3);
    assert_eq!(counter(&ac, "resumable_grpc", "retries"), 2);
    assert_eq!(counter(&ac, "resumable_grpc", "give_ups"), 1);

    let err = ac.update_action_result(&a, &a_result(1)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert_eq!(server.calls(), 6);
    assert_eq!(counter(&ac, "resumable_grpc", "give_ups"), 2);
    assert_eq!(counter(&ac, "grpc", "errors"), 2);

    // A budget of one attempt: no retry at all.
    let once = resumable(&grpc_config(&server.endpoint()), policy(1));
    assert!(once.get_action_result(&a).await.is_err());
    assert_eq!(server.calls(), 7);
    assert_eq!(counter(&once, "resumable_grpc", "retries"), 0);

    // The deadline ends retrying before a large budget is used up.
    let mut p = policy(1000);
    p.initial_backoff = Duration::from_millis(10);
    p.max_backoff = Duration::from_millis(10);
    p.deadline = Some(Duration::from_millis(100));
    let bounded = resumable(&grpc_config(&server.endpoint()), p);
    let started = std::time::Instant::now();
    let err = bounded.get_action_result(&a).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(started.elapsed() < Duration::from_secs(2));
    let attempts = server.calls() - 7;
    // Waits of 5 to 10 ms within 100 ms, far from the budget of 1000.
    assert!((2..=25).contains(&attempts), "{attempts} attempts");
    assert_eq!(counter(&bounded, "resumable_grpc", "give_ups"), 1);

    // Healthy again: it works.
    server.fail_always(None);
    server
        .results()
        .update_action_result(&a, &a_result(5))
        .await
        .unwrap();
    assert_eq!(ac.get_action_result(&a).await.unwrap(), a_result(5));
}

#[tokio::test]
async fn no_backoff_is_waited_past_the_deadline() {
    // As for reads (RetryPolicy::deadline): a wait that would end after the
    // deadline is not started; the call fails at once instead.
    let server = FlakyServer::start(true).await;
    server.fail_always(Some(Code::Unavailable));
    let mut p = policy(1000);
    p.initial_backoff = Duration::from_millis(600);
    p.max_backoff = Duration::from_millis(600);
    p.deadline = Some(Duration::from_millis(50));
    let ac = resumable(&grpc_config(&server.endpoint()), p);
    let a = Digest::of(b"Action");
    let started = std::time::Instant::now();
    let err = ac.get_action_result(&a).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert_eq!(server.calls(), 1);
    assert!(took < Duration::from_millis(250), "waited {took:?}");
    assert_eq!(counter(&ac, "resumable_grpc", "give_ups"), 1);
    assert_eq!(counter(&ac, "resumable_grpc", "retries"), 0);
}

#[tokio::test]
async fn killed_connections_are_retried() {
    let server = RealServer::start(ServerConfig::default()).await;
    let a = Digest::of(b"Action");
    server
        .results
        .update_action_result(&a, &a_result(1))
        .await
        .unwrap();
    // The first two connections are reset as soon as the server speaks.
    let proxy = Proxy::start(server.addr, Some(Faults::bytes(Kill::Rst, 0).times(2)))
        .await
        .unwrap();
    let ac = resumable(&grpc_config(&proxy.endpoint()), policy(5));
    assert_eq!(ac.get_action_result(&a).await.unwrap(), a_result(1));
    assert_eq!(proxy.kills.load(Ordering::SeqCst), 2);
    assert!(counter(&ac, "resumable_grpc", "retries") >= 1);
    assert_eq!(counter(&ac, "resumable_grpc", "give_ups"), 0);

    // The plain node gives up at the first kill.
    proxy.set(Some(Faults::bytes(Kill::Rst, 0).times(1)));
    let conn = GrpcConnection::new("plain", &grpc_config(&proxy.endpoint())).unwrap();
    let plain = GrpcActionCache::new(conn);
    let err = plain.get_action_result(&a).await.unwrap_err();
    assert!(err.message().contains("connection"), "{err}");
    assert_eq!(proxy.kills.load(Ordering::SeqCst), 3);

    // Updates too.
    proxy.set(Some(Faults::bytes(Kill::Fin, 0).times(2)));
    let ac = resumable(&grpc_config(&proxy.endpoint()), policy(5));
    ac.update_action_result(&a, &a_result(2)).await.unwrap();
    assert_eq!(
        server.results.get_action_result(&a).await.unwrap(),
        a_result(2)
    );
    assert_eq!(proxy.kills.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn headers_and_the_instance_name_reach_the_remote_on_every_attempt() {
    let server = FlakyServer::start(false).await;
    let mut cfg = grpc_config(&server.endpoint());
    cfg.instance_name = "ci/main".into();
    cfg.headers = Headers(BTreeMap::from([(
        "authorization".to_string(),
        "Bearer t0k3n".into(),
    )]));
    let ac = resumable(&cfg, policy(5));
    let a = Digest::of(b"Action");

    server.fail_next(1, Code::Unavailable);
    ac.update_action_result(&a, &a_result(1)).await.unwrap();
    server.fail_next(2, Code::Unavailable);
    assert_eq!(ac.get_action_result(&a).await.unwrap(), a_result(1));
    // The remote said updates are disabled.
    assert!(!ac.update_enabled().await);

    let seen = server.seen();
    let methods: Vec<&str> = seen.iter().map(|s| s.method).collect();
    assert_eq!(
        methods,
        ["update", "update", "get", "get", "get", "capabilities"]
    );
    for s in &seen {
        assert_eq!(s.instance_name, "ci/main", "{s:?}");
        assert_eq!(s.authorization.as_deref(), Some("Bearer t0k3n"), "{s:?}");
    }
}

/// A path that takes connections and never answers (a stuck proxy): each call
/// is abandoned after `stall_timeout` and the budget ends it, instead of a
/// lookup that hangs a build forever.
#[tokio::test]
async fn a_call_without_an_answer_is_abandoned_after_the_stall_timeout() {
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = hole.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = hole.accept().await {
            conns.push(c);
        }
    });
    let yaml = format!("{{endpoint: \"grpc://127.0.0.1:{port}\", connect_timeout: 60s}}");
    let cfg: GrpcConfig = serde_yaml_ng::from_str(&yaml).unwrap();
    let mut p = policy(2);
    p.stall_timeout = Duration::from_millis(300);
    let ac = resumable(&cfg, p);
    let started = std::time::Instant::now();
    let err = ac
        .get_action_result(&Digest::of(b"Action"))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert!(err.message().contains("stall_timeout"), "{err}");
    assert_eq!(counter(&ac, "resumable_grpc", "retries"), 1);
    assert_eq!(counter(&ac, "resumable_grpc", "give_ups"), 1);
    held.abort();
}
