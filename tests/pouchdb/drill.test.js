'use strict';
// The acceptance scenario of docs/design.md ("the rollback drill") with real
// PouchDB 9 phones (memory adapter) syncing through `rewind serve` over the
// embedded store and over pouchdb-server, while `rewind upgrade` / `rewind
// rollback --instant` run as separate processes on the same store and are
// killed with SIGKILL at a random point, then re-run to completion. It imitates crates/drill/src/scenario.rs:
//
//   0. ~60 sample docs at v0; five phones pull: two follow `/medic`, three
//      run the old app, pinned at `/v/0/medic`;
//   1. `rewind upgrade --to 7` (killed once, re-run) while every phone keeps
//      editing its own docs and syncing;
//   2. one pinned phone moves up from /v/0 to /v/7 (its app updated): every
//      phone holds what the gateway serves at its URL; all edit (one deletes
//      a doc); the phone that moved up and one v0 phone go offline and edit;
//   3. `rewind rollback --to 0 --instant` (killed once, re-run); online phones
//      follow `/medic` and sync: each holds what `/medic` serves;
//   4. the offline phones come back, push their edits at their own version,
//      then follow `/medic`; everyone syncs twice;
//   5. `rewind upgrade --to 7` again (killed once, re-run); phones sync, edit,
//      and sync twice more via `/medic`;
//   6. the server is restored from a backup (`rewind copy`) taken before the
//      upgrade, while the phones hold v7 documents; they push back what the
//      restore lost, `rewind upgrade --to 7` runs again (killed once,
//      re-run), everyone syncs twice.
//
// Then invariants 1 (every edit's marker in the final winner everywhere,
// deletes stay deleted; and each phone's first person shows the name it
// retyped last, at every version, checked also before the restore), 2 (no document with two live leaves, on the server
// or on a phone) and 4 (each phone's winners are what the gateway serves at
// its version, in that version's shape), and that the kills happened.
//
// The seed (REWIND_DRILL_SEEDS, default 1,2,3) picks which docs each phone
// edits and the kill delays. Each phone edits only the docs it owns
// (fnv(id) % 5, or the docs it created), so every conflict would be spurious.
//
// Run with a release build: REWIND_BIN=target/release/rewind npm test -- drill.test.js

const { describe, test } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');
const h = require('./lib/harness');

const N = 60;
const PHONES = 5;
// The stores the drill runs on (REWIND_DRILL_STORES, default both): the
// embedded store (`rewind serve --data`, the engine on the same file) and
// pouchdb-server as the CouchDB (`rewind serve --couch`, the engine over HTTP).
const STORES = (process.env.REWIND_DRILL_STORES || 'embedded,couch')
  .split(',')
  .map((s) => s.trim())
  .filter(Boolean);
const SEEDS = (process.env.REWIND_DRILL_SEEDS || '1,2,3')
  .split(',')
  .filter((s) => s.trim())
  .map(Number);

// ------------------------------------------------------------------ helpers

/** A small deterministic PRNG (mulberry32). */
function rng(seed) {
  let a = (seed * 0x9e3779b9) >>> 0 || 1;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return { next, below: (n) => Math.floor(next() * n) };
}

/** FNV-1a of a string. */
function fnv(s) {
  let x = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) {
    x ^= s.charCodeAt(i);
    x = Math.imul(x, 0x01000193) >>> 0;
  }
  return x;
}

/** The phone that may edit document `id`. */
function owner(id) {
  const m = /^drill-p(\d+)-/.exec(id);
  return m ? Number(m[1]) : fnv(id) % PHONES;
}

/** A new person document in the shape of version k. */
function newPerson(id, k, marker) {
  // Its place: `parent` before v4, `lineage.parent` from v4 (examples/cht 0004).
  const place = { _id: 'drill-place' };
  if (k === 0) return { _id: id, type: 'person', name: 'Drill Person', parent: place, drill_created: marker };
  const doc = { _id: id, type: 'contact', contact_type: 'person' };
  if (k >= 7) Object.assign(doc, { first_name: 'Drill', last_name: 'Person' });
  else doc.name = 'Drill Person';
  if (k >= 4) doc.lineage = { parent: place };
  else doc.parent = place;
  doc.drill_created = marker;
  return doc;
}

// -------------------------------------------------------------------- drill

