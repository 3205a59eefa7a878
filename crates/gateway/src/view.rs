//! Version views: how a stored revision is presented to a client at version k.
//!
//! Invariant: the presentation is a pure function of the stored leaf (with
//! its `_revisions`), the document's journal and the migration set, so two
//! gateways over the same store answer byte for byte the same, and a
//! revision id always denotes one body:
//!
//! - a document every version sees alike is presented as itself;
//! - otherwise, at every version, as a synthetic descendant of the leaf's
//!   anchor carrying that version's view, on a ladder (`BodyViews`): each
//!   rung (versions that see it alike) a child of the rung below, so a
//!   phone moving up receives a descendant of what it holds; the id
//!   `{gen}-md5(parent rev, migration-set checksum, view hash)…` is derived
//!   from the body and its parent, so it can denote nothing else, and any
//!   gateway recognises it when a phone pushes it back;
//! - next to it, tombstones (`{gen+1}-md5(retired synthetic rev)`) retire
//!   what a phone may hold from another context, from an older anchor or
//!   from recent ancestors: whatever translated copy a phone held, after
//!   one pull it holds exactly one live leaf, the current view.

use rewind_engine::journal::{
    body_hash, body_of, client_body_hash, stamp_unstamped, stored_version, Journal,
};
use rewind_engine::state::State;
use rewind_lens::{Complements, LensError, MigrationSet};
use serde_json::{json, Value};
use std::sync::Arc;

/// Reads complements from a journal without changing it.
struct ReadOnly<'a>(&'a Journal);

impl Complements for ReadOnly<'_> {
    fn get(&mut self, version: u32) -> Option<Value> {
        self.0.kept_for(version)
    }
    fn put(&mut self, _: u32, _: Option<Value>) {}
}

/// The body of `doc` as a client at version `k` sees it.
pub fn view(
    set: &MigrationSet,
    doc: &Value,
    k: u32,
    journal: &Journal,
) -> Result<Value, LensError> {
    let mut out = doc.clone();
    if !MigrationSet::is_migratable(doc) || is_deleted(doc) {
        return Ok(out);
    }
    let rev = doc.get("_rev").and_then(Value::as_str).unwrap_or("");
    let from = stored_version(set, journal, rev, doc);
    stamp_unstamped(set, &mut out, from);
    set.translate(&mut out, from, k, &mut ReadOnly(journal))?;
    Ok(out)
}

/// A revision history as full revision ids, newest first.
pub fn history(doc: &Value) -> Vec<String> {
    let revisions = doc.get("_revisions");
    let start = revisions
        .and_then(|r| r.get("start"))
        .and_then(Value::as_u64);
    let ids = revisions
        .and_then(|r| r.get("ids"))
        .and_then(Value::as_array);
    match (start, ids) {
        (Some(start), Some(ids)) => ids
            .iter()
            .enumerate()
            .filter_map(|(i, id)| {
                id.as_str()
                    .map(|h| format!("{}-{h}", start.saturating_sub(i as u64)))
            })
            .collect(),
        _ => doc
            .get("_rev")
            .and_then(Value::as_str)
            .map(|r| vec![r.to_owned()])
            .unwrap_or_default(),
    }
}

/// The `_revisions` member for a history (newest first).
pub fn revisions_member(history: &[String]) -> Value {
    let start = history.first().map(|r| generation(r)).unwrap_or(0);
    let ids: Vec<&str> = history
        .iter()
        .map(|r| r.split_once('-').map(|(_, h)| h).unwrap_or(r))
        .collect();
    json!({"start": start, "ids": ids})
}

/// The generation of a revision id (`3-abc` → 3).
pub fn generation(rev: &str) -> u64 {
    rev.split_once('-')
        .and_then(|(g, _)| g.parse().ok())
        .unwrap_or(0)
}

/// The synthetic child revision of `base` that presents `body` in
/// presentation `context` (see [`contexts`]): derived from the body, so it
/// denotes nothing else, at any version. Its first 16 hex digits depend on
/// the base, the migrations and the body only, so a synthetic revision is
/// recognised whatever context it was presented in; the other 16 name the
/// context (with no context, the id is the plain md5).
pub fn synthetic_rev(base: &str, checksum: &str, body: &Value, context: &str) -> String {
    synthetic_rev_of(base, checksum, &client_body_hash(body), context)
}

/// [`synthetic_rev`] of a body known by its [`client_body_hash`] (the
/// client's hash: a phone pushes back the body as its JavaScript wrote it,
/// `34.0` coming back as `34`, and must still be recognised). The id is
/// `{gen}-{head}{context}{mark}`: 16 hex of md5(base, checksum, hash), 16
/// naming the context, and 8 derived from those ([`is_synthetic_rev`]), so
/// that the rungs of a ladder are told from the revisions below them by
/// their ids alone, whatever context they were presented in.
fn synthetic_rev_of(base: &str, checksum: &str, body_hash: &str, context: &str) -> String {
    let key = format!("rewind\n{base}\n{checksum}\n{body_hash}");
    let plain = format!("{:x}", md5::compute(&key));
    let tail = if context.is_empty() {
        plain[16..].to_owned()
    } else {
        format!("{:x}", md5::compute(format!("{key}\n{context}")))[..16].to_owned()
    };
    let named = format!("{}{tail}", &plain[..16]);
    format!("{}-{named}{}", generation(base) + 1, SYNTHETIC.mark(&named))
}

/// A kind of revision id rewind derives whose last digits are a mark
/// derived from the ones before: told from any other id by the id alone.
struct MarkedId {
    /// What the mark's digest starts with.
    kind: &'static str,
    /// Hex digits before the mark.
    head: usize,
    /// Hex digits of the mark.
    mark: usize,
}

/// Synthetic revisions ([`synthetic_rev`]).
const SYNTHETIC: MarkedId = MarkedId {
    kind: "rewind-rung",
    head: 32,
    mark: 8,
};

/// Tombstones retiring a synthetic revision ([`tombstone_rev`]).
const RETIREMENT: MarkedId = MarkedId {
    kind: "rewind-retirement",
    head: 16,
    mark: 16,
};

impl MarkedId {
    fn mark(&self, head: &str) -> String {
        format!("{:x}", md5::compute(format!("{}\n{head}", self.kind)))[..self.mark].to_owned()
    }

    /// True when the id part of `rev` is a head and its mark.
    fn is(&self, rev: &str) -> bool {
        let Some((_, hash)) = rev.split_once('-') else {
            return false;
        };
        hash.len() == self.head + self.mark
            && hash.is_char_boundary(self.head)
            && self.mark(&hash[..self.head]) == hash[self.head..]
    }
}

/// True when `rev` is the id of a synthetic revision a gateway presented
/// ([`synthetic_rev`]), told from the id alone (with a chance of 2^-32 for
/// any other revision id).
pub fn is_synthetic_rev(rev: &str) -> bool {
    SYNTHETIC.is(rev)
}

/// True when `a` and `b` are synthetic revisions presenting one view on one
/// parent, in different contexts or the same: the generation and the head
/// of their ids (which name no context) match.
pub fn same_view(a: &str, b: &str) -> bool {
    let head = |rev: &str| {
        let (generation, hash) = rev.split_once('-')?;
        Some((generation.to_owned(), hash.get(..16)?.to_owned()))
    };
    is_synthetic_rev(a) && is_synthetic_rev(b) && head(a).is_some_and(|ha| Some(ha) == head(b))
}

