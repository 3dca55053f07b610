//! A second real proxy: HAProxy 2.6 (master-worker) in front of `blob-access
//! serve`, reloaded about every 400 ms (scripts/haproxy.sh). Each reload sends
//! GOAWAY; 300 ms later (`hard-stop-after`) the old worker ends the streams
//! still open with an empty DATA frame with END_STREAM, without trailers or
//! RST_STREAM, and closes. To HTTP/2 a cut read looks finished: only the
//! missing grpc-status and bytes tell. A plain read dies; `resumable_grpc`
//! finishes with verified bytes.

mod support;

use std::time::{Duration, Instant};
use support::*;

const SIZE: u64 = 600 << 20;

#[test]
fn reloading_haproxy_cuts_plain_reads_and_resumable_reads_survive() {
    if !real_haproxy() {
        return;
    }
    let upstream = Serve::start(None);
    let haproxy = HaProxy::start(upstream.port);
    let dir = tempfile::tempdir().unwrap();
    let file = random_file(dir.path(), SIZE);
    let direct = grpc_config(dir.path(), "direct.yaml", upstream.port);
    let digest = put_cli(&direct, &file);
    let digest = digest.as_str();

    let plain = grpc_config(dir.path(), "plain.yaml", haproxy.port);
    let err = plain_get_is_cut(&haproxy, &plain, digest, &dir.path().join("plain.out"));
    eprintln!("plain read: {err}");

    let resumable = resumable_config(dir.path(), "resumable.yaml", haproxy.port);
    let out = dir.path().join("resumable.out");
    resumable_get_survives(&haproxy, &resumable, digest, &file, &out);

    // The cuts were HAProxy's hard stops of reads in flight (termination
    // state KD: killed while sending data), not something else.
    let log = std::fs::read_to_string(haproxy.dir.path().join("haproxy.log")).unwrap();
    let killed = log
        .lines()
        .filter(|l| l.contains("ByteStream/Read") && l.contains(" KD"))
        .count();
    assert!(killed >= 2, "no reads killed by hard-stop-after:\n{log}");
}

#[test]
fn small_files_go_through_haproxy_while_it_reloads() {
    if !real_haproxy() {
        return;
    }
    let upstream = Serve::start(None);
    let haproxy = HaProxy::start(upstream.port);
    let dir = tempfile::tempdir().unwrap();
    let config = resumable_config(dir.path(), "resumable.yaml", haproxy.port);
    // Rounds of put, find-missing and fetch-tree of new files (uploads, not
    // only lookups) until a reload's GOAWAY made a command go on over a new
    // connection: HAProxy's log then names more client connections than
    // commands ran (one each otherwise). About one reload in ten lands
    // between two calls of a command, hence rounds for up to 45 s.
    let start = Instant::now();
    let (rounds, reloads) = haproxy.with_reloads(|| {
        let mut round = 0;
        loop {
            let dir = dir.path().join(format!("round{round}"));
            std::fs::create_dir(&dir).unwrap();
            let paths = small_files_and_listing(&dir, 300, &format!("round {round} "));
            put_and_fetch_tree(&config, &paths, &dir.join("out"));
            round += 1;
            let moved = connections(&haproxy) > 3 * round;
            let time = start.elapsed();
            if moved && time > Duration::from_secs(3) || time > Duration::from_secs(45) {
                return round;
            }
        }
    });
    let moved = connections(&haproxy).saturating_sub(3 * rounds);
    eprintln!("{rounds} rounds, {reloads} reloads, {moved} commands moved to a new connection");
    assert!(
        moved > 0,
        "no command went on past a GOAWAY in {rounds} rounds"
    );
    assert!(reloads >= 3, "{reloads} reloads");
}

/// Client connections that made requests through `haproxy`, from its log.
fn connections(haproxy: &Proxy) -> usize {
    let log = std::fs::read_to_string(haproxy.dir.path().join("haproxy.log")).unwrap();
    let clients: std::collections::HashSet<&str> = log
        .lines()
        .filter(|l| l.ends_with(" HTTP/2.0\""))
        .filter_map(|l| l.split(' ').next())
        .collect();
    clients.len()
}
