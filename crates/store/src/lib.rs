//! One [`Store`] trait over two backends: CouchDB 3.x over HTTP ([`CouchStore`])
//! and the embedded single-file default ([`SqliteStore`]).
//!
//! Invariant: both backends give the same answers for the same operations
//! (tests/conformance.rs runs one suite against both): the same winning
//! revision, conflicts, tombstones, `revs_diff` answers and changes, with
//! CouchDB's rules. Only what CouchDB itself leaves open differs: sequence
//! values ([`Seq`]), the hash part of revisions made with `new_edits=true`,
//! and number/key-order fidelity of a JavaScript server (NOTES.md).
//!
//! The embedded store keeps every body byte for byte as written (key order,
//! arbitrary-precision numbers) and loses no acknowledged write on a crash.
//!
//! Map: [`rev`] holds revision ids and trees (pure), [`sqlite`] and [`couch`]
//! the backends, [`copy()`] copies a database between any two stores,
//! replication-style and resumable.

#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use serde_json::Value;

pub mod copy;
pub mod couch;
mod doc;
pub mod error;
pub mod rev;
pub mod sqlite;
pub mod types;

pub use copy::{copy, copy_in_batches, CopyProgress, CopyReport, DEFAULT_COPY_BATCH};
pub use couch::{CouchAuth, CouchOptions, CouchStore};
pub use doc::{check_writable, digest as attachment_digest, json_len};
pub use error::{redact_url, Result, StoreError};
pub use rev::{Rev, DEFAULT_REVS_LIMIT};
pub use sqlite::{SqliteStore, TextDoc};
pub use types::*;

/// `s` with its `%XX` escapes decoded (a URL's path segment, user name or
/// password); a `%` not followed by two hex digits stays as it is, and
/// bytes that are not UTF-8 become U+FFFD. Never panics, whatever `s` holds.
pub fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// What the engine and the gateway need of a database.
///
/// Documents are `serde_json::Value`s with CouchDB's special members (`_id`,
/// `_rev`, `_deleted`, `_revisions: {start, ids}`, `_conflicts`,
/// `_attachments`). Ids starting with `_local/` name local documents: no
/// history, not in the changes feed, not replicated by `copy` from CouchDB.
pub trait Store: Send + Sync {
    /// Document counts and the latest sequence (`GET /{db}`).
    fn info(&self) -> impl Future<Output = Result<DbInfo>> + Send;

    /// One document (its winner, or `opts.rev`), or with `opts.open_revs`
    /// several revisions. A missing document is `NotFound` with reason
    /// `missing`; one whose winner is deleted, reason `deleted` (unless a
    /// revision is asked for). With `open_revs: List`, unknown revisions come
    /// back as [`OpenRev::Missing`] rather than as an error.
    fn get(&self, id: &str, opts: &GetOptions) -> impl Future<Output = Result<GetResult>> + Send;

    /// Writes documents (`POST /{db}/_bulk_docs`).
    ///
    /// `new_edits=true`: each document is an edit of its `_rev`, which must be
    /// a leaf (no `_rev`: a new document, or a re-creation over a deleted
    /// one); otherwise that document fails with `conflict` and the others are
    /// still written. One result per document, in order.
    ///
    /// `new_edits=false` (replication): each `_rev` with its `_revisions`
    /// history is merged into the revision tree as is; known revisions are
    /// no-ops. Only failures are listed (as CouchDB does).
    ///
    /// A malformed document (not an object, bad id, revision not `N-hex`,
    /// unknown `_` member, bad base64) fails the whole request with
    /// `BadRequest` before anything is written.
    fn bulk_docs(
        &self,
        docs: Vec<Value>,
        new_edits: bool,
    ) -> impl Future<Output = Result<Vec<BulkResult>>> + Send;

    /// Several documents or revisions at once (`POST /{db}/_bulk_get`), one
    /// result per request in order.
    fn bulk_get(
        &self,
        reqs: Vec<BulkGetRequest>,
        opts: BulkGetOptions,
    ) -> impl Future<Output = Result<Vec<BulkGetResult>>> + Send;

    /// For each id, the revisions this database lacks (`POST /{db}/_revs_diff`).
    /// Ids with nothing missing are left out.
    fn revs_diff(
        &self,
        revs: BTreeMap<String, Vec<String>>,
    ) -> impl Future<Output = Result<BTreeMap<String, RevsDiffEntry>>> + Send;