class Drill {
  constructor(t, seed, kind = 'embedded') {
    this.t = t;
    this.seed = seed;
    this.kind = kind;
    this.cleanup = new h.Cleanup();
    this.kills = [];
    this.edits = []; // {id, field, value}
    this.edited = {}; // id -> [fields]
    this.deleted = new Set();
    this.created = [];
    this.names = new Map(); // id -> the name its last retype typed: {split: [first, last]} or {whole}
    this.killRng = rng(seed * 7919 + 1);
    this.seq = 0;
    this.timings = {};
    this.syncErrors = [];
  }

  async setup() {
    this.store = await h.makeStore(this.cleanup, this.kind, N);
    this.gw = await h.startGateway(this.cleanup, this.store);
    this.phones = [];
    for (let i = 0; i < PHONES; i++) {
      // Phones 0 and 1 follow `/medic`; the others run the old app, pinned
      // at v0. The last names itself (`/_device/{id}`): it moves down.
      const named = i === PHONES - 1 ? { device: `drill-p${i}` } : {};
      const p = h.makePhone(this.cleanup, this.gw, i < 2 ? null : 0, `drill${this.seed}-p${i}`, named);
      p.index = i;
      p.online = true;
      p.rng = rng(this.seed * 1000 + i + 17);
      this.phones.push(p);
    }
  }

  /** Where the snapshot of the server's database `name` (data or companion) lives. */
  snapshotOf(name) {
    return this.kind === 'embedded'
      ? path.join(this.snapDir, `${name}.db`)
      : `${this.store.couch}/snapshot-${name}`;
  }

  /** The live database `name` (`medic`, or its companion `medic-rewind`) as rewind commands take it. */
  liveOf(name) {
    return this.kind === 'embedded'
      ? path.join(this.store.data, name === h.DB ? `${h.DB}.db` : `${h.DB}.db-rewind`)
      : `${this.store.couch}/${name}`;
  }

  /**
   * A backup of the server as an operator takes one: the database and its
   * companion copied with `rewind copy` (revision trees, tombstones,
   * `_local` checkpoints), while the gateway keeps serving.
   */
  async snapshot() {
    if (this.kind === 'embedded') this.snapDir = h.tmpdir(this.cleanup, 'rewind-pt-snap-');
    this.snapped = [];
    for (const name of [h.DB, `${h.DB}-rewind`]) {
      const live = this.liveOf(name);
      const exists =
        this.kind === 'embedded' ? fs.existsSync(live) : (await h.http(live)).status === 200;
      if (!exists) continue;
      await h.rewind(['copy', live, this.snapshotOf(name)], { timeout: 120000 });
      this.snapped.push(name);
    }
  }

  /**
   * The restore: the gateway stops, the database and its companion are
   * replaced by the snapshot, the gateway starts again on the same port.
   */
  async restore() {
    await this.gw.stop();
    for (const name of [h.DB, `${h.DB}-rewind`]) {
      const live = this.liveOf(name);
      if (this.kind === 'embedded') {
        for (const suffix of ['', '-wal', '-shm']) fs.rmSync(live + suffix, { force: true });
      } else {
        const res = await h.http(live, { method: 'DELETE' });
        assert.ok([200, 404].includes(res.status), `DELETE ${live}: ${res.text}`);
      }
      if (this.snapped.includes(name)) await h.rewind(['copy', this.snapshotOf(name), live], { timeout: 120000 });
    }
    await this.gw.restart();
  }

