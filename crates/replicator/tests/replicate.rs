//! Replication and phone behaviour, each scenario against an embedded
//! remote and a real pouchdb-server.

mod common;

use common::{Remote, TempDir};
use rewind_replicator::{
    leaves, remote_uuid, replicate, replication_id, server_root, DocLeaves, Phone, ReplicateOptions,
};
use rewind_store::{AnyStore, GetOptions, Store};
use serde_json::{json, Value};

const SEED: u64 = 7;

async fn seed_remote(remote: &Remote, n: u64) -> Vec<String> {
    let docs: Vec<Value> = rewind_sample::docs(n, SEED).collect();
    let ids = docs
        .iter()
        .map(|d| d["_id"].as_str().unwrap().to_owned())
        .collect();
    let res = remote.store.bulk_docs(docs, true).await.unwrap();
    assert!(res.iter().all(|r| r.is_ok()), "{res:?}");
    ids
}

/// Ids, winners, deletion flags and leaves: what must agree after a sync.
fn trees(docs: &[DocLeaves]) -> Vec<(String, String, bool, Vec<String>)> {
    docs.iter()
        .map(|d| (d.id.clone(), d.winner.clone(), d.deleted, d.leaves.clone()))
        .collect()
}

/// A body as compared across servers: pouchdb-server is JavaScript, so it
/// keeps numbers as doubles (`87.0` comes back as `87`), and it sets an
/// attachment's `revpos` to the revision that brought its data. Key order
/// does not matter to `Value`'s equality.
fn comparable(v: &Value) -> Value {
    match v {
        Value::Number(n) => json!(n.as_f64()),
        Value::Array(a) => Value::Array(a.iter().map(comparable).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .filter(|(k, _)| k.as_str() != "revpos")
                .map(|(k, v)| (k.clone(), comparable(v)))
                .collect(),
        ),
        v => v.clone(),
    }
}

async fn assert_converged(remote: &Remote, phones: &[&Phone]) {
    let server = leaves(&remote.store).await.unwrap();
    for p in phones {
        let local = p.all_docs_with_leaves().await.unwrap();
        assert_eq!(trees(&local), trees(&server), "phone {} differs", p.name);
        for (l, s) in local.iter().zip(&server) {
            assert_eq!(
                comparable(&l.body),
                comparable(&s.body),
                "phone {}: document {} differs",
                p.name,
                l.id
            );
        }
    }
}

async fn pull_brings_every_sample_document(remote: &Remote) {
    seed_remote(remote, 250).await;
    let phone = remote.phone("pull").await;
    let r = phone.sync().await.unwrap();
    assert_eq!(r.pull.docs_read, 250);
    assert_eq!(r.pull.docs_written, 250);
    assert_eq!(r.pull.batches, 3, "batches of 100 like PouchDB");
    assert!(
        r.pull.bytes_downloaded > 250 * 100,
        "{}",
        r.pull.bytes_downloaded
    );
    // The first push looks at what was pulled and sends nothing back.
    assert_eq!(r.push.docs_read, 250);
    assert_eq!(r.push.docs_written, 0);
    assert_eq!(r.push.bytes_downloaded, 0);
    assert_converged(remote, &[&phone]).await;
}

async fn push_sends_new_documents(remote: &Remote) {
    let phone = remote.phone("push").await;
    for d in rewind_sample::docs(150, SEED + 1) {
        phone.create(d).await.unwrap();
    }
    let r = phone.sync().await.unwrap();
    assert_eq!(r.pull.docs_read, 0);
    assert_eq!(r.push.docs_read, 150);
    assert_eq!(r.push.docs_written, 150);
    assert_eq!(remote.store.info().await.unwrap().doc_count, 150);
    assert_converged(remote, &[&phone]).await;
}

async fn a_second_sync_transfers_only_new_changes(remote: &Remote) {
    let ids = seed_remote(remote, 120).await;
    let phone = remote.phone("incremental").await;
    phone.sync().await.unwrap();

    let again = phone.sync().await.unwrap();
    assert_eq!(
        (again.pull.docs_read, again.push.docs_read),
        (0, 0),
        "checkpoints hold: {again:?}"
    );
    assert_eq!(again.pull.bytes_downloaded, 0);

    let more: Vec<Value> = rewind_sample::docs(125, SEED).skip(120).collect();
    remote.store.bulk_docs(more, true).await.unwrap();
    for id in &ids[..3] {
        phone
            .edit(id, |d| d["edited_on_phone"] = json!(true))
            .await
            .unwrap();
    }
    let r = phone.sync().await.unwrap();
    assert_eq!((r.pull.docs_read, r.pull.docs_written), (5, 5));
    // The push sees the 5 pulled documents and the 3 edits, and sends the edits.
    assert_eq!((r.push.docs_read, r.push.docs_written), (8, 3));
    assert_converged(remote, &[&phone]).await;
    let server_doc = remote
        .store
        .get(&ids[0], &GetOptions::default())
        .await
        .unwrap()
        .into_doc()
        .unwrap();
    assert_eq!(server_doc["edited_on_phone"], json!(true));
}