/// True when `rev` is a synthetic child of `base` presenting `body`, in any
/// context.
pub fn presents(rev: &str, base: &str, checksum: &str, body: &Value) -> bool {
    presents_hash(rev, base, checksum, &client_body_hash(body))
}

/// [`presents`] for a body known by its [`client_body_hash`]: the
/// generation and the head of the id, which name no context, match.
fn presents_hash(rev: &str, base: &str, checksum: &str, body_hash: &str) -> bool {
    let expected = synthetic_rev_of(base, checksum, body_hash, "");
    // The generation and the first 16 hex digits: before the context's 16
    // and the mark.
    let head = expected.len() - 16 - SYNTHETIC.mark;
    rev.len() == expected.len() && rev.get(..head) == expected.get(..head)
}

/// The presentation contexts of a document for a client at a pinned URL
/// (`/v/{k}`, or the version header) or following `/{db}`, oldest first;
/// the last is the current one. A synthetic revision id names its context,
/// so that a revision presented again after phones retired its copies gets
/// ids no phone holds a tombstone for (a tombstone on a phone is
/// permanent):
///
/// - following `/{db}`, the **epoch** (see [`epochs`]): it changes when the
///   version `/{db}` serves changes, so the views phones at the old
///   version retired are presented afresh; pinned, the fixed epoch
///   [`PINNED`]: a run changes nothing a pinned phone holds (an old phone
///   downloads nothing for an upgrade plus rollback it never saw);
/// - the **adoptions** recorded in the journal (a restore: see
///   `sync::Session::push`).
///
/// - for a device that named itself and has a **device epoch** (`device`:
///   its device epochs, oldest first, see `crate::device`: one per move
///   down or from `/{db}` to a version), pinned, its current device epoch
///   instead of [`PINNED`]; following, the epoch with its device epoch
///   ([`following`]).
///
/// The other contexts listed are the ones whose copies the client may hold
/// and that its presentation retires: following `/{db}`, the window's
/// epochs and the pinned context (a phone moves from `/v/{k}` to `/{db}`
/// in one pull); pinned, the pinned context's older adoptions (a pinned
/// client retiring `/{db}`'s views would find them deleted on moving
/// there: a phone that does not name itself moves from `/{db}` to `/v/{k}`
/// one way only, like between versions). A device with a device epoch
/// retires besides, pinned or following, its pinned contexts in the window
/// and the contexts it followed in before its current epoch; following,
/// also those of its current epoch with the window's earlier epochs. (Its
/// pinned presentation retires what it followed, and its following
/// presentation is its own, so it moves both ways.)
pub fn contexts(
    epochs: &[String],
    journal: &Journal,
    pinned: bool,
    device: &[String],
) -> Vec<String> {
    // The adoption contexts in the window: one more than the epochs', as
    // adopting a copy names two revisions, one at a time (the copy, then
    // its translation).
    let adoptions = adoption_names(journal, WINDOW + 1);
    let window = &epochs[epochs.len().saturating_sub(WINDOW)..];
    let device = &device[device.len().saturating_sub(WINDOW)..];
    let own = device.last().map(String::as_str);
    // The device epoch before the current one (none: the device had none).
    let before = device.len().checked_sub(2).map(|i| device[i].as_str());
    let current = window.last().map(String::as_str).unwrap_or("");
    let epoch = match pinned {
        true => own.unwrap_or(PINNED).to_owned(),
        false => following(current, own),
    };
    let adoption = adoptions.last().map(String::as_str).unwrap_or("");
    // Every pair of an epoch and an adoption (a phone may have pulled
    // before both changed: a restore's adoptions, then the upgrade after
    // it), the current context last.
    let mut retired: Vec<String> = vec![PINNED.to_owned()];
    if !pinned {
        retired.extend(window.iter().filter(|e| *e != PINNED).cloned());
    }
    if own.is_some() {
        retired.extend(device.iter().cloned());
        for e in window {
            retired.push(following(e, before));
            if !pinned {
                retired.push(following(e, own));
            }
        }
    }
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for e in &retired {
        for a in &adoptions {
            if (e.as_str(), a.as_str()) != (epoch.as_str(), adoption) && seen.insert((e, a)) {
                out.push(context_name(e, a));
            }
        }
    }
    out.push(context_name(&epoch, adoption));
    out
}

/// The epoch of the presentation context of a device following `/{db}`
/// in the database's `epoch`, with its current device epoch `own` (none:
/// the database's epoch, shared by every phone). In the first epoch (`""`,
/// also the pinned one) it is the device's own, as for phones without one
/// (`/v/{k}` and `/{db}` serving `k` present alike until the first run);
/// after a run, `"{epoch} {own}"`, which still names the version that
/// epoch serves first (`context_version`).
pub fn following(epoch: &str, own: Option<&str>) -> String {
    match (epoch, own) {
        (epoch, None) => epoch.to_owned(),
        ("", Some(own)) => own.to_owned(),
        (epoch, Some(own)) => format!("{epoch} {own}"),
    }
}

/// The epoch of the presentation context of pinned URLs (`/v/{k}/{db}`):
/// the epoch before any run, so that until the first run a client sees the
/// same revisions at `/v/{k}` and at `/{db}` serving `k` (and a fresh pull
/// from `/{db}` carries no tombstones for pinned views besides its own).
pub const PINNED: &str = "";

/// How many epochs and adoptions (the current one included) a stored
/// leaf's presentations are retired in.
const WINDOW: usize = 2;

/// The epochs of a database, oldest first, the current one last (at most
/// [`WINDOW`]): `""` before any run, then `"{version}:{run id}"` for each run
/// that changed the version served to clients that do not choose one (an
/// instant rollback from its start, any other run when it finishes) —
/// except upgrades before the first rollback. Those move a phone following
/// `/{db}` up each document's ladder (see [`present`]) within the first
/// epoch: it downloads exactly the documents whose shape changed. After a
/// rollback every run starts an epoch: a rollback's translation of an
/// edited document can move its anchor up (its views differ from the
/// edit's until a re-upgrade completes the complements), the re-upgrade
/// moves it back down, and only a new context keeps the ids presented then
/// from being ids phones were given tombstones for meanwhile.
pub fn epochs(state: &State) -> Vec<String> {
    let out = all_epochs(state);
    out[out.len().saturating_sub(WINDOW)..].to_vec()
}

/// Every epoch of the database's history, oldest first (see [`epochs`]).
fn all_epochs(state: &State) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut rolled_back = false;
    for run in &state.history {
        rolled_back |= run.to < run.from;
        if rolled_back {
            out.push(format!("{}:{}", run.to, run.id));
        }
    }
    if let (Some(served), Some(run)) = (state.served, &state.run) {
        let epoch = format!("{served}:{}", run.id);
        if (rolled_back || served < run.from) && out.last() != Some(&epoch) {
            out.push(epoch);
        }
    }
    out.dedup();
    out
}

/// The only version presented in a context, when it names an epoch after a
/// run (`"{version}:{run id}"`, see [`epochs`]): the contexts of such
/// epochs are used by clients following `/{db}` only (pinned clients use
/// [`PINNED`]'s), and `/{db}` serves one version for a whole epoch, the one
/// its name begins with (every run after the first rollback starts one).
/// `None` for the first epoch's contexts, where every version may have
/// been presented.
fn context_version(context: &str) -> Option<u32> {
    let (version, _) = context.split_once(':')?;
    if version.is_empty() || !version.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    version.parse().ok()
}

