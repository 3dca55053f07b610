//! `put`, `get` and `find-missing`: one-shot transfers through a config tree.

use crate::progress::Ui;
use blob_access::{upload, util, BlobAccess, Digest, DigestFunction, NodeMetrics, ReadRange};
use futures::StreamExt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::AsyncWriteExt;

pub(crate) fn parse_digest(text: &str, function: DigestFunction) -> Result<Digest, String> {
    Digest::parse_with(function, text).map_err(|e| format!("invalid digest {text:?}: {e}"))
}

/// Hashes all files in parallel, asks the CAS once which blobs it lacks, and
/// sends only those, `jobs` at a time; prints each file's digest in order.
pub async fn put(
    config: &Path,
    files: &[PathBuf],
    jobs: usize,
    function: DigestFunction,
    ui: &Ui,
) -> Result<ExitCode, String> {
    let ba = super::open(config)?;
    let started = std::time::Instant::now();
    let total: u64 = files.len() as u64;
    let bar = ui.bar(0, "put");
    let hashed = AtomicU64::new(0);
    let sent = AtomicU64::new(0);
    let progress = |p: upload::Progress| match p {
        upload::Progress::Hashed(bytes) => {
            let n = hashed.fetch_add(1, Ordering::Relaxed) + 1;
            bar.inc_length(bytes);
            bar.inc(bytes);
            bar.set_message(format!("hashed {n}/{total} files"));
        }
        upload::Progress::Missing { files, bytes } => {
            bar.set_position(0);
            bar.set_length(bytes);
            bar.set_message(format!("sending 0/{files} missing files"));
        }
        upload::Progress::Sent(bytes) => {
            let n = sent.fetch_add(1, Ordering::Relaxed) + 1;
            bar.inc(bytes);
            bar.set_message(format!("sent {n} missing files"));
        }
    };
    let report = upload::put_files(&*ba, files, function, jobs, &progress)
        .await
        .map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for d in &report.digests {
        writeln!(out, "{d}").map_err(|e| format!("writing to stdout: {e}"))?;
    }
    out.flush().map_err(|e| format!("writing to stdout: {e}"))?;
    if !ui.quiet() {
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        let bytes: u64 = report.digests.iter().map(|d| d.size_bytes()).sum();
        eprintln!(
            "put {total} files ({bytes} bytes) in {secs:.2}s ({:.0} files/s, {:.1} MiB/s): \
             {} blobs ({} bytes) sent, the rest already stored",
            total as f64 / secs,
            bytes as f64 / (1 << 20) as f64 / secs,
            report.sent_blobs,
            report.sent_bytes,
        );
    }
    put_report(&*ba, report.sent_bytes, started.elapsed());
    Ok(ExitCode::SUCCESS)
}

pub async fn get(
    config: &Path,
    digest: &str,
    function: DigestFunction,
    output: Option<&Path>,
    ui: &Ui,
) -> Result<ExitCode, String> {
    let digest = parse_digest(digest, function)?;
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

/// With `-v`: what the uploads took, including retries of resuming nodes.
fn put_report(ba: &dyn BlobAccess, sent_bytes: u64, elapsed: std::time::Duration) {
    let mut metrics: Vec<NodeMetrics> = Vec::new();
    ba.metrics(&mut metrics);
    let sum = |name: &str| -> u64 { metrics.iter().filter_map(|m| m.get(name)).sum() };
    let (retries, restarts) = (sum("write_retries"), sum("write_restarts"));
    let mib = sent_bytes as f64 / (1 << 20) as f64;
    tracing::info!(
        "put: sent {mib:.1} MiB in {:.2}s ({:.1} MiB/s), {retries} write_retries, {restarts} write_restarts",
        elapsed.as_secs_f64(),
        mib / elapsed.as_secs_f64().max(1e-9),
    );
}

pub async fn find_missing(
    config: &Path,
    digests: &[String],
    function: DigestFunction,
) -> Result<ExitCode, String> {
    let from_stdin;
    let digests = if digests.is_empty() || digests == ["-"] {
        // More digests than a command line holds (100,000 are 7 MB).
        from_stdin = std::io::read_to_string(std::io::stdin())
            .map_err(|e| format!("reading digests from stdin: {e}"))?;
        from_stdin
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|d| parse_digest(d, function))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        digests
            .iter()
            .map(|d| parse_digest(d, function))
            .collect::<Result<Vec<_>, _>>()?
    };
    let ba = super::open(config)?;
    let missing = ba.find_missing(&digests).await.map_err(|e| e.to_string())?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for d in missing {
        writeln!(out, "{d}").map_err(|e| format!("writing to stdout: {e}"))?;
    }
    out.flush().map_err(|e| format!("writing to stdout: {e}"))?;
    Ok(ExitCode::SUCCESS)
}
