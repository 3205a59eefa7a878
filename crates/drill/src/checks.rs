//! The invariants of shared/design.md, checked on the server and on every phone.

use crate::scenario::{server_store, Counterexample, Drill, InvariantResult, Pin};
use crate::{step_error, DrillError};
use rewind_engine::journal::body_of;
use rewind_lens::laws::same_json;
use rewind_lens::migration::NoComplements;
use rewind_replicator::{DocLeaves, Phone};
use rewind_store::{AnyStore, GetOptions, GetResult, OpenRev, OpenRevs, Store};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEEP: usize = 5;

/// What the drill did, to check against.
pub(crate) struct Expectations {
    originals: HashMap<String, Value>,
    /// Every edit's marker, per document: `(field, value)`. Each edit sets
    /// a field of its own, so an edit lost under a later one is still seen.
    markers: HashMap<String, Vec<(String, String)>>,
    /// Each person's name as its last name edit typed it.
    names: HashMap<String, NameEdit>,
    pub(crate) deleted: HashSet<String>,
    pub(crate) edits: u64,
}

impl Expectations {
    pub(crate) fn new(originals: &[Value]) -> Expectations {
        Expectations {
            originals: originals
                .iter()
                .filter_map(|d| {
                    d.get("_id")
                        .and_then(Value::as_str)
                        .map(|id| (id.to_owned(), d.clone()))
                })
                .collect(),
            markers: HashMap::new(),
            names: HashMap::new(),
            deleted: HashSet::new(),
            edits: 0,
        }
    }

    /// The field the next edit sets its marker in (`drill_{phone}_{n}`).
    pub(crate) fn next_field(&self, phone: &str) -> String {
        format!("drill_{phone}_{}", self.edits + 1)
    }

    /// Records that an edit set `field` to `marker` in document `id`.
    pub(crate) fn edit(&mut self, id: &str, field: &str, marker: &str) {
        self.markers
            .entry(id.to_owned())
            .or_default()
            .push((field.to_owned(), marker.to_owned()));
        self.edits += 1;
    }

    /// Records the name an edit of person `id` typed (the edit's marker is
    /// recorded by [`Expectations::edit`]).
    pub(crate) fn name(&mut self, id: &str, name: NameEdit) {
        self.names.insert(id.to_owned(), name);
    }

    /// Whether `id` was a person in the original sample.
    pub(crate) fn is_person(&self, id: &str) -> bool {
        self.originals
            .get(id)
            .is_some_and(|d| d.get("type").and_then(Value::as_str) == Some("person"))
    }

    /// Whether an edit retyped the name of `id`.
    pub(crate) fn renamed(&self, id: &str) -> bool {
        self.names.contains_key(id)
    }

    pub(crate) fn delete(&mut self, id: &str) {
        self.deleted.insert(id.to_owned());
        self.markers.remove(id);
        self.edits += 1;
    }

    fn touched(&self, id: &str) -> bool {
        self.markers.contains_key(id) || self.deleted.contains(id)
    }
}

/// A person's name as an edit typed it: split into first and last name (at
/// examples/cht v7 and up, `0007-split-name`), or whole (below).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum NameEdit {
    Split(String, String),
    Whole(String),
}

/// The migration whose complement the drill's name edits go through.
pub(crate) const SPLIT_NAME: &str = "0007-split-name";

impl NameEdit {
    /// The name `body` (a person, in whichever shape) holds, if any.
    fn of(body: &Value) -> Option<NameEdit> {
        let text = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_owned);
        match (text("first_name"), text("last_name"), text("name")) {
            (Some(first), Some(last), _) => Some(NameEdit::Split(first, last)),
            (_, _, Some(name)) => Some(NameEdit::Whole(name)),
            _ => None,
        }
    }

    /// This name in the shape of `like`: split at the first space, or
    /// joined with one (what `0007-split-name` does with no complement to
    /// say otherwise: what an edit typed is never undone by one).
    fn in_shape_of(&self, like: &NameEdit) -> NameEdit {
        match (self, like) {
            (NameEdit::Whole(name), NameEdit::Split(..)) => match name.split_once(' ') {
                Some((first, last)) => NameEdit::Split(first.into(), last.into()),
                None => NameEdit::Split(name.clone(), String::new()),
            },
            (NameEdit::Split(first, last), NameEdit::Whole(_)) if last.is_empty() => {
                NameEdit::Whole(first.clone())
            }
            (NameEdit::Split(first, last), NameEdit::Whole(_)) => {
                NameEdit::Whole(format!("{first} {last}"))
            }
            _ => self.clone(),
        }
    }
}

