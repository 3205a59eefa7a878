'use strict';
// Shared helpers for the PouchDB integration suite: servers (rewind serve,
// pouchdb-server), sample data, rewind commands, PouchDB phones and the
// invariant checks of docs/design.md (1: no lost edit, 2: no spurious
// conflict, 4: version-k shapes, 6: byte-identical gateways).
//
// Every server listens on 127.0.0.1 on a free port and is killed by `stop()`;
// `Cleanup` collects them so that an `after` hook stops everything, even when
// a test failed half-way. Every wait is bounded.

const assert = require('node:assert/strict');
const { spawn, execFile } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');

const REPO = path.resolve(__dirname, '..', '..', '..');
const BIN = process.env.REWIND_BIN || path.join(REPO, 'target', 'debug', 'rewind');
const MIGRATIONS = path.join(REPO, 'examples', 'cht');
const LATEST = 7;
const DB = 'medic';

const PouchDB = require('pouchdb').plugin(require('pouchdb-adapter-memory'));
// PouchDB's http adapter warns about every 404 (checkpoints): keep the output readable.
PouchDB.on('error', () => {});

// ---------------------------------------------------------------- processes

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** A free TCP port on 127.0.0.1. */
function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** A new temporary directory, removed by `cleanup.run()`. */
function tmpdir(cleanup, prefix = 'rewind-pt-') {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  if (cleanup && !process.env.REWIND_PT_KEEP) cleanup.add(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Collects teardown steps; `run()` runs them newest first and never throws. */
class Cleanup {
  constructor() {
    this.steps = [];
  }
  add(step) {
    this.steps.push(step);
  }
  async run() {
    while (this.steps.length) {
      const step = this.steps.pop();
      try {
        await step();
      } catch (e) {
        // Teardown must go on.
      }
    }
  }
}

/** Waits until `GET url` answers 200, the process died, or `ms` passed. */
async function waitUp(url, proc, ms = 20000) {
  const deadline = Date.now() + ms;
  let last;
  while (Date.now() < deadline) {
    if (proc && proc.exitCode !== null) {
      throw new Error(`${url}: the server exited with ${proc.exitCode}: ${proc.logText()}`);
    }
    try {
      const res = await fetch(url, { signal: AbortSignal.timeout(2000) });
      if (res.ok) {
        await res.arrayBuffer();
        return;
      }
      last = `status ${res.status}`;
    } catch (e) {
      last = e.message;
    }
    await sleep(50);
  }
  throw new Error(`${url} did not answer within ${ms} ms (${last}): ${proc ? proc.logText() : ''}`);
}

/**
 * Waits until `proc`'s output contains one of `texts`; returns it. Throws if
 * the process exits without saying any (its last output is read after the
 * exit) or after `ms`.
 */
async function waitForLog(proc, texts, ms) {
  const deadline = Date.now() + ms;
  for (;;) {
    const said = texts.find((text) => proc.logText().includes(text));
    if (said !== undefined) return said;
    if (proc.exitCode !== null) {
      await sleep(200);
      const late = texts.find((text) => proc.logText().includes(text));
      if (late !== undefined) return late;
      throw new Error(`the server exited with ${proc.exitCode}: ${proc.logText()}`);
    }
    if (Date.now() > deadline) throw new Error(`the server did not say ${JSON.stringify(texts)} within ${ms} ms: ${proc.logText()}`);
    await sleep(50);
  }
}

/** Spawns a long-running process, keeping the tail of its output. */
function spawnServer(cmd, args, opts = {}) {
  const proc = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], ...opts });
  let log = '';
  const keep = (chunk) => {
    log = (log + chunk.toString()).slice(-4000);
  };
  proc.stdout.on('data', keep);
  proc.stderr.on('data', keep);
  proc.logText = () => log;
  proc.on('error', (e) => keep(`spawn error: ${e.message}`));
  return proc;
}

/** Kills a process (SIGTERM, then SIGKILL after 3 s) and waits for it. */
async function kill(proc) {
  if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
  const exited = new Promise((resolve) => proc.once('exit', resolve));
  proc.kill('SIGTERM');
  const timer = setTimeout(() => proc.kill('SIGKILL'), 3000);
  await Promise.race([exited, sleep(5000)]);
  clearTimeout(timer);
}