/// Where a pushed-back synthetic copy (a revision presenting `body` as a
/// synthetic child of its parent) was presented: see [`copy_context`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyContext {
    /// In a context of the window (the current one, the previous epoch or
    /// adoption): the presentation retires it where needed.
    Window,
    /// In an older context of this database's history.
    Older,
    /// In a context this database's history does not name: the copy comes
    /// from a state the server lost (a restore from a snapshot).
    Unknown,
}

/// The context a synthetic copy `rev` presenting `body` as a child of
/// `parent` (its stored base, or the rung below it on a ladder) was
/// presented in, given the database's state, the document's journal and
/// the pushing device's epochs (`crate::device`; empty when it does not
/// name itself).
pub fn copy_context(
    rev: &str,
    parent: &str,
    checksum: &str,
    body: &Value,
    state: &State,
    journal: &Journal,
    device: &[String],
) -> CopyContext {
    let hash = client_body_hash(body);
    let is = |context: &str| synthetic_rev_of(parent, checksum, &hash, context) == rev;
    // Current for some client: pinned or following.
    let all = all_epochs(state);
    let epochs = &all[all.len().saturating_sub(WINDOW)..];
    if [false, true].iter().any(|pinned| {
        contexts(epochs, journal, *pinned, device)
            .iter()
            .any(|c| is(c))
    }) {
        return CopyContext::Window;
    }
    let adoptions = adoption_names(journal, usize::MAX);
    // `all_epochs` starts with the epoch before any run, `PINNED`; a
    // device's copies may be in its device epochs, pinned or following.
    let mut older: Vec<String> = all.iter().chain(device).cloned().collect();
    for own in device {
        older.extend(all.iter().map(|e| following(e, Some(own))));
    }
    for epoch in &older {
        for adoption in &adoptions {
            if is(&context_name(epoch, adoption)) {
                return CopyContext::Older;
            }
        }
    }
    CopyContext::Unknown
}

/// The names of the adoption contexts of a journal, the last `window` of
/// them (oldest first): each names the adopted list up to it (none
/// adopted: "").
fn adoption_names(journal: &Journal, window: usize) -> Vec<String> {
    let adopted = journal.adopted.len();
    (adopted.saturating_sub(window.saturating_sub(1))..=adopted)
        .map(|n| match n {
            0 => String::new(),
            n => format!("{:x}", md5::compute(journal.adopted[..n].join("\n"))),
        })
        .collect()
}

/// The name of the presentation context of an epoch and an adoption.
fn context_name(epoch: &str, adoption: &str) -> String {
    match (epoch.is_empty(), adoption.is_empty()) {
        (true, true) => String::new(),
        (false, true) => epoch.to_owned(),
        (true, false) => format!("adopted {adoption}"),
        (false, false) => format!("{epoch} adopted {adoption}"),
    }
}

/// The tombstone that retires the synthetic revision `synthetic`: the
/// first half names the revision it retires, the second half is a mark
/// derived from the first ([`is_retirement_rev`] tells one from its id
/// alone, with a chance of 2^-64 for any other revision id).
pub fn tombstone_rev(synthetic: &str) -> String {
    let head = format!("{:x}", md5::compute(format!("rewind-retired\n{synthetic}")));
    let head = &head[..16];
    format!(
        "{}-{head}{}",
        generation(synthetic) + 1,
        RETIREMENT.mark(head)
    )
}

/// True when `rev` is the id of a tombstone rewind wrote or presented to
/// retire a revision ([`tombstone_rev`]). A phone keeps every tombstone it
/// was given as a leaf and offers them again whenever the document
/// changes; `_revs_diff` tells it the server needs none of them.
pub fn is_retirement_rev(rev: &str) -> bool {
    RETIREMENT.is(rev)
}

/// True when `doc` (a pushed revision with `_revisions`) is a synthetic
/// revision of this migration set, presented in any context: a
/// translation going back where it came from.
pub fn is_synthetic(doc: &Value, checksum: &str) -> bool {
    let hist = history(doc);
    match (hist.first(), hist.get(1)) {
        (Some(rev), Some(parent)) => presents(rev, parent, checksum, doc),
        _ => false,
    }
}

/// True when `doc` is a tombstone that retired a synthetic revision.
pub fn is_retirement(doc: &Value) -> bool {
    let hist = history(doc);
    is_deleted(doc)
        && matches!((hist.first(), hist.get(1)), (Some(rev), Some(parent)) if *rev == tombstone_rev(parent))
}

/// A revision as presented to a client.
#[derive(Debug, Clone)]
pub struct Presented {
    /// The presented revision id.
    pub rev: String,
    /// The presented document, with `_id`, `_rev` and `_revisions`; shared,
    /// so the presentations the cache holds are handed out without a copy.
    pub doc: Arc<Value>,
    /// True when the body differs from what is stored at this revision id.
    pub synthetic: bool,
}

fn with_meta(mut body: Value, history: &[String]) -> Value {
    if let Some(object) = body.as_object_mut() {
        object.shift_remove("_revisions");
        if let Some(rev) = history.first() {
            object.insert("_rev".into(), Value::from(rev.clone()));
        }
        object.insert("_revisions".into(), revisions_member(history));
    }
    body
}

/// A rung of a body's **ladder**: a run of consecutive versions that see
/// the body alike, with the [`client_body_hash`] of that view (what its
/// synthetic id derives from).
struct Rung {
    hash: String,
    versions: Vec<u32>,
}

/// Every version's view of a body as its [`client_body_hash`], in version
/// order (element `k` is the hash of [`view`] at `k`), the body's own hash,
/// and the view at `keep` itself when asked.
struct VersionViews {
    hashes: Vec<String>,
    own: String,
    kept: Option<Value>,
}

/// [`VersionViews`] of `body`, a stored body at `version` (its
/// [`stored_version`]): one walk through the migrations
/// (`MigrationSet::visit_all`) that copies no view but the one kept, and
/// hashes the body once (it is its own view at its version, unless its
/// stamp is lowered there, or it is a phone's unstamped revision above
/// version 0, whose views are those of the body with the stamp put on).
fn version_views(
    set: &MigrationSet,
    body: &Value,
    version: u32,
    journal: &Journal,
    keep: Option<u32>,
) -> Result<VersionViews, LensError> {
    let versions = set.latest() as usize + 1;
    if !MigrationSet::is_migratable(body) || is_deleted(body) {
        let own = client_body_hash(body);
        return Ok(VersionViews {
            hashes: vec![own.clone(); versions],
            own,
            kept: keep
                .filter(|&k| (k as usize) < versions)
                .map(|_| body.clone()),
        });
    }
    let mut hashes = vec![String::new(); versions];
    let mut own = None;
    let mut kept = None;
    let mut stamped = None;
    if version > 0 && set.stamp_of(body).is_none() {
        let mut copy = body.clone();
        stamp_unstamped(set, &mut copy, version);
        own = Some(client_body_hash(body));
        stamped = Some(copy);
    }
    let walked = stamped.as_ref().unwrap_or(body);
    set.visit_all(
        walked,
        version,
        &mut ReadOnly(journal),
        |k, seen, same_as| {
            // A view equal to one hashed already is not hashed again.
            let hash = match same_as {
                Some(j) if !hashes[j as usize].is_empty() => hashes[j as usize].clone(),
                _ => client_body_hash(seen),
            };
            if std::ptr::eq(seen, body) {
                own = Some(hash.clone());
            }
            hashes[k as usize] = hash;
            if keep == Some(k) {
                kept = Some(seen.clone());
            }
        },
    )?;
    Ok(VersionViews {
        hashes,
        own: own.unwrap_or_else(|| client_body_hash(body)),
        kept,
    })
}