    /// Documents by id (`_all_docs`). Without `keys`, deleted documents are left out.
    fn all_docs(&self, opts: &AllDocsOptions) -> impl Future<Output = Result<AllDocs>> + Send;

    /// A normal changes feed: each document once, at its latest change, in sequence order.
    fn changes(&self, opts: &ChangesOptions) -> impl Future<Output = Result<Changes>> + Send;

    /// Waits until something changes after `since`, at most `timeout`.
    /// Returns true if there is a change (for longpoll and continuous feeds).
    fn wait_for_change(
        &self,
        since: &Seq,
        timeout: Duration,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// A `_local/` document (`id` with or without the `_local/` prefix), with `_rev` `0-N`.
    fn get_local(&self, id: &str) -> impl Future<Output = Result<Value>> + Send;

    /// Writes a `_local/` document. Its `_rev` must be the current one (absent
    /// for a new document), otherwise `Conflict`. Returns the new `_rev`.
    fn put_local(&self, id: &str, body: Value) -> impl Future<Output = Result<String>> + Send;

    /// Deletes a `_local/` document; with `rev`, only if it is the current one.
    fn delete_local(&self, id: &str, rev: Option<&str>) -> impl Future<Output = Result<()>> + Send;

    /// Creates the database; `FileExists` if it exists.
    fn create_db(&self) -> impl Future<Output = Result<()>> + Send;

    /// Deletes the database and everything in it.
    fn delete_db(&self) -> impl Future<Output = Result<()>> + Send;

    /// True if the database exists.
    fn exists(&self) -> impl Future<Output = Result<bool>> + Send;

    /// How many revisions each branch keeps (default [`DEFAULT_REVS_LIMIT`]).
    fn revs_limit(&self) -> impl Future<Output = Result<u64>> + Send;

    /// Sets `revs_limit`; branches are stemmed on their next write.
    fn set_revs_limit(&self, limit: u64) -> impl Future<Output = Result<()>> + Send;

    /// A stable name for this database that contains no credentials (used to
    /// name copy checkpoints): `sqlite:<uuid>` or the database URL.
    fn identity(&self) -> String;

    /// Convenience: writes one document with `new_edits=true` and returns its
    /// new revision, turning a per-document failure into an error.
    fn put(&self, doc: Value) -> impl Future<Output = Result<String>> + Send {
        async move {
            let mut res = self.bulk_docs(vec![doc], true).await?;
            res.pop()
                .ok_or_else(|| StoreError::Internal("bulk_docs answered nothing".into()))?
                .into_written()
        }
    }
}

/// Either backend, chosen at run time by [`open`].
#[derive(Clone)]
pub enum AnyStore {
    /// An embedded store (a file path was given).
    Sqlite(SqliteStore),
    /// A CouchDB database (an `http://` or `https://` URL was given).
    Couch(CouchStore),
}

/// What a database's companion (the engine's state and journal) is named
/// after it: `<db>-rewind` on CouchDB, `<file>-rewind` for an embedded store.
pub const COMPANION_SUFFIX: &str = "-rewind";

/// True when `target` names a CouchDB server or database (an `http://` or
/// `https://` URL) rather than the path of an embedded store.
pub fn is_url(target: &str) -> bool {
    target.starts_with("http://") || target.starts_with("https://")
}

/// Opens a database: an `http://` or `https://` URL is a CouchDB database
/// (user:password in the URL for basic auth; the server must answer like
/// CouchDB, the database need not exist yet), anything else is the path of an
/// embedded store, created if missing.
///
/// A path `<file>-rewind` names the companion of the embedded store `<file>`:
/// its tables inside that file ([`SqliteStore::open_companion`]). A file
/// actually at that path (a companion kept beside its store, as rewind did
/// before 2026-11-27) is opened as it is.
pub async fn open(target: &str) -> Result<AnyStore> {
    if is_url(target) {
        Ok(AnyStore::Couch(CouchStore::open(target).await?))
    } else {
        let path = target.to_owned();
        let companion_of = target
            .strip_suffix(COMPANION_SUFFIX)
            .filter(|base| !base.is_empty() && !std::path::Path::new(target).exists())
            .map(str::to_owned);
        let store = tokio::task::spawn_blocking(move || match companion_of {
            Some(base) => SqliteStore::open_companion(base),
            None => SqliteStore::open(path),
        })
        .await
        .map_err(|e| StoreError::Internal(format!("open task failed: {e}")))??;
        Ok(AnyStore::Sqlite(store))
    }
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Sqlite($s) => $e,
            AnyStore::Couch($s) => $e,
        }
    };
}

