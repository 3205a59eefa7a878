//! The journal: per migrated document, its before-images and complements.
//!
//! `journal:<doc id>` in the companion database holds
//! - `images`: a stack of before-images, one per upgrade that rewrote the
//!   document: the version range, the revision it replaced, the exact body
//!   text before, a hash of the body the upgrade wrote, and the run that
//!   wrote it (the gateway tells from it in which epochs the replaced
//!   revision could still have been a leaf). A rollback that
//!   finds the document still carrying that body restores the image byte for
//!   byte; otherwise the document was edited and is translated instead.
//!   A rollback's own image keeps the body it replaced, or only its hash
//!   when it restored the image below (which holds that body).
//! - `kept`: per migration, the complement the last translation kept (from
//!   `up` for `down`, or from `down` for `up`).

use rewind_lens::MigrationSet;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Members that describe a revision rather than the body.
const REVISION_MEMBERS: [&str; 5] = [
    "_rev",
    "_revisions",
    "_conflicts",
    "_deleted_conflicts",
    "_local_seq",
];

/// Before-images kept per document (older ones are dropped).
pub const MAX_IMAGES: usize = 8;

/// One before-image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Image {
    /// The version of `body`.
    pub from: u32,
    /// The version the upgrade wrote.
    pub to: u32,
    /// The revision the upgrade replaced.
    pub rev: String,
    /// [`body_hash`] of what the upgrade wrote.
    pub after: String,
    /// The body before, exactly as stored (without revision members);
    /// empty when `before` is set instead.
    pub body: String,
    /// The run that wrote it; `None` for a gateway's translation of a push
    /// (and in journals older than this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// [`body_hash`] of the body before, when the body itself is not kept:
    /// a rollback that restored the before-image of the upgrade below it
    /// keeps only the hash of the body it replaced (what the upgrade wrote,
    /// which that image's `after` names and its body recomputes), so that a
    /// walk down through it goes on to that image and the rollback writes
    /// a journal about as long as the upgrade's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<String>,
    /// The complements the translation of `rev` started from, for the
    /// migrations between `from` and `to` (a version missing had none;
    /// `None` in journals older than this field). An edit of `rev` (a
    /// phone's pushed revision, or one a run replaced that an offline phone
    /// still holds) is translated from them again: what the translation
    /// recorded in [`Journal::kept`] serves the way back, not the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept: Option<Map<String, Value>>,
}

impl Image {
    /// The body before, when it is kept (see [`Image::before`]).
    pub fn body_before(&self) -> Option<Value> {
        serde_json::from_str(&self.body).ok()
    }

    /// The body before when it is kept, and its [`body_hash`] (from
    /// `before` when only the hash is kept), reading the body once; `None`
    /// when neither can be read.
    pub fn read_before(&self) -> Option<(Option<Value>, String)> {
        let body = self.body_before();
        let hash = self
            .before
            .clone()
            .or_else(|| body.as_ref().map(body_hash))?;
        Some((body, hash))
    }

    /// [`body_hash`] of the body before (see [`Image::read_before`]).
    pub fn hash_before(&self) -> Option<String> {
        self.read_before().map(|(_, hash)| hash)
    }
}

/// A synthetic revision `rev` a gateway presented as a descendant of the
/// stored revision `base`, retired since (see [`Journal::retired`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RetiredCopy {
    /// The retired synthetic revision, as the phone pushed it back.
    pub rev: String,
    /// The stored revision it descends from.
    pub base: String,
    /// The synthetic revisions between `rev` and `base` (its parent first):
    /// the lower rungs of the ladder it was presented on. Empty when `rev`
    /// is a child of `base`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub between: Vec<String>,
    /// Presented in a state the server lost (a restore): the first such
    /// copy moved the document's presentation context.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lost: bool,
}

/// A document's journal.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Journal {
    /// Before-images, oldest first.
    #[serde(default)]
    pub images: Vec<Image>,
    /// Complements by migration version.
    #[serde(default)]
    pub kept: Map<String, Value>,
    /// Revisions adopted from phones after the server lost their base (a
    /// restore): copies of content that yield to any other leaf.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adopted: Vec<String>,
    /// Deletions phones pushed (as opposed to tombstones rewind wrote).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleted: Vec<String>,
    /// Revisions clients pushed at another version than the server's and
    /// that the gateway translated at once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pushed: Vec<String>,
    /// Synthetic copies phones pushed back that are no longer presented
    /// (an older context, or a state a restore lost) on a revision of a
    /// live branch: the gateway presents a tombstone for each next to the
    /// document, where a stored one would end the live branch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<RetiredCopy>,
    /// The journal document's revision, as read (for conditional writes).
    #[serde(rename = "_rev", skip_serializing_if = "Option::is_none", default)]
    pub rev: Option<String>,
}