/// A body's own client hash and its views from version 0 up, consecutive
/// versions that see it alike grouped in one **rung**. Views that differ
/// only in how a number is written are one view: a JavaScript client
/// cannot tell them apart, and their synthetic ids are one id
/// ([`synthetic_rev`]).
///
/// The rungs from the body's own version up (its **foot**) form a
/// **ladder**: each is presented as a synthetic child of the one below,
/// the foot as a child of the base, so a phone moving up to a newer
/// version receives a descendant of the rung it holds and downloads one
/// revision, and only where the shape changed. The rungs below the foot
/// are each presented as a child of the base: their views depend on the
/// journal's complements, which later writes change, and a change of one
/// would change the id of every rung chained above it, leaving phones
/// with copies no retirement names.
struct BodyViews {
    own: String,
    rungs: Vec<Rung>,
    foot: usize,
}

impl BodyViews {
    /// The views of the stored revision `rev`, whose body is `body`.
    fn of(
        set: &MigrationSet,
        rev: &str,
        body: &Value,
        journal: &Journal,
    ) -> Result<BodyViews, LensError> {
        let version = stored_version(set, journal, rev, body);
        let views = version_views(set, body, version, journal, None)?;
        Ok(BodyViews::from_hashes(views.own, views.hashes, version))
    }

    /// The views of a body at `version` from their hashes, in version order.
    fn from_hashes(own: String, hashes: Vec<String>, version: u32) -> BodyViews {
        let mut rungs: Vec<Rung> = Vec::new();
        for (k, hash) in hashes.into_iter().enumerate() {
            match rungs.last_mut() {
                Some(last) if last.hash == hash => last.versions.push(k as u32),
                _ => rungs.push(Rung {
                    hash,
                    versions: vec![k as u32],
                }),
            }
        }
        let mut views = BodyViews {
            own,
            rungs,
            foot: 0,
        };
        views.foot = views.rung_of(version);
        views
    }

    /// True when every version sees the body as it is.
    fn alike(&self) -> bool {
        self.rungs.iter().all(|v| v.hash == self.own)
    }

    /// The rung version `k` is on (the newest for a version beyond it).
    fn rung_of(&self, k: u32) -> usize {
        self.rungs
            .iter()
            .position(|r| r.versions.contains(&k))
            .unwrap_or(self.rungs.len().saturating_sub(1))
    }

    /// The synthetic revision presenting each rung on `base` in `context`
    /// (element `i` presents rung `i`): on the ladder, a child of the rung
    /// below; the foot and the rungs below it, a child of `base`. A ladder
    /// rung's id names every rung below it down to the foot, so it denotes
    /// one history as well as one body.
    fn presentations(&self, base: &str, checksum: &str, context: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::with_capacity(self.rungs.len());
        for (i, rung) in self.rungs.iter().enumerate() {
            let parent = match i > self.foot {
                true => out[i - 1].as_str(),
                false => base,
            };
            out.push(synthetic_rev_of(parent, checksum, &rung.hash, context));
        }
        out
    }

    /// The `_revisions` history of rung `i`'s presentation (`ids`: the
    /// [`BodyViews::presentations`]) on a base with history `base_history`.
    fn history(&self, ids: &[String], i: usize, base_history: &[String]) -> Vec<String> {
        let below = if i >= self.foot { self.foot } else { i };
        let mut chain: Vec<String> = ids[below..=i].iter().rev().cloned().collect();
        chain.extend_from_slice(base_history);
        chain
    }

    /// The rungs whose presentations a tombstone must retire for a phone
    /// to be left with one live leaf: each rung below the foot (a branch of
    /// its own) and the ladder's top (every ladder rung is its ancestor).
    /// Where rung `presented` is presented (the leaf's own views, in the
    /// current context), only the rungs below the foot and below it: a
    /// phone moving up holds one of those; the ladder below it is its
    /// history.
    fn retired(&self, presented: Option<usize>) -> Vec<usize> {
        match presented {
            Some(r) => (0..self.foot.min(r)).collect(),
            None => (0..self.foot).chain([self.rungs.len() - 1]).collect(),
        }
    }
}

/// The version a phone's copy presented, from the synthetic revisions
/// between it and its stored base: `path` lists them from the copy down to
/// the base's child (top first), `base` is the stored revision and `body`
/// its body. `None` when `path` presents no rung of `base`'s views. Of a
/// rung's versions, the oldest.
pub fn presented_version(
    set: &MigrationSet,
    checksum: &str,
    base: &str,
    body: &Value,
    journal: &Journal,
    path: &[String],
) -> Result<Option<u32>, LensError> {
    let views = BodyViews::of(set, base, body, journal)?;
    let oldest = |i: usize| views.rungs.get(i).and_then(|r| r.versions.first().copied());
    // A rung below the foot: a child of the base.
    if let [copy] = path {
        for (i, rung) in views.rungs.iter().enumerate().take(views.foot) {
            if presents_hash(copy, base, checksum, &rung.hash) {
                return Ok(oldest(i));
            }
        }
    }
    // A ladder rung: the foot and the rungs above it, up to the copy.
    let mut parent = base;
    for (step, rev) in path.iter().rev().enumerate() {
        match views.rungs.get(views.foot + step) {
            Some(rung) if presents_hash(rev, parent, checksum, &rung.hash) => parent = rev,
            _ => return Ok(None),
        }
    }
    Ok(match path.len() {
        0 => None,
        n => oldest(views.foot + n - 1),
    })
}

/// The **anchor** of a stored leaf: the revision its presentations derive
/// from, as its index in `history(leaf)` (0: the leaf itself). Walking
/// down from the leaf, a revision rewind wrote on its parent (a journal
/// image names the parent and the revision's body hash, and holds the
/// parent's exact body) that every version sees as it sees the parent is
/// passed over: a migration, a rollback's before-image and a re-upgrade
/// change no version's view (the lens laws), so they change no presented
/// revision id either. A phone at any version holding an edit it has not
/// pushed yet receives nothing to conflict with while a run rewrites
/// storage, and downloads nothing for it. The walk stops at a human
/// revision, at a gateway's translation of a push (see `anchor_walk`),
/// or at a change of some view.
pub fn anchor(set: &MigrationSet, leaf: &Value, journal: &Journal) -> Result<usize, LensError> {
    Ok(anchor_walk(set, leaf, journal, None)?.0)
}

