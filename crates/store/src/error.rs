//! One error type for both backends, shaped like CouchDB's HTTP errors.

/// Everything a store operation can fail with.
///
/// Every variant maps to a CouchDB-style HTTP answer through [`StoreError::status`]
/// and [`StoreError::couch_error`], so the gateway can forward it unchanged.
/// Messages name the document, database or URL concerned; URLs are always
/// rendered through [`redact_url`], so a password never appears in a message.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A document, revision, attachment or database does not exist (404 `not_found`).
    /// `reason` is CouchDB's: `missing` or `deleted` for documents.
    #[error("{what}: not found ({reason})")]
    NotFound {
        /// What was looked for: `document <id>`, `database <name>`, or the
        /// request (`METHOD url`) a CouchDB server answered 404 to.
        what: String,
        /// CouchDB's reason, passed back as the answer's `reason`.
        reason: String,
    },
    /// An update named a revision that is not a leaf of the document (409 `conflict`).
    #[error("{what}: document update conflict")]
    Conflict {
        /// The document (`document <id>`) or the request (`METHOD url`) that conflicted.
        what: String,
    },
    /// The request or a document in it is malformed; nothing was written (400 `bad_request`).
    #[error("bad request: {reason}")]
    BadRequest {
        /// What is wrong, passed back as the answer's `reason`.
        reason: String,
    },
    /// The server refused the credentials (401 `unauthorized`).
    #[error("{url}: unauthorized: {reason}")]
    Unauthorized {
        /// The request refused (`METHOD url` or a URL), without credentials.
        url: String,
        /// The server's reason, passed back as the answer's `reason`.
        reason: String,
    },
    /// The credentials are valid but not allowed to do this (403 `forbidden`).
    #[error("{url}: forbidden: {reason}")]
    Forbidden {
        /// The request refused (`METHOD url`), without credentials.
        url: String,
        /// The server's reason, passed back as the answer's `reason`.
        reason: String,
    },
    /// `create_db` on a database that already exists (412 `file_exists`).
    #[error("{what}: the database already exists")]
    FileExists {
        /// The database (its name) or the request (`METHOD url`) CouchDB refused.
        what: String,
    },
    /// An attachment stub refers to an attachment the store does not have (412 `missing_stub`).
    #[error(
        "document {id}: attachment stub {name:?} refers to an attachment this store does not have"
    )]
    MissingStub {
        /// The id of the document holding the stub.
        id: String,
        /// The attachment's name in `_attachments`.
        name: String,
    },
    /// A file that is not a rewind store (a text file, a foreign SQLite database,
    /// a damaged file). Nothing was written to it (500 `corrupt_store`).
    #[error("{path}: not a rewind store: {reason}")]
    NotAStore {
        /// The file that was opened.
        path: String,
        /// Why it is not a rewind store.
        reason: String,
    },
    /// A URL that does not answer like CouchDB (502 `not_couchdb`).
    #[error("{url}: not a CouchDB server: {reason}")]
    NotCouch {
        /// The URL asked, without credentials.
        url: String,
        /// What in the answer was not like CouchDB.
        reason: String,
    },
    /// The server could not be reached, even after retries (503 `unreachable`).
    #[error("{url}: cannot reach the server: {reason}")]
    Unreachable {
        /// The URL or request (`METHOD url`) that failed, without credentials.
        url: String,
        /// Why the last attempt failed (connection error, timeout, unreadable answer).
        reason: String,
    },
    /// Any other error answer from the CouchDB server, passed through.
    #[error("{url}: HTTP {status} {error}: {reason}")]
    Http {
        /// The request (`METHOD url`, without credentials), or `document <id>`
        /// for a per-document failure of `bulk_docs`.
        url: String,
        /// The HTTP status; [`StoreError::status`] returns it unchanged.
        status: u16,
        /// CouchDB's `error` name (empty when the answer had none).
        error: String,
        /// CouchDB's `reason`.
        reason: String,
    },
    /// SQLite failed (500 `internal`).
    #[error("{path}: sqlite: {source}")]
    Sqlite {
        /// The store's file (empty when the error did not pass through a store handle).
        path: String,
        /// The SQLite error.
        #[source]
        source: rusqlite::Error,
    },
    /// A bug or an impossible state (500 `internal`).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Shorthand used across the crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    /// A document's refusal in a `_bulk_docs` answer (`error`, `reason`) as
    /// the error CouchDB answers a write of that document alone with: a
    /// `conflict` as [`StoreError::Conflict`], any other as
    /// [`StoreError::Http`] with the status of its name (`forbidden` 403,
    /// `missing_stub` 412, ...; 500 for a name it does not know).
    pub fn refused(id: &str, error: &str, reason: String) -> StoreError {
        if error == "conflict" {
            return StoreError::Conflict {
                what: format!("document {id}"),
            };
        }
        let status = match error {
            "bad_request" | "doc_validation" => 400,
            "unauthorized" => 401,
            "forbidden" => 403,
            "not_found" => 404,
            "file_exists" | "missing_stub" => 412,
            "too_large" => 413,
            _ => 500,
        };
        StoreError::Http {
            url: format!("document {id}"),
            status,
            error: error.to_owned(),
            reason,
        }
    }

    /// The HTTP status CouchDB would answer with.
    pub fn status(&self) -> u16 {
        match self {
            StoreError::NotFound { .. } => 404,
            StoreError::Conflict { .. } => 409,
            StoreError::BadRequest { .. } => 400,
            StoreError::Unauthorized { .. } => 401,
            StoreError::Forbidden { .. } => 403,
            StoreError::FileExists { .. } | StoreError::MissingStub { .. } => 412,
            StoreError::NotCouch { .. } => 502,
            StoreError::Unreachable { .. } => 503,
            StoreError::Http { status, .. } => *status,
            StoreError::NotAStore { .. } | StoreError::Sqlite { .. } | StoreError::Internal(_) => {
                500
            }
        }
    }

    /// CouchDB's `{"error": .., "reason": ..}` pair for this error.
    pub fn couch_error(&self) -> (String, String) {
        let (error, reason) = match self {
            StoreError::NotFound { reason, .. } => ("not_found", reason.clone()),
            StoreError::Conflict { .. } => ("conflict", "Document update conflict.".to_owned()),
            StoreError::BadRequest { reason } => ("bad_request", reason.clone()),
            StoreError::Unauthorized { reason, .. } => ("unauthorized", reason.clone()),
            StoreError::Forbidden { reason, .. } => ("forbidden", reason.clone()),
            StoreError::FileExists { .. } => (
                "file_exists",
                "The database could not be created, the file already exists.".to_owned(),
            ),
            StoreError::MissingStub { .. } => ("missing_stub", self.to_string()),
            StoreError::NotAStore { .. } => ("corrupt_store", self.to_string()),
            StoreError::NotCouch { .. } => ("not_couchdb", self.to_string()),
            StoreError::Unreachable { .. } => ("unreachable", self.to_string()),
            StoreError::Http { error, reason, .. } => (error.as_str(), reason.clone()),
            StoreError::Sqlite { .. } | StoreError::Internal(_) => ("internal", self.to_string()),
        };
        (error.to_owned(), reason)
    }

    pub(crate) fn bad(reason: impl Into<String>) -> Self {
        StoreError::BadRequest {
            reason: reason.into(),
        }
    }

    pub(crate) fn missing(what: impl Into<String>) -> Self {
        StoreError::NotFound {
            what: what.into(),
            reason: "missing".to_owned(),
        }
    }
}

/// Renders a URL with any user name and password removed, for messages and logs.
///
/// Strings that do not parse as URLs are cut at the last `@` before the host as
/// a best effort, so even a malformed URL never leaks a password.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => match (url.find("://"), url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}{}", &url[..scheme + 3], &url[at + 1..])
            }
            _ => url.to_owned(),
        },
    }
}
