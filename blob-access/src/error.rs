//! One error type for every backend and decorator: a gRPC status code (so it
//! crosses `serve` and `grpc` unchanged), a message, and which backend and blob
//! it concerns, so a failure deep in a tree still says where it happened.

use crate::digest::Digest;
use std::fmt;
pub use tonic::Code;

/// The error of every `BlobAccess` call.
#[derive(Clone, Debug)]
pub struct Error {
    code: Code,
    message: String,
    backend: Option<String>,
    /// Boxed: errors travel in `Result`s everywhere, and most name no blob.
    digest: Option<Box<Digest>>,
    /// Retry delay suggested by the server (`google.rpc.RetryInfo`), if any.
    retry_delay: Option<std::time::Duration>,
    /// The server's `grpc-status-details-bin` (a `google.rpc.Status`), kept
    /// so that a proxy passes on what clients act on, e.g. the missing blobs
    /// of an Execute's FAILED_PRECONDITION.
    details: Option<bytes::Bytes>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
            backend: None,
            digest: None,
            retry_delay: None,
            details: None,
        }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, message)
    }
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }
    pub fn data_loss(message: impl Into<String>) -> Self {
        Self::new(Code::DataLoss, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(Code::Unavailable, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, message)
    }
    pub fn resource_exhausted(message: impl Into<String>) -> Self {
        Self::new(Code::ResourceExhausted, message)
    }

    /// Names the backend, unless a deeper one already did.
    pub fn with_backend(mut self, backend: impl Into<String>) -> Self {
        self.backend.get_or_insert_with(|| backend.into());
        self
    }
    /// Names the blob, unless already named.
    pub fn with_digest(mut self, digest: &Digest) -> Self {
        self.digest.get_or_insert_with(|| Box::new(digest.clone()));
        self
    }
    /// Says what was being done: `"FindMissingBlobs"` makes the message
    /// `FindMissingBlobs: <message>`.
    pub fn in_call(mut self, what: &str) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
    pub fn with_retry_delay(mut self, delay: Option<std::time::Duration>) -> Self {
        self.retry_delay = delay;
        self
    }

    pub fn code(&self) -> Code {
        self.code
    }
    pub fn message(&self) -> &str {
        &self.message
    }
    pub fn backend(&self) -> Option<&str> {
        self.backend.as_deref()
    }
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_deref()
    }
    pub fn retry_delay(&self) -> Option<std::time::Duration> {
        self.retry_delay
    }
    pub fn is_not_found(&self) -> bool {
        self.code == Code::NotFound
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.code)?;
        if let Some(b) = &self.backend {
            write!(f, ": backend {b:?}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, ": blob {d}")?;
            if !d.instance_name().is_empty() {
                write!(f, " (instance {:?})", d.instance_name())?;
            }
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for Error {}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        use tonic_types::StatusExt;
        let retry_delay = s.get_details_retry_info().and_then(|r| r.retry_delay);
        let mut message = s.message().to_string();
        if message.is_empty() {
            message = "(no message from server)".into();
        }
        // A status synthesised from a transport failure keeps its cause in source().
        if let Some(src) = std::error::Error::source(&s) {
            message = format!("{message}: {}", error_chain(src));
        }
        let mut e = Error::new(s.code(), message).with_retry_delay(retry_delay);
        if !s.details().is_empty() {
            e.details = Some(bytes::Bytes::copy_from_slice(s.details()));
        }
        e
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        match &e.details {
            Some(details) => tonic::Status::with_details(e.code, e.to_string(), details.clone()),
            None => tonic::Status::new(e.code, e.to_string()),
        }
    }
}

impl Error {
    /// An I/O error with what was being done and where, keeping the code its
    /// kind maps to (e.g. `writing /x/y: No space left on device`).
    pub fn io(context: impl std::fmt::Display, e: std::io::Error) -> Error {
        let code = Error::from(std::io::Error::new(e.kind(), "")).code();
        Error::new(code, format!("{context}: {e}"))
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        let code = match e.kind() {
            K::NotFound => Code::NotFound,
            K::PermissionDenied => Code::PermissionDenied,
            K::InvalidInput | K::InvalidData => Code::InvalidArgument,
            K::StorageFull | K::OutOfMemory => Code::ResourceExhausted,
            K::TimedOut => Code::DeadlineExceeded,
            K::ConnectionRefused | K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => {
                Code::Unavailable
            }
            _ => Code::Internal,
        };
        Error::new(code, e.to_string())
    }
}

/// `a: b: c` for an error and its sources.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trip_keeps_code_and_context() {
        let d = Digest::of(b"x");
        let e = Error::not_found("gone")
            .with_backend("memory")
            .with_digest(&d);
        let s: tonic::Status = e.clone().into();
        assert_eq!(s.code(), Code::NotFound);
        assert!(s.message().contains("memory") && s.message().contains(d.hash()));
        let back: Error = s.into();
        assert_eq!(back.code(), Code::NotFound);
        assert!(back.to_string().contains("gone"));
    }

    #[test]
    fn innermost_backend_wins() {
        let e = Error::unavailable("x")
            .with_backend("inner")
            .with_backend("outer");
        assert_eq!(e.backend(), Some("inner"));
    }
}
