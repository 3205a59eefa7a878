//! Dotted paths into JSON documents (`fields.patient_id`).
//!
//! A path segment addresses an object member. Arrays are not indexed: a
//! migration that needs to reach into arrays uses a `custom` step.

use serde_json::{Map, Value};
use std::fmt;

/// A dotted path such as `fields.patient_id`, split into its segments.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FieldPath(Vec<String>);

impl FieldPath {
    /// Parses a dotted path; `None` when it is empty or has an empty segment.
    pub fn parse(text: &str) -> Option<FieldPath> {
        if text.is_empty() {
            return None;
        }
        let segments: Vec<String> = text.split('.').map(str::to_owned).collect();
        if segments.iter().any(String::is_empty) {
            return None;
        }
        Some(FieldPath(segments))
    }

    /// The path's segments, outermost first.
    pub fn segments(&self) -> &[String] {
        &self.0
    }

    /// True when `self` equals `other` or one is an ancestor of the other.
    pub fn overlaps(&self, other: &FieldPath) -> bool {
        let n = self.0.len().min(other.0.len());
        self.0[..n] == other.0[..n]
    }

    /// True when `self` is `other` or lies inside it.
    pub fn starts_with(&self, other: &FieldPath) -> bool {
        self.0.len() >= other.0.len() && self.0[..other.0.len()] == other.0[..]
    }

    /// Replaces the prefix `from` of this path by `to`; `None` when `from` is not a prefix.
    pub fn rebase(&self, from: &FieldPath, to: &FieldPath) -> Option<FieldPath> {
        if !self.starts_with(from) {
            return None;
        }
        let mut segments = to.0.clone();
        segments.extend_from_slice(&self.0[from.0.len()..]);
        Some(FieldPath(segments))
    }

    /// A path one segment deeper.
    pub fn child(&self, segment: &str) -> FieldPath {
        let mut segments = self.0.clone();
        segments.push(segment.to_owned());
        FieldPath(segments)
    }

    /// The value at this path, if every segment exists and leads through objects.
    pub fn get<'a>(&self, doc: &'a Value) -> Option<&'a Value> {
        let mut here = doc;
        for segment in &self.0 {
            here = here.as_object()?.get(segment)?;
        }
        Some(here)
    }

    /// Removes and returns the value at this path, keeping the order of the remaining keys.
    pub fn take(&self, doc: &mut Value) -> Option<Value> {
        self.take_indexed(doc).map(|taken| taken.value)
    }

    /// Removes the value at this path and says where in its parent object it stood.
    pub fn take_indexed(&self, doc: &mut Value) -> Option<Taken> {
        let parent = self.parent_mut(doc)?;
        let last = self.0.last()?;
        let index = parent.keys().position(|k| k == last)?;
        let value = parent.shift_remove(last)?;
        Some(Taken {
            value,
            index,
            was_last: index == parent.len(),
        })
    }

    /// The value at this path, mutable.
    pub fn get_mut<'a>(&self, doc: &'a mut Value) -> Option<&'a mut Value> {
        let mut here = doc;
        for segment in &self.0 {
            here = here.as_object_mut()?.get_mut(segment)?;
        }
        Some(here)
    }

    fn parent_mut<'a>(&self, doc: &'a mut Value) -> Option<&'a mut Map<String, Value>> {
        let (_, parents) = self.0.split_last()?;
        let mut here = doc;
        for segment in parents {
            here = here.as_object_mut()?.get_mut(segment)?;
        }
        here.as_object_mut()
    }

    /// The path of the object holding this field (empty for a top-level field).
    pub fn parent(&self) -> &[String] {
        &self.0[..self.0.len().saturating_sub(1)]
    }

    /// Sets the value at this path, creating missing parent objects.
    ///
    /// An existing field is replaced where it stands; a new one is inserted at
    /// `index` in its parent (clamped), or appended when `index` is `None`.
    /// Returns the value it replaced and how many parent levels it created,
    /// or `Err` with the value when a parent exists but is not an object.
    pub fn put(&self, doc: &mut Value, value: Value, index: Option<usize>) -> Result<Put, Value> {
        self.put_with_parents_at(doc, value, index, None)
    }

    /// [`FieldPath::put`], inserting the outermost parent object it creates
    /// at `parents_at` in its own parent (clamped; appended when `None`):
    /// where [`FieldPath::prune_empty_parents`] found the one it removed.
    pub fn put_with_parents_at(
        &self,
        doc: &mut Value,
        value: Value,
        index: Option<usize>,
        parents_at: Option<usize>,
    ) -> Result<Put, Value> {
        let Some((last, parents)) = self.0.split_last() else {
            return Err(value);
        };
        let mut created = 0usize;
        let mut here = doc;
        for (depth, segment) in parents.iter().enumerate() {
            let Some(object) = here.as_object_mut() else {
                return Err(value);
            };
            if !object.contains_key(segment) {
                let empty = Value::Object(Map::new());
                match parents_at {
                    Some(at) if created == 0 => {
                        let at = at.min(object.len());
                        object.shift_insert(at, segment.clone(), empty);
                    }
                    _ => {
                        object.insert(segment.clone(), empty);
                    }
                }
                if created == 0 {
                    created = parents.len() - depth;
                }
            }
            here = object.get_mut(segment).expect("inserted or present");
        }
        let Some(object) = here.as_object_mut() else {
            return Err(value);
        };
        let replaced = match (object.contains_key(last), index) {
            (false, Some(index)) => {
                let index = index.min(object.len());
                object.shift_insert(index, last.clone(), value)
            }
            _ => object.insert(last.clone(), value),
        };
        Ok(Put {
            replaced,
            created_parents: created,
        })
    }

    /// Removes the innermost `levels` parent objects of this path when they
    /// are empty, innermost first, stopping at the first that is not.
    /// Returns where the outermost one removed stood in its own parent.
    pub fn prune_empty_parents(&self, doc: &mut Value, levels: usize) -> Option<usize> {
        let parents = self.0.len().saturating_sub(1);
        let mut outermost = None;
        for depth in (parents.saturating_sub(levels)..parents).rev() {
            let parent = FieldPath(self.0[..=depth].to_vec());
            let empty = parent
                .get(doc)
                .and_then(Value::as_object)
                .is_some_and(Map::is_empty);
            if !empty {
                break;
            }
            outermost = parent.take_indexed(doc).map(|taken| taken.index);
        }
        outermost
    }

    /// How many of this path's parent objects are not parents of `other`
    /// too: the innermost ones, which a value moved from here to `other`
    /// leaves behind.
    pub fn parents_apart_from(&self, other: &FieldPath) -> usize {
        let (mine, theirs) = (self.parent(), other.parent());
        let shared = mine.iter().zip(theirs).take_while(|(a, b)| a == b).count();
        mine.len() - shared
    }

    /// The path of the object holding this field; `None` for a top-level
    /// field (the document is not a parent object).
    pub fn parent_path(&self) -> Option<FieldPath> {
        let parent = self.parent();
        (!parent.is_empty()).then(|| FieldPath(parent.to_vec()))
    }

    /// True when the object holding this path's field holds nothing else
    /// (false for a top-level field).
    pub fn is_alone_in_parent(&self, doc: &Value) -> bool {
        self.parent_path()
            .and_then(|parent| parent.get(doc)?.as_object().map(|o| o.len() == 1))
            .unwrap_or(false)
    }
}

