pub mod demo;
pub mod fetch_tree;
pub mod metrics;
pub mod serve;
pub mod transfer;
pub mod validate;

use blob_access::{BlobAccess, BuildContext};
use std::path::Path;
use std::sync::Arc;

/// Loads a config file and builds its CAS tree, with errors ready to print.
pub fn open(config: &Path) -> Result<Arc<dyn BlobAccess>, String> {
    let loaded = blob_access_config::load_file(config).map_err(|e| e.to_string())?;
    loaded
        .build_cas(&BuildContext::root())
        .map_err(|e| format!("{}: {e}", config.display()))
}
