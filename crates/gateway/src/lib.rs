//! The sync gateway: the CouchDB replication protocol in front of a store,
//! each client syncing at its own schema version.
//!
//! Invariant: the gateway keeps no state of its own. Everything it answers
//! is a function of the store (documents, journal, version state) and the
//! migration set, so two instances answer byte for byte the same and either
//! can be restarted at any time. (What it holds in memory, presentations
//! and changes pages read ahead, are answers it already gave or would give a
//! moment earlier: see `sync::PresentCache` and `ahead`.) See `view` for how
//! revisions are presented across versions and `sync` for how pushed
//! revisions are stored.

#![warn(missing_docs)]

mod ahead;
pub mod device;
mod filter;
mod http;
pub mod sync;
pub mod view;

pub use http::{hash_password, password_matches, router, serve, Backend, Gateway, GatewayConfig};

use rewind_store::StoreError;

/// Everything that can go wrong answering a request; each maps to a
/// CouchDB-style `{"error", "reason"}` with its HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The store answered an error.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The rewind state could not be read.
    #[error(transparent)]
    Engine(#[from] rewind_engine::EngineError),
    /// A document could not be translated.
    #[error("document {0}: {1}")]
    Lens(String, rewind_lens::LensError),
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// No such database, document or endpoint.
    #[error("{0}")]
    NotFound(String),
    /// A write based on a revision that is not a leaf.
    #[error("document {0}: update conflict")]
    Conflict(String),
    /// Authentication required or failed.
    #[error("{0}")]
    Unauthorized(String),
    /// Not allowed for this user.
    #[error("{0}")]
    Forbidden(String),
    /// A body larger than allowed.
    #[error("{0}")]
    TooLarge(String),
    /// An endpoint the gateway serves, asked with a method it does not
    /// take: the methods it takes, as CouchDB says them (`POST`,
    /// `GET,HEAD,POST`).
    #[error("Only {0} allowed")]
    MethodNotAllowed(&'static str),
    /// A bug or an impossible state.
    #[error("{0}")]
    Internal(String),
}

impl GatewayError {
    /// The HTTP status and CouchDB's `error` and `reason`.
    pub fn couch(&self) -> (u16, String, String) {
        match self {
            GatewayError::Store(e) => {
                let (error, reason) = e.couch_error();
                (e.status(), error, reason)
            }
            GatewayError::Engine(rewind_engine::EngineError::Store(e)) => {
                let (error, reason) = e.couch_error();
                (e.status(), error, reason)
            }
            GatewayError::Engine(e) => (500, "rewind_state".into(), e.to_string()),
            GatewayError::Lens(..) => (500, "translation_failed".into(), self.to_string()),
            GatewayError::BadRequest(r) => (400, "bad_request".into(), r.clone()),
            GatewayError::NotFound(r) => (404, "not_found".into(), r.clone()),
            GatewayError::Conflict(_) => {
                (409, "conflict".into(), "Document update conflict.".into())
            }
            GatewayError::Unauthorized(r) => (401, "unauthorized".into(), r.clone()),
            GatewayError::Forbidden(r) => (403, "forbidden".into(), r.clone()),
            GatewayError::TooLarge(r) => (413, "too_large".into(), r.clone()),
            GatewayError::MethodNotAllowed(_) => {
                (405, "method_not_allowed".into(), self.to_string())
            }
            GatewayError::Internal(r) => (500, "internal".into(), r.clone()),
        }
    }
}
