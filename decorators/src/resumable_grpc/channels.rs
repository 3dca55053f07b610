//! The connection attempts go over, and a new one when it is no longer
//! trusted.
//!
//! A tonic channel reconnects by itself only once its connection is closed.
//! A draining proxy may keep the old connection open and reset every new
//! stream on it, and a black-holed path keeps it open and silent; attempts
//! on it are doomed. The reader then asks for a fresh connection
//! ([`super::AttemptRequest::fresh_connection`]) and gets a new channel, with
//! the same settings, shared by the node's later attempts.

use blob_access::grpc::GrpcChannel;
use std::sync::Mutex;

type Connect = Box<dyn Fn() -> GrpcChannel + Send + Sync>;

/// The node's current channel, numbered, and how to make another.
pub struct Channels {
    connect: Connect,
    current: Mutex<(u64, GrpcChannel)>,
}

impl Channels {
    /// Starts with `first`; `connect` makes a new lazily connected channel
    /// (a new connection) each time one is replaced.
    pub fn new(
        first: GrpcChannel,
        connect: impl Fn() -> GrpcChannel + Send + Sync + 'static,
    ) -> Self {
        Channels {
            connect: Box::new(connect),
            current: Mutex::new((0, first)),
        }
    }

    /// Always the same channel: asking for a fresh one changes nothing.
    pub fn fixed(channel: GrpcChannel) -> Self {
        Channels::new(channel.clone(), move || channel.clone())
    }

    /// The current channel and its number.
    pub fn current(&self) -> (u64, GrpcChannel) {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces channel number `distrusted` by a new one, unless another read
    /// already did (many reads cut together replace it once), and returns the
    /// current channel.
    pub fn replace(&self, distrusted: u64) -> (u64, GrpcChannel) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.0 == distrusted {
            *current = (distrusted + 1, (self.connect)());
        }
        current.clone()
    }
}