/** Runs `rewind ARGS...`; resolves with stdout, rejects with stderr. */
function rewind(args, { timeout = 60000 } = {}) {
  return new Promise((resolve, reject) => {
    execFile(BIN, args, { timeout, maxBuffer: 64 << 20, cwd: REPO }, (err, stdout, stderr) => {
      if (err) {
        err.message = `rewind ${args.join(' ')}: ${err.message}\n${stderr}`;
        reject(err);
      } else {
        resolve(stdout);
      }
    });
  });
}

/** Runs rewind with `input` on stdin. */
function rewindWithInput(args, input, { timeout = 60000 } = {}) {
  return new Promise((resolve, reject) => {
    const child = execFile(BIN, args, { timeout, maxBuffer: 64 << 20, cwd: REPO }, (err, stdout, stderr) => {
      if (err) {
        err.message = `rewind ${args.join(' ')}: ${err.message}\n${stderr}`;
        reject(err);
      } else {
        resolve(stdout);
      }
    });
    child.stdin.end(input);
  });
}

// ------------------------------------------------------------------ servers

/**
 * Starts `rewind serve` over a backend ({data} or {couch}); returns
 * `{url, port, proc, stop(), restart()}`. `config`: a rewind.toml to pass
 * with `--config` (users, for instance).
 */
async function startGateway(cleanup, backend, { port, config } = {}) {
  const gw = { port: port || (await freePort()) };
  const launch = async () => {
    const args = ['serve', '--migrations', MIGRATIONS, '--listen', `127.0.0.1:${gw.port}`];
    if (config) args.unshift('--config', config);
    if (backend.data) args.push('--data', backend.data);
    else args.push('--couch', backend.couch);
    gw.proc = spawnServer(BIN, args);
    gw.url = `http://127.0.0.1:${gw.port}`;
    // Its own line once it listens: a server answering before that (or
    // instead, when the port was taken) is another process's.
    await waitForLog(gw.proc, [`on ${gw.url} (`], 20000);
    await waitUp(`${gw.url}/`, gw.proc);
  };
  gw.stop = () => kill(gw.proc);
  gw.restart = async () => {
    await gw.stop();
    // The same port: phones keep their URL. Retry a few times if the port lingers.
    for (let attempt = 0; ; attempt++) {
      try {
        await launch();
        return;
      } catch (e) {
        if (attempt >= 5) throw e;
        await sleep(200);
      }
    }
  };
  cleanup.add(() => gw.stop());
  await launch();
  return gw;
}

/**
 * Starts pouchdb-server in a temp dir; returns `{url, port, proc, stop()}`.
 * A server answering on the port may be another process's (the port was
 * taken between `freePort` and the bind): this one then says so and exits,
 * and it starts again on another port.
 */
async function startPouchServer(cleanup) {
  const dir = tmpdir(cleanup, 'rewind-pt-couch-');
  const bin = path.join(__dirname, '..', 'node_modules', 'pouchdb-server', 'bin', 'pouchdb-server');
  for (let attempt = 0; attempt < 10; attempt++) {
    const port = await freePort();
    const proc = spawnServer(process.execPath, [bin, '--host', '127.0.0.1', '--port', String(port), '--dir', dir], {
      cwd: dir,
    });
    const server = { port, proc, dir, url: `http://127.0.0.1:${port}`, stop: () => kill(proc) };
    cleanup.add(() => server.stop());
    const taken = 'is already in use';
    if ((await waitForLog(proc, [`has started on ${server.url}/`, taken], 30000)) === taken) {
      await server.stop();
      continue;
    }
    await waitUp(`${server.url}/`, proc, 30000);
    return server;
  }
  throw new Error('pouchdb-server: ten free ports were taken before it could bind them');
}

/**
 * A store with sample data: kind 'embedded' (a temp dir with medic.db) or
 * 'couch' (pouchdb-server). `target` is what rewind commands take.
 */
async function makeStore(cleanup, kind, docs) {
  let store;
  if (kind === 'embedded') {
    const dir = tmpdir(cleanup);
    store = { kind, data: dir, target: path.join(dir, `${DB}.db`) };
  } else if (kind === 'couch') {
    const couch = await startPouchServer(cleanup);
    store = { kind, couch: couch.url, server: couch, target: `${couch.url}/${DB}` };
  } else {
    throw new Error(`unknown store kind ${kind}`);
  }
  if (docs) await rewind(['sample', '--docs', String(docs), '--db', store.target]);
  return store;
}

const upgrade = (store, to) =>
  rewind(['upgrade', '--db', store.target, '--migrations', MIGRATIONS, '--to', String(to)], { timeout: 120000 });
