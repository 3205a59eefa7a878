//! Taking documents apart (metadata, body, attachments) and putting them back together.

use base64::Engine as _;
use serde_json::{Map, Value};

use crate::error::{Result, StoreError};
use crate::rev::{rev_path, Rev};

/// A document as written, split into its parts and validated.
#[derive(Debug, Clone)]
pub(crate) struct ParsedDoc {
    pub id: String,
    /// `_rev` (the parent with `new_edits=true`, the revision itself with `false`).
    pub rev: Option<Rev>,
    /// With `new_edits=false`: the path `_rev` + `_revisions` describe, newest first.
    pub path: Vec<Rev>,
    pub deleted: bool,
    /// The body without special members, serialized exactly as given.
    pub body: String,
    pub atts: Vec<(String, AttIn)>,
    /// With `new_edits=true`, the new revision when its parent is `rev`,
    /// computed by whoever made the document (off the writer's lock).
    pub child: Option<Rev>,
}

/// One attachment as written.
#[derive(Debug, Clone)]
pub(crate) enum AttIn {
    /// New data (base64 `data` decoded).
    Inline {
        content_type: String,
        data: Vec<u8>,
        revpos: Option<u64>,
    },
    /// `stub: true`: keep what an earlier revision had.
    Stub { digest: Option<String> },
}

const IGNORED_SPECIALS: [&str; 4] = [
    "_conflicts",
    "_deleted_conflicts",
    "_revs_info",
    "_local_seq",
];

/// Checks a document id: a non-empty string; ids starting with `_` must be
/// `_design/...` or `_local/...`.
pub(crate) fn check_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(StoreError::bad("document id must not be empty"));
    }
    if id.starts_with('_') && !id.starts_with("_design/") && !id.starts_with("_local/") {
        return Err(StoreError::bad(format!(
            "invalid document id {id:?}: only _design/ and _local/ ids may start with an underscore"
        )));
    }
    Ok(())
}

/// A document's `_id`, `_rev` and `_deleted`, as [`specials`] reads them.
struct Specials<'a> {
    id: Option<&'a str>,
    rev: Option<Rev>,
    deleted: bool,
}

/// Reads and checks the special members of a document other than
/// `_revisions` and `_attachments` (skipped: the caller reads them); members
/// `bulk_docs` ignores are allowed, any other special member is an error.
fn specials(map: &Map<String, Value>) -> Result<Specials<'_>> {
    let mut out = Specials {
        id: None,
        rev: None,
        deleted: false,
    };
    for (k, v) in map {
        if !k.starts_with('_') {
            continue;
        }
        match k.as_str() {
            "_id" => match v {
                Value::String(s) => out.id = Some(s),
                _ => return Err(StoreError::bad("_id must be a string")),
            },
            "_rev" => match v {
                Value::String(s) => out.rev = Some(s.parse::<Rev>()?),
                Value::Null => {}
                _ => return Err(StoreError::bad("_rev must be a string")),
            },
            "_deleted" => match v {
                Value::Bool(b) => out.deleted = *b,
                Value::Null => {}
                _ => return Err(StoreError::bad("_deleted must be true or false")),
            },
            "_revisions" | "_attachments" => {}
            k if IGNORED_SPECIALS.contains(&k) => {}
            _ => return Err(StoreError::bad(format!("bad special document member: {k}"))),
        }
    }
    Ok(out)
}

/// Checks `doc` as `bulk_docs` checks each document before writing any
/// (special members, id, revision and its history, attachments), writing
/// nothing: `Err` says why the store would refuse the request. A caller
/// that writes elsewhere before the document (a journal) checks first.
pub fn check_writable(doc: &Value, new_edits: bool) -> Result<()> {
    parse_doc(doc.clone(), new_edits).map(|_| ())
}

/// Splits and validates one document of a `bulk_docs` request.
pub(crate) fn parse_doc(doc: Value, new_edits: bool) -> Result<ParsedDoc> {
    let Value::Object(mut map) = doc else {
        return Err(StoreError::bad("a document must be a JSON object"));
    };
    // The members that are taken whole; the body is then written from the
    // map as it is, without building a second map.
    let revisions = map.shift_remove("_revisions");
    let atts_raw = map.shift_remove("_attachments");
    let Specials { id, rev, deleted } = specials(&map)?;
    let id = match id.map(str::to_owned) {
        Some(id) => id,
        None if new_edits => new_uuid(),
        None => {
            return Err(StoreError::bad(
                "a document written with new_edits=false needs an _id",
            ))
        }
    };
    check_id(&id)?;
    let path = match (&rev, new_edits) {
        (Some(rev), false) => rev_path(rev, revisions.as_ref())
            .map_err(|e| StoreError::bad(format!("document {id}: {}", e.couch_error().1)))?,
        (None, false) => {
            return Err(StoreError::bad(format!(
                "document {id}: new_edits=false needs a _rev"
            )))
        }
        _ => Vec::new(),
    };
    let atts = match atts_raw {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(m)) => m
            .into_iter()
            .map(|(name, a)| parse_att(&id, &name, a).map(|a| (name, a)))
            .collect::<Result<_>>()?,
        Some(_) => {
            return Err(StoreError::bad(format!(
                "document {id}: _attachments must be an object"
            )))
        }
    };
    let body = body_text(&map)?;
    Ok(ParsedDoc {
        id,
        rev,
        path,
        deleted,
        body,
        atts,
        child: None,
    })
}

