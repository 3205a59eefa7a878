//! `rewind serve` tells its operator about the requests it failed: each
//! 5xx of its own is written to standard error, with method, path, status
//! and reason; the client's own mistakes (4xx) are not.

use std::time::{Duration, Instant};

use rewind_testkit::{http_request, Gateway};

fn request(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    http_request(port, method, path, "", body)
}

/// `rewind serve` run in `dir` on the embedded stores in `data`, with
/// examples/cht's migrations.
fn serve_cht(dir: &std::path::Path, data: &std::path::Path) -> Gateway {
    let migrations = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/cht");
    Gateway::serve_embedded(env!("CARGO_BIN_EXE_rewind"), dir, data, &migrations)
}

/// A migration whose step throws on a document that has `boom`.
const FAILING_STEP: &str = r#"description: Adds `seen`; throws on a document that has `boom`.
when: {seen: {$exists: false}}
up:
  - custom:
      up: |
        function up(doc, kept, keep) {
          if (doc.boom) throw new Error('boom');
          return Object.assign({}, doc, {seen: true});
        }
      down: |
        function down(doc, kept, keep) {
          const out = Object.assign({}, doc);
          delete out.seen;
          return out;
        }
when_after: {seen: {$exists: true}}
"#;

#[test]
fn a_failed_translation_is_logged_and_answered_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let migrations = dir.path().join("migrations");
    std::fs::create_dir_all(&migrations).unwrap();
    std::fs::write(migrations.join("0001-boom.yaml"), FAILING_STEP).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let gateway =
        Gateway::serve_embedded(env!("CARGO_BIN_EXE_rewind"), dir.path(), &data, &migrations);
    let port = gateway.port;
    assert_eq!(request(port, "PUT", "/medic", "").0, 201);
    assert_eq!(request(port, "PUT", "/medic/fine", r#"{"a":1}"#).0, 201);
    assert_eq!(
        request(port, "PUT", "/medic/bad", r#"{"boom":true}"#).0,
        201
    );

    let (status, body) = request(port, "GET", "/v/1/medic/fine", "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""seen":true"#), "{body}");
    let (status, body) = request(port, "GET", "/v/1/medic/bad?revs=true", "");
    assert_eq!(status, 500, "{body}");
    assert!(body.contains(r#""error":"translation_failed""#), "{body}");
    assert!(body.contains("boom"), "{body}");
    let (status, _) = request(port, "GET", "/v/9/medic", "");
    assert_eq!(status, 400);

    // The line comes from another thread of the test: wait for it.
    let logged = "rewind serve: GET /v/1/medic/bad: 500 translation_failed: ";
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gateway.stderr().contains(logged) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let said = gateway.stderr();
    assert!(said.contains(logged), "not logged:\n{said}");
    let line = said.lines().find(|l| l.contains(logged)).unwrap();
    assert!(line.contains("boom"), "the reason: {line}");
    assert!(
        !line.contains("revs=true"),
        "the query is not logged: {line}"
    );
    assert!(
        !said.contains("/v/9/"),
        "a client's 400 was logged:\n{said}"
    );
    assert!(
        !said.contains("/v/1/medic/fine"),
        "a success was logged:\n{said}"
    );
}

/// A data directory that does not exist is made, and said (a mistyped
/// path would otherwise serve an empty set of databases in silence).
#[test]
fn a_missing_data_directory_is_made_and_said() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("not-yet");
    let gateway = serve_cht(dir.path(), &data);
    assert!(data.is_dir(), "the data directory was not made");
    let said = gateway.stderr();
    assert!(
        said.contains(&format!(
            "made {}, which holds no database yet",
            data.display()
        )),
        "{said}"
    );
    // No [[users]]: the operator is told the gateway is open (a line
    // after the one the gateway was waited for).
    let open = "no [[users]] in rewind.toml: every request is served as an admin \
                (anyone on this machine";
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gateway.stderr().contains(open) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(gateway.stderr().contains(open), "{}", gateway.stderr());
    let (status, body) = request(gateway.port, "GET", "/_all_dbs", "");
    assert_eq!((status, body.trim()), (200, "[]"));
    drop(gateway);
    // An existing one is served without a word about it.
    let again = serve_cht(dir.path(), &data);
    assert!(!again.stderr().contains("made "), "{}", again.stderr());
}

/// A write the store refuses for one document (a stub naming an
/// attachment it does not have) is answered as CouchDB answers it, with
/// that refusal's own status, error and reason, and writes nothing: by
/// `PUT`, `PUT ?new_edits=false` and in `_bulk_docs`' per-document answer.
#[test]
fn a_refused_document_is_answered_with_its_own_couchdb_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let gateway = serve_cht(dir.path(), &data);
    let port = gateway.port;
    assert_eq!(request(port, "PUT", "/medic", "").0, 201);
    let (status, body) = request(port, "PUT", "/medic/d", r#"{"a":1}"#);
    assert_eq!(status, 201, "{body}");
    let written: serde_json::Value = serde_json::from_str(&body).unwrap();
    let rev = written["rev"].as_str().unwrap().to_owned();
    let stub = r#""_attachments":{"x.txt":{"stub":true}}"#;
    let refused = |status: u16, body: &str| {
        assert_eq!(status, 412, "{body}");
        assert!(body.contains(r#""error":"missing_stub""#), "{body}");
        assert!(body.contains(r#"attachment stub \"x.txt\""#), "{body}");
        assert!(
            !body.contains(r#"{\"id\""#),
            "a refusal inside a refusal: {body}"
        );
    };
    let (status, body) = request(
        port,
        "PUT",
        &format!("/medic/d?rev={rev}"),
        &format!("{{{stub}}}"),
    );
    refused(status, &body);
    let (status, body) = request(
        port,
        "PUT",
        "/medic/e?new_edits=false",
        &format!(r#"{{"_rev":"1-abc",{stub}}}"#),
    );
    refused(status, &body);
    let (status, body) = request(
        port,
        "POST",
        "/medic/_bulk_docs",
        &format!(r#"{{"docs":[{{"_id":"d","_rev":"{rev}",{stub}}}]}}"#),
    );
    assert_eq!(status, 201, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer[0]["error"], "missing_stub", "{body}");
    // Nothing was written.
    let (_, body) = request(port, "GET", "/medic/d", "");
    assert!(body.contains(&rev), "{body}");
    assert_eq!(request(port, "GET", "/medic/e", "").0, 404);
}
