//! Revision ids and revision trees with CouchDB's rules.
//!
//! A tree is a flat list of nodes with parent links; roots are the oldest
//! revisions still known (stemming cuts older ones off). Pure code, no I/O.

use std::fmt;
use std::str::FromStr;

use crate::error::StoreError;

/// Revisions kept per branch unless a database says otherwise (CouchDB's default).
pub const DEFAULT_REVS_LIMIT: u64 = 1000;

/// A revision id `N-hash`: generation `N` ≥ 1 and a hex hash.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rev {
    /// The generation `N`: 1 for a first revision, its parent's plus one after.
    pub pos: u64,
    /// The hash part: 1 to 128 hex digits (32 lowercase ones for revisions this crate makes).
    pub hash: String,
}

impl Rev {
    /// The deterministic child revision of `parent` for this content: md5 over
    /// the parent id, the deleted flag, the body bytes and the attachment
    /// digests, as 32 lowercase hex characters (like CouchDB's).
    pub fn child_of(parent: Option<&Rev>, deleted: bool, body: &str, att_digests: &str) -> Rev {
        let mut ctx = md5::Context::new();
        let parent_s = parent.map(|p| p.to_string()).unwrap_or_default();
        ctx.consume(parent_s.as_bytes());
        ctx.consume([0u8, deleted as u8, 0]);
        ctx.consume(body.as_bytes());
        ctx.consume([0u8]);
        ctx.consume(att_digests.as_bytes());
        Rev {
            pos: parent.map_or(1, |p| p.pos + 1),
            hash: format!("{:x}", ctx.finalize()),
        }
    }
}

impl fmt::Display for Rev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.pos, self.hash)
    }
}

impl FromStr for Rev {
    type Err = StoreError;

    /// Parses `N-hex`; anything else is a `bad_request` naming the string.
    fn from_str(s: &str) -> Result<Rev, StoreError> {
        let bad = || {
            StoreError::bad(format!("invalid revision {s:?}: expected N-hex, like \"1-967a00dff5e02add41819138abb3284d\""))
        };
        let (pos, hash) = s.split_once('-').ok_or_else(bad)?;
        if pos.is_empty() || pos.len() > 19 || !pos.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let pos: u64 = pos.parse().map_err(|_| bad())?;
        if pos == 0 || !valid_hash(hash) {
            return Err(bad());
        }
        Ok(Rev {
            pos,
            hash: hash.to_owned(),
        })
    }
}

/// A revision hash: 1 to 128 hex digits.
pub(crate) fn valid_hash(hash: &str) -> bool {
    !hash.is_empty() && hash.len() <= 128 && hash.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Builds the path (newest first) that a document's `_rev` and optional
/// `_revisions: {start, ids}` describe.
pub fn rev_path(rev: &Rev, revisions: Option<&serde_json::Value>) -> Result<Vec<Rev>, StoreError> {
    let Some(revisions) = revisions else {
        return Ok(vec![rev.clone()]);
    };
    let bad = |why: &str| StoreError::bad(format!("invalid _revisions for {rev}: {why}"));
    let start = revisions
        .get("start")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| bad("start must be a positive integer"))?;
    let ids = revisions
        .get("ids")
        .and_then(|v| v.as_array())
        .ok_or_else(|| bad("ids must be an array"))?;
    if start != rev.pos || ids.first().and_then(|v| v.as_str()) != Some(rev.hash.as_str()) {
        return Err(bad("start and ids[0] must match _rev"));
    }
    if ids.len() as u64 > start {
        return Err(bad("more ids than generations"));
    }
    ids.iter()
        .enumerate()
        .map(|(i, id)| match id.as_str() {
            Some(h) if valid_hash(h) => Ok(Rev {
                pos: start - i as u64,
                hash: h.to_owned(),
            }),
            _ => Err(bad("every id must be a hex string")),
        })
        .collect()
}

/// One revision in a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The revision id.
    pub rev: Rev,
    /// Index of the parent node; `None` for a root.
    pub parent: Option<usize>,
    /// True when this revision is a tombstone (`_deleted: true`).
    pub deleted: bool,
}

/// All known revisions of one document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevTree {
    /// Every known revision, in no particular order; `parent` indexes into this list.
    pub nodes: Vec<Node>,
}

/// What merging a path into a tree did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Merge {
    /// The newest revision of the path was already known: nothing changed.
    Known,
    /// New nodes were added; the newest revision is a new leaf.
    Added,
}

