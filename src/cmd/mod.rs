pub mod demo;
pub mod fetch_tree;
pub mod metrics;
pub mod serve;
pub mod transfer;
pub mod validate;

use blob_access::{BlobAccess, BuildContext, BuildNode};
use std::path::Path;
use std::sync::Arc;

/// Loads and builds the tree of a config file, with errors ready to print.
pub fn open(config: &Path) -> Result<Arc<dyn BlobAccess>, String> {
    open_in(config, &BuildContext::root())
}

/// As [`open`], building in `ctx` (e.g. one that records metrics).
pub fn open_in(config: &Path, ctx: &BuildContext) -> Result<Arc<dyn BlobAccess>, String> {
    let node = blob_access_config::load_file(config).map_err(|e| e.to_string())?;
    node.build(ctx)
        .map_err(|e| format!("{}: {e}", config.display()))
}
