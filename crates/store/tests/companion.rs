//! An embedded store's companion (`<file>-rewind`: the engine's state and
//! journal) lives in tables inside the store's own file: one file carries
//! the data and everything a rollback needs, and the two databases stay
//! independent (documents, counts, sequences, deletion).

mod common;

use std::path::Path;

use common::TempDir;
use rewind_store::*;
use serde_json::{json, Value};

async fn open(path: &Path) -> AnyStore {
    rewind_store::open(&path.display().to_string())
        .await
        .unwrap()
}

fn companion_of(path: &Path) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(COMPANION_SUFFIX);
    p.into()
}

fn docs(prefix: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"_id": format!("{prefix}-{i:04}"), "i": i}))
        .collect()
}

async fn ids(s: &AnyStore) -> Vec<String> {
    s.all_docs(&AllDocsOptions::default())
        .await
        .unwrap()
        .rows
        .into_iter()
        .map(|r| r.key)
        .collect()
}

/// The names of the tables in an SQLite file.
fn tables(path: &Path) -> Vec<String> {
    let c = rusqlite::Connection::open(path).unwrap();
    let mut st = c
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap();
    st.query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

#[tokio::test]
async fn a_companion_is_tables_in_its_stores_file_and_a_database_of_its_own() {
    let dir = TempDir::new();
    let path = dir.path().join("medic.db");
    let data = open(&path).await;
    data.bulk_docs(docs("d", 30), true).await.unwrap();
    let companion = open(&companion_of(&path)).await;
    assert!(
        !companion_of(&path).exists(),
        "the companion made a file of its own"
    );
    assert!(companion.exists().await.unwrap());
    companion.bulk_docs(docs("j", 12), true).await.unwrap();
    companion
        .put_local("_local/x", json!({"n": 1}))
        .await
        .unwrap();

    let t = tables(&path);
    for name in ["docs", "rewind_docs", "rewind_meta", "rewind_revs"] {
        assert!(t.contains(&name.to_owned()), "no table {name} in {t:?}");
    }
    let (d, c) = (data.info().await.unwrap(), companion.info().await.unwrap());
    assert_eq!((d.doc_count, c.doc_count), (30, 12));
    assert_eq!((d.update_seq, c.update_seq), (json!(30), json!(12)));
    assert_eq!(c.db_name, "medic-rewind");
    assert_eq!(ids(&data).await.len(), 30);
    assert!(ids(&companion).await.iter().all(|id| id.starts_with("j-")));
    assert!(data.get_local("_local/x").await.is_err());
    assert_ne!(data.identity(), companion.identity());

    // Each database's feed lists only its own documents.
    let feed = companion.changes(&ChangesOptions::default()).await.unwrap();
    assert_eq!(feed.results.len(), 12);

    // Deleting one leaves the other whole; fresh handles see the same.
    companion.delete_db().await.unwrap();
    assert!(!companion.exists().await.unwrap());
    let data = open(&path).await;
    assert_eq!(data.info().await.unwrap().doc_count, 30);
    let companion = open(&companion_of(&path)).await;
    assert!(!companion.exists().await.unwrap());
    companion.create_db().await.unwrap();
    assert_eq!(companion.info().await.unwrap().doc_count, 0);
    data.delete_db().await.unwrap();
    companion.bulk_docs(docs("k", 3), true).await.unwrap();
    assert_eq!(companion.info().await.unwrap().doc_count, 3);
}

/// Opening `<file>-rewind` before `<file>` exists makes the file, but not
/// the database: a copy into the companion first (a restore) must not
/// make an empty database appear.
#[tokio::test]
async fn a_companion_opened_first_makes_the_file_but_not_its_database() {
    let dir = TempDir::new();
    let path = dir.path().join("new.db");
    let companion = open(&companion_of(&path)).await;
    companion.bulk_docs(docs("j", 2), true).await.unwrap();
    assert!(path.exists());
    let data = open(&path).await;
    assert!(!data.exists().await.unwrap());
    data.create_db().await.unwrap();
    data.bulk_docs(docs("d", 1), true).await.unwrap();
    assert_eq!(
        open(&companion_of(&path))
            .await
            .info()
            .await
            .unwrap()
            .doc_count,
        2
    );
}

/// A companion file kept beside its store (the layout before the companion
/// moved into the store's file) is still opened as it is.
#[tokio::test]
async fn a_companion_file_beside_its_store_is_still_used() {
    let dir = TempDir::new();
    let path = dir.path().join("old.db");
    let file = AnyStore::Sqlite(SqliteStore::open(companion_of(&path)).unwrap());
    file.bulk_docs(docs("j", 4), true).await.unwrap();
    let companion = open(&companion_of(&path)).await;
    assert_eq!(companion.info().await.unwrap().doc_count, 4);
    assert!(!path.exists(), "opening the companion file made its store");
}

/// A run writes the documents and their journals at once: handles on the
/// data and the companion of one file, writing in parallel, lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_and_its_companion_written_in_parallel_lose_nothing() {
    let dir = TempDir::new();
    let path = dir.path().join("par.db");
    let data = open(&path).await;
    let companion = open(&companion_of(&path)).await;
    let write = |s: AnyStore, prefix: &'static str| async move {
        for round in 0..20 {
            let batch: Vec<Value> = (0..50)
                .map(|i| json!({"_id": format!("{prefix}-{round:02}-{i:02}")}))
                .collect();
            for r in s.bulk_docs(batch, true).await.unwrap() {
                assert!(r.error.is_none(), "{r:?}");
            }
        }
    };
    tokio::join!(write(data.clone(), "d"), write(companion.clone(), "j"));
    for (s, prefix) in [
        (open(&path).await, "d"),
        (open(&companion_of(&path)).await, "j"),
    ] {
        let all = ids(&s).await;
        assert_eq!(all.len(), 1000);
        assert!(all.iter().all(|id| id.starts_with(prefix)));
        assert_eq!(s.info().await.unwrap().update_seq, json!(1000));
    }
}