/// Gives person `doc` (in its phone's shape) a name the split does not
/// take back as typed, so only the complement holds it exactly: a first
/// name with a space in it, or a whole name ending in one. `None` for a
/// document that is not a person with a name.
pub(crate) fn edit_name(doc: &mut Value, tag: u64) -> Option<NameEdit> {
    let is_person = doc.get("type").and_then(Value::as_str) == Some("person")
        || doc.get("contact_type").and_then(Value::as_str) == Some("person");
    let edit = match NameEdit::of(doc) {
        Some(NameEdit::Split(_, last)) if is_person => {
            NameEdit::Split(format!("Drill {tag}"), last)
        }
        Some(NameEdit::Whole(_)) if is_person => NameEdit::Whole(format!("Drill{tag} ")),
        _ => return None,
    };
    match &edit {
        NameEdit::Split(first, _) => doc["first_name"] = first.clone().into(),
        NameEdit::Whole(name) => doc["name"] = name.clone().into(),
    }
    Some(edit)
}

/// Which phone edits a document: each phone has its own documents, so only
/// the drill's deliberate scenarios could make two humans edit one.
pub(crate) fn owner(id: &str, devices: usize) -> usize {
    let digest = md5::compute(id.as_bytes());
    (u64::from_le_bytes(digest.0[..8].try_into().unwrap_or([0; 8])) % devices.max(1) as u64)
        as usize
}

/// The ids of a phone's live documents.
pub(crate) async fn local_live_ids(phone: &Phone) -> Result<Vec<String>, String> {
    Ok(phone
        .all_docs_with_leaves()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|d| !d.deleted)
        .map(|d| d.id)
        .collect())
}

fn text(v: &Value) -> String {
    serde_json::to_string(&body_of(v)).unwrap_or_default()
}

fn result(
    number: u8,
    name: &str,
    checked: u64,
    counterexamples: Vec<Counterexample>,
) -> InvariantResult {
    InvariantResult {
        number,
        name: name.to_owned(),
        holds: counterexamples.is_empty(),
        checked,
        counterexamples: counterexamples.into_iter().take(KEEP).collect(),
    }
}

fn cx(
    document: &str,
    place: &str,
    expected: impl Into<String>,
    found: impl Into<String>,
) -> Counterexample {
    let clip = |s: String| {
        if s.len() > 300 {
            format!("{}…", &s[..s.floor_char_boundary(300)])
        } else {
            s
        }
    };
    Counterexample {
        document: document.to_owned(),
        place: place.to_owned(),
        expected: clip(expected.into()),
        found: clip(found.into()),
    }
}

async fn all_leaves(store: &AnyStore) -> Result<Vec<DocLeaves>, DrillError> {
    rewind_replicator::leaves(store)
        .await
        .map_err(|e| step_error("checks")(e.to_string()))
}

/// Invariant 3, first half: right after the rollback, every document nobody
/// edited has its exact bytes from before the upgrade.
pub(crate) async fn exact_rollback(drill: &Drill) -> Result<InvariantResult, DrillError> {
    let server = server_store(drill).await?;
    let mut bad = Vec::new();
    let mut checked = 0;
    for doc in all_leaves(&server).await? {
        let Some(original) = drill.expect().originals.get(&doc.id) else {
            continue;
        };
        if drill.expect().touched(&doc.id) {
            continue;
        }
        checked += 1;
        if text(&doc.body) != text(original) {
            bad.push(cx(&doc.id, "server", text(original), text(&doc.body)));
        }
    }
    Ok(result(3, "exact rollback", checked, bad))
}