const rollback = (store, to) =>
  rewind(['rollback', '--db', store.target, '--migrations', MIGRATIONS, '--to', String(to)], { timeout: 120000 });

// ------------------------------------------------------------ sample shapes

const sampleCache = new Map();

/** The sample documents (version 0), as `rewind sample` writes them. */
async function sampleDocs(n) {
  const key = `0:${n}`;
  if (!sampleCache.has(key)) {
    const out = await rewind(['sample', '--docs', String(n)]);
    sampleCache.set(key, parseLines(out));
  }
  return sampleCache.get(key);
}

/** The sample documents at version k, as `rewind translate --from 0 --to k` gives them. */
async function sampleAt(n, k) {
  const key = `${k}:${n}`;
  if (!sampleCache.has(key)) {
    const docs = await sampleDocs(n);
    const input = docs.map((d) => JSON.stringify(d)).join('\n') + '\n';
    const out = await rewindWithInput(
      ['translate', '--from', '0', '--to', String(k), '--migrations', MIGRATIONS],
      input,
    );
    sampleCache.set(key, parseLines(out));
  }
  return sampleCache.get(key);
}

function parseLines(text) {
  return text
    .split('\n')
    .filter((l) => l.trim())
    .map((l) => JSON.parse(l));
}

/** The shape markers a migratable document has at version k (a failure message, or null). */
function shapeProblem(doc, k) {
  const t = doc.type;
  const personish = t === 'person' || (t === 'contact' && doc.contact_type === 'person');
  const place =
    ['clinic', 'health_center'].includes(t) ||
    (t === 'contact' && ['clinic', 'health_center'].includes(doc.contact_type));
  if (personish) {
    if (k === 0 && t !== 'person') return `v0 person has type ${t}`;
    if (k >= 1 && (t !== 'contact' || doc.contact_type !== 'person')) return `v${k} person is not a contact`;
    if (k >= 4 && 'parent' in doc) return `v${k} person still has parent`;
    if (k < 4 && 'lineage' in doc) return `v${k} person has lineage`;
    if (k >= 6 && ['male', 'female'].includes(doc.sex)) return `v${k} person has sex ${doc.sex}`;
    if (k < 6 && ['m', 'f'].includes(doc.sex)) return `v${k} person has sex ${doc.sex}`;
    if (k >= 7 && !('first_name' in doc && !('name' in doc))) return `v${k} person has no first_name`;
    if (k < 7 && ('first_name' in doc || !('name' in doc))) return `v${k} person has first_name`;
  } else if (place) {
    if (k <= 1 && t === 'contact') return `v${k} place is a contact`;
    if (k >= 2 && t !== 'contact') return `v${k} place has type ${t}`;
  } else if (t === 'data_record' && doc.fields) {
    const f = doc.fields;
    if (k >= 3 && 'patient_id' in f) return `v${k} report has fields.patient_id`;
    if (k < 3 && 'patient_uuid' in f) return `v${k} report has fields.patient_uuid`;
    if (k >= 5 && 'legacy_code' in f) return `v${k} report has fields.legacy_code`;
  }
  return null;
}

/** A document's body without replication metadata (and without `skip` fields). */
function bodyOf(doc, skip = []) {
  const out = {};
  for (const [key, value] of Object.entries(doc)) {
    if (key.startsWith('_') && key !== '_id') continue;
    if (skip.includes(key)) continue;
    out[key] = value;
  }
  return out;
}

// ------------------------------------------------------------------- phones

let phoneCounter = 0;

/**
 * A PouchDB phone (memory adapter) at version `k` of `gw` (k null: no prefix).
 * `device`: the id it names itself by (`/_device/{id}` in its URL, or with
 * `header` the `X-Rewind-Device` header, set through PouchDB's `fetch` option).
 */
