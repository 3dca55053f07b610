//! Config trees.