  /**
   * `rewind VERB --to N` as a child process, killed with SIGKILL after a
   * seeded random delay, then re-run to completion. Returns the kills.
   */
  async engine(verb, to, { instant = false } = {}) {
    const args = [verb, '--db', this.store.target, '--migrations', h.MIGRATIONS, '--to', String(to), '--batch', '1'];
    if (instant) args.push('--instant');
    let killed = 0;
    let log = '';
    // A few tries: if a run finished before its delay, the next one (a no-op
    // by then) is not killable, so the delays are short; the loop is bounded.
    for (let attempt = 0; attempt < 3 && killed === 0; attempt++) {
      const proc = spawn(h.BIN, args, { stdio: ['ignore', 'pipe', 'pipe'], cwd: h.REPO });
      this.cleanup.add(() => {
        if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
      });
      proc.stdout.on('data', (c) => (log = (log + c).slice(-4000)));
      proc.stderr.on('data', (c) => (log = (log + c).slice(-4000)));
      const exited = new Promise((resolve) => proc.once('exit', (code, signal) => resolve({ code, signal })));
      // The embedded engine migrates the drill's 60 docs in tens of
      // milliseconds: kill it sooner than one working over HTTP.
      const delay = this.kind === 'embedded' ? 5 + this.killRng.below(40) : 15 + this.killRng.below(120);
      const first = await Promise.race([exited, h.sleep(delay).then(() => null)]);
      if (first === null) {
        proc.kill('SIGKILL');
        const end = await h.withTimeout(exited, 10000, `${verb} after SIGKILL`);
        if (end.signal === 'SIGKILL') {
          killed++;
          this.kills.push({ verb, to, delay });
        }
      } else if (first.code !== 0) {
        throw new Error(`rewind ${args.join(' ')} exited with ${first.code}: ${log}`);
      } else {
        break; // finished before the kill: nothing left to kill
      }
    }
    // Resume to completion. A run SIGKILLed after it recorded its end has
    // nothing left to do, and says so.
    try {
      await h.rewind(args, { timeout: 120000 });
    } catch (e) {
      if (!String(e.message).includes(`already at version ${to}`)) throw e;
    }
    return killed;
  }

  /** Phone i edits `n` of its own live docs (a new marker field each) and creates `create` docs at version k. */
  async editRound(p, n, tag, { create = 0, k = null } = {}) {
    const docs = await p.docs();
    const mine = docs
      .filter((d) => !d._id.startsWith('_design/') && owner(d._id) === p.index && !this.deleted.has(d._id))
      .map((d) => d._id);
    for (let j = 0; j < n && mine.length; j++) {
      const id = mine[p.rng.below(mine.length)];
      const field = `drill_p${p.index}_${++this.seq}`;
      const value = `${tag}-s${this.seed}-${this.seq}`;
      await p.edit(id, (d) => (d[field] = value));
      this.edits.push({ id, field, value, phone: p.index, k: p.k });
      (this.edited[id] = this.edited[id] || []).push(field);
    }
    // The phone's first person, its name retyped at whatever version the
    // phone is, in forms the name split (examples/cht 0007) takes back
    // differently, so only its complement holds them exactly.
    const person = docs.find((d) => mine.includes(d._id) && (d.type === 'person' || d.contact_type === 'person'));
    if (person) {
      const field = `drill_p${p.index}_${++this.seq}`;
      const value = `${tag}-named-s${this.seed}-${this.seq}`;
      let typed = null;
      await p.edit(person._id, (d) => {
        d[field] = value;
        if (typeof d.first_name === 'string' && typeof d.last_name === 'string') {
          d.first_name = `Drill ${this.seq}`;
          typed = { split: [d.first_name, d.last_name] };
        } else if (typeof d.name === 'string') {
          d.name = `Drill${this.seq} `;
          typed = { whole: d.name };
        }
      });
      this.edits.push({ id: person._id, field, value, phone: p.index, k: p.k });
      // The shape checks compare everything else with the sample.
      (this.edited[person._id] = this.edited[person._id] || []).push(field, 'name', 'first_name', 'last_name');
      if (typed) this.names.set(person._id, typed);
    }
    for (let j = 0; j < create; j++) {
      const id = `drill-p${p.index}-${tag}-${++this.seq}`;
      const value = `${tag}-created-s${this.seed}-${this.seq}`;
      await p.db.put(newPerson(id, k, value));
      this.created.push(id);
      this.edits.push({ id, field: 'drill_created', value });
    }
  }

  /**
   * Invariant 1 for retyped names: each person shows the name typed last,
   * split or joined as its shape asks, at /v/0 and /v/7 and on every
   * phone (checked while the journal still holds the complements the
   * names went through, and at the end).
   */
  async assertNamesKept(when) {
    const split = (n) => {
      const i = n.indexOf(' ');
      return i < 0 ? [n, ''] : [n.slice(0, i), n.slice(i + 1)];
    };
    const join = ([f, l]) => (l === '' ? f : `${f} ${l}`);
    const wrong = [];
    const check = (doc, typed, place) => {
      if (!doc) return; // missing: the markers' check reports it
      const found = 'first_name' in doc ? JSON.stringify([doc.first_name, doc.last_name]) : JSON.stringify(doc.name);
      const want = 'first_name' in doc
        ? JSON.stringify(typed.split || split(typed.whole))
        : JSON.stringify(typed.whole !== undefined ? typed.whole : join(typed.split));
      if (found !== want) wrong.push(`${doc._id} at ${place}: ${found}, typed ${want}`);
    };
    for (const [id, typed] of this.names) {
      if (this.deleted.has(id)) continue;
      for (const k of [0, 7]) {
        const res = await h.http(`${this.gw.url}/v/${k}/${h.DB}/${encodeURIComponent(id)}`);
        check(res.status === 200 ? res.json : null, typed, `/v/${k}`);
      }
      for (const p of this.phones) check(await p.db.get(id).catch(() => null), typed, `phone ${p.index}`);
    }
    assert.deepEqual(wrong, [], `names not as typed last after ${when}`);
  }

