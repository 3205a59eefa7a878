//! The drill end to end, small: every invariant holds, and the report says so.

use rewind_drill::{run, DrillOptions};

fn drill(seed: u64) -> Vec<String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let report = rt
        .block_on(run(DrillOptions {
            docs: 40,
            devices: 3,
            seed,
            ..DrillOptions::default()
        }))
        .unwrap();
    assert_eq!(report.invariants.len(), 6);
    assert!(report.edits > 0, "the phones edited nothing");
    assert_eq!(report.steps.len(), 7);
    report
        .invariants
        .iter()
        .filter(|i| !i.holds)
        .map(|i| format!("{}. {}: {:?}", i.number, i.name, i.counterexamples))
        .collect()
}

#[test]
fn a_small_drill_holds_every_invariant() {
    let failing = drill(3);
    assert!(failing.is_empty(), "{failing:#?}");
}

// Known open bug (closing note of 2026-11-25, second session): after the
// restore, phones bring back two branches of one document that the server
// had resolved before the restore (an edit made during the upgrade and a
// later offline edit on another path); both come back as adopted copies and
// the older one can win, losing the newer edit (invariant 1). Run it with
// `cargo test -p rewind-drill -- --ignored`.
#[test]
#[ignore = "open: a restore can bring back a resolved branch that wins over a newer edit"]
fn seed_7_restore_keeps_the_newer_of_two_recovered_branches() {
    let failing = drill(7);
    assert!(failing.is_empty(), "{failing:#?}");
}
