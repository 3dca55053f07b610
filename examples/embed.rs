//! How a Rust build tool embeds blob-access: load a config, look an action up
//! in the action cache, upload its output and result, ask which inputs are
//! missing, and fetch a blob with verification.
//!
//! ```sh
//! cargo run --example embed                       # the in-memory example tree
//! cargo run --example embed -- examples/ci.yaml   # any config file
//! ```

use blob_access::action_cache::ActionResult;
use blob_access::proto::OutputFile;
use blob_access::{util, BuildContext, Code, Digest, ReadRange};
use bytes::Bytes;
use std::path::PathBuf;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/memory.yaml"))
        });
    let storage = blob_access_config::load_file(&config)?.build(&BuildContext::root())?;
    let cas = storage.cas;

    // Before running an action, ask the action cache (if the config has one).
    let action = Digest::of(b"an Action message: command, inputs, platform");
    if let Some(ac) = &storage.action_cache {
        match ac.get_action_result(&action).await {
            Ok(hit) => println!("cached: exit code {}", hit.exit_code),
            Err(e) if e.code() == Code::NotFound => println!("not cached: {e}"),
            Err(e) => return Err(e.into()),
        }
    }

    // The action ran and produced an output: upload it under its digest...
    let output = Bytes::from_static(b"int main() { return 0; }\n");
    let digest = Digest::of(&output);
    cas.put(&digest, util::once(output.clone())).await?;

    // ...then its result, which names the output by digest.
    if let Some(ac) = &storage.action_cache {
        let result = ActionResult {
            output_files: vec![OutputFile {
                path: "main.c".into(),
                digest: Some(digest.to_proto()),
                ..Default::default()
            }],
            ..Default::default()
        };
        ac.update_action_result(&action, &result).await?;
        let hit = ac.get_action_result(&action).await?;
        assert_eq!(hit, result);
        println!(
            "action result stored and served: {} output",
            hit.output_files.len()
        );
    }

    // Before uploading inputs, ask which ones the CAS lacks.
    let other = Digest::of(b"not uploaded yet");
    let missing = cas.find_missing(&[digest.clone(), other.clone()]).await?;
    println!("missing: {missing:?}");
    assert_eq!(missing, vec![other]);

    // Fetch it back; bytes are only returned once size and hash checked out.
    let data = util::read_to_bytes(&*cas, &digest, ReadRange::FULL, 1 << 20).await?;
    assert_eq!(data, output);
    println!("fetched {digest}: {} bytes, verified", data.len());
    Ok(())
}