  /** Phone i deletes one of its own sample docs. */
  async deleteOne(p) {
    const docs = await p.docs();
    const doc = docs.find(
      (d) => owner(d._id) === p.index && !d._id.startsWith('drill-') && !d._id.startsWith('_design/') && !this.deleted.has(d._id),
    );
    if (!doc) return;
    await p.db.remove(doc);
    this.deleted.add(doc._id);
  }

  /**
   * One sync of phone p. A failed replication is retried (bounded), as a
   * real phone's next sync would, but every failure is recorded in
   * `syncErrors` and asserted empty at the very end.
   */
  async sync(p) {
    let result;
    for (let attempt = 0; ; attempt++) {
      try {
        result = await p.sync();
        break;
      } catch (e) {
        this.syncErrors.push(`phone ${p.index} (${p.url}): ${e.message}`);
        if (attempt >= 3) throw e;
        await h.sleep(100);
      }
    }
    const { pushed, pulled } = result;
    if (process.env.DRILL_DEBUG) {
      console.error(`sync phone ${p.index} ${p.url}: pushed ${pushed.docs_written}, pulled ${pulled.docs_written}`);
    }
    assert.deepEqual(pushed.errors, [], `phone ${p.index} push errors`);
    assert.deepEqual(pulled.errors, [], `phone ${p.index} pull errors`);
  }

  /**
   * Invariant 4 now (after a sync that moved phones): every online phone
   * holds what the gateway serves at its URL, the same documents with the
   * same bodies and the same revisions.
   */
  async assertConverged(when) {
    for (const p of this.phones.filter((q) => q.online)) {
      const served = await h.http(`${p.url}/_all_docs?include_docs=true`);
      assert.equal(served.status, 200, served.text);
      const want = new Map(served.json.rows.filter((r) => !r.id.startsWith('_design/')).map((r) => [r.id, r.doc]));
      const mine = new Map((await p.docs()).filter((d) => !d._id.startsWith('_design/')).map((d) => [d._id, d]));
      const problems = [];
      for (const [id, doc] of want) {
        const local = mine.get(id);
        if (!local) {
          problems.push(`${id}: missing`);
          continue;
        }
        if (local._rev !== doc._rev) problems.push(`${id}: rev ${local._rev}, served ${doc._rev}`);
        try {
          assert.deepStrictEqual(h.bodyOf(local), h.bodyOf(doc));
        } catch (e) {
          problems.push(`${id}: body ${JSON.stringify(h.bodyOf(local))}, served ${JSON.stringify(h.bodyOf(doc))}`);
        }
        if (local._conflicts && local._conflicts.length) problems.push(`${id}: conflicts ${local._conflicts}`);
      }
      for (const id of mine.keys()) if (!want.has(id)) problems.push(`${id}: held, not served`);
      if (problems.length && process.env.DRILL_TREES) {
        // The first differing document's revision trees, on the phone and as served.
        const id = problems[0].split(':')[0];
        const tree = await p.db.get(id, { revs_info: true, open_revs: 'all', revs: true });
        console.log('PHONE', JSON.stringify(tree.map((r) => [r.ok && r.ok._rev, r.ok && r.ok._deleted, r.ok && r.ok._revisions])));
        const sv = await h.http(`${p.url}/${id}?open_revs=all&revs=true`);
        console.log('SERVED', JSON.stringify(sv.json.map((r) => [r.ok && r.ok._rev, r.ok && r.ok._deleted, r.ok && r.ok._revisions])));
      }
      assert.deepEqual(problems.slice(0, 5), [], `phone ${p.index} at ${p.url} after ${when}: ${problems.length} documents differ`);
    }
  }

