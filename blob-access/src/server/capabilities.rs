//! Capabilities: what a client may expect of this server (SHA-256, zstd,
//! the batch limit; a CAS only, no execution and no action cache).

use super::Shared;
use crate::proto::capabilities_server;
use crate::proto::{
    compressor, digest_function, symlink_absolute_path_strategy, ActionCacheUpdateCapabilities,
    CacheCapabilities, GetCapabilitiesRequest, ServerCapabilities,
};
use bazel_remote_apis::build::bazel::semver::SemVer;
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
        self.0.check_instance(&request.get_ref().instance_name)?;
        let zstd = compressor::Value::Zstd as i32;
        let cache = CacheCapabilities {
            digest_functions: vec![digest_function::Value::Sha256 as i32],
            action_cache_update_capabilities: Some(ActionCacheUpdateCapabilities {
                update_enabled: false,
            }),
            max_batch_total_size_bytes: self.0.cfg.max_batch_total_size_bytes as i64,
            // Only matters for action results, which this server does not store.
            symlink_absolute_path_strategy: symlink_absolute_path_strategy::Value::Disallowed
                as i32,
            supported_compressors: vec![zstd],
            supported_batch_update_compressors: vec![zstd],
            // 0: no limit of our own; the backend may still refuse a blob.
            max_cas_blob_size_bytes: 0,
            split_blob_support: false,
            splice_blob_support: false,
            ..Default::default()
        };
        Ok(Response::new(ServerCapabilities {
            cache_capabilities: Some(cache),
            execution_capabilities: None,
            deprecated_api_version: None,
            low_api_version: version(2, 0),
            high_api_version: version(2, 3),
        }))
    }
}