impl RevTree {
    /// Index of a revision, if known.
    pub fn find(&self, rev: &Rev) -> Option<usize> {
        self.nodes.iter().position(|n| &n.rev == rev)
    }

    fn child_flags(&self) -> Vec<bool> {
        let mut has_child = vec![false; self.nodes.len()];
        for n in &self.nodes {
            if let Some(p) = n.parent {
                has_child[p] = true;
            }
        }
        has_child
    }

    /// Indexes of the leaves (revisions without children).
    pub fn leaves(&self) -> Vec<usize> {
        let has_child = self.child_flags();
        (0..self.nodes.len()).filter(|&i| !has_child[i]).collect()
    }

    /// True when `idx` has no child.
    pub fn is_leaf(&self, idx: usize) -> bool {
        !self.nodes.iter().any(|n| n.parent == Some(idx))
    }

    /// Leaves sorted best first: non-deleted before deleted, then higher
    /// generation, then higher hash. The first one is the winner.
    pub fn sorted_leaves(&self) -> Vec<usize> {
        let mut leaves = self.leaves();
        leaves.sort_by(|&a, &b| {
            let (a, b) = (&self.nodes[a], &self.nodes[b]);
            (!b.deleted, b.rev.pos, &b.rev.hash).cmp(&(!a.deleted, a.rev.pos, &a.rev.hash))
        });
        leaves
    }

    /// The winning revision: the non-deleted leaf with the highest generation,
    /// ties broken by the higher hash; if every leaf is deleted, the highest deleted leaf.
    pub fn winner(&self) -> usize {
        self.sorted_leaves()[0]
    }

    /// Non-deleted leaves other than the winner, best first (`_conflicts`).
    pub fn conflicts(&self) -> Vec<usize> {
        self.sorted_leaves()
            .into_iter()
            .skip(1)
            .filter(|&i| !self.nodes[i].deleted)
            .collect()
    }

    /// The path from `idx` to its root, newest first.
    pub fn path(&self, idx: usize) -> Vec<usize> {
        let mut out = vec![idx];
        let mut cur = idx;
        while let Some(p) = self.nodes[cur].parent {
            out.push(p);
            cur = p;
        }
        out
    }

    /// `_revisions` for `idx`: `{start, ids}` along its path.
    pub fn revisions_json(&self, idx: usize) -> serde_json::Value {
        let path = self.path(idx);
        let ids: Vec<serde_json::Value> = path
            .iter()
            .map(|&i| serde_json::Value::from(self.nodes[i].rev.hash.clone()))
            .collect();
        serde_json::json!({ "start": self.nodes[idx].rev.pos, "ids": ids })
    }

    /// Leaves that descend from `idx` (itself if it is a leaf).
    pub fn leaves_under(&self, idx: usize) -> Vec<usize> {
        self.leaves()
            .into_iter()
            .filter(|&l| self.path(l).contains(&idx))
            .collect()
    }

    /// Adds a new root revision or a child of `parent`; returns its index.
    pub fn push(&mut self, rev: Rev, parent: Option<usize>, deleted: bool) -> usize {
        self.nodes.push(Node {
            rev,
            parent,
            deleted,
        });
        self.nodes.len() - 1
    }

    /// Merges a path (newest first), as replication does with `new_edits=false`.
    ///
    /// The newest revision of the path that the tree already knows is the
    /// attachment point; newer ones are added as a chain under it. Older path
    /// entries extend a root upwards when the tree had lost them to stemming.
    /// With no revision in common the path becomes a new root chain.
    pub fn merge_path(&mut self, path: &[Rev], deleted: bool) -> Merge {
        let known = path.iter().position(|r| self.find(r).is_some());
        if known == Some(0) {
            return Merge::Known;
        }
        let (mut parent, newer) = match known {
            Some(k) => {
                let at = self.find(&path[k]).expect("found above");
                // Extend a stemmed root with the older ancestors the path knows.
                let mut cur = at;
                for older in &path[k + 1..] {
                    match self.nodes[cur].parent {
                        Some(p) if self.nodes[p].rev == *older => cur = p,
                        Some(_) => break,
                        None => {
                            if self.find(older).is_some() {
                                break;
                            }
                            let idx = self.push(older.clone(), None, false);
                            self.nodes[cur].parent = Some(idx);
                            cur = idx;
                        }
                    }
                }
                (Some(at), &path[..k])
            }
            None => (None, path),
        };
        for (i, rev) in newer.iter().enumerate().rev() {
            parent = Some(self.push(rev.clone(), parent, i == 0 && deleted));
        }
        Merge::Added
    }

