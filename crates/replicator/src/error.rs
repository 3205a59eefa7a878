//! The one error type of this crate.

use rewind_store::StoreError;

/// Everything replication and the simulated phone can fail with.
///
/// Every message names the databases involved; they are rendered through
/// [`rewind_store::redact_url`], so no password ever appears in one.
#[derive(Debug, thiserror::Error)]
pub enum ReplicateError {
    /// A store operation failed during a replication.
    #[error("replication {replication}: {step}: {error}")]
    Store {
        /// `source -> target`, credentials removed.
        replication: String,
        /// What the replicator was doing, e.g. "reading the source's changes".
        step: String,
        /// The store's error.
        #[source]
        error: Box<StoreError>,
    },
    /// The source listed a revision in its changes feed but could not give it.
    #[error(
        "replication {replication}: the source could not give document {id} revision {rev}: \
         {error}: {reason}"
    )]
    Fetch {
        /// `source -> target`, credentials removed.
        replication: String,
        /// The document's `_id`.
        id: String,
        /// The revision asked for.
        rev: String,
        /// The source's error name (`not_found`, or `attachment_stub` when it
        /// sent a stub instead of attachment data).
        error: String,
        /// The source's reason.
        reason: String,
    },
    /// The target refused a replicated revision for a reason other than
    /// access control (`forbidden`/`unauthorized` refusals are counted in the
    /// report instead, as PouchDB does).
    #[error("replication {replication}: the target refused document {id}: {error}: {reason}")]
    Refused {
        /// `source -> target`, credentials removed.
        replication: String,
        /// The refused document's `_id`.
        id: String,
        /// The target's error name from `_bulk_docs`.
        error: String,
        /// The target's reason.
        reason: String,
    },
    /// `GET /` on a server did not give an answer we can use.
    #[error("{url}: cannot read the server's uuid: {reason}")]
    Uuid {
        /// The URL asked, credentials removed.
        url: String,
        /// What went wrong: not a URL, no database in it, an HTTP failure or
        /// an answer that is not JSON.
        reason: String,
    },
    /// A phone's own operation failed (opening its stores, reading or writing
    /// its local database).
    #[error("phone {phone}: {step}: {error}")]
    Phone {
        /// The phone's name.
        phone: String,
        /// What the phone was doing, e.g. "opening the local store <path>".
        step: String,
        /// The store's error.
        #[source]
        error: Box<StoreError>,
    },
    /// A phone could not create its temporary directory.
    #[error("phone {phone}: cannot create {path}: {error}")]
    TempDir {
        /// The phone's name.
        phone: String,
        /// The directory that could not be created.
        path: String,
        /// The I/O error.
        #[source]
        error: std::io::Error,
    },
}

/// Shorthand used across the crate.
pub type Result<T, E = ReplicateError> = std::result::Result<T, E>;