  /** Phone p pushes only (uploads its edits at its own version). */
  async push(p) {
    const pushed = await p.push();
    assert.deepEqual(pushed.errors, [], `phone ${p.index} push errors`);
  }

  /** Every online phone syncs, one after the other. */
  async syncAll() {
    for (const p of this.phones) if (p.online) await this.sync(p);
  }

  async timed(name, step) {
    const started = Date.now();
    const out = await step();
    this.timings[name] = (Date.now() - started) / 1000;
    return out;
  }
}

// ------------------------------------------------------------------- checks

/**
 * What the soak script sums (scripts/soak-pouchdb-drill.sh): lost edits
 * (an edit's marker missing from the winner, or a deleted document served,
 * on the server at v7 or on a phone) and spurious conflicts (documents with
 * more than one live leaf, on the server or on a phone). Counts, no asserts:
 * written to $REWIND_DRILL_REPORT/drill-{store}-{seed}.json before the checks.
 */
async function tally(d) {
  const v7 = `${d.gw.url}/v/7/${h.DB}`;
  const lost = [];
  const conflicts = [];
  const live = d.edits.filter((e) => !d.deleted.has(e.id));
  for (const e of live) {
    const res = await h.http(`${v7}/${encodeURIComponent(e.id)}`);
    if (res.status !== 200 || res.json[e.field] !== e.value) lost.push(`${e.id}.${e.field} on the server`);
  }
  for (const id of d.deleted) {
    if ((await h.http(`${v7}/${encodeURIComponent(id)}`)).status !== 404) lost.push(`deletion of ${id} on the server`);
  }
  for (const id of await h.serverConflicts(v7)) conflicts.push(`${id} on the server`);
  for (const p of d.phones) {
    for (const e of live) {
      const doc = await p.db.get(e.id).catch(() => null);
      if (!doc || doc[e.field] !== e.value) lost.push(`${e.id}.${e.field} on phone ${p.index}`);
    }
    for (const id of d.deleted) {
      if (await p.db.get(id).catch(() => null)) lost.push(`deletion of ${id} on phone ${p.index}`);
    }
    for (const doc of await p.docs()) {
      if (doc._conflicts && doc._conflicts.length) conflicts.push(`${doc._id} on phone ${p.index}`);
    }
  }
  return { store: d.kind, seed: d.seed, edits: d.edits.length, kills: d.kills.length, lost, conflicts };
}