/// The members of `map` not starting with `_`, as compact JSON text (what
/// `serde_json::to_string` gives for a map of only those members).
fn body_text(map: &Map<String, Value>) -> Result<String> {
    let mut out: Vec<u8> = Vec::with_capacity(512);
    out.push(b'{');
    let mut first = true;
    for (k, v) in map {
        if k.starts_with('_') {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        serde_json::to_writer(&mut out, k).map_err(|e| StoreError::Internal(e.to_string()))?;
        out.push(b':');
        serde_json::to_writer(&mut out, v).map_err(|e| StoreError::Internal(e.to_string()))?;
    }
    out.push(b'}');
    String::from_utf8(out).map_err(|e| StoreError::Internal(e.to_string()))
}

/// Checks that `body` is the text of a JSON object none of whose members
/// starts with `_` (a body as `parse_doc` makes it).
pub(crate) fn check_plain_body(body: &str) -> std::result::Result<(), String> {
    use serde::de::{Deserializer, Error as _, IgnoredAny, MapAccess, Visitor};

    struct Plain;
    impl<'de> Visitor<'de> for Plain {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
            while let Some(key) = map.next_key::<String>()? {
                if key.starts_with('_') {
                    return Err(A::Error::custom(format!(
                        "the body has a special member {key}"
                    )));
                }
                map.next_value::<IgnoredAny>()?;
            }
            Ok(())
        }
    }
    let mut de = serde_json::Deserializer::from_str(body);
    de.deserialize_map(Plain).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())
}

fn parse_att(id: &str, name: &str, a: Value) -> Result<AttIn> {
    let bad = |why: &str| StoreError::bad(format!("document {id}: attachment {name:?}: {why}"));
    let Value::Object(a) = a else {
        return Err(bad("must be an object"));
    };
    if a.get("stub").and_then(Value::as_bool) == Some(true) {
        return Ok(AttIn::Stub {
            digest: a.get("digest").and_then(Value::as_str).map(str::to_owned),
        });
    }
    let data = a
        .get("data")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("needs base64 `data` or `stub: true`"))?;
    let data = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| bad(&format!("data is not base64: {e}")))?;
    let content_type = a
        .get("content_type")
        .and_then(Value::as_str)
        .unwrap_or("application/octet-stream")
        .to_owned();
    Ok(AttIn::Inline {
        content_type,
        data,
        revpos: a.get("revpos").and_then(Value::as_u64),
    })
}

/// CouchDB's attachment digest: `md5-` + base64 of the md5 of the data.
pub fn digest(data: &[u8]) -> String {
    format!(
        "md5-{}",
        base64::engine::general_purpose::STANDARD.encode(md5::compute(data).0)
    )
}

/// Base64 for inline attachment data.
pub(crate) fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// The metadata of a stored attachment: `{content_type, digest, length, revpos}`.
pub(crate) fn att_meta(content_type: &str, digest: &str, length: u64, revpos: u64) -> Value {
    serde_json::json!({ "content_type": content_type, "digest": digest, "length": length, "revpos": revpos })
}

/// A random document id (32 hex characters), as CouchDB makes for documents without `_id`.
pub(crate) fn new_uuid() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::with_capacity(32);
    for _ in 0..2 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

/// Extra members added around a stored body when a document is read.
#[derive(Default)]
pub(crate) struct Extras {
    pub deleted: bool,
    pub attachments: Option<Map<String, Value>>,
    pub conflicts: Option<Vec<String>>,
    pub revisions: Option<Value>,
}

/// Puts a document back together: `_id`, `_rev`, the stored body members in
/// their order, then `_deleted`, `_attachments`, `_conflicts`, `_revisions`.
pub(crate) fn assemble(id: &str, rev: &str, body: &str, extras: Extras) -> Result<Value> {
    let stored: Map<String, Value> = serde_json::from_str(body).map_err(|e| {
        StoreError::Internal(format!("document {id} {rev}: stored body unreadable: {e}"))
    })?;
    let mut out = Map::with_capacity(stored.len() + 4);
    out.insert("_id".into(), Value::from(id));
    out.insert("_rev".into(), Value::from(rev));
    out.extend(stored);
    if extras.deleted {
        out.insert("_deleted".into(), Value::Bool(true));
    }
    if let Some(a) = extras.attachments.filter(|a| !a.is_empty()) {
        out.insert("_attachments".into(), Value::Object(a));
    }
    if let Some(c) = extras.conflicts.filter(|c| !c.is_empty()) {
        out.insert(
            "_conflicts".into(),
            c.into_iter().map(Value::from).collect(),
        );
    }
    if let Some(r) = extras.revisions {
        out.insert("_revisions".into(), r);
    }
    Ok(Value::Object(out))
}

