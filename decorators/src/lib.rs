//! Decorators and terminals built on the `blob-access` core: each wraps
//! another `BlobAccess` (or a remote) and changes only the calls it is about.
//!
//! A decorator's config is generic over the node type of its children
//! (`ExistenceCachingConfig<N>` with `backend: Box<N>`), so that this crate
//! does not depend on the crate that lists every node kind.

pub mod completeness_checking;
pub mod demultiplexing;
pub mod error_logging;
pub mod existence_caching;
pub mod mirrored;
pub mod read_caching;
pub mod resumable_grpc;
pub mod sharding;