/// The journal document id of a document.
pub fn journal_id(doc_id: &str) -> String {
    format!("journal:{doc_id}")
}

/// The document a journal document id ([`journal_id`]) names.
pub fn journaled_id(journal_id: &str) -> &str {
    journal_id.strip_prefix("journal:").unwrap_or(journal_id)
}

/// The body of a document: without its revision members.
pub fn body_of(doc: &Value) -> Value {
    let mut body = doc.clone();
    if let Some(object) = body.as_object_mut() {
        for member in REVISION_MEMBERS {
            object.shift_remove(member);
        }
    }
    body
}

/// The exact JSON text of a document's body (without its revision
/// members), as `serde_json::to_string(&body_of(doc))` gives it, without
/// copying the document.
pub fn body_text(doc: &Value) -> String {
    let Value::Object(map) = doc else {
        return serde_json::to_string(doc).unwrap_or_default();
    };
    let mut out: Vec<u8> = Vec::with_capacity(512);
    out.push(b'{');
    let mut first = true;
    for (key, value) in map {
        if REVISION_MEMBERS.contains(&key.as_str()) {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        let _ = serde_json::to_writer(&mut out, key);
        out.push(b':');
        let _ = serde_json::to_writer(&mut out, value);
    }
    out.push(b'}');
    String::from_utf8(out).unwrap_or_default()
}

/// How [`canonical`] writes numbers.
#[derive(Clone, Copy, PartialEq)]
enum Numbers {
    /// As the document's text has them (`34.0` and `34` differ).
    AsWritten,
    /// As a JavaScript client writes them back after parsing: by value
    /// (`34.0`, `34` and `3.4e1` are one number).
    AsJavaScript,
}

fn canonical(value: &Value, numbers: Numbers, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => canonical_members(map.iter(), numbers, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(item, numbers, out);
            }
            out.push(b']');
        }
        Value::Number(n) if numbers == Numbers::AsJavaScript => {
            let text = n.as_str();
            if rewind_lens::json_text::is_plain_integer(text) {
                // A double holds it exactly and writes it back alike.
                out.extend_from_slice(text.as_bytes());
                return;
            }
            match text.parse::<f64>() {
                // JSON.stringify writes -0 as 0.
                Ok(0.0) => out.push(b'0'),
                Ok(f) if f.is_finite() => {
                    use std::io::Write;
                    let _ = write!(out, "{f}");
                }
                _ => out.extend_from_slice(text.as_bytes()),
            }
        }
        other => {
            let _ = serde_json::to_writer(&mut *out, other);
        }
    }
}

/// An object's members in key order, as [`canonical`] writes them. Sorted
/// with their values, so no member is looked up by its key again.
fn canonical_members<'a>(
    members: impl Iterator<Item = (&'a String, &'a Value)>,
    numbers: Numbers,
    out: &mut Vec<u8>,
) {
    let mut members: Vec<(&String, &Value)> = members.collect();
    members.sort_unstable_by(|a, b| a.0.cmp(b.0));
    out.push(b'{');
    for (i, (key, value)) in members.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let _ = serde_json::to_writer(&mut *out, key);
        out.push(b':');
        canonical(value, numbers, out);
    }
    out.push(b'}');
}

/// The version the stored revision `rev` with body `body` is at: its
/// stamp; else the version a gateway journaled it at when a phone pushed it
/// unstamped ([`Journal::pushed_version`]); else 0. Never above the latest.
pub fn stored_version(set: &MigrationSet, journal: &Journal, rev: &str, body: &Value) -> u32 {
    set.stamp_of(body)
        .or_else(|| journal.pushed_version(rev))
        .unwrap_or(0)
        .min(set.latest())
}

/// Puts the stamp of `version` on a body that has none (the lens reads an
/// unstamped body as version 0 and would skip every step going down from
/// it), at the end of its members. A stamped body, or version 0, is left
/// as it is.
pub fn stamp_unstamped(set: &MigrationSet, body: &mut Value, version: u32) {
    if version == 0 || set.stamp_of(body).is_some() {
        return;
    }
    if let Some(object) = body.as_object_mut() {
        object.insert(set.stamp_field().to_owned(), Value::from(version));
    }
}

