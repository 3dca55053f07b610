//! Capabilities: what a client may expect of this server (SHA-256, zstd, the
//! batch limit, whether action results may be uploaded) and, with an
//! execution tree, the remote's execution capabilities.

use super::Shared;
use bazel_remote_apis::build::bazel::semver::SemVer;
use blob_access::proto::capabilities_server;
use blob_access::proto::{
    compressor, digest_function, symlink_absolute_path_strategy, ActionCacheUpdateCapabilities,
    CacheCapabilities, ExecutionCapabilities, GetCapabilitiesRequest, ServerCapabilities,
};
use tonic::{Request, Response, Status};

pub(super) struct Capabilities(pub(super) Shared);

fn version(major: i32, minor: i32) -> Option<SemVer> {
    Some(SemVer {
        major,
        minor,
        patch: 0,
        prerelease: String::new(),
    })
}

#[tonic::async_trait]
impl capabilities_server::Capabilities for Capabilities {
    async fn get_capabilities(
        &self,
        request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<ServerCapabilities>, Status> {
        let instance_name = &request.get_ref().instance_name;
        let extensions = request.extensions();
        self.0
            .check_instance(instance_name, extensions, super::Permission::Read)?;
        // Set by the token check: a caller that may only read here must not upload results.
        let caller_may_write = extensions
            .get::<super::Grant>()
            .is_none_or(|g| g.permission_for(instance_name) == Some(super::Permission::Write));
        let zstd = compressor::Value::Zstd as i32;
        // Bazel fails a build that uploads results to a cache refusing them, so
        // updates are advertised only where the tree (and any remote) takes them.
        let update_enabled = match &self.0.action_cache {
            Some(ac) => {
                caller_may_write && !self.0.cfg.action_cache_read_only && ac.update_enabled().await
            }
            None => false,
        };
        let cache = CacheCapabilities {
            digest_functions: served_functions(),
            action_cache_update_capabilities: Some(ActionCacheUpdateCapabilities {
                update_enabled,
            }),
            max_batch_total_size_bytes: self.0.cfg.max_batch_total_size_bytes as i64,
            // Action results are stored as clients send them, absolute symlinks included.
            symlink_absolute_path_strategy: symlink_absolute_path_strategy::Value::Allowed as i32,
            supported_compressors: vec![zstd],
            supported_batch_update_compressors: vec![zstd],
            // 0: no limit of our own; the backend may still refuse a blob.
            max_cas_blob_size_bytes: 0,
            split_blob_support: false,
            splice_blob_support: false,
            ..Default::default()
        };
        let execution = match &self.0.execution {
            Some(tree) => Some(execution_capabilities(&**tree, instance_name).await),
            None => None,
        };
        Ok(Response::new(ServerCapabilities {
            cache_capabilities: Some(cache),
            execution_capabilities: execution,
            deprecated_api_version: None,
            low_api_version: version(2, 0),
            high_api_version: version(2, 3),
        }))
    }
}

/// The remote's execution capabilities, with the digest functions both serve.
/// A remote that cannot be asked now is reported as executing (the config
/// says it does): its Execute calls then say what is wrong, where a client
/// told "no execution" would refuse to start.
async fn execution_capabilities(
    tree: &dyn blob_access::Execution,
    instance_name: &str,
) -> ExecutionCapabilities {
    let sha256 = digest_function::Value::Sha256 as i32;
    let remote = match tree.capabilities(instance_name).await {
        Ok(Some(caps)) => caps,
        Ok(None) => return ExecutionCapabilities::default(),
        Err(e) => {
            tracing::warn!(error = %e, "could not ask the execution service for its capabilities");
            ExecutionCapabilities {
                exec_enabled: true,
                ..Default::default()
            }
        }
    };
    // The remote executes with the functions it names (SHA-256 if it names
    // none), of those this server's caches serve.
    let served = served_functions();
    let functions = match remote.digest_functions.as_slice() {
        [] => vec![sha256],
        named => named
            .iter()
            .filter(|f| served.contains(f))
            .copied()
            .collect(),
    };
    ExecutionCapabilities {
        digest_function: sha256,
        digest_functions: functions,
        ..remote
    }
}

/// Every digest function the caches take (each node keeps them apart).
fn served_functions() -> Vec<i32> {
    let all = blob_access::DigestFunction::ALL;
    all.iter().map(|f| f.to_proto()).collect()
}
