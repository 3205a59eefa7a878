//! Version views: how a stored revision is presented to a client at version k.
//!
//! Invariant: the presentation is a pure function of the stored leaf (with
//! its `_revisions`), the document's journal and the migration set, so two
//! gateways over the same store answer byte for byte the same, and a
//! revision id always denotes one body:
//!
//! - a document every version sees alike is presented as itself;
//! - otherwise, at every version, as a synthetic revision above the stored
//!   leaf's anchor carrying that version's view, with the id
//!   `{gen}-md5(anchor rev, migration-set checksum, view hash)`: derived from
//!   the body, so it can denote nothing else, and any gateway recognises it
//!   when a phone pushes it back. The versions that see the body alike form
//!   runs; the view of each run is a child of the previous run's view (the
//!   first a child of the anchor), so the view at a version descends from
//!   every older version's view: a phone that moves up receives one
//!   revision per document whose shape changed, and nothing to retire;
//! - next to it, tombstones (`{gen+1}-md5(retired synthetic rev)`) retire the
//!   views presented in other contexts and the views of its recent
//!   ancestors, one per chain: whatever translated copy a phone held, after
//!   one pull it holds exactly one live leaf, the current view.

use rewind_engine::journal::{body_hash, body_of, client_body_hash, Journal};
use rewind_engine::state::State;
use rewind_lens::{Complements, LensError, MigrationSet};
use serde_json::{json, Value};

/// Reads complements from a journal without changing it.
struct ReadOnly<'a>(&'a Journal);

impl Complements for ReadOnly<'_> {
    fn get(&mut self, version: u32) -> Option<Value> {
        self.0.kept_for(version)
    }
    fn put(&mut self, _: u32, _: Option<Value>) {}
}