function makePhone(cleanup, gw, k, name = 'phone', { device, header = false } = {}) {
  const db = new PouchDB(`${name}-${process.pid}-${++phoneCounter}`, { adapter: 'memory' });
  const phone = {
    db,
    k,
    gw,
    get url() {
      // `phone.k`, not the `k` it was made with: tests move phones between
      // `/{db}` (k null) and `/v/{k}` by setting it.
      const version = phone.k === null || phone.k === undefined ? '' : `/v/${phone.k}`;
      const named = device && !header ? `/_device/${device}` : '';
      return `${phone.gw.url}${version}${named}/${DB}`;
    },
    remote() {
      const opts = { skip_setup: true };
      if (device && header) {
        opts.fetch = (url, init) => {
          init.headers.set('X-Rewind-Device', device);
          return PouchDB.fetch(url, init);
        };
      }
      return new PouchDB(phone.url, opts);
    },
    /** What replication names as the other side: the URL, or a database sending the header. */
    endpoint() {
      return device && header ? phone.remote() : phone.url;
    },
    pull(opts = {}) {
      return withTimeout(db.replicate.from(phone.endpoint(), { batch_size: 100, ...opts }), 60000, `pull ${phone.url}`);
    },
    push(opts = {}) {
      return withTimeout(db.replicate.to(phone.endpoint(), { batch_size: 100, ...opts }), 60000, `push ${phone.url}`);
    },
    async sync() {
      const pushed = await phone.push();
      const pulled = await phone.pull();
      return { pushed, pulled };
    },
    async docs() {
      const res = await db.allDocs({ include_docs: true, conflicts: true });
      return res.rows.map((r) => r.doc);
    },
    async get(id) {
      return db.get(id, { conflicts: true });
    },
    /** Edits doc `id` with `change(doc)`; returns the new rev. */
    async edit(id, change) {
      const doc = await db.get(id);
      change(doc);
      const res = await db.put(doc);
      return res.rev;
    },
  };
  cleanup.add(() => db.destroy());
  return phone;
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => {
      if (typeof promise.cancel === 'function') promise.cancel();
      reject(new Error(`${what}: no answer within ${ms} ms`));
    }, ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Polls `check()` (truthy = done) every 100 ms for at most `ms`. */
async function waitFor(check, ms, what) {
  const deadline = Date.now() + ms;
  let last;
  while (Date.now() < deadline) {
    try {
      last = await check();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    await sleep(100);
  }
  throw new Error(`timed out after ${ms} ms waiting for ${what}${last instanceof Error ? `: ${last.message}` : ''}`);
}

// --------------------------------------------------------------------- http

/** `fetch` with a timeout; returns {status, text, json}. */
async function http(url, { method = 'GET', body, headers = {}, raw = false } = {}) {
  const init = { method, headers: { ...headers }, signal: AbortSignal.timeout(30000) };
  if (body !== undefined) {
    init.body = raw ? body : JSON.stringify(body);
    init.headers['content-type'] = init.headers['content-type'] || 'application/json';
  }
  const res = await fetch(url, init);
  const text = await res.text();
  let json;
  try {
    json = JSON.parse(text);
  } catch (e) {
    json = undefined;
  }
  return { status: res.status, text, json, headers: res.headers };
}

/** Every change row with all leaves, paged (bounded). */
async function allChanges(base) {
  const rows = [];
  let since = 0;
  for (let page = 0; page < 1000; page++) {
    const res = await http(`${base}/_changes?style=all_docs&limit=500&since=${encodeURIComponent(JSON.stringify(since))}`);
    assert.equal(res.status, 200, `_changes: ${res.text}`);
    rows.push(...res.json.results);
    if (res.json.results.length < 500) return rows;
    since = res.json.last_seq;
  }
  throw new Error('_changes did not end');
}

// --------------------------------------------------------------- invariants

/**
 * Invariant 2 on a server database URL: no document has more than one live
 * leaf, except those listed in `allowed` (ids of human-human conflicts).
 * Returns the ids with conflicts.
 */
async function serverConflicts(base) {
  const rows = await allChanges(base);
  const conflicted = [];
  for (const row of rows) {
    if (row.id.startsWith('_design/')) continue;
    if (row.changes.length < 2) continue;
    const res = await http(`${base}/${encodeURIComponent(row.id)}?open_revs=all`);
    assert.equal(res.status, 200, `open_revs=all of ${row.id}: ${res.text}`);
    const live = res.json.filter((r) => r.ok && !r.ok._deleted);
    if (live.length > 1) conflicted.push(row.id);
  }
  return conflicted;
}

async function assertNoServerConflicts(base, allowed = []) {
  const found = (await serverConflicts(base)).filter((id) => !allowed.includes(id));
  assert.deepEqual(found, [], `documents with more than one live leaf at ${base}`);
}

/** Invariant 2 on a phone: no document has `_conflicts`. */
async function assertNoPhoneConflicts(phone, allowed = []) {
  const docs = await phone.docs();
  const found = docs.filter((d) => d._conflicts && d._conflicts.length && !allowed.includes(d._id)).map((d) => d._id);
  assert.deepEqual(found, [], `phone at v${phone.k} holds conflicted documents`);
}

/**
 * Invariant 4 on a phone: every sample document it holds is exactly the
 * version-k translation of the original (fields in `edited[id]` and
 * attachments aside), and every migratable document has the version-k shape
 * markers.
 */
async function assertPhoneShapes(phone, n, { edited = {}, deleted = [] } = {}) {
  const k = phone.k;
  const expected = new Map((await sampleAt(n, k)).map((d) => [d._id, d]));
  const docs = await phone.docs();
  const problems = [];
  for (const doc of docs) {
    if (doc._id.startsWith('_design/')) continue;
    const marker = shapeProblem(doc, k);
    if (marker) problems.push(`${doc._id}: ${marker}`);
    const want = expected.get(doc._id);
    if (!want) continue;
    const skip = edited[doc._id] || [];
    try {
      assert.deepStrictEqual(bodyOf(doc, skip), bodyOf(want, skip));
    } catch (e) {
      problems.push(`${doc._id}: differs from translate 0→${k}: ${JSON.stringify(bodyOf(doc))} vs ${JSON.stringify(bodyOf(want))}`);
    }
  }
  for (const id of deleted) {
    if (docs.some((d) => d._id === id)) problems.push(`${id}: deleted, still on the phone`);
  }
  // Every document the phone should hold is there (a view the phone was
  // told to retire shows as a deletion: a lost document, not a shape).
  const held = new Set(docs.map((d) => d._id));
  for (const id of expected.keys()) {
    if (!held.has(id) && !deleted.includes(id)) problems.push(`${id}: missing on the phone`);
  }
  assert.deepEqual(problems.slice(0, 5), [], `phone at v${k}: ${problems.length} documents missing or with the wrong shape`);
  return docs;
}

/**
 * Invariant 1: every recorded edit (`{id, field, value}` on a field no
 * migration touches) is on the server (read through `base`) and on every phone.
 */
async function assertEditsEverywhere(edits, { bases = [], phones = [] }) {
  for (const base of bases) {
    for (const e of edits) {
      const res = await http(`${base}/${encodeURIComponent(e.id)}`);
      assert.equal(res.status, 200, `${base}/${e.id}: ${res.text}`);
      assert.deepEqual(res.json[e.field], e.value, `edit of ${e.id}.${e.field} lost at ${base}`);
    }
  }
  for (const phone of phones) {
    for (const e of edits) {
      const doc = await phone.db.get(e.id);
      assert.deepEqual(doc[e.field], e.value, `edit of ${e.id}.${e.field} lost on the phone at v${phone.k}`);
    }
  }
}

/** Sample ids of a kind ('person', 'place', 'report'), from the v0 sample. */
async function sampleIds(n, kind) {
  const docs = await sampleDocs(n);
  return docs
    .filter((d) =>
      kind === 'person'
        ? d.type === 'person'
        : kind === 'place'
          ? ['clinic', 'health_center'].includes(d.type)
          : d.type === 'data_record',
    )
    .map((d) => d._id);
}

/**
 * Waits (bounded) until `/medic` serves version k: the gateway caches the
 * engine's state for STATE_TTL (250 ms, crates/gateway/src/http.rs), so a
 * separate process's finish shows a moment later.
 */
async function waitServed(gw, k) {
  await waitFor(async () => (await servedVersion(gw)) === k, 5000, `/medic to serve v${k}`);
}

/** The version `/medic` serves right now. */
async function servedVersion(gw) {
  const res = await http(`${gw.url}/${DB}`);
  assert.equal(res.status, 200, res.text);
  return res.json.rewind.version;
}

module.exports = {
  waitServed,
  servedVersion,
  REPO,
  BIN,
  MIGRATIONS,
  LATEST,
  DB,
  PouchDB,
  Cleanup,
  sleep,
  freePort,
  tmpdir,
  kill,
  rewind,
  rewindWithInput,
  startGateway,
  startPouchServer,
  makeStore,
  upgrade,
  rollback,
  sampleDocs,
  sampleAt,
  sampleIds,
  shapeProblem,
  bodyOf,
  makePhone,
  withTimeout,
  waitFor,
  http,
  allChanges,
  serverConflicts,
  assertNoServerConflicts,
  assertNoPhoneConflicts,
  assertPhoneShapes,
  assertEditsEverywhere,
  STORE_KINDS: (process.env.REWIND_PT_STORES || 'embedded,couch').split(','),
};
