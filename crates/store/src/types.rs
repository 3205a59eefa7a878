//! Request options and answers shared by both backends.
//!
//! Answers derive `Serialize` in CouchDB's wire shape, so the gateway can send
//! them as they are.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A position in a database's changes feed.
///
/// The embedded store uses integers (1, 2, ...; 0 is "the beginning"), and so
/// does pouchdb-server. CouchDB 2+ uses opaque strings (`"12-g1AAAA..."`) that
/// must be passed back exactly as received: never parse, compare or do
/// arithmetic on a `Seq` from a CouchDB backend. Both backends accept `0` and
/// `"now"` as `since`; the embedded store also accepts integers written as strings.
pub type Seq = Value;

/// Database information, as `GET /{db}` answers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DbInfo {
    /// The database name (the file stem for the embedded store).
    pub db_name: String,
    /// Documents whose winning revision is not deleted.
    pub doc_count: u64,
    /// Documents whose winning revision is deleted.
    pub doc_del_count: u64,
    /// The sequence of the latest change.
    pub update_seq: Seq,
}

/// Which revisions `get` returns when `open_revs` is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenRevs {
    /// Every leaf of the revision tree, deleted ones included.
    All,
    /// These revisions; unknown ones come back as [`OpenRev::Missing`].
    List(Vec<String>),
}

/// Options of `get`, named after CouchDB's query parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GetOptions {
    /// A specific revision instead of the winner.
    pub rev: Option<String>,
    /// Include `_revisions: {start, ids}` (the path to the oldest known ancestor).
    pub revs: bool,
    /// Include `_conflicts`: the non-deleted leaves that lost, highest first.
    pub conflicts: bool,
    /// Return several revisions as a [`GetResult::Revs`] list.
    pub open_revs: Option<OpenRevs>,
    /// With `open_revs: List`, replace a non-leaf revision by the leaves that descend from it.
    pub latest: bool,
    /// Inline attachment data (base64 `data`) instead of stubs.
    pub attachments: bool,
}

/// What `get` returns.
#[derive(Debug, Clone, PartialEq)]
pub enum GetResult {
    /// One document (no `open_revs`).
    Doc(Value),
    /// One entry per requested revision (with `open_revs`).
    Revs(Vec<OpenRev>),
}

impl GetResult {
    /// The single document, or `None` for an `open_revs` answer.
    pub fn into_doc(self) -> Option<Value> {
        match self {
            GetResult::Doc(d) => Some(d),
            GetResult::Revs(_) => None,
        }
    }
}

/// One entry of an `open_revs` answer: `{"ok": doc}` or `{"missing": rev}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OpenRev {
    /// The revision's document, with `_id` and `_rev` (a tombstone has `_deleted: true`).
    #[serde(rename = "ok")]
    Ok(Value),
    /// A requested revision the database does not have, as it was asked.
    #[serde(rename = "missing")]
    Missing(String),
}

/// The outcome for one document of `bulk_docs`.
///
/// Success: `{id, rev}`. Failure: `{id, error, reason}` with CouchDB's error
/// names (`conflict`, `forbidden`, `missing_stub`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkResult {
    /// The document's `_id`.
    pub id: String,
    /// The revision written; `None` on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
    /// CouchDB's error name on failure; `None` when the document was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// CouchDB's human-readable reason on failure; `None` when the document was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl BulkResult {
    /// True when the document was written.
    pub fn is_ok(&self) -> bool {
        self.error.is_none()
    }

    /// The new revision of a document written with `new_edits=true`; a
    /// failure as the error CouchDB answers for that document alone
    /// ([`crate::StoreError::refused`]).
    pub fn into_written(self) -> crate::Result<String> {
        match (self.rev, self.error.as_deref()) {
            (Some(rev), None) => Ok(rev),
            (_, e) => Err(crate::StoreError::refused(
                &self.id,
                e.unwrap_or("unknown"),
                self.reason.unwrap_or_default(),
            )),
        }
    }
}

/// One document asked of `bulk_get`: its winner (`rev: None`) or one revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkGetRequest {
    /// The document's `_id`.
    pub id: String,
    /// The revision asked for; `None` for the winning revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
}

impl BulkGetRequest {
    /// A request for `id` at `rev` (`None`: the winning revision).
    pub fn new(id: impl Into<String>, rev: Option<&str>) -> Self {
        BulkGetRequest {
            id: id.into(),
            rev: rev.map(str::to_owned),
        }
    }
}

/// Options of `bulk_get`, as CouchDB's `_bulk_get` query parameters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BulkGetOptions {
    /// Include `_revisions`.
    pub revs: bool,
    /// Replace a non-leaf revision by the leaves that descend from it.
    pub latest: bool,
    /// Inline attachment data instead of stubs.
    pub attachments: bool,
}