/// The version a stored body is at: its stamp, or 0.
pub fn version_of(set: &MigrationSet, doc: &Value) -> u32 {
    set.stamp_of(doc).unwrap_or(0).min(set.latest())
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
    let from = version_of(set, doc);
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

/// The synthetic revision presenting `body` at place `place` of the chain
/// of views above `base` (place 0: a child of `base`; see [`present`]), in
/// presentation `context` (see [`contexts`]): derived from the body, so it
/// denotes nothing else, at any version. Its first 16 hex digits depend on
/// the base, the migrations and the body only, so a synthetic revision is
/// recognised whatever context and place it was presented in; the other 16
/// name the context (with no context, the id is the plain md5); its
/// generation is the base's plus one plus its place.
pub fn synthetic_rev(
    base: &str,
    checksum: &str,
    body: &Value,
    context: &str,
    place: usize,
) -> String {
    synthetic_rev_of_hash(base, checksum, &client_body_hash(body), context, place)
}

/// [`synthetic_rev`] of a body whose [`client_body_hash`] is `hash`.
fn synthetic_rev_of_hash(
    base: &str,
    checksum: &str,
    hash: &str,
    context: &str,
    place: usize,
) -> String {
    let key = synthetic_key(base, checksum, hash);
    let plain = format!("{:x}", md5::compute(&key));
    let tail = if context.is_empty() {
        plain[16..].to_owned()
    } else {
        format!("{:x}", md5::compute(format!("{key}\n{context}")))[..16].to_owned()
    };
    format!(
        "{}-{}{tail}",
        generation(base) + 1 + place as u64,
        &plain[..16]
    )
}

fn synthetic_key(base: &str, checksum: &str, hash: &str) -> String {
    // The client's hash: a phone pushes back the body as its JavaScript
    // wrote it (`34.0` comes back as `34`), and must still be recognised.
    format!("rewind\n{base}\n{checksum}\n{hash}")
}

/// True when `rev` is a synthetic revision presenting `body` above `base`,
/// in any context, at any place of the chain of views.
pub fn presents(rev: &str, base: &str, checksum: &str, body: &Value) -> bool {
    presents_hash(rev, base, checksum, &client_body_hash(body))
}

/// [`presents`] for a body whose [`client_body_hash`] is `hash`.
fn presents_hash(rev: &str, base: &str, checksum: &str, hash: &str) -> bool {
    if generation(rev) <= generation(base) {
        return false;
    }
    let place = (generation(rev) - generation(base) - 1) as usize;
    let expected = synthetic_rev_of_hash(base, checksum, hash, "", place);
    rev.len() == expected.len()
        && rev.get(..expected.len() - 16) == expected.get(..expected.len() - 16)
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
/// The other contexts listed are the ones whose copies the client may hold
/// and that its presentation retires: following `/{db}`, the window's
/// epochs and the pinned context (a phone moves from `/v/{k}` to `/{db}`
/// in one pull); pinned, the pinned context's older adoptions only (a
/// pinned client retiring `/{db}`'s views would find them deleted on
/// moving there: moves between the two kinds go one way, like moves
/// between versions).
pub fn contexts(epochs: &[String], journal: &Journal, pinned: bool) -> Vec<String> {
    // The adoption contexts in the window: one more than the epochs', as
    // adopting a copy names two revisions, one at a time (the copy, then
    // its translation).
    let adoptions = adoption_names(journal, WINDOW + 1);
    let window = &epochs[epochs.len().saturating_sub(WINDOW)..];
    let epoch = match pinned {
        true => PINNED,
        false => window.last().map(String::as_str).unwrap_or(""),
    };
    let adoption = adoptions.last().map(String::as_str).unwrap_or("");
    // Every pair of an epoch and an adoption (a phone may have pulled
    // before both changed: a restore's adoptions, then the upgrade after
    // it), the current context last.
    let mut retired: Vec<&str> = vec![PINNED];
    if !pinned {
        retired.extend(window.iter().map(String::as_str).filter(|e| *e != PINNED));
    }
    let mut out = Vec::new();
    for e in retired {
        for a in &adoptions {
            if (e, a.as_str()) != (epoch, adoption) {
                out.push(context_name(e, a));
            }
        }
    }
    out.push(context_name(epoch, adoption));
    out
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
/// that lowered the version served to clients that do not choose one (an
/// instant rollback from its start, any other run when it finishes). A run
/// that raises it starts no epoch: the view at a version descends from the
/// older versions' views, so phones following `/{db}` move up within a
/// context, downloading only the documents whose shape changed; a phone
/// that moves down needs a context of fresh ids (see [`present`]).
pub fn epochs(state: &State) -> Vec<String> {
    let out = all_epochs(state);
    out[out.len().saturating_sub(WINDOW)..].to_vec()
}

/// Every epoch of the database's history, oldest first (see [`epochs`]).
fn all_epochs(state: &State) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut served = state
        .history
        .first()
        .or(state.run.as_ref())
        .map_or(state.version, |run| run.from);
    let mut flip = |to: u32, id: &str| {
        if to < served {
            out.push(format!("{to}:{id}"));
        }
        served = to;
    };
    for run in &state.history {
        flip(run.to, &run.id);
    }
    if let (Some(to), Some(run)) = (state.served, &state.run) {
        flip(to, &run.id);
    }
    out.dedup();
    out
}

/// Where a pushed-back synthetic copy (a revision presenting `body` as a
/// synthetic child of `base`) was presented: see [`copy_context`].
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

/// The context a synthetic copy `rev` of `base` presenting `body` was
/// presented in, given the database's state and the document's journal.
pub fn copy_context(
    rev: &str,
    base: &str,
    checksum: &str,
    body: &Value,
    state: &State,
    journal: &Journal,
) -> CopyContext {
    let place = generation(rev).saturating_sub(generation(base) + 1) as usize;
    let is = |context: &str| synthetic_rev(base, checksum, body, context, place) == rev;
    // Current for some client: pinned or following.
    let all = all_epochs(state);
    let epochs = &all[all.len().saturating_sub(WINDOW)..];
    if [false, true]
        .iter()
        .any(|pinned| contexts(epochs, journal, *pinned).iter().any(|c| is(c)))
    {
        return CopyContext::Window;
    }
    let adoptions = adoption_names(journal, usize::MAX);
    // `all_epochs` starts with the epoch before any run, `PINNED`.
    for epoch in &all {
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
        retirement_mark(head)
    )
}

fn retirement_mark(head: &str) -> String {
    format!("{:x}", md5::compute(format!("rewind-retirement\n{head}")))[..16].to_owned()
}

/// True when `rev` is the id of a tombstone rewind wrote or presented to
/// retire a revision ([`tombstone_rev`]). A phone keeps every tombstone it
/// was given as a leaf and offers them again whenever the document
/// changes; `_revs_diff` tells it the server needs none of them.
pub fn is_retirement_rev(rev: &str) -> bool {
    let Some((_, hash)) = rev.split_once('-') else {
        return false;
    };
    hash.len() == 32 && hash.is_char_boundary(16) && retirement_mark(&hash[..16]) == hash[16..]
}

/// When `doc` (a pushed revision with `_revisions`) is a synthetic
/// revision of this migration set, presented in any context, the place in
/// its history of the stored revision it presents a view of (its base,
/// below the chain of views: see [`present`]): a translation going back
/// where it came from. `latest`: the set's latest version (a chain holds
/// at most one view per version).
pub fn synthetic_base(doc: &Value, checksum: &str, latest: u32) -> Option<usize> {
    let hist = history(doc);
    let rev = hist.first()?;
    let hash = client_body_hash(doc);
    (1..hist.len().min(latest as usize + 2))
        .find(|&at| presents_hash(rev, &hist[at], checksum, &hash))
}

/// The version whose view a phone's edit was made from: `history` is the
/// pushed revision's history down to its stored base (last), whose body is
/// `base_body`; the nearest synthetic revision in between (the phone may
/// have edited more than once) presented the view of one run of versions,
/// told by its place in the chain, and the run's oldest version is
/// answered. `None` when no revision in between presents a view of the
/// base.
pub fn presented_version(
    set: &MigrationSet,
    checksum: &str,
    journal: &Journal,
    history: &[String],
    base_body: &Value,
) -> Result<Option<u32>, LensError> {
    let Some((base, above)) = history.split_last() else {
        return Ok(None);
    };
    let views = BodyViews::of(set, base_body, journal)?;
    for rev in above.iter().skip(1) {
        let place = generation(rev).saturating_sub(generation(base) + 1) as usize;
        let Some(run) = views.runs.get(place) else {
            continue;
        };
        if presents_hash(rev, base, checksum, &run.hash) {
            let oldest = match place {
                0 => 0,
                _ => views.runs[place - 1].newest + 1,
            };
            return Ok(Some(oldest));
        }
    }
    Ok(None)
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
    /// The presented document, with `_id`, `_rev` and `_revisions`.
    pub doc: Value,
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

/// A run of consecutive versions that see a body alike: the view's
/// [`client_body_hash`], the view, and the newest version of the run.
struct Run {
    hash: String,
    body: Value,
    newest: u32,
}

/// Every version's view of a body, in version order, each with its
/// [`client_body_hash`]: one walk through the migrations
/// (`MigrationSet::translate_all`), element `k` equal to [`view`] at `k`.
fn version_views(
    set: &MigrationSet,
    body: &Value,
    journal: &Journal,
) -> Result<Vec<(String, Value)>, LensError> {
    let all = if !MigrationSet::is_migratable(body) || is_deleted(body) {
        vec![body.clone(); set.latest() as usize + 1]
    } else {
        set.translate_all(body, version_of(set, body), &mut ReadOnly(journal))?
    };
    Ok(all
        .into_iter()
        .map(|seen| (client_body_hash(&seen), seen))
        .collect())
}

/// A body's own client hash and its views across every version, as runs of
/// versions that see it alike, in version order. Views that differ only in
/// how a number is written are one view: a JavaScript client cannot tell
/// them apart, and their synthetic ids are one id ([`synthetic_rev`]).
struct BodyViews {
    own: String,
    runs: Vec<Run>,
}

impl BodyViews {
    fn of(set: &MigrationSet, body: &Value, journal: &Journal) -> Result<BodyViews, LensError> {
        Ok(BodyViews::from_versions(
            body,
            version_views(set, body, journal)?,
        ))
    }

    fn from_versions(body: &Value, versions: Vec<(String, Value)>) -> BodyViews {
        let mut runs: Vec<Run> = Vec::new();
        for (k, (hash, seen)) in versions.into_iter().enumerate() {
            match runs.last_mut() {
                Some(last) if last.hash == hash => last.newest = k as u32,
                _ => runs.push(Run {
                    hash,
                    body: seen,
                    newest: k as u32,
                }),
            }
        }
        BodyViews {
            own: client_body_hash(body),
            runs,
        }
    }

    /// True when every version sees the body as it is.
    fn alike(&self) -> bool {
        self.runs.iter().all(|v| v.hash == self.own)
    }

    /// The place of the run that version `k` belongs to.
    fn place_of(&self, k: u32) -> usize {
        self.runs
            .iter()
            .position(|run| run.newest >= k)
            .unwrap_or(self.runs.len().saturating_sub(1))
    }

    /// The chain of synthetic revisions presenting the runs up to `place`
    /// above `base_history` (a stored revision's history) in `context`,
    /// newest first, followed by `base_history`: each run's view is a
    /// child of the one before, so the view at a version descends from
    /// the views of every older version.
    fn chain(
        &self,
        base_history: &[String],
        checksum: &str,
        context: &str,
        place: usize,
    ) -> Vec<String> {
        let base = base_history.first().map(String::as_str).unwrap_or("");
        let end = place.min(self.runs.len().saturating_sub(1));
        let mut chain: Vec<String> = self
            .runs
            .get(..=end)
            .unwrap_or_default()
            .iter()
            .enumerate()
            .rev()
            .map(|(at, run)| synthetic_rev_of_hash(base, checksum, &run.hash, context, at))
            .collect();
        chain.extend_from_slice(base_history);
        chain
    }
}

/// Every version's view of a body, as [`client_body_hash`]es in version order.
fn view_hashes(
    set: &MigrationSet,
    body: &Value,
    journal: &Journal,
) -> Result<Vec<String>, LensError> {
    Ok(version_views(set, body, journal)?
        .into_iter()
        .map(|(hash, _)| hash)
        .collect())
}

/// The **anchor** of a stored leaf: the revision its presentations derive
/// from, as its index in `history(leaf)` (0: the leaf itself). Walking
/// down from the leaf, a revision rewind wrote on its parent (a journal
/// image names the parent and the revision's body hash, and holds the
/// parent's exact body) that every version sees as it sees the parent is
/// passed over: a migration, a rollback's before-image, a re-upgrade and a
/// gateway's translation of a push change no version's view (the lens
/// laws), so they change no presented revision id either. A phone at any
/// version holding an edit it has not pushed yet receives nothing to
/// conflict with while a run rewrites storage, and downloads nothing for
/// it. The walk stops at a human revision or at a change of some view.
pub fn anchor(set: &MigrationSet, leaf: &Value, journal: &Journal) -> Result<usize, LensError> {
    Ok(anchor_walk(set, leaf, journal, None)?.0)
}

/// [`anchor`], and the places in the leaf's history above the anchor of
/// the revisions a gateway wrote (translations of pushes, whose images
/// name no run): their views, equal to their parents' with today's
/// complements, may have differed when they were leaves, so they may have
/// been presented. `leaf_views`: the leaf's [`version_views`], when known.
fn anchor_walk(
    set: &MigrationSet,
    leaf: &Value,
    journal: &Journal,
    leaf_views: Option<&[(String, Value)]>,
) -> Result<(usize, Vec<usize>), LensError> {
    let hist = history(leaf);
    if is_deleted(leaf) || journal.images.is_empty() {
        return Ok((0, Vec::new()));
    }
    // The chain of revisions rewind wrote, down from the leaf: (place in
    // the history, the parent's body, whether a gateway wrote the child).
    let mut chain: Vec<(usize, Value, bool)> = Vec::new();
    let leaf_hash = body_hash(leaf);
    let mut here = leaf_hash.clone();
    while let Some(parent) = hist.get(chain.len() + 1) {
        let Some(image) = journal
            .images
            .iter()
            .rev()
            .find(|i| i.rev == *parent && i.after == here)
        else {
            break;
        };
        let Ok(previous) = serde_json::from_str::<Value>(&image.body) else {
            break;
        };
        here = body_hash(&previous);
        chain.push((chain.len() + 1, previous, image.run.is_none()));
    }
    if chain.is_empty() {
        return Ok((0, Vec::new()));
    }
    // The lowest revision of the chain every version sees as it sees the
    // leaf (views in between may differ today only because the journal's
    // complements changed: a rollback drops them).
    let mine: Vec<String> = match leaf_views {
        Some(views) => views.iter().map(|(hash, _)| hash.clone()).collect(),
        None => view_hashes(set, leaf, journal)?,
    };
    let mut at = 0;
    for (place, body, _) in chain.iter().rev() {
        if body_hash(body) == leaf_hash || view_hashes(set, body, journal)? == mine {
            at = *place;
            break;
        }
    }
    let translated = chain
        .iter()
        .filter(|(place, _, by_gateway)| *by_gateway && *place <= at)
        .map(|(place, _, _)| place - 1)
        .collect();
    Ok((at, translated))
}

/// What presenting a document needs besides its revision: the migrations,
/// their checksum, the document's journal and the presentation contexts.
pub struct Context<'a> {
    pub set: &'a MigrationSet,
    pub checksum: &'a str,
    pub journal: &'a Journal,
    /// The presentation contexts, the current one last ([`contexts`]).
    pub contexts: &'a [String],
}

impl Context<'_> {
    fn current(&self) -> &str {
        self.contexts.last().map(String::as_str).unwrap_or("")
    }
}

/// Tombstones retiring the synthetic revisions presenting the views of
/// `base` (a revision with `body` and history `base_history`), one per
/// context of the window: each is a child of the chain of every view
/// ([`BodyViews::chain`]), so it descends from whichever of them a phone
/// holds. (An ancestor stays presented after a run replaced it, as the
/// anchor of the run's revision, until a human revision or a change of
/// view moves the anchor: no context can be passed over.) With
/// `presented` (the leaf, presented in the current context), the current
/// context retires nothing: the view presented at a version descends from
/// the views of every older version, so a phone that moves up (its app
/// updated) holds no tombstone for the view presented there, and receives
/// a descendant of the view it held. (A phone that moves down finds the
/// view it held newer than the one presented: a stateless gateway cannot
/// make a revision both the descendant and the ancestor of another, so one
/// direction of moves within a context is chosen, the one apps take when
/// they update.)
fn retirements(
    cx: &Context<'_>,
    id: &Value,
    base_history: &[String],
    views: &BodyViews,
    presented: bool,
    out: &mut Vec<Presented>,
) {
    if views.alike() {
        // Every version sees it alike: it was never presented synthetically.
        return;
    }
    let current = cx.contexts.len() - 1;
    let top = views.runs.len() - 1;
    for (index, context) in cx.contexts.iter().enumerate() {
        if presented && index == current {
            continue;
        }
        let chain = views.chain(base_history, cx.checksum, context, top);
        let retired = tombstone_rev(&chain[0]);
        if out.iter().any(|p| p.rev == retired) {
            continue;
        }
        let mut with_tombstone = vec![retired.clone()];
        with_tombstone.extend(chain);
        let doc = with_meta(json!({"_id": id, "_deleted": true}), &with_tombstone);
        out.push(Presented {
            rev: retired,
            doc,
            synthetic: true,
        });
    }
}

/// How many stored ancestors below a leaf's anchor have the synthetic
/// children of their views retired (a phone's translated copy may be that
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
/// retirements of its ancestors' views.
///
/// A document every version sees alike is presented as itself. Otherwise a
/// client at any version gets a synthetic revision carrying its view, above
/// the views of the older versions ([`BodyViews::chain`]) and the leaf's
/// anchor (so a phone holding an older version's view, or the leaf itself,
/// always receives a descendant), together with tombstones retiring the
/// views presented in the other contexts of the window, of the leaf and of
/// its ancestors: a phone that moves up a version, or whose translated copy
/// the server moved past, is left with exactly one live leaf after one pull.
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
    let leaf_versions = if deleted {
        Vec::new()
    } else {
        version_views(set, leaf, journal)?
    };
    let (at, translated) = anchor_walk(set, leaf, journal, Some(&leaf_versions))?;
    let base = &hist[at.min(hist.len().saturating_sub(1))..];
    let id = leaf.get("_id").cloned().unwrap_or(Value::Null);
    let mut out = Vec::new();
    let leaf_views = BodyViews::from_versions(leaf, leaf_versions);
    if deleted || leaf_views.alike() {
        out.push(Presented {
            rev,
            doc: leaf.clone(),
            synthetic: false,
        });
    } else {
        let place = leaf_views.place_of(k);
        let chain = leaf_views.chain(base, checksum, cx.current(), place);
        out.push(Presented {
            rev: chain[0].clone(),
            doc: with_meta(body_of(&leaf_views.runs[place].body), &chain),
            synthetic: true,
        });
        retirements(cx, &id, base, &leaf_views, true, &mut out);
    }
    // The views of the ancestors below the anchor, and of the revisions
    // above it that a gateway translated: an anchor can move down when the
    // journal's complements grow (a translation whose view differed from
    // its parent's for lack of a complement no longer does), so phones may
    // hold copies presented on one. (What a run wrote was never presented:
    // its images and complements are written with it.)
    if translated.first() == Some(&0) && !deleted {
        retirements(cx, &id, &hist, &leaf_views, false, &mut out);
    }
    let others = ancestors
        .iter()
        .filter_map(|(rev, body)| Some((hist.iter().position(|r| r == rev)?, body)))
        .filter(|(pos, _)| *pos > at || (*pos > 0 && translated.contains(pos)))
        .take(ANCESTORS);
    for (pos, body) in others {
        let views = BodyViews::of(set, body, journal)?;
        retirements(cx, &id, &hist[pos..], &views, false, &mut out);
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
        // A copy presented above a chain of views (its generation above
        // its base's plus one) hangs from revisions the journal does not
        // name: its tombstone's history stops at the copy (a phone holding
        // it attaches the tombstone there).
        if generation(&copy.rev) == generation(&copy.base) + 1 {
            chain.extend_from_slice(&hist[pos..]);
        }
        out.push(Presented {
            rev: retired,
            doc: with_meta(json!({"_id": id, "_deleted": true}), &chain),
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
        let previous = serde_json::from_str::<Value>(&image.body).ok()?;
        here = body_hash(&previous);
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
        let contexts = contexts(&["".to_owned()], journal, true);
        let cx = Context {
            set,
            checksum: "ck",
            journal,
            contexts: &contexts,
        };
        present(&cx, leaf, k, ancestors).unwrap()
    }

    /// `body` stored as revision `revs[0]`, with history `revs` (newest first).
    fn stored(mut body: Value, revs: &[&str]) -> Value {
        let history: Vec<String> = revs.iter().map(|r| r.to_string()).collect();
        body["_rev"] = json!(revs[0]);
        body["_revisions"] = revisions_member(&history);
        body
    }

    /// A person stored at v0 as `1-aaaa`.
    fn ann() -> Value {
        stored(
            json!({"_id": "p", "type": "person", "name": "Ann"}),
            &["1-aaaa"],
        )
    }

    fn persons_set() -> MigrationSet {
        let file = std::path::PathBuf::from("0001-persons-to-contacts.yaml");
        let text = include_str!("../../../examples/baseline/0001-persons-to-contacts.yaml");
        MigrationSet::parse_files(&[(file, text.to_owned())], "rewind").unwrap()
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
            }],
            ..Journal::default()
        };
        assert_eq!(anchor(&set, &migrated, &journal).unwrap(), 1);
        let ancestors = [("1-aaaa".to_owned(), body_of(&before))];
        for k in 0..=1 {
            let was = &present_pinned(&set, &journal, &before, k, &[])[0];
            let now = &present_pinned(&set, &journal, &migrated, k, &ancestors)[0];
            assert_eq!(was.rev, now.rev, "v{k}: the presented revision");
            assert_eq!(body_of(&was.doc), body_of(&now.doc), "v{k}: its body");
        }
        // A revision nobody journaled (a human edit) is its own anchor.
        let mut edited = migrated.clone();
        edited["name"] = json!("Ann B.");
        assert_eq!(anchor(&set, &edited, &journal).unwrap(), 0);
    }

    #[test]
    fn the_view_at_a_version_descends_from_every_older_versions_view() {
        // A person stored at v0, no run: v0 sees it as `person`, v1 as a
        // contact. A phone at v0 moving up to v1 (its app updated) must
        // receive a descendant of the view it holds, with nothing to
        // retire it: one revision, no tombstone; a fresh phone at v0 holds
        // nothing of v1's view.
        let set = persons_set();
        let leaf = ann();
        let journal = Journal::default();
        let at = |k: u32| present_pinned(&set, &journal, &leaf, k, &[]);
        let (at0, at1) = (at(0), at(1));
        assert_eq!(at0.len(), 1, "v0: its view alone");
        assert_eq!(at1.len(), 1, "v1: its view alone");
        assert_eq!(history(&at0[0].doc), [at0[0].rev.clone(), "1-aaaa".into()]);
        assert_eq!(
            history(&at1[0].doc),
            [at1[0].rev.clone(), at0[0].rev.clone(), "1-aaaa".into()],
            "v1's view is a child of v0's"
        );
        assert_eq!(at1[0].doc["type"], "contact");
        assert_eq!(at0[0].doc["type"], "person");
        // Pushed back, each is told a synthetic revision of the stored one
        // below its chain, and its version is told by its place.
        for (k, presented) in [(0, &at0[0]), (1, &at1[0])] {
            let base = synthetic_base(&presented.doc, "ck", set.latest());
            assert_eq!(base, Some(k as usize + 1), "v{k}: its base");
            let mut edit = presented.doc.clone();
            edit["phone"] = json!("+1");
            let mut hist = vec!["9-ffff".to_owned()];
            hist.extend(history(&presented.doc));
            let base_body = body_of(&leaf);
            let told = presented_version(&set, "ck", &journal, &hist, &base_body).unwrap();
            assert_eq!(told, Some(k), "v{k}: the version an edit on it was made at");
            assert_eq!(
                synthetic_base(&edit, "ck", set.latest()),
                None,
                "v{k}: an edit"
            );
        }
    }

    #[test]
    fn a_retired_revision_gets_one_tombstone_per_context_above_every_view() {
        // A person at v0 whose views a phone may hold in two contexts
        // (following /{db} before and after a run): presented as an
        // ancestor, each context retires the whole chain with one
        // tombstone, a descendant of each view.
        let set = persons_set();
        let old = ann();
        let edited = stored(
            json!({"_id": "p", "type": "person", "name": "Ann B."}),
            &["2-bbbb", "1-aaaa"],
        );
        let journal = Journal::default();
        let contexts = vec!["0:r1".to_owned(), "1:r2".to_owned()];
        let cx = Context {
            set: &set,
            checksum: "ck",
            journal: &journal,
            contexts: &contexts,
        };
        let before: Vec<Presented> = (0..=1)
            .flat_map(|k| {
                let cx = Context {
                    contexts: &contexts[..1],
                    ..cx
                };
                present(&cx, &old, k, &[]).unwrap()
            })
            .collect();
        let now = present(&cx, &edited, 1, &[("1-aaaa".into(), body_of(&old))]).unwrap();
        let tombstones: Vec<&Presented> = now.iter().filter(|p| is_deleted(&p.doc)).collect();
        // The ancestor's views in both contexts, the leaf's in the older
        // one: one tombstone each, whatever the number of views.
        assert_eq!(tombstones.len(), 3, "one per base and context: {now:?}");
        for held in &before {
            let retired = tombstones
                .iter()
                .any(|t| history(&t.doc).contains(&held.rev));
            assert!(retired, "{} is retired", held.rev);
        }
    }

    fn run(id: &str, from: u32, to: u32) -> rewind_engine::state::Run {
        rewind_engine::state::Run {
            id: id.into(),
            kind: if to > from { "upgrade" } else { "rollback" }.into(),
            from,
            to,
            started: 0,
            finished: Some(1),
            outcome: "done".into(),
            since: json!(0),
            by_id: None,
            instant: false,
            resumed: 0,
            counts: Default::default(),
        }
    }

    #[test]
    fn only_a_run_that_lowers_the_served_version_starts_an_epoch() {
        let mut state = State::default();
        state.version = 7;
        state.history.push(run("r1", 0, 7));
        assert_eq!(all_epochs(&state), [""], "an upgrade moves phones up");
        state.history.push(run("r2", 7, 0));
        state.history.push(run("r3", 0, 3));
        assert_eq!(all_epochs(&state), ["", "0:r2"], "a rollback does not");
        // An instant rollback, from its start.
        state.run = Some(run("r4", 3, 1));
        state.served = Some(1);
        assert_eq!(all_epochs(&state), ["", "0:r2", "1:r4"]);
        assert_eq!(epochs(&state), ["0:r2", "1:r4"], "the window");
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
