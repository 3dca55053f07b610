//! `serve`: a REAPI CAS in front of any tree (placeholder until the server lands).

use std::path::Path;
use std::process::ExitCode;

pub async fn run(_config: Option<&Path>, _listen: &str) -> Result<ExitCode, String> {
    Err("serve is not implemented yet".into())
}