/// Invariant 3, second half: re-upgrading restores the complement: every
/// untouched document is exactly the upgrade of its original.
pub(crate) async fn complement_restored(drill: &Drill) -> Result<InvariantResult, DrillError> {
    let server = server_store(drill).await?;
    let mut bad = Vec::new();
    let mut checked = 0;
    for doc in all_leaves(&server).await? {
        let Some(original) = drill.expect().originals.get(&doc.id) else {
            continue;
        };
        if drill.expect().touched(&doc.id) {
            continue;
        }
        checked += 1;
        let mut expected = body_of(original);
        if drill
            .set()
            .translate(&mut expected, 0, drill.latest(), &mut NoComplements)
            .is_err()
        {
            continue;
        }
        if !same_json(&expected, &body_of(&doc.body)) {
            bad.push(cx(&doc.id, "server", text(&expected), text(&doc.body)));
        }
    }
    Ok(result(3, "exact rollback", checked, bad))
}

async fn live_leaf_count(store: &AnyStore, id: &str) -> usize {
    let opts = GetOptions {
        open_revs: Some(OpenRevs::All),
        ..GetOptions::default()
    };
    match store.get(id, &opts).await {
        Ok(GetResult::Revs(revs)) => revs
            .iter()
            .filter(|r| matches!(r, OpenRev::Ok(d) if d.get("_deleted").and_then(Value::as_bool) != Some(true)))
            .count(),
        _ => 1,
    }
}

/// Invariant 4 at one moment: every online phone holds what the gateway
/// serves at its version (`served` for phones following `/{db}`): the same
/// winning revision and body for every document, none missing. `when`
/// names the moment in counterexamples (`""`: the end). Returns (documents
/// checked, counterexamples).
pub(crate) async fn convergence(
    drill: &Drill,
    served: u32,
    when: &str,
) -> Result<(u64, Vec<Counterexample>), DrillError> {
    let (mut diverged, mut checked) = (Vec::new(), 0u64);
    for device in drill.devices().iter().filter(|d| d.online) {
        let k = match device.pin {
            Pin::Follow => served,
            Pin::At(k) => k,
        };
        let place = match when {
            "" => device.phone.name.clone(),
            when => format!("{} (v{k}) after {when}", device.phone.name),
        };
        // What the phone's own URL serves: `/medic` and `/v/{k}/medic`
        // present the same bodies in different contexts (revision ids).
        let view_url = crate::scenario::url_of(drill.base(), device.pin, device.named.as_deref());
        let view = rewind_store::open(&view_url)
            .await
            .map_err(|e| step_error("checks")(e.to_string()))?;
        let expected = all_leaves(&view).await?;
        let phone_docs = all_leaves(&device.phone.local).await?;
        let mine: HashMap<&str, &DocLeaves> =
            phone_docs.iter().map(|d| (d.id.as_str(), d)).collect();
        for want in &expected {
            checked += 1;
            match mine.get(want.id.as_str()) {
                // Deleted on both sides: converged (which tombstone wins
                // among deleted leaves does not matter).
                Some(have) if want.deleted && have.deleted => {}
                Some(have)
                    if have.winner == want.winner
                        && !have.deleted
                        && same_json(&body_of(&have.body), &body_of(&want.body)) => {}
                Some(have) => diverged.push(cx(
                    &want.id,
                    &place,
                    format!("{} {}", want.winner, text(&want.body)),
                    format!(
                        "{} {}{}",
                        have.winner,
                        if have.deleted { "deleted " } else { "" },
                        text(&have.body)
                    ),
                )),
                None => diverged.push(cx(&want.id, &place, want.winner.clone(), "missing")),
            }
        }
    }
    Ok((checked, diverged))
}

/// Invariant 1 for retyped names in the documents of one place: each
/// person's name as its last name edit typed it, in the document's shape.
fn names_lost(
    expect: &Expectations,
    by_id: &HashMap<&str, &DocLeaves>,
    place: &str,
) -> (u64, Vec<Counterexample>) {
    let (mut checked, mut lost) = (0, Vec::new());
    for (id, typed) in &expect.names {
        let Some(d) = by_id.get(id.as_str()).filter(|d| !d.deleted) else {
            continue; // missing or deleted: the markers' check reports it
        };
        checked += 1;
        let found = NameEdit::of(&d.body);
        let want = found.as_ref().map(|f| typed.in_shape_of(f));
        if found.is_none() || found != want {
            let want = format!("the name typed last, {:?}", want.as_ref().unwrap_or(typed));
            lost.push(cx(id, place, want, text(&d.body)));
        }
    }
    (checked, lost)
}