/// [`anchor`], and the anchor's version. `leaf_views`: the leaf's
/// [`version_views`] hashes, when known.
fn anchor_walk(
    set: &MigrationSet,
    leaf: &Value,
    journal: &Journal,
    leaf_views: Option<&[String]>,
) -> Result<(usize, u32), LensError> {
    let hist = history(leaf);
    let rev = hist.first().map(String::as_str).unwrap_or("");
    let mut version = stored_version(set, journal, rev, leaf);
    if is_deleted(leaf) || journal.images.is_empty() {
        return Ok((0, version));
    }
    // The chain of revisions a run wrote, down from the leaf: (place in
    // the history, the parent's body when journaled). It stops at a
    // revision a gateway wrote (the translation of a push): below it is
    // the phone's own revision, which is never the anchor. Its views may
    // equal the translation's only once the journal's complements have
    // grown (a later run completes what the translation lacked), and an
    // anchor moving down onto it would present again the ids retired on
    // phones while it was an ancestor.
    let mut chain: Vec<(usize, Option<Value>)> = Vec::new();
    let leaf_hash = body_hash(leaf);
    let mut here = leaf_hash.clone();
    while let Some(parent) = hist.get(chain.len() + 1) {
        // Of the images of one write, the first journaled: a gateway and a
        // run that both translated the same revision journal the same
        // write (one of them then finds it written), and the later image
        // must not move the anchor once the revision is stored (a run's
        // image after a gateway's passed the walk on through the
        // translation, and phones were presented retirements of what they
        // held; found by the Rust drill).
        let Some(image) = journal
            .images
            .iter()
            .find(|i| i.rev == *parent && i.after == here)
        else {
            break;
        };
        let (Some((previous, hash)), Some(_)) = (image.read_before(), &image.run) else {
            break;
        };
        here = hash;
        chain.push((chain.len() + 1, previous));
    }
    if chain.is_empty() {
        return Ok((0, version));
    }
    // The lowest revision of the chain every version sees as it sees the
    // leaf (views in between may differ today only because the journal's
    // complements changed: a rollback drops them).
    let computed;
    let mine: &[String] = match leaf_views {
        Some(views) => views,
        None => {
            computed = version_views(set, leaf, version, journal, None)?.hashes;
            &computed
        }
    };
    let mut at = 0;
    for (place, body) in chain.iter().rev() {
        // A body journaled by hash only (a rollback's restore) is passed
        // over: the before-image below it is the one its views equal.
        let Some(body) = body else {
            continue;
        };
        let body_version = stored_version(set, journal, &hist[*place], body);
        if body_hash(body) == leaf_hash
            || version_views(set, body, body_version, journal, None)?.hashes == mine
        {
            at = *place;
            version = body_version;
            break;
        }
    }
    Ok((at, version))
}

/// What presenting a document needs besides its revision: the migrations,
/// their checksum, the document's journal and the presentation contexts.
pub struct Context<'a> {
    /// The migration set the versions are defined by.
    pub set: &'a MigrationSet,
    /// The set's checksum ([`MigrationSet::checksum`]), part of every synthetic revision id.
    pub checksum: &'a str,
    /// The presented document's journal.
    pub journal: &'a Journal,
    /// The presentation contexts, the current one last ([`contexts`]).
    pub contexts: &'a [String],
}

impl Context<'_> {
    fn current(&self) -> &str {
        self.contexts.last().map(String::as_str).unwrap_or("")
    }
}

/// Tombstones retiring the presentations of the rungs of `base` (a
/// revision whose views are `views`, with history `base_history`) in every
/// context of the window: those [`BodyViews::retired`] names (in the
/// context of an epoch after a run, the rung of the version it served
/// only), and for the leaf's own rungs (`presented`: the rung presented in
/// the current context) fewer there. Moves go up the ladder: a phone holding a lower
/// rung receives the rung of its new version as a descendant and needs no
/// tombstone; a phone moving down finds the rung it holds above the one
/// presented, and keeps its shape until the document or the context
/// changes (a stateless gateway cannot serve both directions: a phone
/// fresh at the lower version receives the same answer). A rung in
/// `leaf_history` needs none either: what is presented descends from it.
fn retirements(
    cx: &Context<'_>,
    id: &Value,
    base_history: &[String],
    views: &BodyViews,
    presented: Option<usize>,
    leaf_history: &[String],
    out: &mut Vec<Presented>,
) {
    if views.alike() {
        // Every version sees it alike: it was never presented synthetically.
        return;
    }
    let current = cx.contexts.len() - 1;
    for (index, context) in cx.contexts.iter().enumerate() {
        // In the context of an epoch after a run only that epoch's version
        // was presented.
        let rungs = match (index == current, presented, context_version(context)) {
            (true, Some(_), _) => views.retired(presented),
            (_, _, Some(v)) => vec![views.rung_of(v)],
            _ => views.retired(None),
        };
        if rungs.is_empty() {
            // The leaf's own rungs in the current context, none below both
            // the foot and the rung presented (the common case, a foot at
            // version 0): nothing to retire, no ids to compute.
            continue;
        }
        let ids = views.presentations(&base_history[0], cx.checksum, context);
        for i in rungs {
            if leaf_history.contains(&ids[i]) {
                continue;
            }
            let retired = tombstone_rev(&ids[i]);
            if out.iter().any(|p| p.rev == retired) {
                continue;
            }
            let mut chain = vec![retired.clone()];
            chain.extend(views.history(&ids, i, base_history));
            let doc = with_meta(json!({"_id": id, "_deleted": true}), &chain);
            out.push(Presented {
                rev: retired,
                doc: Arc::new(doc),
                synthetic: true,
            });
        }
    }
}

/// How many stored ancestors below a leaf's anchor have the presentations
/// of their rungs retired (a phone's translated copy may be that
/// many revisions behind). A copy further behind heals in two syncs: the
/// phone pushes it back, the gateway retires it on the server, the next
/// pull brings the tombstone. Every ancestor multiplies what each pull
/// carries (views × contexts): ten history entries made phones' trees
/// reach ~450 revisions per document in the drill; three stored ones left
/// phones of the PouchDB drill (tests/pouchdb/drill.test.js, seed 3) with
/// conflicts.
pub const ANCESTORS: usize = 5;

/// True when `doc` is a deletion (`"_deleted": true`).
pub(crate) fn is_deleted(doc: &Value) -> bool {
    doc.get("_deleted").and_then(Value::as_bool) == Some(true)
}