/// A new revision of a document whose body is already JSON text, written by
/// [`crate::SqliteStore::bulk_docs_text`] as it is, without building a
/// document and serializing it again. Built only by constructors that check
/// it, so the store trusts it: a valid id (not `_local/`), a valid revision
/// if any, and a body that is the text of a JSON object with no member
/// starting with `_` (so no attachments and no deletion).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextDoc {
    id: String,
    rev: Option<Rev>,
    body: String,
    /// The revision this edit of `rev` makes (hashed when the document is
    /// made, on the caller's thread rather than in the write transaction).
    child: Rev,
}

impl TextDoc {
    /// Checks and wraps a body already serialized; `rev` is the revision
    /// edited (`None`: a new document). Fails with `BadRequest` for a bad or
    /// `_local/` id, a bad revision, or a body that is not a plain object's
    /// text.
    pub fn new(id: String, rev: Option<&str>, body: String) -> Result<TextDoc> {
        check_id(&id)?;
        if id.starts_with("_local/") {
            return Err(StoreError::bad(format!(
                "document {id}: _local documents cannot be written as text"
            )));
        }
        check_plain_body(&body).map_err(|e| StoreError::bad(format!("document {id}: {e}")))?;
        let rev = rev.map(str::parse::<Rev>).transpose()?;
        Ok(TextDoc::checked(id, rev, body))
    }

    /// The document `doc` as text: its members not starting with `_`,
    /// serialized as `bulk_docs` stores them, edited from its `_rev`.
    /// `None` when it is not that simple: not an object, no valid `_id`, a
    /// `_local/` id, a bad `_rev`, attachments, a deletion, or another
    /// special member than the ones `bulk_docs` ignores; such a document is
    /// written as a value (which reports what is wrong with it).
    pub fn from_doc(doc: &Value) -> Option<TextDoc> {
        let Value::Object(map) = doc else {
            return None;
        };
        if !map.get("_attachments").is_none_or(Value::is_null) {
            return None;
        }
        let Specials { id, rev, deleted } = specials(map).ok()?;
        let id = id.filter(|id| !deleted && !id.starts_with("_local/"))?;
        check_id(id).ok()?;
        Some(TextDoc::checked(id.to_owned(), rev, body_text(map).ok()?))
    }

    fn checked(id: String, rev: Option<Rev>, body: String) -> TextDoc {
        let child = Rev::child_of(rev.as_ref(), false, &body, "");
        TextDoc {
            id,
            rev,
            body,
            child,
        }
    }

    /// The document id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The length of the document's JSON text with its `_id` and `_rev`
    /// (`{"_id":…,"_rev":…,…}`), as `json_len` counts a document.
    pub fn json_len(&self) -> u64 {
        let mut len = 1 + 6 + serialized_len(&self.id);
        if let Some(rev) = &self.rev {
            len += 1 + 7 + serialized_len(&rev.to_string());
        }
        // The body's members after a comma, or the closing brace alone.
        len + if self.body == "{}" {
            1
        } else {
            self.body.len() as u64
        }
    }
}

impl From<TextDoc> for ParsedDoc {
    fn from(doc: TextDoc) -> ParsedDoc {
        ParsedDoc {
            id: doc.id,
            rev: doc.rev,
            path: Vec::new(),
            deleted: false,
            body: doc.body,
            atts: Vec::new(),
            child: Some(doc.child),
        }
    }
}

/// The length of a value's JSON text (as `serde_json` writes it), counted
/// without building the text.
pub fn json_len(value: &Value) -> u64 {
    serialized_len(value)
}

