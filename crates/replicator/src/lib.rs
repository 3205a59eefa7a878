//! CouchDB replication between any two rewind stores, the way PouchDB 9 does
//! it, and a simulated phone built on it (the client of `rewind drill`).
//!
//! Invariant: what the replicator asks of a store is what PouchDB asks of a
//! CouchDB server (shared/baseline/TRACE.md): `_changes?style=all_docs`,
//! `_revs_diff`, `_bulk_get?revs=true&latest=true`, `_bulk_docs` with
//! `new_edits=false`, and `_local/{replication id}` checkpoints in PouchDB's
//! shape on both sides. So a phone simulated here exercises the same server
//! paths (gateway included) as a real PouchDB phone, every revision tree
//! travels whole (conflicts, tombstones, attachments), and a checkpoint is
//! written only after the batch it covers is on the target.
//!
//! Map: [`replicate()`] and [`sync()`] in `replicate`, [`Phone`],
//! [`remote_uuid`] and [`leaves`] in `phone`, [`ReplicateError`] in `error`.

#![warn(missing_docs)]

mod error;
mod phone;
mod replicate;

pub use error::{ReplicateError, Result};
pub use phone::{leaves, remote_uuid, server_root, DocLeaves, Phone};
pub use replicate::{
    replicate, replication_id, sync, ReplicateOptions, ReplicationReport, SyncReport, WriteFailure,
    DEFAULT_BATCH_SIZE,
};