/// The answer of `bulk_get` for one requested id, in request order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BulkGetResult {
    /// The requested document's `_id`.
    pub id: String,
    /// The revisions found, or the error: one entry, or with `latest` one per
    /// leaf that descends from the requested revision.
    pub docs: Vec<BulkGetItem>,
}

/// `{"ok": doc}` or `{"error": {id, rev, error, reason}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BulkGetItem {
    /// A revision's document, with `_id` and `_rev`.
    #[serde(rename = "ok")]
    Ok(Value),
    /// Why the requested document or revision could not be given.
    #[serde(rename = "error")]
    Error(DocError),
}

/// A per-document error inside `bulk_get`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocError {
    /// The requested document's `_id`.
    pub id: String,
    /// The requested revision (`"undefined"` when none was, as CouchDB says).
    pub rev: String,
    /// CouchDB's error name, e.g. `not_found`.
    pub error: String,
    /// CouchDB's human-readable reason, e.g. `missing` or `deleted`.
    pub reason: String,
}

/// The `_revs_diff` answer for one document: the revisions the store lacks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevsDiffEntry {
    /// The asked revisions this database does not have.
    pub missing: Vec<String>,
    /// Leaves the store has with a lower generation than a missing revision:
    /// attachments they hold need not be sent again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub possible_ancestors: Vec<String>,
}

/// Options of `all_docs`. Keys compare as raw UTF-8 bytes (see NOTES.md).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllDocsOptions {
    /// Exactly these ids, in this order (deleted and missing ones included as such).
    pub keys: Option<Vec<String>>,
    /// First id (inclusive); with `descending`, the highest id.
    pub start_key: Option<String>,
    /// Last id (inclusive).
    pub end_key: Option<String>,
    /// At most this many rows; `None`: no limit.
    pub limit: Option<usize>,
    /// Rows to pass over before the first one returned.
    pub skip: usize,
    /// Add the winning revision's body as `doc`.
    pub include_docs: bool,
    /// Highest id first (also the order of `keys`, reversed).
    pub descending: bool,
}

/// The `all_docs` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AllDocs {
    /// Number of non-deleted documents in the database.
    pub total_rows: u64,
    /// Where the first row stands, as CouchDB says; the embedded store answers `skip`.
    pub offset: u64,
    /// The rows, by id (highest first with `descending`), or in `keys` order.
    pub rows: Vec<AllDocsRow>,
}

/// One row of `all_docs`: a document, or `{key, error: "not_found"}` for a missing key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AllDocsRow {
    /// The document's `_id`; `None` for a missing key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The row's key: the document id, or the requested key.
    pub key: String,
    /// The winning revision; `None` for a missing key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<RowValue>,
    /// With `include_docs`, the winning revision's body (JSON `null` for a
    /// deleted document asked by key); otherwise `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc: Option<Value>,
    /// `not_found` for a requested key the database does not have; otherwise `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `{rev, deleted?}` in an `all_docs` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowValue {
    /// The winning revision.
    pub rev: String,
    /// True when the winning revision is deleted (only for rows asked by key).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

/// Options of `changes` (a normal, finite feed).
#[derive(Debug, Clone, PartialEq)]
pub struct ChangesOptions {
    /// Changes after this sequence (`0`: from the beginning; `"now"`: nothing yet).
    pub since: Seq,
    /// At most this many rows; `None`: no limit.
    pub limit: Option<usize>,
    /// List every leaf revision (`style=all_docs`), not only the winner.
    pub style_all_docs: bool,
    /// Add the winning revision's body as `doc`.
    pub include_docs: bool,
    /// Newest first.
    pub descending: bool,
}

impl Default for ChangesOptions {
    fn default() -> Self {
        ChangesOptions {
            since: Value::from(0),
            limit: None,
            style_all_docs: false,
            include_docs: false,
            descending: false,
        }
    }
}

/// The `changes` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Changes {
    /// One row per changed document, in sequence order (newest first with `descending`).
    pub results: Vec<ChangeRow>,
    /// Pass this as the next `since` to continue.
    pub last_seq: Seq,
}

/// One document in the changes feed, at its latest change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeRow {
    /// The sequence of the document's latest change.
    pub seq: Seq,
    /// The document's `_id`.
    pub id: String,
    /// The winning revision, or with `style_all_docs` every leaf (the winner first).
    pub changes: Vec<ChangeRev>,
    /// True when the winning revision is deleted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    /// With `include_docs`, the winning revision's body; otherwise `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub doc: Option<Value>,
}

/// `{rev}` in a change row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRev {
    /// A leaf revision id (`N-hash`).
    pub rev: String,
}