/// Invariant 1 for retyped names at one moment of the drill (`when`), in
/// what the gateway serves at version 0 and at the latest: while the
/// journal holds the complements the names went through, which the final
/// checks, after the restore, no longer see.
pub(crate) async fn names_kept(
    drill: &Drill,
    when: &str,
) -> Result<(u64, Vec<Counterexample>), DrillError> {
    let (mut checked, mut lost) = (0, Vec::new());
    for k in [0, drill.latest()] {
        let url = crate::scenario::url_of(drill.base(), Pin::At(k), None);
        let view = rewind_store::open(&url)
            .await
            .map_err(|e| step_error("checks")(e.to_string()))?;
        let docs = all_leaves(&view).await?;
        let by_id: HashMap<&str, &DocLeaves> = docs.iter().map(|d| (d.id.as_str(), d)).collect();
        let (c, l) = names_lost(drill.expect(), &by_id, &format!("/v/{k} after {when}"));
        checked += c;
        lost.extend(l);
    }
    Ok((checked, lost))
}

/// Invariants 1, 2, 3 (merged), 4 and 5 after the last sync.
pub(crate) async fn final_checks(
    drill: &Drill,
    exact: InvariantResult,
    complement: InvariantResult,
    names_before: (u64, Vec<Counterexample>),
) -> Result<Vec<InvariantResult>, DrillError> {
    let server = server_store(drill).await?;
    let mut places: Vec<(String, AnyStore)> = vec![("server".into(), server.clone())];
    for device in drill.devices() {
        places.push((device.phone.name.clone(), device.phone.local.clone()));
    }
    let (mut lost, mut conflicts) = (names_before.1, Vec::new());
    let (mut lost_checked, mut conflict_checked) = (names_before.0, 0u64);
    let mut server_docs = Vec::new();
    for (place, store) in &places {
        let docs = all_leaves(store).await?;
        let by_id: HashMap<&str, &DocLeaves> = docs.iter().map(|d| (d.id.as_str(), d)).collect();
        // 1. No lost edit.
        for (id, markers) in &drill.expect().markers {
            lost_checked += markers.len() as u64;
            let doc = by_id.get(id.as_str());
            for (field, marker) in markers {
                let want = || format!("{field} = {marker}");
                match doc {
                    Some(d)
                        if !d.deleted
                            && d.body.get(field).and_then(Value::as_str) == Some(marker) => {}
                    Some(d) => lost.push(cx(id, place, want(), text(&d.body))),
                    None => lost.push(cx(id, place, want(), "the document is missing")),
                }
            }
        }
        let (checked, names) = names_lost(drill.expect(), &by_id, place);
        lost_checked += checked;
        lost.extend(names);
        for id in &drill.expect().deleted {
            lost_checked += 1;
            if let Some(d) = by_id.get(id.as_str()) {
                if !d.deleted {
                    lost.push(cx(id, place, "deleted", text(&d.body)));
                }
            }
        }
        // 2. No spurious conflict: the drill's phones edit disjoint documents.
        for d in &docs {
            conflict_checked += 1;
            if d.leaves.len() > 1 && live_leaf_count(store, &d.id).await > 1 {
                conflicts.push(cx(
                    &d.id,
                    place,
                    "one live leaf",
                    format!("leaves {:?}", d.leaves),
                ));
            }
        }
        if place == "server" {
            server_docs = docs;
        }
    }
    // 3. Exact rollback (and the complement on re-upgrade).
    let mut exact_all = exact.counterexamples.clone();
    exact_all.extend(complement.counterexamples.clone());
    let exact = result(
        3,
        "exact rollback",
        exact.checked + complement.checked,
        exact_all,
    );
    // 4. Convergence: each phone holds what the gateway serves at its
    // version, now and after every version switch the scenario made.
    let (now_checked, mut diverged) = convergence(drill, drill.latest(), "").await?;
    let converged_checked = now_checked + drill.converged.0;
    diverged.splice(0..0, drill.converged.1.iter().cloned());
    // 5. Crash safety: every untouched document migrated exactly once.
    let (mut twice, mut once_checked) = (Vec::new(), 0u64);
    for doc in &server_docs {
        let Some(original) = drill.expect().originals.get(&doc.id) else {
            continue;
        };
        if drill.expect().touched(&doc.id) {
            continue;
        }
        once_checked += 1;
        let mut expected = body_of(original);
        if drill
            .set()
            .translate(&mut expected, 0, drill.latest(), &mut NoComplements)
            .is_ok()
            && !same_json(&expected, &body_of(&doc.body))
        {
            twice.push(cx(&doc.id, "server", text(&expected), text(&doc.body)));
        }
    }
    let crash_name = if drill.kill_mode() {
        "crash safety (runs killed with SIGKILL and resumed)"
    } else {
        "crash safety (no --kill: checked that no document was migrated twice)"
    };
    Ok(vec![
        result(1, "no lost edit", lost_checked, lost),
        result(2, "no spurious conflict", conflict_checked, conflicts),
        exact,
        result(4, "convergence", converged_checked, diverged),
        result(5, crash_name, once_checked, twice),
    ])
}

