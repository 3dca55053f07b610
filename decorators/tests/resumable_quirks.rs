//! Issue 10, item 3: real servers' quirks with ranged reads, each a mode of
//! the fault server. One sends whole chunks past `read_limit` and then fails
//! with an error of its own; one refuses any non-zero `read_limit`
//! (UNIMPLEMENTED as bb-storage did, or INVALID_ARGUMENT). Both give the exact
//! range, and both are counted in the node's metrics.

mod faults;

use blob_access::{Code, Digest, ReadRange};
use blob_access_decorators::resumable_grpc::RetryPolicy;
use bytes::Bytes;
use faults::server::{Fault, FaultServer, Options};
use faults::{test_blob, Client};
use futures::StreamExt;
use std::time::Duration;

fn policy() -> RetryPolicy {
    RetryPolicy {
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(20),
        ..RetryPolicy::default()
    }
}

async fn read_range(client: &Client, d: &Digest, range: ReadRange) -> Result<Vec<u8>, String> {
    let mut s = client.get(d, range);
    let mut out = Vec::new();
    while let Some(item) = s.next().await {
        out.extend_from_slice(&item.map_err(|e| e.to_string())?);
    }
    Ok(out)
}

const SIZE: usize = 600_001;
const RANGES: [(u64, u64); 5] = [
    (0, 1),
    (10, 1000),
    (65_535, 65_537),
    (300_000, 250_000),
    (SIZE as u64 - 7, 7),
];

async fn setup(opts: Options) -> (FaultServer, Client, Digest, Bytes) {
    let zstd = opts.zstd;
    let server = FaultServer::start(opts).await;
    let data = test_blob(SIZE, 11);
    let d = server.insert(data.clone()).await;
    let client = Client::new(&server.endpoint(), zstd, policy());
    (server, client, d, data)
}

#[tokio::test]
async fn a_server_sending_past_read_limit_still_gives_the_exact_range() {
    for zstd in [false, true] {
        let opts = Options {
            zstd,
            overrun_read_limit: true,
            ..Options::default()
        };
        let (server, client, d, data) = setup(opts).await;
        for (offset, len) in RANGES {
            let before = server.requests().len();
            let got = read_range(&client, &d, ReadRange::new(offset, Some(len))).await;
            let want = &data[offset as usize..(offset + len) as usize];
            assert!(
                got.as_deref() == Ok(want),
                "zstd {zstd}, {offset}+{len}: {:?}",
                got.map(|g| g.len())
            );
            assert_eq!(server.requests().len(), before + 1, "{offset}+{len}");
        }
        // A cut on the way is resumed with the remaining limit, overrun again.
        server.plan([Some(Fault::Status {
            after: 1000,
            code: Code::Unavailable,
        })]);
        let got = read_range(&client, &d, ReadRange::new(5, Some(200_000))).await;
        assert!(got.as_deref() == Ok(&data[5..200_005]));
        assert!(client.counter("overruns_trimmed") >= RANGES.len() as u64 - 1);
        // A full read is not trimmed: the server is asked for no limit.
        client.read_all(&d, &data).await.unwrap();
    }
}

#[tokio::test]
async fn a_server_refusing_read_limit_gets_an_unlimited_read_stopped_at_the_range() {
    for code in [Code::Unimplemented, Code::InvalidArgument] {
        let opts = Options {
            refuse_read_limit: Some(code),
            ..Options::default()
        };
        let (server, client, d, data) = setup(opts).await;
        let got = read_range(&client, &d, ReadRange::new(1000, Some(5000))).await;
        assert!(got.as_deref() == Ok(&data[1000..6000]), "{code:?}");
        let r: Vec<_> = server.requests().iter().map(|r| (r.1, r.2)).collect();
        assert_eq!(r, vec![(1000, 5000), (1000, 0)], "{code:?}");
        assert_eq!(client.counter("read_limit_fallbacks"), 1);
        // The node remembers; a cut read resumes without a limit too.
        server.plan([Some(Fault::Status {
            after: 70_000,
            code: Code::Unavailable,
        })]);
        for (offset, len) in RANGES {
            let got = read_range(&client, &d, ReadRange::new(offset, Some(len))).await;
            let want = &data[offset as usize..(offset + len) as usize];
            assert!(got.as_deref() == Ok(want), "{code:?}, {offset}+{len}");
        }
        assert!(server.requests()[2..].iter().all(|r| r.2 == 0));
        assert_eq!(client.counter("read_limit_fallbacks"), 1);
        assert!(client.counter("overruns_trimmed") >= 1);
    }
}
