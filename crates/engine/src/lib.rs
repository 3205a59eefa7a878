//! The upgrade and rollback engine, and the project it works on.
//!
//! Invariant: state that must survive a crash is written before it is relied
//! on (journal entry, then document, then checkpoint), and it lives next to
//! the data, so any process can resume a run another one started.

#![warn(missing_docs)]

pub mod journal;
pub mod load;
pub mod offline;
pub mod plan;
pub mod project;
pub mod run;
pub mod state;

pub use project::{Config, Project, User};

use std::path::PathBuf;

/// Everything that can go wrong in the engine crate.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Reading a file or directory failed.
    #[error("{path}: {source}")]
    Io {
        /// What was read.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// `rewind.toml` is malformed.
    #[error("{path}: {reason}")]
    Config {
        /// The configuration file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Input documents or records are malformed.
    #[error("{what}: {reason}")]
    Input {
        /// Where (`file:line`, document id).
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// The database or its companion failed.
    #[error(transparent)]
    Store(#[from] rewind_store::StoreError),
    /// The lens failed on a document.
    #[error("document {id}: {source}")]
    Lens {
        /// The document.
        id: String,
        /// What failed.
        source: rewind_lens::LensError,
    },
    /// The state in the database does not allow the operation.
    #[error("{0}")]
    Refused(String),
    /// A journal changed between the run reading and writing it (a gateway
    /// journaled a phone's push): the run resumes from its checkpoint.
    #[error("the journal of {0} changed while the run wrote it (another writer, such as `rewind serve` storing a push, got there first)")]
    JournalRace(String),
    /// Another run holds the lease.
    #[error("another run holds the lease ({owner}) for {seconds} more seconds; wait, or check `rewind status`")]
    Busy {
        /// Who holds it.
        owner: String,
        /// How long it still holds it.
        seconds: u64,
    },
    /// Stored state could not be read.
    #[error("corrupt rewind state: {0}")]
    Corrupt(String),
    /// One or more migration files are malformed or not reversible.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Migrations(Vec<rewind_lens::LensError>),
}

/// A `Result` with [`EngineError`].
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
