//! A remote REAPI ActionCache, on the same channel, instance name and headers
//! as the `grpc` node's CAS: a proxy forwards both of a build tool's caches.

use super::{ActionCache, ActionResult};
use crate::grpc::GrpcConnection;
use crate::node::Counters;
use crate::proto::{GetActionResultRequest, UpdateActionResultRequest};
use crate::{Digest, Error, NodeMetrics, Result};

/// See the module documentation.
pub struct GrpcActionCache {
    conn: GrpcConnection,
    counters: Counters,
}

const COUNTERS: &[&str] = &["hits", "misses", "updates", "errors"];

/// How long a client's GetCapabilities waits for the remote's answer.
const CAPABILITIES_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

impl GrpcActionCache {
    pub fn new(conn: GrpcConnection) -> Self {
        GrpcActionCache {
            conn,
            counters: Counters::new(COUNTERS),
        }
    }

    pub fn connection(&self) -> &GrpcConnection {
        &self.conn
    }

    /// `e` naming this node and the action.
    pub fn error(&self, e: impl Into<Error>, action: &Digest) -> Error {
        e.into().with_backend(self.conn.name()).with_digest(action)
    }
}

impl GrpcActionCache {
    /// One GetActionResult call, failing with the status as tonic reports it.
    async fn try_get(&self, action: &Digest) -> Result<ActionResult, tonic::Status> {
        let req = self.get_request(action);
        let client = &mut self.conn.action_cache_client();
        Ok(client.get_action_result(req).await?.into_inner())
    }

    /// One UpdateActionResult call, like [`try_get`](Self::try_get).
    async fn try_update(
        &self,
        action: &Digest,
        result: &ActionResult,
    ) -> Result<(), tonic::Status> {
        let req = self.update_request(action, result);
        let client = &mut self.conn.action_cache_client();
        client.update_action_result(req).await?;
        Ok(())
    }

    /// The GetActionResult request of `action`, with the configured headers
    /// (for callers that make the call on a channel of their own).
    pub fn get_request(&self, action: &Digest) -> tonic::Request<GetActionResultRequest> {
        self.conn.request(GetActionResultRequest {
            instance_name: self.conn.instance_name_for(action),
            action_digest: Some(action.to_proto()),
            digest_function: action.function().to_proto(),
            // Inlined outputs would skip the CAS, where the caller verifies them.
            inline_stdout: false,
            inline_stderr: false,
            ..Default::default()
        })
    }

    /// The UpdateActionResult request, like [`get_request`](Self::get_request).
    pub fn update_request(
        &self,
        action: &Digest,
        result: &ActionResult,
    ) -> tonic::Request<UpdateActionResultRequest> {
        self.conn.request(UpdateActionResultRequest {
            instance_name: self.conn.instance_name_for(action),
            action_digest: Some(action.to_proto()),
            action_result: Some(result.clone()),
            digest_function: action.function().to_proto(),
            ..Default::default()
        })
    }

    /// Counts the outcome of a call (by whatever node made it).
    pub fn count<T>(&self, result: &Result<T>, ok: &str) {
        match result {
            Ok(_) => self.counters.inc(ok),
            Err(e) if e.code() == crate::Code::NotFound => self.counters.inc("misses"),
            Err(_) => self.counters.inc("errors"),
        }
    }
}

#[async_trait::async_trait]
impl ActionCache for GrpcActionCache {
    async fn get_action_result(&self, action: &Digest) -> Result<ActionResult> {
        let result = self
            .try_get(action)
            .await
            .map_err(|s| self.error(s, action));
        self.count(&result, "hits");
        result
    }

    async fn update_action_result(&self, action: &Digest, result: &ActionResult) -> Result<()> {
        let outcome = self
            .try_update(action, result)
            .await
            .map_err(|s| self.error(s, action));
        self.count(&outcome, "updates");
        outcome
    }

    async fn update_enabled(&self) -> bool {
        // Unknown (remote unreachable, or slow to say): yes, as a refusal makes
        // some clients fail their builds outright and an update will tell; and
        // soon, as clients ask at startup.
        let caps = tokio::time::timeout(CAPABILITIES_WAIT, self.conn.capabilities()).await;
        match caps {
            Ok(Ok(c)) => c.action_cache_update_enabled,
            _ => true,
        }
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        out.push(self.counters.snapshot(self.conn.name(), "grpc"));
    }
}
