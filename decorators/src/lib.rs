//! Decorators and terminals built on the `blob-access` core: each wraps
//! another `BlobAccess` (or a remote) and changes only the calls it is about.

pub mod resumable_grpc;