async fn http(base: &str, method: &str, path: &str, body: &str) -> Result<Vec<u8>, String> {
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .map_err(|e| e.to_string())?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or(0);
    Ok(response[split..].to_vec())
}

/// Invariant 6: a second gateway over the same store answers byte for byte the same.
pub(crate) async fn determinism(drill: &Drill) -> Result<InvariantResult, DrillError> {
    let second = rewind_gateway::Gateway::new(rewind_gateway::GatewayConfig {
        backend: rewind_gateway::Backend::Embedded(drill.data_dir().to_path_buf()),
        migrations: drill.set().clone(),
        databases: vec!["medic".into()],
        users: Vec::new(),
        log_errors: false,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| step_error("determinism")(e.to_string()))?;
    let port = listener
        .local_addr()
        .map_err(|e| step_error("determinism")(e.to_string()))?
        .port();
    let router = rewind_gateway::router(second);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    let other = format!("http://127.0.0.1:{port}");
    let latest = drill.latest();
    let mut requests: Vec<(String, String, String)> = vec![
        ("GET".into(), "/".into(), String::new()),
        ("GET".into(), "/v/0/".into(), String::new()),
        ("GET".into(), "/medic".into(), String::new()),
    ];
    for k in [0, latest / 2, latest] {
        requests.push((
            "GET".into(),
            format!("/v/{k}/medic/_changes?style=all_docs&limit=200"),
            String::new(),
        ));
    }
    let server = server_store(drill).await?;
    let ids: Vec<String> = all_leaves(&server)
        .await?
        .into_iter()
        .take(50)
        .map(|d| d.id)
        .collect();
    let docs: Vec<Value> = ids.iter().map(|id| serde_json::json!({"id": id})).collect();
    let body = serde_json::json!({"docs": docs}).to_string();
    for k in [0, latest] {
        requests.push((
            "POST".into(),
            format!("/v/{k}/medic/_bulk_get?revs=true&latest=true"),
            body.clone(),
        ));
    }
    let mut bad = Vec::new();
    for (method, path, body) in &requests {
        let a = http(drill.base(), method, path, body)
            .await
            .map_err(step_error("determinism"))?;
        let b = http(&other, method, path, body)
            .await
            .map_err(step_error("determinism"))?;
        if a != b {
            bad.push(cx(
                path,
                "second gateway",
                String::from_utf8_lossy(&a).into_owned(),
                String::from_utf8_lossy(&b).into_owned(),
            ));
        }
    }
    task.abort();
    Ok(result(
        6,
        "determinism (two gateways answer byte for byte the same)",
        requests.len() as u64,
        bad,
    ))
}
