//! Documents with attachments go through an upgrade and a rollback whole:
//! their attachments stay (same data, same digest) while their bodies are
//! migrated and restored byte for byte, in batches that mix them with
//! plain documents (which the embedded store writes as text).

use base64::Engine as _;
use rewind_engine::run::RunOptions;
use rewind_engine::state::Database;
use rewind_store::{GetOptions, Store};
use rewind_testkit::{load_sample, shared_server, TempDir};
use serde_json::{json, Value};

mod common;
use common::{cht, run_to};

fn with_attachments() -> GetOptions {
    GetOptions {
        attachments: true,
        ..Default::default()
    }
}

/// The body without revision members, and each attachment's data and digest.
fn parts(doc: &Value) -> (Value, Vec<(String, Value, Value)>) {
    let mut body = doc.clone();
    let object = body.as_object_mut().unwrap();
    object.remove("_rev");
    let atts = object
        .remove("_attachments")
        .and_then(|a| a.as_object().cloned())
        .unwrap_or_default()
        .into_iter()
        .map(|(name, a)| (name, a["data"].clone(), a["digest"].clone()))
        .collect();
    (body, atts)
}

async fn attachments_survive_upgrade_and_rollback(target: &str) {
    let docs = load_sample(target, 300, 21).await;
    let db = Database::open(target).await.unwrap();
    // Every tenth document gets an attachment: batches mix both kinds.
    let mut attached = Vec::new();
    for (i, doc) in docs.iter().enumerate().filter(|(i, _)| i % 10 == 0) {
        let id = doc["_id"].as_str().unwrap();
        let mut stored = common::doc(&db.data, id, &GetOptions::default()).await;
        let data = base64::engine::general_purpose::STANDARD.encode(format!("photo {i}"));
        stored["_attachments"] = json!({"photo.txt": {"content_type": "text/plain", "data": data}});
        db.data.put(stored).await.unwrap();
        attached.push(id.to_owned());
    }
    let read = |id: String| {
        let db = db.clone();
        async move { parts(&common::doc(&db.data, &id, &with_attachments()).await) }
    };
    let mut before = Vec::new();
    for id in &attached {
        before.push(read(id.clone()).await);
    }
    let set = cht();
    let opts = RunOptions {
        batch: 64,
        ..RunOptions::default()
    };
    run_to(&db, &set, set.latest(), &opts).await;
    let mut migrated = 0;
    for (id, (body, atts)) in attached.iter().zip(&before) {
        let (now, now_atts) = read(id.clone()).await;
        assert_eq!(&now_atts, atts, "{id}: attachments after the upgrade");
        assert_eq!(now["_id"], body["_id"]);
        migrated += usize::from(&now != body);
    }
    assert!(migrated > 5, "only {migrated} attached documents migrated");
    run_to(&db, &set, 0, &opts).await;
    for (id, expected) in attached.iter().zip(&before) {
        assert_eq!(
            &read(id.clone()).await,
            expected,
            "{id}: after the rollback"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachments_survive_upgrade_and_rollback_embedded() {
    let dir = TempDir::new();
    attachments_survive_upgrade_and_rollback(&dir.file("medic.db")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachments_survive_upgrade_and_rollback_on_pouchdb_server() {
    attachments_survive_upgrade_and_rollback(&shared_server().fresh_db_url()).await;
}
