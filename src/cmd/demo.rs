//! `demo`: the project's main job in one command, on embedded defaults. An
//! in-memory CAS serves a generated blob through a proxy that cuts every
//! connection, as a reloading load balancer does; a plain read fails and a
//! `resumable_grpc` read (examples/demo.yaml) completes, verified.

use blob_access::memory::MemoryBlobAccess;
use blob_access::{BlobAccess, BuildContext, Digest, NodeMetrics, ReadRange};
use blob_access_chaos::{Faults, Kill, Proxy};
use blob_access_server::{self as server, ServerConfig};
use bytes::Bytes;
use futures::StreamExt;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

const DEMO_TREE: &str = include_str!("../../examples/demo.yaml");
const DEMO_ENDPOINT: &str = "grpc://127.0.0.1:8980";

/// How the proxy cuts connections: after `every` or `bytes`, whichever first.
pub struct DemoOptions {
    pub size_mib: u64,
    pub every: Duration,
    pub bytes_mib: u64,
}

pub async fn run(opts: DemoOptions) -> Result<ExitCode, String> {
    let size = opts.size_mib << 20;
    let (digest, blob) = tokio::task::spawn_blocking(move || generate(size))
        .await
        .map_err(|e| e.to_string())?;
    let memory = Arc::new(MemoryBlobAccess::new("demo memory", size + (1 << 20)));
    memory
        .put(&digest, blob_access::util::chunked(blob, 1 << 20))
        .await
        .map_err(|e| e.to_string())?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot listen on loopback: {e}"))?;
    let cas_addr = listener.local_addr().map_err(|e| e.to_string())?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::serve_tcp(
        memory,
        ServerConfig::default(),
        listener,
        async move {
            let _ = stopped.await;
        },
    ));
    let faults = Faults {
        kill: Kill::Rst,
        after_bytes: Some(opts.bytes_mib << 20),
        after_time: Some(opts.every),
        times: u64::MAX,
    };
    let proxy = Proxy::start(cas_addr, Some(faults))
        .await
        .map_err(|e| format!("cannot start the proxy: {e}"))?;
    let endpoint = proxy.endpoint();

    println!("blob-access demo: reading a large blob through a proxy that kills streams");
    println!(
        "  CAS    in-memory REAPI server on {cas_addr}, holding blob {digest} ({} MiB)",
        opts.size_mib
    );
    println!(
        "  proxy  {} resets every connection after {:?} or {} MiB, like a load balancer reloading",
        proxy.addr, opts.every, opts.bytes_mib
    );

    println!("\n1. plain `grpc` node through the proxy");
    let plain = tree(&format!("grpc: {{endpoint: \"{endpoint}\"}}"), "plain grpc")?;
    let plain_result = read(&*plain, &digest).await;
    match &plain_result {
        Ok(r) => println!("   completed ({} bytes): the proxy did not cut it", r.bytes),
        Err((bytes, e)) => println!(
            "   FAILED after {:.1} MiB: {e}",
            *bytes as f64 / (1 << 20) as f64
        ),
    }

    println!("\n2. `resumable_grpc` node (examples/demo.yaml) through the same proxy");
    let resumable = tree(
        &DEMO_TREE.replace(DEMO_ENDPOINT, &endpoint),
        "examples/demo.yaml",
    )?;
    let result = read(&*resumable, &digest).await;
    let mut metrics: Vec<NodeMetrics> = Vec::new();
    resumable.metrics(&mut metrics);
    let resumptions: u64 = metrics.iter().filter_map(|m| m.get("resumptions")).sum();
    let ok = match &result {
        Ok(r) => {
            let mib = r.bytes as f64 / (1 << 20) as f64;
            let secs = r.elapsed.as_secs_f64();
            println!(
                "   OK: {mib:.0} MiB in {secs:.2}s ({:.0} MiB/s), {resumptions} resumptions, \
                 SHA-256 digest verified",
                mib / secs.max(1e-9)
            );
            true
        }
        Err((bytes, e)) => {
            println!("   FAILED after {bytes} bytes and {resumptions} resumptions: {e}");
            false
        }
    };
    println!(
        "\n   connections killed by the proxy: {}",
        proxy.kills.load(std::sync::atomic::Ordering::Relaxed)
    );
    drop(proxy);
    let _ = stop.send(());
    let _ = server.await;
    Ok(if ok && plain_result.is_err() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A deterministic, incompressible blob and its digest.
fn generate(size: u64) -> (Digest, Bytes) {
    use rand::{RngCore, SeedableRng};
    let mut data = vec![0u8; size as usize];
    rand::rngs::StdRng::seed_from_u64(0x5eed).fill_bytes(&mut data);
    (Digest::of(&data), Bytes::from(data))
}

fn tree(yaml: &str, name: &str) -> Result<Arc<dyn BlobAccess>, String> {
    blob_access_config::load_str(yaml, blob_access_config::Format::Yaml, name)
        .map_err(|e| e.to_string())?
        .build_cas(&BuildContext::root())
        .map_err(|e| e.to_string())
}

struct Read {
    bytes: u64,
    elapsed: Duration,
}

/// Reads the whole blob into a sink; on failure, how many bytes came first.
async fn read(ba: &dyn BlobAccess, digest: &Digest) -> Result<Read, (u64, blob_access::Error)> {
    let started = Instant::now();
    let mut s = ba.get(digest, ReadRange::FULL);
    let mut bytes = 0u64;
    while let Some(chunk) = s.next().await {
        bytes += chunk.map_err(|e| (bytes, e))?.len() as u64;
    }
    Ok(Read {
        bytes,
        elapsed: started.elapsed(),
    })
}