/// A hash of a document's body that ignores key order and revision members
/// (a server may reorder keys; the content is what matters). Numbers count
/// as written: journals compare it with what rewind itself wrote.
pub fn body_hash(doc: &Value) -> String {
    hash_with(doc, Numbers::AsWritten)
}

/// [`body_hash`] of the body as a JavaScript client (PouchDB) hands it
/// back: numbers by value, so a body stored with `"weight": 34.0` and the
/// phone's copy of it, which says `34`, hash alike. Revision ids derived
/// from bodies a phone may push back use it.
pub fn client_body_hash(doc: &Value) -> String {
    hash_with(doc, Numbers::AsJavaScript)
}

fn hash_with(doc: &Value, numbers: Numbers) -> String {
    let mut text = Vec::with_capacity(1024);
    match doc {
        // The body without copying the document: revision members skipped.
        Value::Object(map) => canonical_members(
            map.iter()
                .filter(|(k, _)| !REVISION_MEMBERS.contains(&k.as_str())),
            numbers,
            &mut text,
        ),
        other => canonical(other, numbers, &mut text),
    }
    // Hex by table: this runs for every view of every document a gateway
    // presents, and `write!` per byte cost ~2% of a pull's CPU.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(32);
    for b in Sha256::digest(&text).iter().take(16) {
        hex.push(DIGITS[usize::from(b >> 4)] as char);
        hex.push(DIGITS[usize::from(b & 15)] as char);
    }
    hex
}

impl Journal {
    /// The complement kept for migration `version`.
    pub fn kept_for(&self, version: u32) -> Option<Value> {
        self.kept.get(&version.to_string()).cloned()
    }

    /// Records (or with `None` forgets) the complement of migration `version`.
    pub fn keep(&mut self, version: u32, complement: Option<Value>) {
        match complement {
            Some(c) => {
                self.kept.insert(version.to_string(), c);
            }
            None => {
                self.kept.shift_remove(&version.to_string());
            }
        }
    }

    /// The version a gateway read revision `rev` at when a phone pushed it
    /// (its image of the push: `run: None`), if it journaled one. A phone
    /// whose app writes no stamp pushes its revisions unstamped; the
    /// gateway journals the version it read the revision at before storing
    /// it, so that readers never take such a body for version 0.
    pub fn pushed_version(&self, rev: &str) -> Option<u32> {
        self.images
            .iter()
            .find(|i| i.run.is_none() && i.rev == rev)
            .map(|i| i.from)
    }

    /// The complements of the migrations between `low` and `high` (each
    /// version above `low`, up to `high`), as [`Image::kept`] holds them.
    pub fn kept_between(&self, low: u32, high: u32) -> Map<String, Value> {
        (low + 1..=high)
            .filter_map(|v| self.kept_for(v).map(|c| (v.to_string(), c)))
            .collect()
    }

    /// Puts back, for a translation from version `from` to `to` of an edit
    /// of revision `rev`, the complements its content's own translations
    /// started from ([`Image::kept`]): for each migration between the two,
    /// those of the first image, from the newest image of `rev` on, that
    /// went the same way through it. False when no image did (an older
    /// journal, or a revision never translated): the complements stay.
    pub fn restore_kept_of(&mut self, rev: &str, from: u32, to: u32) -> bool {
        let Some(start) = self.images.iter().rposition(|i| i.rev == rev) else {
            return false;
        };
        let up = from < to;
        let found: Vec<(u32, Option<Value>)> = (from.min(to) + 1..=from.max(to))
            .filter_map(|v| {
                self.images[start..]
                    .iter()
                    .filter(|i| (i.from < i.to) == up && i.from != i.to)
                    .filter(|i| i.from.min(i.to) < v && v <= i.from.max(i.to))
                    .find_map(|i| i.kept.as_ref())
                    .map(|kept| (v, kept.get(&v.to_string()).cloned()))
            })
            .collect();
        let restored = !found.is_empty();
        for (v, complement) in found {
            self.keep(v, complement);
        }
        restored
    }

