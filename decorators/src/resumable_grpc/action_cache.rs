//! `resumable_grpc` in an action cache tree: GetActionResult and
//! UpdateActionResult forwarded to the remote, retried when the transport
//! fails (a proxy reloading between two of a build's thousand lookups) by
//! the rules of [`super::unary`].

use super::channels::Channels;
use super::observe::ObservingChannel;
use super::unary::{UnaryRetry, COUNTERS};
use super::RetryPolicy;
use blob_access::action_cache::{ActionCache, ActionResult, GrpcActionCache};
use blob_access::grpc::GrpcChannel;
use blob_access::node::Counters;
use blob_access::proto::action_cache_client::ActionCacheClient;
use blob_access::{Digest, NodeMetrics, Result};
use std::sync::Arc;

/// See the module documentation.
pub struct ResumableGrpcActionCache {
    plain: GrpcActionCache,
    unary: UnaryRetry,
}

impl ResumableGrpcActionCache {
    pub fn new(plain: GrpcActionCache, policy: RetryPolicy) -> Self {
        let conn = plain.connection().clone();
        let fresh = conn.clone();
        let channels = Channels::new(conn.channel(), move || fresh.new_channel());
        ResumableGrpcActionCache {
            plain,
            unary: UnaryRetry {
                policy,
                channels: Arc::new(channels),
                counters: Arc::new(Counters::new(COUNTERS)),
            },
        }
    }
}

/// A client whose calls record the status the server sent.
fn client(channel: GrpcChannel) -> ActionCacheClient<ObservingChannel<GrpcChannel>> {
    ActionCacheClient::new(ObservingChannel::new(channel))
        .max_decoding_message_size(blob_access::grpc::MAX_MESSAGE)
        .max_encoding_message_size(blob_access::grpc::MAX_MESSAGE)
}

#[async_trait::async_trait]
impl ActionCache for ResumableGrpcActionCache {
    async fn get_action_result(&self, action: &Digest) -> Result<ActionResult> {
        let result = self
            .unary
            .retrying("GetActionResult", |channel, observed| {
                let mut req = self.plain.get_request(action);
                observed.attach(&mut req);
                async move { Ok(client(channel).get_action_result(req).await?.into_inner()) }
            })
            .await
            .map_err(|e| self.plain.error(e, action));
        self.plain.count(&result, "hits");
        result
    }

    async fn update_action_result(&self, action: &Digest, result: &ActionResult) -> Result<()> {
        let outcome = self
            .unary
            .retrying("UpdateActionResult", |channel, observed| {
                let mut req = self.plain.update_request(action, result);
                observed.attach(&mut req);
                async move { client(channel).update_action_result(req).await.map(|_| ()) }
            })
            .await
            .map_err(|e| self.plain.error(e, action));
        self.plain.count(&outcome, "updates");
        outcome
    }

    async fn update_enabled(&self) -> bool {
        self.plain.update_enabled().await
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        let name = self.plain.connection().name();
        out.push(self.unary.counters.snapshot(name, "resumable_grpc"));
        self.plain.metrics(out);
    }
}