async function finalChecks(d) {
  if (process.env.REWIND_DRILL_REPORT) {
    const report = await tally(d);
    const file = path.join(process.env.REWIND_DRILL_REPORT, `drill-${d.kind}-${d.seed}.json`);
    fs.writeFileSync(file, JSON.stringify(report, null, 1));
  }
  const v7 = `${d.gw.url}/v/7/${h.DB}`;
  const v0 = `${d.gw.url}/v/0/${h.DB}`;
  const follow = `${d.gw.url}/${h.DB}`;
  assert.equal(await h.servedVersion(d.gw), 7, 'the server serves v7 at the end');

  // The server, read through the gateway at v7.
  const all = await h.http(`${v7}/_all_docs?include_docs=true`);
  assert.equal(all.status, 200, all.text);
  const served = new Map(all.json.rows.filter((r) => !r.id.startsWith('_design/')).map((r) => [r.id, r.doc]));

  // Invariant 2 on the server: one live leaf per document (open_revs=all of
  // every served doc, and of every changed doc, deleted ones included).
  const multi = [];
  for (const id of served.keys()) {
    const res = await h.http(`${v7}/${encodeURIComponent(id)}?open_revs=all`);
    assert.equal(res.status, 200, `open_revs=all of ${id}: ${res.text}`);
    const live = res.json.filter((r) => r.ok && !r.ok._deleted);
    if (live.length !== 1) multi.push(`${id}: ${live.length} live leaves`);
  }
  assert.deepEqual(multi, [], 'server documents with more than one live leaf (v7)');
  for (const base of [v7, v0, follow]) await h.assertNoServerConflicts(base);

  // Invariant 1: every edit's marker in the winner, on the server and on every phone.
  await d.assertNamesKept('the restore');
  const liveEdits = d.edits.filter((e) => !d.deleted.has(e.id)); // an edited doc may be deleted later
  await h.assertEditsEverywhere(liveEdits, { bases: [v7, v0, follow], phones: d.phones });
  for (const id of d.deleted) {
    assert.ok(!served.has(id), `${id} was deleted, the server serves it`);
    for (const base of [v7, v0]) {
      const res = await h.http(`${base}/${encodeURIComponent(id)}`);
      assert.equal(res.status, 404, `${id} was deleted, ${base} answers ${res.status}: ${res.text}`);
    }
    for (const p of d.phones) {
      await assert.rejects(p.db.get(id), { status: 404 }, `${id} was deleted, phone ${p.index} holds it`);
    }
  }

  if (process.env.DRILL_DEBUG) {
    for (const [id, doc] of served) {
      if (doc.fields && 'legacy_code' in doc.fields) {
        console.error('LEGACY', id, doc._rev, JSON.stringify(d.edits.filter((e) => e.id === id)));
      }
    }
  }
  // What /medic serves (v7): the phones follow it. (`/v/7` presents the same
  // bodies in the pinned context, under other revision ids.)
  const followed = await h.http(`${follow}/_all_docs?include_docs=true`);
  assert.equal(followed.status, 200, followed.text);
  const servedAtFollow = new Map(followed.json.rows.filter((r) => !r.id.startsWith('_design/')).map((r) => [r.id, r.doc]));
  for (const p of d.phones) {
    // Invariant 2 on the phone.
    await h.assertNoPhoneConflicts(p);
    // Invariant 4: the phone (following /medic, now v7) holds exactly what /medic serves.
    const res = await p.db.allDocs({ include_docs: true });
    const mine = new Map(res.rows.filter((r) => !r.id.startsWith('_design/')).map((r) => [r.id, r.doc]));
    const missing = [...servedAtFollow.keys()].filter((id) => !mine.has(id));
    const extra = [...mine.keys()].filter((id) => !servedAtFollow.has(id));
    assert.deepEqual({ missing, extra }, { missing: [], extra: [] }, `phone ${p.index}: documents held vs served at /medic`);
    const differ = [];
    for (const [id, doc] of servedAtFollow) {
      const local = mine.get(id);
      if (local._rev !== doc._rev) differ.push(`${id}: rev ${local._rev} on the phone, ${doc._rev} served`);
      try {
        assert.deepStrictEqual(h.bodyOf(local), h.bodyOf(doc));
      } catch (e) {
        differ.push(`${id}: body ${JSON.stringify(h.bodyOf(local))} on the phone, ${JSON.stringify(h.bodyOf(doc))} served`);
      }
    }
    assert.deepEqual(differ.slice(0, 5), [], `phone ${p.index}: ${differ.length} winners differ from what /medic serves`);
    p.k = 7; // for the shape check's expectations (the phone follows /medic = v7)
    await h.assertPhoneShapes(p, N, { edited: d.edited, deleted: [...d.deleted] });
    p.k = null;
  }

  // Every replication succeeded the first time (the gateway answered no 5xx).
  assert.deepEqual(d.syncErrors, [], 'failed replications (retried)');

  // The kills happened: one per engine run (upgrade, rollback, re-upgrade).
  assert.deepEqual(
    d.kills.map((k) => `${k.verb} ${k.to}`),
    ['upgrade 7', 'rollback 0', 'upgrade 7', 'upgrade 7'],
    'SIGKILLs of the engine processes',
  );
}

// -------------------------------------------------------------------- tests

// History: this test ran as `todo` while it failed about one seed in four
// (a v7 report keeping fields.legacy_code, a document with two live leaves,
// an edited document deleted). Two gateway bugs it found, fixed on
// 2026-11-26: views pushed back after a switch went unrecognised when
// PouchDB had rewritten a number (`34.0` → `34`), and a push tombstoned the
// engine's migration of the pushed revision itself. It is a plain test now;
// REWIND_DRILL_SEEDS runs more seeds, DRILL_DEBUG=1 REWIND_PT_KEEP=1 keeps
// the stores and prints each sync, DRILL_TREES=1 prints the revision trees
// of the first document a phone holds otherwise than served.

