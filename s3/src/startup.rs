//! A missing bucket or refused credentials are found when the tree is built,
//! not at the first build that uses it.

use crate::config::S3Config;
use crate::keys::Keys;
use blob_access::{Code, Error, Result};
use futures::StreamExt;
use object_store::ObjectStore;
use std::time::Duration;

/// How long the check may take (credentials from instance metadata included).
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// Lists the node's prefix once. Runs on a thread and runtime of its own, so
/// that building works inside or outside an async runtime alike.
pub(crate) fn check_bucket(config: &S3Config, node: &str) -> Result<()> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Error::internal(format!("{node}: cannot start a runtime: {e}")))?;
            rt.block_on(check(config, node))
        })
        .join()
        .unwrap_or_else(|_| {
            Err(Error::internal(format!(
                "{node}: the bucket check panicked"
            )))
        })
    })
}

async fn check(config: &S3Config, node: &str) -> Result<()> {
    let store = config.client(node, crate::ClientUse::Requests)?;
    let root = Keys::new(&config.prefix).root();
    // One page of the prefix is enough to learn that the bucket exists and
    // the key may list it (s3:ListBucket).
    let first = async { store.list(Some(&root)).next().await.transpose() };
    let listed = tokio::time::timeout(CHECK_TIMEOUT, first).await;
    let where_ = format!(
        "bucket {:?} at {}",
        config.bucket,
        config.endpoint.as_deref().unwrap_or("AWS")
    );
    let e = match listed {
        Ok(Ok(_)) => return Ok(()),
        Ok(Err(e)) => e,
        Err(_) => {
            return Err(Error::unavailable(format!(
                "{node}: no answer from {where_} within {CHECK_TIMEOUT:?}"
            )))
        }
    };
    let code = crate::errors::from_store(&e, node).code();
    let why = match code {
        Code::NotFound => format!("the bucket does not exist ({e})"),
        Code::PermissionDenied | Code::Unauthenticated => format!(
            "the credentials were refused (check access_key_id and secret_access_key, \
             or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY): {e}"
        ),
        _ => format!("it cannot be listed: {e}"),
    };
    Err(Error::new(code, format!("{node}: {where_}: {why}")))
}