async fn concurrent_edits_on_two_phones_conflict_and_everyone_agrees_on_the_winner(
    remote: &Remote,
) {
    let ids = seed_remote(remote, 10).await;
    let (a, b) = (remote.phone("a").await, remote.phone("b").await);
    a.sync().await.unwrap();
    b.sync().await.unwrap();
    let id = &ids[4];
    a.edit(id, |d| d["by"] = json!("a")).await.unwrap();
    b.edit(id, |d| d["by"] = json!("b")).await.unwrap();
    a.sync().await.unwrap();
    b.sync().await.unwrap();
    a.sync().await.unwrap();
    assert_converged(remote, &[&a, &b]).await;
    let server = leaves(&remote.store).await.unwrap();
    let doc = server.iter().find(|d| &d.id == id).unwrap();
    assert_eq!(
        doc.leaves.len(),
        2,
        "both edits are kept as leaves: {doc:?}"
    );
    assert!(doc.leaves.contains(&doc.winner));
    // The winner is CouchDB's: the higher revision hash at equal generation.
    assert_eq!(&doc.winner, doc.leaves.iter().max().unwrap());
    let conflicts = a
        .local
        .get(
            id,
            &GetOptions {
                conflicts: true,
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .into_doc()
        .unwrap();
    assert_eq!(conflicts["_conflicts"].as_array().map(Vec::len), Some(1));
}

async fn deletes_replicate_as_tombstones(remote: &Remote) {
    let ids = seed_remote(remote, 10).await;
    let (a, b) = (remote.phone("a").await, remote.phone("b").await);
    a.sync().await.unwrap();
    b.sync().await.unwrap();
    for id in &ids[..3] {
        a.delete(id).await.unwrap();
    }
    let r = a.sync().await.unwrap();
    assert_eq!(r.push.docs_written, 3);
    let r = b.sync().await.unwrap();
    assert_eq!(r.pull.docs_written, 3);
    assert_converged(remote, &[&a, &b]).await;
    let on_b = b.all_docs_with_leaves().await.unwrap();
    for id in &ids[..3] {
        let d = on_b.iter().find(|d| &d.id == id).unwrap();
        assert!(d.deleted, "{d:?}");
        assert!(d.winner.starts_with("2-"));
    }
    assert_eq!(remote.store.info().await.unwrap().doc_count, 7);
    assert_eq!(b.local.info().await.unwrap().doc_count, 7);
}

async fn attachment_data(store: &AnyStore, id: &str) -> Value {
    let doc = store
        .get(
            id,
            &GetOptions {
                attachments: true,
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .into_doc()
        .unwrap();
    doc["_attachments"]["note.txt"]["data"].clone()
}

async fn attachments_replicate_with_their_data(remote: &Remote) {
    let (a, b) = (remote.phone("a").await, remote.phone("b").await);
    // "hello attachment" in base64.
    let data = "aGVsbG8gYXR0YWNobWVudA==";
    a.create(json!({
        "_id": "with-att",
        "type": "data_record",
        "_attachments": {"note.txt": {"content_type": "text/plain", "data": data}},
    }))
    .await
    .unwrap();
    a.sync().await.unwrap();
    assert_eq!(
        attachment_data(&remote.store, "with-att").await,
        json!(data)
    );
    b.sync().await.unwrap();
    assert_eq!(attachment_data(&b.local, "with-att").await, json!(data));

    // An edit that keeps the attachment as a stub still carries it over.
    a.edit("with-att", |d| d["seen"] = json!(1)).await.unwrap();
    a.sync().await.unwrap();
    let r = b.sync().await.unwrap();
    assert_eq!(r.pull.docs_written, 1);
    assert_eq!(attachment_data(&b.local, "with-att").await, json!(data));
    assert_converged(remote, &[&a, &b]).await;
}

async fn checkpoints_survive_a_restart_of_the_phone(remote: &Remote) {
    seed_remote(remote, 130).await;
    let dir = TempDir::new();
    let path = dir.path().join("phone.db");
    {
        let phone = remote.phone_at("restart", &path).await;
        let r = phone.sync().await.unwrap();
        assert_eq!(r.pull.docs_written, 130);
    }
    let phone = remote.phone_at("restart", &path).await;
    let r = phone.sync().await.unwrap();
    assert_eq!((r.pull.docs_read, r.push.docs_read), (0, 0), "{r:?}");
    assert_ne!(r.pull.start_seq, json!(0));
    assert_converged(remote, &[&phone]).await;
}

async fn a_new_checkpoint_key_rescans_but_copies_nothing_twice(remote: &Remote) {
    seed_remote(remote, 40).await;
    let dir = TempDir::new();
    let local = rewind_store::open(&dir.path().join("l.db").display().to_string())
        .await
        .unwrap();
    let v1 = ReplicateOptions {
        checkpoint_key: "uuid-of-v1".into(),
        ..Default::default()
    };
    let first = replicate(&remote.store, &local, &v1).await.unwrap();
    assert_eq!((first.docs_read, first.docs_written), (40, 40));
    assert_eq!(
        first.replication_id,
        replication_id(&remote.store, &local, "uuid-of-v1")
    );
    let again = replicate(&remote.store, &local, &v1).await.unwrap();
    assert_eq!(again.docs_read, 0);
    let v2 = ReplicateOptions {
        checkpoint_key: "uuid-of-v2".into(),
        ..Default::default()
    };
    let switched = replicate(&remote.store, &local, &v2).await.unwrap();
    assert_eq!(switched.start_seq, json!(0));
    assert_eq!((switched.docs_read, switched.docs_written), (40, 0));
    assert_eq!(
        switched.bytes_downloaded, 0,
        "known revisions are not fetched"
    );
    // Both sides hold the checkpoint, in PouchDB's shape.
    for store in [&remote.store, &local] {
        let ck = store
            .get_local(&format!("_local/{}", switched.replication_id))
            .await
            .unwrap();
        assert_eq!(ck["last_seq"], switched.last_seq);
        assert!(ck["session_id"].is_string());
        assert_eq!(ck["history"][0]["session_id"], ck["session_id"]);
    }
}

async fn the_batch_size_is_configurable(remote: &Remote) {
    seed_remote(remote, 50).await;
    let mut phone = remote.phone("batches").await;
    phone.options.batch_size = 7;
    let r = phone.sync().await.unwrap();
    assert_eq!((r.pull.docs_read, r.pull.batches), (50, 8));
    assert_converged(remote, &[&phone]).await;
}

async fn a_checkpoint_on_one_side_only_restarts_from_zero(remote: &Remote) {
    seed_remote(remote, 20).await;
    let phone = remote.phone("lost").await;
    let r = phone.sync().await.unwrap();
    // The phone's store is wiped of its checkpoint (an app reinstall keeps
    // nothing): the server's checkpoint alone must not be trusted.
    let id = format!("_local/{}", r.pull.replication_id);
    phone.local.delete_local(&id, None).await.unwrap();
    let again = phone.sync().await.unwrap();
    assert_eq!(again.pull.start_seq, json!(0));
    assert_eq!((again.pull.docs_read, again.pull.docs_written), (20, 0));
}

both!(
    pull_brings_every_sample_document,
    push_sends_new_documents,
    a_second_sync_transfers_only_new_changes,
    concurrent_edits_on_two_phones_conflict_and_everyone_agrees_on_the_winner,
    deletes_replicate_as_tombstones,
    attachments_replicate_with_their_data,
    checkpoints_survive_a_restart_of_the_phone,
    a_new_checkpoint_key_rescans_but_copies_nothing_twice,
    the_batch_size_is_configurable,
    a_checkpoint_on_one_side_only_restarts_from_zero,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_names_its_checkpoints_after_the_servers_uuid() {
    let remote = Remote::pouch().await;
    let uuid = remote_uuid(&server_root(&remote.url).unwrap())
        .await
        .unwrap()
        .expect("pouchdb-server answers a uuid");
    // Without a shared handle: the phone opens the URL itself.
    let phone = Phone::new("uuid", &remote.url).await.unwrap();
    let r = phone.sync().await.unwrap();
    assert_eq!(
        r.pull.replication_id,
        replication_id(&remote.store, &phone.local, &uuid)
    );
    assert_eq!(
        r.push.replication_id,
        replication_id(&phone.local, &remote.store, &uuid)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_server_without_its_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://admin:s3cret@127.0.0.1:{port}/medic");
    let phone = Phone::new("offline", &url).await.unwrap();
    let err = phone.sync().await.unwrap_err().to_string();
    assert!(!err.contains("s3cret"), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    let err = remote_uuid(&server_root(&url).unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(!err.contains("s3cret"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_the_server_forbids_are_counted_and_the_rest_still_replicate() {
    let remote = Remote::pouch().await;
    remote
        .store
        .put(json!({
            "_id": "_design/guard",
            "validate_doc_update":
                "function (doc) { if (doc.secret) { throw({forbidden: 'no secrets here'}); } }",
        }))
        .await
        .unwrap();
    let phone = remote.phone("denied").await;
    phone.create(json!({"_id": "ok-1", "n": 1})).await.unwrap();
    phone
        .create(json!({"_id": "bad-1", "secret": true}))
        .await
        .unwrap();
    phone.create(json!({"_id": "ok-2", "n": 2})).await.unwrap();
    let r = phone.sync().await.unwrap();
    assert_eq!(r.push.docs_written, 2, "{r:?}");
    assert_eq!(r.push.doc_write_failures, 1);
    assert_eq!(r.push.failures[0].id, "bad-1");
    assert_eq!(r.push.failures[0].error, "forbidden");
    assert_eq!(remote.store.info().await.unwrap().doc_count, 3);
}