impl AnyStore {
    /// The documents that have a live leaf, in id order, after `after`, at
    /// most `limit`: see [`SqliteStore::live_docs_by_id`] and
    /// [`CouchStore::live_docs_by_id`].
    pub async fn live_docs_by_id(
        &self,
        after: Option<String>,
        limit: usize,
        include_docs: bool,
    ) -> Result<Vec<ChangeRow>> {
        dispatch!(self, s => s.live_docs_by_id(after, limit, include_docs).await)
    }

    /// The live leaf revisions of each of `ids` (a deleted document's winner
    /// alone) in one request, where the backend has one (CouchDB:
    /// `CouchStore::live_leaf_revs`); `None` for the embedded store, whose
    /// per-document reads of every leaf are cheap.
    pub async fn live_leaf_revs(
        &self,
        ids: &[String],
    ) -> Result<Option<BTreeMap<String, Vec<String>>>> {
        match self {
            AnyStore::Sqlite(_) => Ok(None),
            AnyStore::Couch(s) => s.live_leaf_revs(ids).await.map(Some),
        }
    }
}

impl Store for AnyStore {
    async fn info(&self) -> Result<DbInfo> {
        dispatch!(self, s => s.info().await)
    }
    async fn get(&self, id: &str, opts: &GetOptions) -> Result<GetResult> {
        dispatch!(self, s => s.get(id, opts).await)
    }
    async fn bulk_docs(&self, docs: Vec<Value>, new_edits: bool) -> Result<Vec<BulkResult>> {
        dispatch!(self, s => s.bulk_docs(docs, new_edits).await)
    }
    async fn bulk_get(
        &self,
        reqs: Vec<BulkGetRequest>,
        opts: BulkGetOptions,
    ) -> Result<Vec<BulkGetResult>> {
        dispatch!(self, s => s.bulk_get(reqs, opts).await)
    }
    async fn revs_diff(
        &self,
        revs: BTreeMap<String, Vec<String>>,
    ) -> Result<BTreeMap<String, RevsDiffEntry>> {
        dispatch!(self, s => s.revs_diff(revs).await)
    }
    async fn all_docs(&self, opts: &AllDocsOptions) -> Result<AllDocs> {
        dispatch!(self, s => s.all_docs(opts).await)
    }
    async fn changes(&self, opts: &ChangesOptions) -> Result<Changes> {
        dispatch!(self, s => s.changes(opts).await)
    }
    async fn wait_for_change(&self, since: &Seq, timeout: Duration) -> Result<bool> {
        dispatch!(self, s => s.wait_for_change(since, timeout).await)
    }
    async fn get_local(&self, id: &str) -> Result<Value> {
        dispatch!(self, s => s.get_local(id).await)
    }
    async fn put_local(&self, id: &str, body: Value) -> Result<String> {
        dispatch!(self, s => s.put_local(id, body).await)
    }
    async fn delete_local(&self, id: &str, rev: Option<&str>) -> Result<()> {
        dispatch!(self, s => s.delete_local(id, rev).await)
    }
    async fn create_db(&self) -> Result<()> {
        dispatch!(self, s => s.create_db().await)
    }
    async fn delete_db(&self) -> Result<()> {
        dispatch!(self, s => s.delete_db().await)
    }
    async fn exists(&self) -> Result<bool> {
        dispatch!(self, s => s.exists().await)
    }
    async fn revs_limit(&self) -> Result<u64> {
        dispatch!(self, s => s.revs_limit().await)
    }
    async fn set_revs_limit(&self, limit: u64) -> Result<()> {
        dispatch!(self, s => s.set_revs_limit(limit).await)
    }
    fn identity(&self) -> String {
        dispatch!(self, s => s.identity())
    }
}

#[cfg(test)]
mod percent_tests {
    use super::percent_decode;

    #[test]
    fn percent_decode_takes_any_text() {
        assert_eq!(percent_decode("p%40ss%2Fw"), "p@ss/w");
        assert_eq!(percent_decode("caf%C3%A9"), "café");
        for kept in ["50%", "%4", "%", "%zz", "%+a"] {
            assert_eq!(percent_decode(kept), kept);
        }
        // A `%` before a character of several bytes (this slices no char).
        assert_eq!(percent_decode("%aé"), "%aé");
        assert_eq!(percent_decode("%é"), "%é");
        assert_eq!(percent_decode("%FF"), "\u{FFFD}");
    }
}
