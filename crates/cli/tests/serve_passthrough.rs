//! `rewind serve --couch`: requests the gateway does not need to understand
//! (views, an app server's own endpoints) pass straight through upstream.

use rewind_store::Store;
use rewind_testkit::{http_get, Gateway, PouchServer};
use serde_json::json;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_and_unknown_endpoints_pass_through_to_couchdb() {
    let couch = PouchServer::start();
    let store = rewind_store::open(&couch.db_url("medic")).await.unwrap();
    store.create_db().await.unwrap();
    store
        .bulk_docs(
            vec![
                json!({"_id": "a", "type": "person"}),
                json!({"_id": "_design/app", "views": {"by_type": {"map": "function (doc) { emit(doc.type, 1); }"}}}),
            ],
            true,
        )
        .await
        .unwrap();
    let migrations = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/cht");
    let mut serve = Command::new(env!("CARGO_BIN_EXE_rewind"));
    serve
        .arg("serve")
        .arg("--couch")
        .arg(&couch.url)
        .arg("--migrations")
        .arg(&migrations);
    let gateway = Gateway::spawn(serve);
    let port = gateway.port;
    let view =
        tokio::task::spawn_blocking(move || http_get(port, "/medic/_design/app/_view/by_type"))
            .await
            .unwrap()
            .expect("the view answers through the gateway");
    assert!(view.contains("\"key\":\"person\""), "{view}");
    // With a version and a device named in the path, both are dropped from
    // what goes upstream.
    let named = tokio::task::spawn_blocking(move || {
        http_get(port, "/v/3/_device/phone-1/medic/_design/app/_view/by_type")
    })
    .await
    .unwrap()
    .expect("the view answers through a named device's URL");
    // (The bodies: the `date` headers differ when a second turns between.)
    let body = |response: &str| response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
    assert_eq!(body(&named), body(&view));
    assert!(named.starts_with("HTTP/1.0 200"), "{named}");
    let unknown = tokio::task::spawn_blocking(move || http_get(port, "/api/v1/settings"))
        .await
        .unwrap()
        .unwrap_or_default();
    assert!(
        unknown.contains("not_found") || unknown.contains("error"),
        "upstream's answer comes back: {unknown}"
    );
}
