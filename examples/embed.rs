//! How a Rust build tool embeds blob-access: load a config tree, then upload an
//! output, ask which inputs are missing, and fetch a blob with verification.
//!
//! ```sh
//! cargo run --example embed                       # the in-memory example tree
//! cargo run --example embed -- examples/ci.yaml   # any config file
//! ```

use blob_access::{util, BuildContext, Digest, ReadRange};
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
    let tree = blob_access_config::load_file(&config)?;
    let cas = tree.build_cas(&BuildContext::root())?;

    // An action produced an output: upload it under its digest.
    let output = Bytes::from_static(b"int main() { return 0; }\n");
    let digest = Digest::of(&output);
    cas.put(&digest, util::once(output.clone())).await?;

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
