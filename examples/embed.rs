//! How a Rust build tool embeds blob-access: load a config, look an action up
//! in the action cache, upload its output and result, ask which inputs are
//! missing, fetch a blob with verification and, where the config names an
//! execution service, run an action remotely and follow it to its result.
//!
//! ```sh
//! cargo run --example embed                       # the in-memory example tree
//! cargo run --example embed -- examples/ci.yaml   # any config file
//! cargo run --example embed -- examples/remote-execution.yaml   # with a cluster
//! ```

use blob_access::action_cache::ActionResult;
use blob_access::execution::{execute_response, stage_of, ExecuteRequest, Execution};
use blob_access::proto::{Action, Command, Directory, FileNode, OutputFile};
use blob_access::{util, BlobAccess, BuildContext, Code, Digest, DigestFunction, ReadRange};
use bytes::Bytes;
use futures::StreamExt;
use prost::Message;
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

    match &storage.execution {
        Some(exec) => run_remotely(&*cas, &**exec).await?,
        None => println!(
            "no execution tree in {}: nothing run remotely",
            config.display()
        ),
    }
    Ok(())
}

/// Uploads an action (its Command and an input root of one file) and runs it on the
/// cluster, printing each update of its operation. With `resumable_grpc`,
/// the stream goes on through cuts: one stream, one name, to `done`.
async fn run_remotely(
    cas: &dyn BlobAccess,
    exec: &dyn Execution,
) -> Result<(), Box<dyn std::error::Error>> {
    let store = |message: Bytes| async move {
        let digest = Digest::of(&message);
        cas.put(&digest, util::once(message)).await.map(|()| digest)
    };
    // The action's input root: one file, which the command reads.
    let input = store(Bytes::from_static(b"hello from the cluster\n")).await?;
    let root = Directory {
        files: vec![FileNode {
            name: "greeting.txt".into(),
            digest: Some(input.to_proto()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let command = Command {
        arguments: vec!["/bin/sh".into(), "-c".into(), "cat greeting.txt".into()],
        ..Default::default()
    };
    let action = Action {
        command_digest: Some(store(command.encode_to_vec().into()).await?.to_proto()),
        input_root_digest: Some(store(root.encode_to_vec().into()).await?.to_proto()),
        ..Default::default()
    };
    let action_digest = store(action.encode_to_vec().into()).await?;
    let mut updates = exec.execute(ExecuteRequest {
        action_digest: Some(action_digest.to_proto()),
        ..Default::default()
    });
    while let Some(op) = updates.next().await {
        let op = op?;
        println!("operation {}: {}", op.name, stage_of(&op));
        if let Some(response) = execute_response(&op) {
            if let Some(status) = response.status.filter(|s| s.code != 0) {
                println!(
                    "the cluster did not run it: code {}: {}",
                    status.code, status.message
                );
            }
            let result = response.result.unwrap_or_default();
            // Small outputs may come inlined, others by digest, to fetch from the CAS.
            let stdout = match &result.stdout_digest {
                Some(d) => {
                    let d = Digest::from_proto(DigestFunction::Sha256, d)?;
                    util::read_to_bytes(cas, &d, ReadRange::FULL, 1 << 20).await?
                }
                None => Bytes::from(result.stdout_raw),
            };
            let stdout = String::from_utf8_lossy(&stdout);
            println!(
                "ran remotely: exit code {}, stdout {stdout:?}",
                result.exit_code
            );
        }
    }
    Ok(())
}
