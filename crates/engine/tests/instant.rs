//! `rollback --instant`: the old version is served from the start of the
//! run, while the documents are rewritten, and stops being an override once
//! they have caught up.

use rewind_engine::run::{run, Progress, RunOptions};
use rewind_engine::state::{Database, State};
use rewind_testkit::{load_sample, TempDir};

mod common;
use common::{cht, run_to};

async fn rollback_observing_served(instant: bool) -> (Vec<(u32, u32)>, State) {
    let dir = TempDir::new();
    let target = dir.file("medic.db");
    load_sample(&target, 600, 5).await;
    let set = cht();
    let db = Database::open(&target).await.unwrap();
    let opts = RunOptions {
        batch: 100,
        ..RunOptions::default()
    };
    run_to(&db, &set, set.latest(), &opts).await;
    // What a gateway would read while the rollback runs: (served version,
    // storage version), sampled at every progress report.
    let observer = Database::open(&target).await.unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let watcher = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while rx.recv().await.is_some() {
                let state = State::load(&observer).await.unwrap();
                if state.run.is_some() {
                    seen.lock()
                        .unwrap()
                        .push((state.served_version(), state.version));
                }
            }
        })
    };
    let opts = RunOptions {
        batch: 100,
        instant,
        ..RunOptions::default()
    };
    run(&db, &set, 0, &opts, &mut |_: &Progress| {
        let _ = tx.send(());
    })
    .await
    .unwrap();
    drop(tx);
    watcher.await.unwrap();
    let state = State::load(&db).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    (seen, state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instant_rollback_serves_the_old_version_while_documents_are_rewritten() {
    let (seen, state) = rollback_observing_served(true).await;
    assert!(!seen.is_empty(), "no state was observed during the run");
    let latest = cht().latest();
    for (served, version) in &seen {
        assert_eq!(*served, 0, "served during an instant rollback");
        assert_eq!(*version, latest, "storage version during the rollback");
    }
    assert_eq!(state.version, 0);
    assert_eq!(state.served, None, "the override outlives the run");
    assert_eq!(state.served_version(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_rollback_serves_the_new_version_until_it_finishes() {
    let (seen, state) = rollback_observing_served(false).await;
    assert!(!seen.is_empty(), "no state was observed during the run");
    let latest = cht().latest();
    assert!(seen.iter().all(|(served, _)| *served == latest), "{seen:?}");
    assert_eq!(state.served_version(), 0);
}

/// The embedded companion keeps one revision of each journal: after an
/// upgrade and a rollback, every journal was written twice and holds only
/// its leaf (the replaced body is gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_companion_keeps_only_the_leaf_of_each_journal() {
    use rewind_store::{GetOptions, Store};
    let dir = TempDir::new();
    let target = dir.file("medic.db");
    load_sample(&target, 300, 9).await;
    let set = cht();
    let db = Database::open(&target).await.unwrap();
    assert_eq!(
        db.state.revs_limit().await.unwrap(),
        rewind_engine::state::COMPANION_REVS_LIMIT
    );
    let opts = RunOptions::default();
    for to in [set.latest(), 0] {
        run_to(&db, &set, to, &opts).await;
    }
    let journals = db
        .state
        .all_docs(&rewind_store::AllDocsOptions {
            start_key: Some("journal:".into()),
            end_key: Some("journal:\u{fff0}".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .rows;
    assert!(journals.len() > 100, "{} journals", journals.len());
    let revs = GetOptions {
        revs: true,
        ..Default::default()
    };
    for row in journals {
        let doc = common::doc(&db.state, &row.key, &revs).await;
        let rev = doc["_rev"].as_str().unwrap();
        assert!(
            rev.starts_with("2-"),
            "{}: written twice, at {rev}",
            row.key
        );
        assert_eq!(
            doc["_revisions"]["ids"].as_array().unwrap().len(),
            1,
            "{}: only the leaf kept",
            row.key
        );
    }
}