    /// Takes back what run `run` journaled for revision `rev` (its image,
    /// and the complements its translation from `from` to `to` replaced)
    /// when it journaled that revision before, going the same way: a crash
    /// came between the journal's write and the document's, and the
    /// resumed run now translates `rev` again. Without this the second translation
    /// would start from what the first one recorded for the way back (a
    /// name kept aside by the upgrade, gone when a killed rollback ran
    /// again). False when the run had not journaled `rev`.
    pub fn retake_run_image(&mut self, run: &str, rev: &str, from: u32, to: u32) -> bool {
        let Some(at) = self.images.iter().rposition(|i| {
            i.rev == rev && i.run.as_deref() == Some(run) && (i.from < i.to) == (from < to)
        }) else {
            return false;
        };
        self.restore_kept_of(rev, from, to);
        self.images.remove(at);
        true
    }

    /// Pushes a before-image, dropping the oldest beyond [`MAX_IMAGES`].
    pub fn push_image(&mut self, image: Image) {
        self.images.push(image);
        if self.images.len() > MAX_IMAGES {
            self.images.remove(0);
        }
    }

    /// True when the journal holds nothing.
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
            && self.kept.is_empty()
            && self.adopted.is_empty()
            && self.deleted.is_empty()
            && self.pushed.is_empty()
            && self.retired.is_empty()
    }
}

/// Adapts a journal to the lens's [`rewind_lens::Complements`].
pub struct JournalComplements<'a>(pub &'a mut Journal);