/// A value removed by [`FieldPath::take_indexed`] and where it stood.
#[derive(Debug)]
pub struct Taken {
    /// The removed value.
    pub value: Value,
    /// Its index among its parent object's keys.
    pub index: usize,
    /// True when it was the parent's last key.
    pub was_last: bool,
}

/// What [`FieldPath::put`] did.
#[derive(Debug)]
pub struct Put {
    /// The value that was at the path before, if any.
    pub replaced: Option<Value>,
    /// How many parent objects were created, innermost ones, to hold the value.
    pub created_parents: usize,
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("."))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn put_into_missing_parents_creates_them_and_prune_removes_them_again() {
        let mut doc = json!({"a": 1});
        let path = FieldPath::parse("x.y.z").unwrap();
        let put = path.put(&mut doc, json!(2), None).unwrap();
        assert_eq!(put.created_parents, 2);
        assert_eq!(doc, json!({"a": 1, "x": {"y": {"z": 2}}}));
        path.take(&mut doc);
        path.prune_empty_parents(&mut doc, put.created_parents);
        assert_eq!(doc, json!({"a": 1}));
    }

    #[test]
    fn a_pruned_parent_comes_back_where_it_stood() {
        let text = r#"{"a":1,"x":{"y":{"z":2}},"b":3}"#;
        let mut doc: Value = serde_json::from_str(text).unwrap();
        let path = FieldPath::parse("x.y.z").unwrap();
        let value = path.take(&mut doc).unwrap();
        let at = path.prune_empty_parents(&mut doc, 2);
        assert_eq!(at, Some(1));
        assert_eq!(serde_json::to_string(&doc).unwrap(), r#"{"a":1,"b":3}"#);
        let put = path.put_with_parents_at(&mut doc, value, None, at).unwrap();
        assert_eq!(put.created_parents, 2);
        assert_eq!(serde_json::to_string(&doc).unwrap(), text);
    }

    #[test]
    fn parents_apart_and_alone() {
        let p = |s| FieldPath::parse(s).unwrap();
        assert_eq!(p("lineage.parent").parents_apart_from(&p("parent")), 1);
        assert_eq!(p("a.x").parents_apart_from(&p("a.y")), 0);
        assert_eq!(p("a.b.x").parents_apart_from(&p("a.y")), 1);
        assert_eq!(p("x").parents_apart_from(&p("a.y")), 0);
        let doc = json!({"a": {"x": 1}, "b": {"x": 1, "y": 2}, "x": 3});
        assert!(p("a.x").is_alone_in_parent(&doc));
        assert!(!p("b.x").is_alone_in_parent(&doc));
        assert!(!p("x").is_alone_in_parent(&doc));
    }

    #[test]
    fn take_keeps_the_order_of_the_other_keys() {
        let mut doc = json!({"a": 1, "b": 2, "c": 3});
        FieldPath::parse("b").unwrap().take(&mut doc);
        assert_eq!(serde_json::to_string(&doc).unwrap(), r#"{"a":1,"c":3}"#);
    }
}