    /// Cuts every branch to its newest `limit` revisions. Returns the revisions
    /// removed (their bodies can be dropped).
    pub fn stem(&mut self, limit: u64) -> Vec<Rev> {
        let limit = limit.max(1) as usize;
        let mut keep = vec![false; self.nodes.len()];
        for leaf in self.leaves() {
            for &i in self.path(leaf).iter().take(limit) {
                keep[i] = true;
            }
        }
        if keep.iter().all(|&k| k) {
            return Vec::new();
        }
        let mut new_index = vec![None; self.nodes.len()];
        let mut nodes = Vec::new();
        let mut removed = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if keep[i] {
                new_index[i] = Some(nodes.len());
                nodes.push(n.clone());
            } else {
                removed.push(n.rev.clone());
            }
        }
        for n in &mut nodes {
            n.parent = n.parent.and_then(|p| new_index[p]);
        }
        self.nodes = nodes;
        removed
    }

    /// Compact text form stored by the embedded backend.
    pub fn to_json(&self) -> String {
        let rows: Vec<(u64, &str, i64, u8)> = self
            .nodes
            .iter()
            .map(|n| {
                (
                    n.rev.pos,
                    n.rev.hash.as_str(),
                    n.parent.map_or(-1, |p| p as i64),
                    n.deleted as u8,
                )
            })
            .collect();
        serde_json::to_string(&rows).expect("tree serializes")
    }

    /// Parses [`RevTree::to_json`]'s form.
    pub fn from_json(s: &str) -> Result<RevTree, StoreError> {
        let rows: Vec<(u64, String, i64, u8)> = serde_json::from_str(s)
            .map_err(|e| StoreError::Internal(format!("unreadable revision tree: {e}")))?;
        let len = rows.len() as i64;
        let nodes = rows
            .into_iter()
            .map(|(pos, hash, parent, deleted)| {
                if parent >= len {
                    return Err(StoreError::Internal(
                        "revision tree parent out of range".into(),
                    ));
                }
                Ok(Node {
                    rev: Rev { pos, hash },
                    parent: (parent >= 0).then_some(parent as usize),
                    deleted: deleted != 0,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(RevTree { nodes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Rev {
        s.parse().unwrap()
    }

    #[test]
    fn revision_strings_must_be_generation_dash_hex() {
        assert!("1-abc".parse::<Rev>().is_ok());
        for bad in [
            "", "1", "abc", "0-abc", "-abc", "1-", "1-xyz", "x-abc", "+1-ab", "1-ab-cd",
        ] {
            assert!(bad.parse::<Rev>().is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn winner_is_highest_live_leaf_then_highest_hash_then_highest_deleted() {
        let mut t = RevTree::default();
        t.merge_path(&[r("2-aa"), r("1-00")], false);
        t.merge_path(&[r("2-bb"), r("1-00")], false);
        assert_eq!(t.nodes[t.winner()].rev, r("2-bb"));
        assert_eq!(t.conflicts().len(), 1);
        t.merge_path(&[r("3-01"), r("2-bb"), r("1-00")], true);
        assert_eq!(
            t.nodes[t.winner()].rev,
            r("2-aa"),
            "a deleted leaf never beats a live one"
        );
        assert!(t.conflicts().is_empty());
        t.merge_path(&[r("3-02"), r("2-aa"), r("1-00")], true);
        assert_eq!(
            t.nodes[t.winner()].rev,
            r("3-02"),
            "all deleted: the highest deleted leaf"
        );
    }

    #[test]
    fn stemming_keeps_the_newest_revisions_of_each_branch() {
        let mut t = RevTree::default();
        let path: Vec<Rev> = (1..=10).rev().map(|i| r(&format!("{i}-a{i}"))).collect();
        t.merge_path(&path, false);
        let removed = t.stem(3);
        assert_eq!(removed.len(), 7);
        assert_eq!(t.path(t.winner()).len(), 3);
        assert_eq!(t.merge_path(&path, false), Merge::Known);
        // A longer history of a stemmed root extends nothing once stemmed again.
        let mut again = t.clone();
        again.stem(3);
        assert_eq!(again, t);
    }

    #[test]
    fn tree_text_round_trips() {
        let mut t = RevTree::default();
        t.merge_path(&[r("2-aa"), r("1-00")], true);
        assert_eq!(RevTree::from_json(&t.to_json()).unwrap(), t);
    }
}