fn serialized_len(value: &(impl serde::Serialize + ?Sized)) -> u64 {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_len_counts_serialized_bytes() {
        let v = serde_json::json!({"a": "é", "n": 1, "big": 12345678901234567890u64});
        assert_eq!(json_len(&v), serde_json::to_vec(&v).unwrap().len() as u64);
    }

    #[test]
    fn body_keeps_key_order_and_big_numbers() {
        let text = r#"{"z":1,"_id":"a","big":12345678901234567890,"f":1.10,"a":{"y":1,"x":2}}"#;
        let p = parse_doc(serde_json::from_str(text).unwrap(), true).unwrap();
        assert_eq!(
            p.body,
            r#"{"z":1,"big":12345678901234567890,"f":1.10,"a":{"y":1,"x":2}}"#
        );
        let back = assemble("a", "1-ab", &p.body, Extras::default()).unwrap();
        assert_eq!(
            serde_json::to_string(&back).unwrap(),
            r#"{"_id":"a","_rev":"1-ab","z":1,"big":12345678901234567890,"f":1.10,"a":{"y":1,"x":2}}"#
        );
    }

    #[test]
    fn body_text_is_the_map_of_plain_members_serialized() {
        for text in [
            r#"{"_id":"a","z":[1,2.50,1e400],"_rev":"1-ab","c":{"_y":1,"a":"é\n\u0001"},"_deleted":true}"#,
            r#"{"_id":"a"}"#,
            r#"{"a":null,"_conflicts":[],"b":{}}"#,
        ] {
            let Value::Object(map) = serde_json::from_str(text).unwrap() else {
                unreachable!()
            };
            let plain: Map<String, Value> = map
                .iter()
                .filter(|(k, _)| !k.starts_with('_'))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            assert_eq!(
                body_text(&map).unwrap(),
                serde_json::to_string(&Value::Object(plain)).unwrap()
            );
        }
    }

    #[test]
    fn a_text_doc_is_what_parse_doc_makes_of_a_plain_document() {
        for text in [
            r#"{"_id":"a","_rev":"2-ab","z":[1,2.50,1e400],"c":{"_y":1,"a":"é\n\u0001"}}"#,
            r#"{"z":1,"_id":"a\"b","_conflicts":["1-x"],"_revisions":{"start":1,"ids":["ab"]}}"#,
            r#"{"_id":"_design/x","_rev":null,"_deleted":false}"#,
        ] {
            let doc: Value = serde_json::from_str(text).unwrap();
            let from_text = TextDoc::from_doc(&doc).expect(text);
            let parsed = parse_doc(doc.clone(), true).unwrap();
            assert_eq!(from_text.id(), parsed.id);
            assert_eq!(from_text.rev, parsed.rev, "{text}");
            assert_eq!(from_text.body, parsed.body, "{text}");
            // Its length: the document with only `_id`, `_rev` and the body.
            let mut only = Map::new();
            only.insert("_id".into(), Value::from(parsed.id.clone()));
            if let Some(rev) = &parsed.rev {
                only.insert("_rev".into(), Value::from(rev.to_string()));
            }
            let Value::Object(body) = serde_json::from_str(&parsed.body).unwrap() else {
                unreachable!()
            };
            only.extend(body);
            assert_eq!(
                from_text.json_len(),
                json_len(&Value::Object(only)),
                "{text}"
            );
            let checked = TextDoc::new(
                parsed.id.clone(),
                parsed.rev.map(|r| r.to_string()).as_deref(),
                parsed.body.clone(),
            )
            .unwrap();
            assert_eq!(checked, from_text);
        }
        // What is not that simple is left to `parse_doc` (and its errors).
        for text in [
            r#"{"_id":"a","_deleted":true}"#,
            r#"{"_id":"a","_attachments":{"f":{"stub":true}}}"#,
            r#"{"_id":"a","_foo":1}"#,
            r#"{"_id":"a","_rev":"x"}"#,
            r#"{"_id":"_bad"}"#,
            r#"{"_id":"_local/a"}"#,
            r#"{"a":1}"#,
            "[1]",
        ] {
            let doc: Value = serde_json::from_str(text).unwrap();
            assert_eq!(TextDoc::from_doc(&doc), None, "{text}");
        }
        for (id, rev, body) in [
            ("a", None, r#"{"_id":"a"}"#),
            ("a", Some("x"), "{}"),
            ("_local/a", None, "{}"),
            ("", None, "{}"),
            ("a", None, "[1]"),
        ] {
            assert!(
                TextDoc::new(id.into(), rev, body.into()).is_err(),
                "{id} {body}"
            );
        }
    }

    #[test]
    fn plain_bodies_are_objects_without_special_members() {
        assert!(check_plain_body(r#"{"a":{"_b":1},"c":[1e400]}"#).is_ok());
        assert!(check_plain_body("{}").is_ok());
        for bad in [r#"{"_id":"a"}"#, "[1]", "{", r#"{"a":1} x"#, r#""s""#] {
            assert!(check_plain_body(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_special_members_and_bad_ids_are_refused() {
        assert!(parse_doc(serde_json::json!({"_id": "a", "_foo": 1}), true).is_err());
        assert!(parse_doc(serde_json::json!({"_id": "_bad"}), true).is_err());
        assert!(parse_doc(serde_json::json!({"_id": "a", "_rev": "nope"}), true).is_err());
        assert!(parse_doc(serde_json::json!([1]), true).is_err());
        assert!(parse_doc(serde_json::json!({"_id": "a"}), false).is_err());
    }
}