impl rewind_lens::Complements for JournalComplements<'_> {
    fn get(&mut self, version: u32) -> Option<Value> {
        self.0.kept_for(version)
    }
    fn put(&mut self, version: u32, complement: Option<Value>) {
        self.0.keep(version, complement);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pushed_revisions_starting_complements_come_back_for_its_edit() {
        let mut journal = Journal::default();
        journal.keep(4, Some(serde_json::json!({"ops": {"0": {"mk": 1}}})));
        journal.keep(5, Some(serde_json::json!({"ops": {"0": {"val": "A1"}}})));
        journal.keep(2, Some(serde_json::json!({"stamp": null})));
        let started = journal.kept_between(3, 7);
        assert_eq!(started.keys().collect::<Vec<_>>(), ["4", "5"]);
        journal.push_image(Image {
            from: 7,
            to: 3,
            rev: "1-phone".into(),
            after: "h".into(),
            body: "{}".into(),
            run: None,
            before: None,
            kept: Some(started),
        });
        // The translation recorded what the way back needs.
        journal.keep(5, None);
        journal.keep(6, Some(serde_json::json!({"ops": {}})));
        assert!(journal.restore_kept_of("1-phone", 7, 3));
        assert_eq!(
            journal.kept_for(5),
            Some(serde_json::json!({"ops": {"0": {"val": "A1"}}}))
        );
        assert_eq!(
            journal.kept_for(6),
            None,
            "had none when the translation started"
        );
        assert_eq!(
            journal.kept_for(2),
            Some(serde_json::json!({"stamp": null})),
            "outside the range"
        );
        assert!(!journal.restore_kept_of("1-other", 7, 3));
        assert!(
            !journal.restore_kept_of("1-phone", 3, 7),
            "the image went down, not up"
        );
    }

    #[test]
    fn a_run_translating_a_revision_again_starts_from_what_it_first_started_from() {
        let name = serde_json::json!({"ops": {"0": {"name": "Lan "}}});
        let mut journal = Journal::default();
        journal.keep(7, Some(name.clone()));
        let image = |run: &str| Image {
            from: 7,
            to: 0,
            rev: "2-upgraded".into(),
            after: "h".into(),
            body: "{}".into(),
            run: Some(run.into()),
            before: None,
            kept: Some(journal.kept_between(0, 7)),
        };
        let (first, other) = (image("rollback"), image("other"));
        journal.push_image(other);
        journal.push_image(first);
        // The killed attempt recorded what going up again would need.
        journal.keep(7, None);
        assert!(!journal.retake_run_image("another", "2-upgraded", 7, 0));
        assert!(
            !journal.retake_run_image("rollback", "2-upgraded", 0, 7),
            "the image went down"
        );
        assert!(!journal.retake_run_image("rollback", "3-other", 7, 0));
        assert_eq!(journal.kept_for(7), None);
        assert!(journal.retake_run_image("rollback", "2-upgraded", 7, 0));
        assert_eq!(journal.kept_for(7), Some(name));
        assert_eq!(journal.images.len(), 1, "its own image taken back");
        assert_eq!(journal.images[0].run.as_deref(), Some("other"));
    }

    #[test]
    fn body_text_is_the_body_serialized() {
        for text in [
            r#"{"_id":"a","_rev":"1-x","b":[1,2.50,1e400],"_revisions":{"start":1},"c":{"z":1,"a":"é\n"},"_conflicts":[]}"#,
            r#"{"_id":"a"}"#,
            r#"{"_rev":"1-x"}"#,
        ] {
            let doc: Value = serde_json::from_str(text).unwrap();
            assert_eq!(
                body_text(&doc),
                serde_json::to_string(&body_of(&doc)).unwrap()
            );
        }
    }

    /// The first implementation, which journals were written with.
    fn reference_body_hash(doc: &Value) -> String {
        fn canonical(value: &Value, out: &mut String) {
            match value {
                Value::Object(map) => {
                    let mut keys: Vec<&String> = map.keys().collect();
                    keys.sort();
                    out.push('{');
                    for (i, key) in keys.into_iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        out.push_str(&serde_json::to_string(key).unwrap_or_default());
                        out.push(':');
                        canonical(&map[key], out);
                    }
                    out.push('}');
                }
                Value::Array(items) => {
                    out.push('[');
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        canonical(item, out);
                    }
                    out.push(']');
                }
                other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
            }
        }
        let mut text = String::new();
        canonical(&body_of(doc), &mut text);
        Sha256::digest(text.as_bytes())
            .iter()
            .take(16)
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn body_hash_is_stable() {
        // Hashes the gateway compares with journals written before: they
        // must not change.
        let doc: Value = serde_json::from_str(
            r#"{"_id":"a","_rev":"1-x","b":[1,2.50,1e400,null,true],"c":{"z":1,"a":"é\n"},"_conflicts":[]}"#,
        )
        .unwrap();
        let mut reordered: Value = serde_json::from_str(
            r#"{"c":{"a":"é\n","z":1},"_id":"a","b":[1,2.50,1e400,null,true]}"#,
        )
        .unwrap();
        assert_eq!(body_hash(&doc), body_hash(&reordered));
        assert_eq!(body_hash(&doc), reference_body_hash(&doc));
        for text in [
            r#"[1,{"b":2,"a":1}]"#,
            r#""s""#,
            r#"{}"#,
            r#"{"_rev":"1-a","_deleted":true}"#,
        ] {
            let v: Value = serde_json::from_str(text).unwrap();
            assert_eq!(body_hash(&v), reference_body_hash(&v), "{text}");
        }
        reordered["b"][0] = Value::from(2);
        assert_ne!(body_hash(&doc), body_hash(&reordered));
    }

    #[test]
    fn integers_are_written_as_their_double_formats_them() {
        // The fast path for integers must write what the double's
        // formatting writes: synthetic ids phones hold derive from it.
        for text in [
            "0",
            "-0",
            "7",
            "-15",
            "100",
            "999999999999999",
            "-999999999999999",
            "1000000000000000",
            "123456789012345678",
            "12345678901234567890",
        ] {
            let n: serde_json::Number = serde_json::from_str(text).unwrap();
            let mut fast = Vec::new();
            canonical(&Value::Number(n), Numbers::AsJavaScript, &mut fast);
            let f: f64 = text.parse().unwrap();
            let slow = if f == 0.0 {
                "0".to_owned()
            } else {
                format!("{f}")
            };
            assert_eq!(String::from_utf8(fast).unwrap(), slow, "{text}");
        }
    }

    #[test]
    fn client_body_hash_counts_numbers_by_value() {
        // PouchDB parses `34.0` and writes back `34`: a phone's copy of a
        // body must hash like the body it was given.
        let stored: Value = serde_json::from_str(
            r#"{"_id":"a","w":34.0,"t":[2.50,-0.0,1e2],"n":12345678901234567890}"#,
        )
        .unwrap();
        let from_phone: Value =
            serde_json::from_str(r#"{"w":34,"t":[2.5,0,100],"_id":"a","n":12345678901234567000}"#)
                .unwrap();
        assert_eq!(client_body_hash(&stored), client_body_hash(&from_phone));
        assert_ne!(body_hash(&stored), body_hash(&from_phone));
        let edited: Value = serde_json::from_str(
            r#"{"w":34.5,"t":[2.5,0,100],"_id":"a","n":12345678901234567000}"#,
        )
        .unwrap();
        assert_ne!(client_body_hash(&stored), client_body_hash(&edited));
        // Out of a double's range, the text is kept.
        let huge: Value = serde_json::from_str(r#"{"x":1e400}"#).unwrap();
        let other: Value = serde_json::from_str(r#"{"x":2e400}"#).unwrap();
        assert_ne!(client_body_hash(&huge), client_body_hash(&other));
    }
}
