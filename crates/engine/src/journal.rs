//! The journal: per migrated document, its before-images and complements.
//!
//! `journal:<doc id>` in the companion database holds
//! - `images`: a stack of before-images, one per upgrade that rewrote the
//!   document: the version range, the revision it replaced, the exact body
//!   text before, and a hash of the body the upgrade wrote. A rollback that
//!   finds the document still carrying that body restores the image byte for
//!   byte; otherwise the document was edited and is translated instead.
//! - `kept`: per migration, the complement the last translation kept (from
//!   `up` for `down`, or from `down` for `up`).

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
    /// The body before, exactly as stored (without revision members).
    pub body: String,
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
    /// The journal document's revision, as read (for conditional writes).
    #[serde(rename = "_rev", skip_serializing_if = "Option::is_none", default)]
    pub rev: Option<String>,
}

/// The journal document id of a document.
pub fn journal_id(doc_id: &str) -> String {
    format!("journal:{doc_id}")
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

/// A hash of a document's body that ignores key order and revision members
/// (a server may reorder keys; the content is what matters).
pub fn body_hash(doc: &Value) -> String {
    let mut text = String::new();
    canonical(&body_of(doc), &mut text);
    Sha256::digest(text.as_bytes())
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
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
