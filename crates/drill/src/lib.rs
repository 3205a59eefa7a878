//! The rollback drill: a rehearsal of the upgrade that broke the phones,
//! rolled back, re-applied and restored from a snapshot, with simulated
//! phones syncing through the gateway, checking every invariant.
//!
//! Invariant: the drill only uses the public paths a real deployment uses —
//! the engine's `run`, the gateway's HTTP protocol, and phones that
//! replicate the way PouchDB does — so what it proves holds for them.

#![warn(missing_docs)]

mod checks;
mod scenario;

pub use scenario::{run, DrillOptions, DrillReport, InvariantResult, StepResult, MIN_DEVICES};

/// The `examples/cht` migrations, built in so the drill runs anywhere.
pub fn builtin_migrations() -> Vec<(std::path::PathBuf, String)> {
    macro_rules! file {
        ($name:literal) => {
            (
                std::path::PathBuf::from(concat!("examples/cht/", $name)),
                include_str!(concat!("../../../examples/cht/", $name)).to_owned(),
            )
        };
    }
    vec![
        file!("0001-persons-to-contacts.yaml"),
        file!("0002-places-to-contacts.yaml"),
        file!("0003-rename-patient-id.yaml"),
        file!("0004-move-parent-reference.yaml"),
        file!("0005-remove-legacy-code.yaml"),
        file!("0006-recode-sex.yaml"),
        file!("0007-split-name.yaml"),
    ]
}

/// Everything that can stop a drill (as opposed to an invariant failing,
/// which the report records).
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    /// A step could not run.
    #[error("{step}: {reason}")]
    Step {
        /// The step.
        step: String,
        /// Why.
        reason: String,
    },
}

/// Wraps any error as the failure of `step`.
pub(crate) fn step_error(step: &str) -> impl Fn(String) -> DrillError + '_ {
    move |reason| DrillError::Step {
        step: step.to_owned(),
        reason,
    }
}