/// Presents a stored leaf (a document with `_rev` and `_revisions`) to a
/// client at version `k`, with `ancestors` (`(rev, body)` of stored
/// revisions of its history, where known; the first [`ANCESTORS`] below
/// its [`anchor`] count). A deleted leaf is presented as itself, with the
/// retirements of its ancestors' rungs.
///
/// A document every version sees alike is presented as itself. Otherwise a
/// client at any version gets the rung of its version on the ladder of the
/// leaf's anchor (`BodyViews`), a synthetic descendant carrying its view
/// (so a phone holding the leaf itself, or a lower rung of the ladder,
/// receives a descendant), together with tombstones retiring what a phone
/// may hold besides (`retirements`): a phone that moves up a version, or
/// whose translated copy the server moved past, is left with exactly one
/// live leaf after one pull.
pub fn present(
    cx: &Context<'_>,
    leaf: &Value,
    k: u32,
    ancestors: &[(String, Value)],
) -> Result<Vec<Presented>, LensError> {
    let (set, checksum, journal) = (cx.set, cx.checksum, cx.journal);
    let hist = history(leaf);
    let rev = hist.first().cloned().unwrap_or_default();
    // The presentations derive from the anchor (a deleted leaf is its own);
    // the revisions above it were never presented (they are its
    // presentation).
    if k > set.latest() {
        return Err(LensError::NoSuchVersion {
            asked: k,
            latest: set.latest(),
        });
    }
    let deleted = is_deleted(leaf);
    // Every version's view of the leaf, computed once for all below.
    // (A deleted leaf is presented as itself: it has no views.)
    let views = if deleted {
        VersionViews {
            hashes: Vec::new(),
            own: String::new(),
            kept: None,
        }
    } else {
        let version = stored_version(set, journal, &rev, leaf);
        version_views(set, leaf, version, journal, Some(k))?
    };
    let (at, anchor_version) = anchor_walk(set, leaf, journal, Some(&views.hashes))?;
    let base = &hist[at.min(hist.len().saturating_sub(1))..];
    let id = leaf.get("_id").cloned().unwrap_or(Value::Null);
    let mut out = Vec::new();
    let seen = views.kept.unwrap_or(Value::Null);
    // The ladder's foot is the anchor's version: the anchor's views are
    // the leaf's, and it is from the anchor's body that the ladder is
    // computed again when a later leaf retires it.
    let leaf_views = BodyViews::from_hashes(views.own, views.hashes, anchor_version);
    if deleted || leaf_views.alike() {
        out.push(Presented {
            rev,
            doc: Arc::new(leaf.clone()),
            synthetic: false,
        });
    } else {
        let ids = leaf_views.presentations(&base[0], checksum, cx.current());
        let rung = leaf_views.rung_of(k);
        let chain = leaf_views.history(&ids, rung, base);
        out.push(Presented {
            rev: chain[0].clone(),
            doc: Arc::new(with_meta(body_of(&seen), &chain)),
            synthetic: true,
        });
        retirements(cx, &id, base, &leaf_views, Some(rung), &hist, &mut out);
    }
    // The rungs of the ancestors below the anchor.
    let others = ancestors
        .iter()
        .filter_map(|(rev, body)| Some((hist.iter().position(|r| r == rev)?, body)))
        .filter(|(pos, _)| *pos > at)
        .take(ANCESTORS);
    for (pos, body) in others {
        let views = BodyViews::of(set, &hist[pos], body, journal)?;
        retirements(cx, &id, &hist[pos..], &views, None, &hist, &mut out);
    }
    // Copies phones pushed back that are no longer presented, on this
    // branch (`Journal::retired`).
    for copy in &journal.retired {
        let Some(pos) = hist.iter().position(|r| *r == copy.base) else {
            continue;
        };
        let retired = tombstone_rev(&copy.rev);
        if out.iter().any(|p| p.rev == retired || p.rev == copy.rev) {
            continue;
        }
        let mut chain = vec![retired.clone(), copy.rev.clone()];
        chain.extend_from_slice(&copy.between);
        chain.extend_from_slice(&hist[pos..]);
        out.push(Presented {
            rev: retired,
            doc: Arc::new(with_meta(json!({"_id": id, "_deleted": true}), &chain)),
            synthetic: true,
        });
    }
    Ok(out)
}

/// True when `leaf` was written by rewind (a migration, translation or
/// rollback) on top of one of `ancestors`, with no human edit in between:
/// a human edit on such an ancestor wins over it.
pub fn is_system_descendant(leaf: &Value, ancestors: &[String], journal: &Journal) -> bool {
    system_base(leaf, ancestors, journal).is_some()
}

