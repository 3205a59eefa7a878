//! The upgrade and rollback engine, and the project it works on.
//!
//! Invariant: state that must survive a crash is written before it is relied
//! on (journal entry, then document, then checkpoint), and it lives next to
//! the data, so any process can resume a run another one started.

pub mod offline;
pub mod project;

pub use project::{Config, Project};

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
    /// One or more migration files are malformed or not reversible.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Migrations(Vec<rewind_lens::LensError>),
}

/// A `Result` with [`EngineError`].
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
