//! The action cache in a bucket: one small object per action (see
//! [`crate::keys`]), written whole and read whole. A bucket's lifecycle rule
//! that expires results makes them misses (NOT_FOUND), as eviction would.

use crate::config::S3Config;
use crate::errors::from_store;
use crate::keys::Keys;
use blob_access::action_cache::{self, ActionCache, ActionResult};
use blob_access::node::Counters;
use blob_access::{Digest, NodeMetrics, Result};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use std::sync::Arc;

pub struct S3ActionCache {
    name: String,
    store: Arc<dyn ObjectStore>,
    keys: Keys,
    counters: Counters,
}

impl S3ActionCache {
    pub fn new(name: &str, config: &S3Config) -> Result<Self> {
        let name = if name.is_empty() { "s3" } else { name };
        Ok(S3ActionCache {
            store: config.client(name, crate::ClientUse::Requests)?,
            name: name.into(),
            keys: Keys::new(&config.prefix),
            counters: Counters::new(&["gets", "hits", "updates"]),
        })
    }
}

#[async_trait::async_trait]
impl ActionCache for S3ActionCache {
    async fn get_action_result(&self, action: &Digest) -> Result<ActionResult> {
        self.counters.inc("gets");
        let key = self.keys.action_cache(action);
        let got = async { self.store.get(&key).await?.bytes().await }.await;
        let data = match got {
            Ok(data) => data,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(action_cache::not_found(action, &self.name))
            }
            Err(e) => return Err(from_store(&e, &self.name).with_digest(action)),
        };
        let result = action_cache::decode(action, &data, &self.name)?;
        self.counters.inc("hits");
        Ok(result)
    }

    async fn update_action_result(&self, action: &Digest, result: &ActionResult) -> Result<()> {
        self.counters.inc("updates");
        let data = action_cache::encode(action, result, &self.name)?;
        self.store
            .put(&self.keys.action_cache(action), PutPayload::from(data))
            .await
            .map_err(|e| from_store(&e, &self.name).with_digest(action))?;
        Ok(())
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        out.push(self.counters.snapshot(&self.name, "s3"));
    }
}
