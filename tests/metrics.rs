//! `serve --metrics-listen`, scraped during a transfer: a plain client reads a
//! blob through `serve` whose tree is `resumable_grpc` behind a proxy that
//! kills connections every 64 MiB.

mod support;

use blob_access_chaos::{Faults, Kill, Proxy};
use std::process::Command;
use support::*;

const SIZE: u64 = 300 << 20;

/// The value of the sample whose line starts with `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[test]
fn metrics_are_scraped_during_a_resumed_transfer() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Serve::start(None);
    let file = random_file(dir.path(), SIZE);
    let to_origin = grpc_config(dir.path(), "origin.yaml", origin.port);
    let digest = put_cli(&to_origin, &file);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let upstream = format!("127.0.0.1:{}", origin.port).parse().unwrap();
    let proxy = rt
        .block_on(Proxy::start(
            upstream,
            Some(Faults::bytes(Kill::Rst, 64 << 20)),
        ))
        .unwrap();
    let tree = dir.path().join("tree.yaml");
    std::fs::write(
        &tree,
        format!(
            "resumable_grpc:\n  grpc: {{endpoint: \"{}\"}}\n",
            proxy.endpoint()
        ),
    )
    .unwrap();
    let serve = Serve::start_with(Some(&tree), &["--metrics-listen", "127.0.0.1:0"]);
    let (port, metrics_port) = (serve.port, serve.metrics_port.unwrap());
    wait_for_port(metrics_port);

    let to_serve = grpc_config(dir.path(), "serve.yaml", port);
    let out = dir.path().join("out");
    let mut client = Command::new(bin())
        .args([
            "get",
            "-q",
            "--config",
            to_serve.to_str().unwrap(),
            &digest,
            "-o",
        ])
        .arg(&out)
        .spawn()
        .unwrap();
    let read = "blob_access_bytes_total{node=\"resumable_grpc\",direction=\"read\"}";
    let mut during = Vec::new();
    while client.try_wait().unwrap().is_none() {
        during.push(sample(&scrape(metrics_port), read).unwrap_or(0.0));
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(client.wait().unwrap().success());
    assert!(files_equal(&file, &out));
    // At least one scrape caught the transfer half-way.
    assert!(
        during.iter().any(|b| *b > 0.0 && *b < SIZE as f64),
        "no mid-transfer scrape among {during:?}"
    );

    let text = scrape(metrics_port);
    drop(serve);
    let get = "{node=\"resumable_grpc\",op=\"get\"}";
    assert_eq!(sample(&text, read), Some(SIZE as f64), "{text}");
    assert_eq!(
        sample(&text, &format!("blob_access_calls_total{get}")),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            &format!("blob_access_call_duration_seconds_count{get}")
        ),
        Some(1.0)
    );
    let resumptions = sample(
        &text,
        "blob_access_resumable_grpc_resumptions_total{node=\"resumable_grpc\"}",
    )
    .unwrap();
    // 300 MiB through a proxy that kills each connection after 64 MiB.
    assert!(resumptions >= 4.0, "{resumptions} resumptions:\n{text}");
    assert_eq!(
        sample(
            &text,
            "blob_access_resumable_grpc_give_ups_total{node=\"resumable_grpc\"}"
        ),
        Some(0.0)
    );
    assert!(!text.contains("blob_access_errors_total{"), "{text}");
    eprintln!(
        "scrapes during the transfer: {}, resumptions: {resumptions}",
        during.len()
    );
}
