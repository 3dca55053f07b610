//! `put`, `get` and `find-missing`: one-shot transfers through a config tree.

use crate::progress::Ui;
use blob_access::{util, BlobAccess, Digest, NodeMetrics, ReadRange};
use futures::StreamExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tokio::io::AsyncWriteExt;

pub(crate) fn parse_digest(text: &str) -> Result<Digest, String> {
    text.parse()
        .map_err(|e| format!("invalid digest {text:?}: {e}"))
}

pub async fn put(config: &Path, files: &[PathBuf], ui: &Ui) -> Result<ExitCode, String> {
    let ba = super::open(config)?;
    for f in files {
        let digest = util::digest_file(f).await.map_err(|e| e.to_string())?;
        let bar = ui.bar(digest.size_bytes(), &f.display().to_string());
        let started = std::time::Instant::now();
        // Reopenable: a node that retries uploads may read the file again.
        let source = util::reopenable_file(f);
        let counted: blob_access::Reopen = std::sync::Arc::new(move || {
            let bar = bar.clone();
            bar.set_position(0);
            source()
                .inspect(move |c| {
                    if let Ok(c) = c {
                        bar.inc(c.len() as u64)
                    }
                })
                .boxed()
        });
        ba.put_reopenable(&digest, counted)
            .await
            .map_err(|e| e.to_string())?;
        put_report(&*ba, &digest, started.elapsed());
        println!("{digest}");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn get(
    config: &Path,
    digest: &str,
    output: Option<&Path>,
    ui: &Ui,
) -> Result<ExitCode, String> {
    let digest = parse_digest(digest)?;
    let ba = super::open(config)?;
    let bar = ui.bar(digest.size_bytes(), &digest.hash()[..12]);
    let started = std::time::Instant::now();
    match output {
        Some(path) if path != Path::new("-") => {
            util::write_to_file(&*ba, &digest, path, |n| bar.inc(n))
                .await
                .map_err(|e| e.to_string())?;
        }
        _ => {
            let mut out = tokio::io::stdout();
            let mut s = ba.get(&digest, ReadRange::FULL);
            while let Some(chunk) = s.next().await {
                let chunk = chunk.map_err(|e| e.to_string())?;
                out.write_all(&chunk)
                    .await
                    .map_err(|e| format!("writing to stdout: {e}"))?;
                bar.inc(chunk.len() as u64);
            }
            out.flush()
                .await
                .map_err(|e| format!("writing to stdout: {e}"))?;
        }
    }
    bar.finish_and_clear();
    report(&*ba, &digest, started.elapsed());
    Ok(ExitCode::SUCCESS)
}

/// With `-v`: what the transfer took, including resumptions of resuming nodes.
fn report(ba: &dyn BlobAccess, digest: &Digest, elapsed: std::time::Duration) {
    let mut metrics: Vec<NodeMetrics> = Vec::new();
    ba.metrics(&mut metrics);
    let resumptions: u64 = metrics.iter().filter_map(|m| m.get("resumptions")).sum();
    let mib = digest.size_bytes() as f64 / (1 << 20) as f64;
    tracing::info!(
        digest = %digest,
        resumptions,
        "got {mib:.1} MiB in {:.2}s ({:.1} MiB/s), digest verified, {resumptions} resumptions",
        elapsed.as_secs_f64(),
        mib / elapsed.as_secs_f64().max(1e-9),
    );
}

/// With `-v`: what an upload took, including retries of resuming nodes.
fn put_report(ba: &dyn BlobAccess, digest: &Digest, elapsed: std::time::Duration) {
    let mut metrics: Vec<NodeMetrics> = Vec::new();
    ba.metrics(&mut metrics);
    let sum = |name: &str| -> u64 { metrics.iter().filter_map(|m| m.get(name)).sum() };
    let (retries, restarts) = (sum("write_retries"), sum("write_restarts"));
    let mib = digest.size_bytes() as f64 / (1 << 20) as f64;
    tracing::info!(
        digest = %digest,
        "put {mib:.1} MiB in {:.2}s ({:.1} MiB/s), {retries} write_retries, {restarts} write_restarts",
        elapsed.as_secs_f64(),
        mib / elapsed.as_secs_f64().max(1e-9),
    );
}

pub async fn find_missing(config: &Path, digests: &[String]) -> Result<ExitCode, String> {
    let digests = digests
        .iter()
        .map(|d| parse_digest(d))
        .collect::<Result<Vec<_>, _>>()?;
    let ba = super::open(config)?;
    for d in ba.find_missing(&digests).await.map_err(|e| e.to_string())? {
        println!("{d}");
    }
    Ok(ExitCode::SUCCESS)
}
