//! object_store's errors as this project's: a status code a client acts on,
//! and a message naming the node and the key.

use blob_access::{Code, Error};

pub(crate) fn from_store(e: &object_store::Error, node: &str) -> Error {
    use object_store::Error as E;
    let code = match (e, http_status(e)) {
        (E::NotFound { .. }, _) | (_, Some(404)) => Code::NotFound,
        (E::PermissionDenied { .. }, _) | (_, Some(403)) => Code::PermissionDenied,
        (E::Unauthenticated { .. }, _) | (_, Some(401)) => Code::Unauthenticated,
        (E::Precondition { .. }, _) => Code::FailedPrecondition,
        (E::InvalidPath { .. } | E::NotSupported { .. } | E::NotImplemented { .. }, _) => {
            Code::InvalidArgument
        }
        _ if request_timeout(e) => Code::Unavailable,
        (_, Some(s)) if (400..500).contains(&s) && !matches!(s, 408 | 429) => Code::InvalidArgument,
        // Connections refused or reset, 5xx, throttling (503 SlowDown, 429).
        _ => Code::Unavailable,
    };
    Error::new(code, format!("object store: {e}")).with_backend(node)
}

/// Whether a failed request may succeed when repeated: no answer, a 5xx
/// (503 SlowDown included), 408 or 429.
pub(crate) fn transient(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    matches!(e, E::Generic { .. } | E::JoinError { .. })
        && (http_status(e).is_none_or(|s| s >= 500 || s == 408 || s == 429) || request_timeout(e))
}

/// S3's 400 RequestTimeout: a body sent too slowly, worth sending again.
fn request_timeout(e: &object_store::Error) -> bool {
    e.to_string().contains("<Code>RequestTimeout</Code>")
}

/// The HTTP status of a failed request. object_store keeps it in an error
/// type it does not export, so it is read from the message it prints.
pub(crate) fn http_status(e: &object_store::Error) -> Option<u16> {
    let text = e.to_string();
    let at = text.find("status code: ")? + "status code: ".len();
    text.get(at..at + 3)?.parse().ok()
}