/// The revision of `ancestors` that rewind's writes leading to `leaf` start
/// from (the nearest, walking down from the leaf through journal images),
/// when `leaf` is such a write: see [`is_system_descendant`].
pub fn system_base<'a>(
    leaf: &Value,
    ancestors: &'a [String],
    journal: &Journal,
) -> Option<&'a String> {
    let hist = history(leaf);
    let mut here = body_hash(leaf);
    let mut at = 0usize;
    for _ in 0..=journal.images.len() {
        let step = journal.images.iter().rev().find_map(|image| {
            let pos = hist.iter().skip(at + 1).position(|r| *r == image.rev)?;
            (image.after == here).then_some((at + 1 + pos, image))
        });
        let (pos, image) = step?;
        if let Some(base) = ancestors.iter().find(|a| **a == image.rev) {
            return Some(base);
        }
        here = image.hash_before()?;
        at = pos;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `present` for a pinned client, before any run.
    fn present_pinned(
        set: &MigrationSet,
        journal: &Journal,
        leaf: &Value,
        k: u32,
        ancestors: &[(String, Value)],
    ) -> Vec<Presented> {
        let contexts = contexts(&["".to_owned()], journal, true, &[]);
        let cx = Context {
            set,
            checksum: "ck",
            journal,
            contexts: &contexts,
        };
        present(&cx, leaf, k, ancestors).unwrap()
    }

    fn persons_set() -> MigrationSet {
        let file = std::path::PathBuf::from("0001-persons-to-contacts.yaml");
        let text = include_str!("../../../examples/baseline/0001-persons-to-contacts.yaml");
        MigrationSet::parse_files(&[(file, text.to_owned())], "rewind").unwrap()
    }

    /// A person stored at v0 as revision 1-aaaa: v0 and v1 see it differently.
    fn person_at_v0() -> Value {
        json!({
            "_id": "p", "type": "person", "name": "Ann",
            "_rev": "1-aaaa", "_revisions": {"start": 1, "ids": ["aaaa"]}
        })
    }

    /// A state whose history is `runs` (id, from, to), oldest first.
    fn state_after(runs: &[(&str, u32, u32)]) -> State {
        let mut state = State::default();
        for (id, from, to) in runs {
            state.record(rewind_engine::state::Run::new(*id, *from, *to, 0));
        }
        state
    }

    /// The revisions [`person_at_v0`] is presented with at `k` to a client
    /// following `/{db}` in `state`, and the ids of its two rungs in
    /// `context`.
    fn person_following(state: &State, k: u32, context: &str) -> (Vec<String>, [String; 2]) {
        let set = persons_set();
        let leaf = person_at_v0();
        let journal = Journal::default();
        let contexts = contexts(&epochs(state), &journal, false, &[]);
        let cx = Context {
            set: &set,
            checksum: "ck",
            journal: &journal,
            contexts: &contexts,
        };
        let seen = |k: u32| view(&set, &leaf, k, &journal).unwrap();
        let rung0 = synthetic_rev("1-aaaa", "ck", &seen(0), context);
        let rung1 = synthetic_rev(&rung0, "ck", &seen(1), context);
        let revs = present(&cx, &leaf, k, &[])
            .unwrap()
            .into_iter()
            .map(|p| p.rev)
            .collect();
        (revs, [rung0, rung1])
    }

    #[test]
    fn an_unstamped_revision_a_phone_pushed_is_read_at_the_version_journaled() {
        // A v1 phone whose app writes no stamp pushes a new contact
        // (1-bbbb). The gateway journals the push at v1, stores the
        // revision as sent, then writes its stamped translation (2-cccc).
        let set = persons_set();
        let mut pushed = json!({"_id": "c", "type": "contact", "contact_type": "person"});
        let mut translated = pushed.clone();
        translated["rewind"] = json!(1);
        pushed["_rev"] = json!("1-bbbb");
        pushed["_revisions"] = json!({"start": 1, "ids": ["bbbb"]});
        translated["_rev"] = json!("2-cccc");
        translated["_revisions"] = json!({"start": 2, "ids": ["cccc", "bbbb"]});
        let journal = Journal {
            images: vec![rewind_engine::journal::Image {
                from: 1,
                to: 1,
                rev: "1-bbbb".into(),
                after: body_hash(&translated),
                body: serde_json::to_string(&body_of(&pushed)).unwrap(),
                run: None,
                before: None,
                kept: None,
            }],
            ..Journal::default()
        };
        // Between the two writes (or after a crash there) a v0 phone is
        // presented the v0 shape, not the body as stored.
        let window = present_pinned(&set, &journal, &pushed, 0, &[]);
        assert_eq!(window[0].doc["type"], "person", "{:?}", window[0].doc);
        assert!(window[0].synthetic);
        // Unjournaled, the same body would be read as version 0.
        let unjournaled = present_pinned(&set, &Journal::default(), &pushed, 0, &[]);
        assert_eq!(unjournaled[0].doc["type"], "contact");
        // Once the translation is the leaf, the v0 phone gets the same
        // shape, and a tombstone for what it was presented in between.
        let ancestors = [("1-bbbb".to_owned(), body_of(&pushed))];
        let after = present_pinned(&set, &journal, &translated, 0, &ancestors);
        assert_eq!(body_of(&after[0].doc), body_of(&window[0].doc));
        let retired = tombstone_rev(&window[0].rev);
        assert!(
            after.iter().any(|p| p.rev == retired),
            "{:?}",
            after.iter().map(|p| &p.rev).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_migration_changes_no_presented_revision_id() {
        // A person at v0 (1-aaaa), migrated by run r1 to v1 (2-bbbb): the
        // migration changes no version's view, so a phone at either
        // version is presented the same revision before and after it, and
        // a phone holding an unpushed edit of it receives nothing.
        let set = persons_set();
        let mut before = json!({"_id": "p", "type": "person", "name": "Ann"});
        let mut migrated = view(&set, &before, 1, &Journal::default()).unwrap();
        before["_rev"] = json!("1-aaaa");
        before["_revisions"] = json!({"start": 1, "ids": ["aaaa"]});
        migrated["_rev"] = json!("2-bbbb");
        migrated["_revisions"] = json!({"start": 2, "ids": ["bbbb", "aaaa"]});
        let journal = Journal {
            images: vec![rewind_engine::journal::Image {
                from: 0,
                to: 1,
                rev: "1-aaaa".into(),
                after: body_hash(&migrated),
                body: serde_json::to_string(&body_of(&before)).unwrap(),
                run: Some("r1".into()),
                before: None,
                kept: None,
            }],
            ..Journal::default()
        };
        assert_eq!(anchor(&set, &migrated, &journal).unwrap(), 1);
        // The same revision written by a gateway (the translation of a
        // push: its image names no run) is its own anchor: the walk stops
        // there, and never moves down onto the phone's revision.
        let mut translated = journal.clone();
        translated.images[0].run = None;
        assert_eq!(anchor(&set, &migrated, &translated).unwrap(), 0);
        // A run that translated the same revision meanwhile journals the
        // same write after the gateway (and then finds it written): the
        // first image decides, so the anchor stays where it was.
        let mut raced = translated.clone();
        raced.images.push(journal.images[0].clone());
        assert_eq!(anchor(&set, &migrated, &raced).unwrap(), 0);
        // And the other way round: a gateway's image after the run's.
        let mut raced = journal.clone();
        raced.images.push(translated.images[0].clone());
        assert_eq!(anchor(&set, &migrated, &raced).unwrap(), 1);
        let ancestors = [("1-aaaa".to_owned(), body_of(&before))];
        for k in 0..=1 {
            let was = &present_pinned(&set, &journal, &before, k, &[])[0];
            let now = &present_pinned(&set, &journal, &migrated, k, &ancestors)[0];
            assert_eq!(was.rev, now.rev, "v{k}: the presented revision");
            assert_eq!(body_of(&was.doc), body_of(&now.doc), "v{k}: its body");
        }
        // A rollback restoring the before-image (3-cccc, byte for byte
        // 1-aaaa's body) journals the migrated body by its hash only: the
        // walk goes through it down to 1-aaaa, and nothing presented moves.
        let mut rolled_back = body_of(&before);
        rolled_back["_rev"] = json!("3-cccc");
        rolled_back["_revisions"] = json!({"start": 3, "ids": ["cccc", "bbbb", "aaaa"]});
        let mut after_rollback = journal.clone();
        after_rollback.images.push(rewind_engine::journal::Image {
            from: 1,
            to: 0,
            rev: "2-bbbb".into(),
            after: body_hash(&rolled_back),
            body: String::new(),
            run: Some("r2".into()),
            before: Some(body_hash(&migrated)),
            kept: None,
        });
        assert_eq!(anchor(&set, &rolled_back, &after_rollback).unwrap(), 2);
        for k in 0..=1 {
            let was = &present_pinned(&set, &journal, &before, k, &[])[0];
            let now = &present_pinned(&set, &after_rollback, &rolled_back, k, &ancestors)[0];
            assert_eq!(
                was.rev, now.rev,
                "v{k}: the presented revision after the rollback"
            );
        }
        // A revision nobody journaled (a human edit) is its own anchor.
        let mut edited = migrated.clone();
        edited["name"] = json!("Ann B.");
        assert_eq!(anchor(&set, &edited, &journal).unwrap(), 0);
    }

    #[test]
    fn a_device_moving_down_is_presented_in_its_epoch_with_the_ladder_it_held_retired() {
        // A person at v0, no run: a pinned phone at v1 holds the v1 rung of
        // the pinned context, above the v0 rung. Named, and moved down to
        // v0, it is presented the v0 view in its device epoch (an id no
        // other phone holds, a child of the stored revision) and a
        // tombstone retiring the pinned ladder's top rung, the one it holds:
        // one live leaf, the v0 view.
        let set = persons_set();
        let leaf = person_at_v0();
        let journal = Journal::default();
        let seen = |k: u32| view(&set, &leaf, k, &journal).unwrap();
        let pinned0 = synthetic_rev("1-aaaa", "ck", &seen(0), PINNED);
        let pinned1 = synthetic_rev(&pinned0, "ck", &seen(1), PINNED);
        assert_eq!(
            present_pinned(&set, &journal, &leaf, 1, &[])[0].rev,
            pinned1
        );
        let device = ["device d 1 x".to_owned()];
        let contexts = contexts(&["".to_owned()], &journal, true, &device);
        assert_eq!(contexts.last(), Some(&device[0]), "the current context");
        assert!(
            contexts.contains(&PINNED.to_owned()),
            "the pinned context is retired"
        );
        let cx = Context {
            set: &set,
            checksum: "ck",
            journal: &journal,
            contexts: &contexts,
        };
        let revs: Vec<String> = present(&cx, &leaf, 0, &[])
            .unwrap()
            .into_iter()
            .map(|p| p.rev)
            .collect();
        let own0 = synthetic_rev("1-aaaa", "ck", &seen(0), &device[0]);
        assert_eq!(revs[0], own0);
        assert_ne!(own0, pinned0);
        assert!(revs.contains(&tombstone_rev(&pinned1)), "{revs:?}");
        // Following `/{db}` in the first epoch, the device is presented in
        // its own context too (as `/v/{k}` and `/{db}` present alike until
        // the first run); after a run, in the run's epoch with its own,
        // retiring the plain epochs and its pinned context.
        let first = contexts_of(&[""], &journal, false, &device);
        assert_eq!(first.last(), Some(&device[0]));
        let later = contexts_of(&["", "7:r1"], &journal, false, &device);
        assert_eq!(later.last().map(String::as_str), Some("7:r1 device d 1 x"));
        for held in [PINNED, "7:r1", device[0].as_str()] {
            assert!(later.iter().any(|c| c == held), "{held} retired: {later:?}");
        }
        // Pinned again after following (a device epoch each time it leaves
        // `/{db}`): what it followed in is retired.
        let device2 = ["device d 1 x".to_owned(), "device d 2 y".to_owned()];
        let again = contexts_of(&["", "7:r1"], &journal, true, &device2);
        assert_eq!(again.last(), Some(&device2[1]));
        for held in ["7:r1 device d 1 x", "device d 1 x", PINNED] {
            assert!(again.iter().any(|c| c == held), "{held} retired: {again:?}");
        }
        assert!(
            !again.iter().any(|c| c == "7:r1 device d 2 y"),
            "its next follow context is fresh"
        );
        // A second move down: the first device epoch is retired in turn.
        let device = ["device d 1 x".to_owned(), "device d 2 y".to_owned()];
        let second = contexts_of(&[""], &journal, true, &device);
        assert_eq!(second.last(), Some(&device[1]));
        assert!(second.contains(&device[0]) && second.contains(&PINNED.to_owned()));
    }

    fn contexts_of(
        epochs: &[&str],
        journal: &Journal,
        pinned: bool,
        device: &[String],
    ) -> Vec<String> {
        let epochs: Vec<String> = epochs.iter().map(|e| (*e).to_owned()).collect();
        contexts(&epochs, journal, pinned, device)
    }

    #[test]
    fn a_phone_moving_up_receives_a_descendant_of_the_rung_it_holds() {
        // A person stored at v0, no run: v0 sees it as `person`, v1 as a
        // contact. The v1 view is presented on the rung above the v0 view,
        // as its child: a phone at v0 moving up to v1 (its app updated)
        // downloads that one revision and holds one live leaf; a fresh
        // phone at either version downloads one revision.
        let set = persons_set();
        let leaf = person_at_v0();
        let journal = Journal::default();
        let at = |k: u32| present_pinned(&set, &journal, &leaf, k, &[]);
        let (at0, at1) = (at(0), at(1));
        assert_eq!(at0.len(), 1, "v0: its view alone");
        assert_eq!(at1.len(), 1, "v1: its view alone");
        assert_eq!(history(&at0[0].doc), [at0[0].rev.clone(), "1-aaaa".into()]);
        assert_eq!(
            history(&at1[0].doc),
            [at1[0].rev.clone(), at0[0].rev.clone(), "1-aaaa".into()],
            "v1's rung descends from v0's"
        );
        assert!(presents(
            &at1[0].rev,
            &at0[0].rev,
            "ck",
            &body_of(&at1[0].doc)
        ));
        // The version a phone's edit on the v1 rung was made at.
        let path = [at1[0].rev.clone(), at0[0].rev.clone()];
        let version = presented_version(&set, "ck", "1-aaaa", &body_of(&leaf), &journal, &path);
        assert_eq!(version.unwrap(), Some(1));
        let version =
            presented_version(&set, "ck", "1-aaaa", &body_of(&leaf), &journal, &path[1..]);
        assert_eq!(version.unwrap(), Some(0));
        let forged = [
            at1[0].rev.clone(),
            "2-0123456789abcdef0123456789abcdef".into(),
        ];
        let version = presented_version(&set, "ck", "1-aaaa", &body_of(&leaf), &journal, &forged);
        assert_eq!(version.unwrap(), None, "not a ladder of 1-aaaa");
    }

    #[test]
    fn a_rollback_starts_an_epoch_whose_ids_are_fresh_and_one_tombstone_retires_the_ladder_before()
    {
        // Runs that raise the served version start no epoch: a phone
        // following `/{db}` moves up the ladder. A rollback starts one.
        assert_eq!(epochs(&state_after(&[("r1", 0, 1)])), [""]);
        let state = state_after(&[("r1", 0, 1), ("r2", 1, 0)]);
        assert_eq!(epochs(&state), ["", "0:r2"], "a rollback starts one");
        let after = state_after(&[("r1", 0, 1), ("r2", 1, 0), ("r3", 0, 1)]);
        assert_eq!(
            epochs(&after),
            ["0:r2", "1:r3"],
            "after a rollback every run starts one"
        );
        // A person at v0 (1-aaaa), no journal: v0 and v1 see it
        // differently. In r2's epoch a phone following `/{db}` gets, at
        // either version, the rung of r2's epoch and one tombstone on the
        // top of the pinned ladder (the epoch before r2, where `/{db}`
        // served both versions: a phone may hold either rung of it).
        for k in 0..=1 {
            let (revs, pinned) = person_following(&state, k, PINNED);
            assert_eq!(revs.len(), 2, "v{k}: the view and one tombstone: {revs:?}");
            assert_eq!(
                revs[1],
                tombstone_rev(&pinned[1]),
                "v{k}: the pinned ladder's top"
            );
            assert_ne!(revs[0], pinned[k as usize], "v{k}: a fresh id");
            assert!(is_synthetic_rev(&revs[0]) && is_synthetic_rev(&pinned[0]));
            assert!(!is_synthetic_rev(&revs[1]) && !is_synthetic_rev("2-0123456789abcdef"));
        }
    }

    #[test]
    fn after_a_rollback_each_run_is_an_epoch_that_retires_the_rung_it_served() {
        // Rollback r2 starts epoch "0:r2"; re-upgrade r3 starts "1:r3" (a
        // phone following `/{db}` gets the v1 rung there); rollback r4
        // starts "0:r4", where a phone following `/{db}` gets a tombstone
        // retiring the v1 rung of r3's epoch.
        let state = state_after(&[("r1", 0, 1), ("r2", 1, 0), ("r3", 0, 1), ("r4", 1, 0)]);
        assert_eq!(epochs(&state), ["1:r3", "0:r4"]);
        let (revs, r3) = person_following(&state, 0, "1:r3");
        assert!(
            revs.contains(&tombstone_rev(&r3[1])),
            "r3's v1 rung retired: {revs:?}"
        );
    }

    #[test]
    fn the_rungs_below_the_anchors_version_are_children_of_the_anchor() {
        // A contact stored at v1 (1-cccc, stamped): v0 sees it as a person.
        // Its foot is v1's rung: v0's rung is a child of the anchor beside
        // it, not below it (its view reads complements later writes
        // replace). A phone at v0 moving up gets the v1 rung and a
        // tombstone for the v0 rung it holds.
        let set = persons_set();
        let leaf = json!({
            "_id": "p", "type": "contact", "contact_type": "person", "name": "Ann", "rewind": 1,
            "_rev": "1-cccc", "_revisions": {"start": 1, "ids": ["cccc"]}
        });
        let journal = Journal::default();
        let at = |k: u32| present_pinned(&set, &journal, &leaf, k, &[]);
        let (at0, at1) = (at(0), at(1));
        assert_eq!(history(&at0[0].doc), [at0[0].rev.clone(), "1-cccc".into()]);
        assert_eq!(history(&at1[0].doc), [at1[0].rev.clone(), "1-cccc".into()]);
        assert_eq!(at0.len(), 1, "v0: its rung alone");
        let retired: Vec<&str> = at1[1..].iter().map(|p| p.rev.as_str()).collect();
        assert_eq!(
            retired,
            [tombstone_rev(&at0[0].rev)],
            "v1 retires the v0 rung"
        );
    }

    #[test]
    fn retirements_are_told_by_their_id() {
        for synthetic in ["3-0123456789abcdef0123456789abcdef", "1-x", "12-ab"] {
            let retired = tombstone_rev(synthetic);
            assert!(is_retirement_rev(&retired), "{retired}");
            assert_eq!(generation(&retired), generation(synthetic) + 1);
            // It names the revision it retires.
            assert_ne!(retired, tombstone_rev("3-ffffffffffffffffffffffffffffffff"));
        }
        for other in [
            "4-0123456789abcdef0123456789abcdef",
            "4-967a00dff5e02add41819138abb3284d",
            "4-",
            "nonsense",
            "4-é123456789abcdef0123456789abcde",
        ] {
            assert!(!is_retirement_rev(other), "{other}");
        }
    }
}
