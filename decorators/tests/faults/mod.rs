//! Fault injection for the tests of `resumable_grpc`: a scripted in-memory
//! server for the reader's logic, and real TCP/HTTP/2 servers and proxies
//! that break streams the ways middleware does.
#![allow(dead_code)]

pub mod frame_proxy;
pub mod h2_server;
#[allow(unused_imports)]
pub use blob_access_chaos as proxy;
pub mod scripted;
pub mod server;

use blob_access::resource::Compressor;
use blob_access::{BlobStream, Digest, Error, ReadRange};
use blob_access_decorators::resumable_grpc::{
    ByteStreamOpener, Channels, ResumableReads, RetryPolicy,
};
use futures::StreamExt;
use std::sync::Arc;

/// The client under test: resuming reads over one tonic channel to `endpoint`.
pub struct Client {
    pub reads: ResumableReads,
    channels: Arc<Channels>,
    compressor: Compressor,
}

impl Client {
    pub fn new(endpoint: &str, zstd: bool, policy: RetryPolicy) -> Self {
        let uri = endpoint.replace("grpc://", "http://");
        let connect = move || {
            blob_access::grpc::http_status::HttpStatusChannel::new(
                tonic::transport::Channel::from_shared(uri.clone())
                    .unwrap()
                    .connect_lazy(),
            )
        };
        let channels = Arc::new(Channels::new(connect(), connect));
        let compressor = if zstd {
            Compressor::Zstd
        } else {
            Compressor::Identity
        };
        Client {
            reads: ResumableReads::new("resumable", policy),
            channels,
            compressor,
        }
    }

    pub fn get(&self, digest: &Digest, range: ReadRange) -> BlobStream {
        let opener = ByteStreamOpener::new(self.channels.clone(), "", digest);
        self.reads
            .get(Arc::new(opener), digest, range, self.compressor)
    }

    /// Reads a whole blob. Bytes before a final error may be wrong (the error
    /// says to discard them); a success must be exactly `expected`.
    pub async fn read_all(&self, digest: &Digest, expected: &[u8]) -> Result<(), Error> {
        let mut s = self.get(digest, ReadRange::FULL);
        let (mut at, mut wrong_at) = (0usize, None);
        while let Some(chunk) = s.next().await {
            let chunk = chunk?;
            if wrong_at.is_none() && !expected[at.min(expected.len())..].starts_with(&chunk) {
                wrong_at = Some(at);
            }
            at += chunk.len();
        }
        assert_eq!(
            wrong_at, None,
            "a successful read of {digest} returned wrong bytes"
        );
        assert_eq!(at, expected.len(), "short success for {digest}");
        Ok(())
    }

    pub fn counter(&self, name: &str) -> u64 {
        let mut m = Vec::new();
        self.reads.metrics(&mut m);
        m[0].get(name).unwrap()
    }
}

/// Test data, half incompressible, half repetitive, so zstd frames hold real
/// compressed blocks and cuts fall inside them.
pub fn test_blob(len: usize, seed: u64) -> bytes::Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let block = (out.len() / 4096) % 2 == 0;
        let n = (len - out.len()).min(4096);
        for i in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.push(if block {
                x as u8
            } else {
                b"resumable "[i % 10]
            });
        }
    }
    out.into()
}