for (const kind of STORES) {
  describe(`rollback drill: five PouchDB phones through rewind serve (${kind} store), engine killed with SIGKILL`, () => {
    for (const seed of SEEDS) {
      test(`seed ${seed}`, { timeout: 300000 }, async (t) => {
        const d = new Drill(t, seed, kind);
        t.after(() => d.cleanup.run());
        await d.setup();
        const [a, b, c, e, f] = d.phones; // a, b: follow; c: v0 → v7, offline; e: v0 offline; f: named, v0 → v7 → v3, follows, visits v3, online

        // 0. Phones pull the database at v0.
        await d.timed('initial pull', async () => {
          await Promise.all(d.phones.map((p) => p.pull()));
          for (const p of d.phones) assert.equal((await p.docs()).length, N, `phone ${p.index} pulled`);
        });

        // The operator's backup, taken before the upgrade.
        await d.snapshot();

        // 1. Upgrade to v7 as a separate process (killed, re-run) while phones edit and sync.
        await d.timed('upgrade during traffic', async () => {
          let done = false;
          const upgrade = d.engine('upgrade', 7).finally(() => (done = true));
          upgrade.catch(() => {});
          let rounds = 0;
          while ((rounds < 2 || !done) && rounds < 40) {
            await Promise.all(
              d.phones.map(async (p) => {
                await d.editRound(p, 1, `up${rounds}`);
                await d.sync(p);
              }),
            );
            rounds++;
          }
          await upgrade;
          d.trafficRounds = rounds;
          await h.waitServed(d.gw, 7);
          await d.syncAll();
        });

        // 2. One old phone moves up to v7 (and goes offline); the named
        //    one moves up to v7, then down to v3 (its app taken back); the
        //    other stays at v0 and goes offline; a and b follow /medic (v7).
        await d.timed('switch, offline edits', async () => {
          c.k = 7;
          f.k = 7;
          await d.syncAll();
          await d.assertConverged('moving up to v7');
          f.k = 3;
          await d.syncAll();
          await d.assertConverged('a named phone moving down to v3');
          c.online = false;
          e.online = false;
          for (const p of d.phones) await d.editRound(p, 2, 'pinned', { create: 1, k: p.k === null ? 7 : p.k });
          await d.deleteOne(a);
          await d.syncAll();
        });

        // 3. Instant rollback to v0 (killed, re-run); online phones follow /medic and sync.
        await d.timed('rollback', async () => {
          await d.engine('rollback', 0, { instant: true });
          await h.waitServed(d.gw, 0);
          for (const p of d.phones) if (p.online) p.k = null;
          await d.syncAll();
          await d.assertConverged('the rollback');
        });

        // 4. The offline phones come back, push their edits at their own
        //    version, then follow /medic; everyone syncs twice.
        await d.timed('offline phones return', async () => {
          for (const p of [c, e]) {
            p.online = true;
            await d.push(p);
            p.k = null;
          }
          await d.syncAll();
          await d.syncAll();
          await d.assertNamesKept('the offline phones returned');
        });

        // 5. Re-upgrade to v7 (killed, re-run); everyone syncs via /medic, edits, syncs twice.
        await d.timed('re-upgrade', async () => {
          await d.engine('upgrade', 7);
          await h.waitServed(d.gw, 7);
          await d.syncAll();
          // The named phone leaves /medic for v3 and comes back.
          f.k = 3;
          await d.syncAll();
          await d.assertConverged('a named phone moving from /medic to v3');
          f.k = null;
          await d.syncAll();
          await d.assertConverged('a named phone following /medic again');
          for (const p of d.phones) await d.editRound(p, 1, 'fixed', { create: 1, k: 7 });
          await d.syncAll();
          await d.syncAll();
          await d.assertNamesKept('the re-upgrade');
        });

        // 6. The server is restored from the backup taken before the upgrade,
        //    while every phone holds v7 documents and edits made since; the
        //    phones push back what the restore lost, the upgrade runs again
        //    (killed, re-run), everyone syncs twice.
        await d.timed('restore', async () => {
          await d.restore();
          assert.equal(await h.servedVersion(d.gw), 0, 'the backup predates the upgrade');
          await d.syncAll();
          await d.engine('upgrade', 7);
          await h.waitServed(d.gw, 7);
          await d.syncAll();
          await d.syncAll();
        });

        await d.timed('checks', () => finalChecks(d));
        t.diagnostic(
          `seed ${seed}: ${d.edits.length} edits, ${d.deleted.size} deleted, kills ${JSON.stringify(d.kills)}, ` +
            `${d.trafficRounds} edit+sync rounds during the upgrade, ` +
            `timings ${JSON.stringify(d.timings)}`,
        );
      });
    }
  });
}

module.exports = { owner, rng };
