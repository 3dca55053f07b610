//! Decorators: each wraps another `BlobAccess` and changes only the calls it is about.
