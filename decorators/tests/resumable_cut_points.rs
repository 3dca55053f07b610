//! Issue 10, item 2: cut points chosen by a property test over the whole byte
//! range of a read, identity and zstd: a TCP RST or FIN after any number of
//! bytes towards the client (HTTP/2 preface, headers, inside a frame, inside
//! a gRPC message, inside a zstd frame, after the last byte), and END_STREAM
//! at any payload byte, inside a prefix or a payload. Each read returns
//! verified bytes within a bounded number of attempts.

mod faults;

use blob_access_decorators::resumable_grpc::RetryPolicy;
use faults::h2_server::{H2Fault, H2Server, Within};
use faults::proxy::{Faults, Kill, Proxy};
use faults::server::{FaultServer, Options};
use faults::{test_blob, Client};
use proptest::prelude::*;
use std::time::Duration;

const SIZE: usize = 200_003;

fn policy() -> RetryPolicy {
    RetryPolicy {
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(20),
        ..RetryPolicy::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Bytes of the blob on the wire, as a server making a zstd frame of each
/// `piece` sends it, plus room for the HTTP/2 and gRPC framing.
fn wire_len(zstd: bool, piece: usize) -> u64 {
    let data = test_blob(SIZE, 1);
    let payload: usize = if zstd {
        data.chunks(piece)
            .map(|p| zstd::bulk::compress(p, 1).unwrap().len())
            .sum()
    } else {
        SIZE
    };
    payload as u64 + 1500
}

fn tcp_cut(zstd: bool, rst: bool, fraction: f64, times: u64) -> Result<(), TestCaseError> {
    runtime().block_on(async {
        let server = FaultServer::start(Options {
            zstd,
            ..Options::default()
        })
        .await;
        let data = test_blob(SIZE, 1);
        let d = server.insert(data.clone()).await;
        let kill = if rst { Kill::Rst } else { Kill::Fin };
        let cut = (wire_len(zstd, 16 * 1024) as f64 * fraction) as u64;
        let faults = Faults::bytes(kill, cut).times(times);
        let proxy = Proxy::start(server.addr, Some(faults)).await.unwrap();
        let client = Client::new(&proxy.endpoint(), zstd, policy());
        let res = client.read_all(&d, &data).await;
        prop_assert!(res.is_ok(), "cut at {cut}: {res:?}");
        let reads = server.requests().len() as u64;
        prop_assert!(reads <= times + 1, "cut at {cut}: {reads} reads");
        // Up to 90% of the estimate, the cut falls inside the stream.
        let kills = proxy.kills.load(std::sync::atomic::Ordering::Relaxed);
        prop_assert!(fraction > 0.9 || kills >= 1, "cut at {cut}: nothing cut");
        Ok(())
    })
}

fn h2_end(zstd: bool, within: Within, fraction: f64) -> Result<(), TestCaseError> {
    runtime().block_on(async {
        let server = H2Server::start(zstd).await;
        let data = test_blob(SIZE, 1);
        let d = server.insert(data.clone());
        let after = ((wire_len(zstd, 64 * 1024) - 1500) as f64 * fraction) as u64;
        let fault = H2Fault::EndStream { after, within };
        server.plan([Some(fault), Some(fault)]);
        let client = Client::new(&server.endpoint(), zstd, policy());
        let res = client.read_all(&d, &data).await;
        prop_assert!(res.is_ok(), "{fault:?}: {res:?}");
        prop_assert!(server.reads() <= 3, "{fault:?}: {} reads", server.reads());
        prop_assert!(server.reads() >= 2, "{fault:?}: not cut");
        Ok(())
    })
}

fn within() -> impl Strategy<Value = Within> {
    prop_oneof![
        Just(Within::Boundary),
        Just(Within::Payload),
        (1usize..=4).prop_map(Within::Prefix),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn tcp_rst_or_fin_anywhere_is_resumed(
        zstd in any::<bool>(),
        rst in any::<bool>(),
        fraction in 0.0..1.0f64,
        times in 1u64..=2,
    ) {
        tcp_cut(zstd, rst, fraction, times)?;
    }

    #[test]
    fn end_stream_anywhere_is_resumed(
        zstd in any::<bool>(),
        within in within(),
        fraction in 0.0..1.0f64,
    ) {
        h2_end(zstd, within, fraction)?;
    }
}
