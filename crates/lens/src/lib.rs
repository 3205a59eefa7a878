//! Two-way migration lenses over JSON documents.
//!
//! Invariant: no I/O and no async here. Everything is a pure function of a
//! document, a migration set and a complement, so it can be property-tested
//! and reused by the engine, the gateway and `rewind check` alike. (`custom`
//! steps run JavaScript in a sandbox without I/O.)
//!
//! The map: [`path`] addresses fields, [`selector`] is the Mango subset that
//! says which documents a migration touches, [`ops`] are the lens operations
//! with their complements, [`migration`] parses files and applies a whole
//! migration set across versions with the stamp, [`laws`] checks the
//! round-trip laws on sample and generated documents.

#![warn(missing_docs)]

pub mod json_text;
pub mod laws;
pub mod migration;
pub mod ops;
pub mod path;
pub mod script;
pub mod selector;

pub use migration::{Complements, Migration, MigrationSet, StepOutcome, DEFAULT_STAMP};
pub use ops::Direction;

use std::path::PathBuf;

/// Everything that can go wrong in the lens crate.
#[derive(Debug, thiserror::Error)]
pub enum LensError {
    /// A migration file is malformed or not reversible.
    #[error("{file}:{line}:{column}: {reason}")]
    Invalid {
        /// The file, as named by the caller.
        file: PathBuf,
        /// 1-based line.
        line: u64,
        /// 1-based column.
        column: u64,
        /// What is wrong, in one line.
        reason: String,
    },
    /// A document does not have the shape an operation needs.
    #[error("document does not fit the migration: {0}")]
    Shape(String),
    /// A `custom` step failed (exception, time limit, bad return value).
    #[error("custom step failed: {0}")]
    Script(String),
    /// A version outside the migration set was asked for.
    #[error("version {asked} does not exist: the migrations go from 0 to {latest}")]
    NoSuchVersion {
        /// The version asked for.
        asked: u32,
        /// The latest version.
        latest: u32,
    },
}

/// A `Result` with [`LensError`].
pub type Result<T, E = LensError> = std::result::Result<T, E>;
