//! object_store's errors as this project's: a status code a client acts on,
//! and a message naming the node and the key.

use blob_access::{Code, Error};

pub(crate) fn from_store(e: &object_store::Error, node: &str) -> Error {
    use object_store::Error as E;
    let code = match e {
        E::NotFound { .. } => Code::NotFound,
        E::PermissionDenied { .. } => Code::PermissionDenied,
        E::Unauthenticated { .. } => Code::Unauthenticated,
        E::Precondition { .. } => Code::FailedPrecondition,
        E::InvalidPath { .. } | E::NotSupported { .. } | E::NotImplemented { .. } => {
            Code::InvalidArgument
        }
        // Connections refused or reset, 5xx, throttling (503 SlowDown).
        _ => Code::Unavailable,
    };
    Error::new(code, format!("object store: {e}")).with_backend(node)
}

/// Whether a failed request may succeed when repeated.
pub(crate) fn transient(e: &object_store::Error) -> bool {
    matches!(
        e,
        object_store::Error::Generic { .. } | object_store::Error::JoinError { .. }
    )
}
