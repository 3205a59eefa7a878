'use strict';
// Browser PouchDB (its own bundle, IndexedDB, the browser's fetch) in headless
// Chromium, syncing through `rewind serve` from another origin: the page is
// served on one port, the gateway listens on another, so every request is a
// cross-origin one and the browser enforces CORS (preflights for the
// credentialed, JSON and custom-header requests PouchDB makes), and gzip is
// the browser's own. Node's PouchDB in the other suites enforces none of it.
//
// No browser driver: the page runs the scenario and posts what it saw back to
// the page server; the test checks it there and on the server.
//
// Needs Chromium (`/usr/bin/chromium`, or REWIND_CHROMIUM). `scripts/test`
// installs Debian's chromium when it may; `.ci/run` sets
// REWIND_BROWSER_REQUIRED=1, which makes a missing browser a failure;
// elsewhere the suite is skipped with a message saying why.

const { test } = require('node:test');
const assert = require('node:assert/strict');
const { spawn, execFileSync } = require('node:child_process');
const fs = require('node:fs');
const http = require('node:http');
const path = require('node:path');
const h = require('./lib/harness');

const N = 200;
const USER = 'chw1';
const PASSWORD = 'browser pass';

/** The Chromium to run, or null when there is none. */
function findChromium() {
  for (const candidate of [process.env.REWIND_CHROMIUM, '/usr/bin/chromium', '/usr/bin/chromium-browser']) {
    if (candidate && fs.existsSync(candidate)) return candidate;
  }
  for (const name of ['chromium', 'chromium-browser', 'google-chrome']) {
    try {
      return execFileSync('sh', ['-c', `command -v ${name}`]).toString().trim() || null;
    } catch (e) {
      // not on PATH
    }
  }
  return null;
}

const chromium = findChromium();
const required = process.env.REWIND_BROWSER_REQUIRED === '1';
const skip =
  chromium || required
    ? false
    : 'no Chromium here (install Debian\'s chromium, or set REWIND_CHROMIUM): browser suite skipped';

/**
 * The page: browser PouchDB pulls /v/0 with basic auth, edits a migrated
 * document and creates one at v0, pushes, pulls again, makes two plain
 * fetches whose answers a page can only read when the gateway's CORS headers
 * allow it (a 401 without credentials, a 404 JSON error), and reports all of
 * it to `/result`; then it syncs live, reporting to `/live` each revision of
 * `live-doc` it pulls.
 */
function pageHtml(gateway) {
  return `<!doctype html><meta charset="utf-8"><title>rewind browser phone</title>
<script src="/pouchdb.min.js"></script>
<script>
const GW = ${JSON.stringify(gateway)};
const AUTH = ${JSON.stringify({ username: USER, password: PASSWORD })};
async function report(body, what = 'result') {
  await fetch('/' + what, { method: 'POST', body: JSON.stringify(body) });
}
let live;
async function scenario() {
  const out = {};
  const remote = new PouchDB(GW + '/v/0/medic', { auth: AUTH, skip_setup: true });
  const local = new PouchDB('phone-' + Date.now());
  out.adapter = local.adapter;
  const pulled = await local.replicate.from(remote, { batch_size: 50 });
  out.pulled = { ok: pulled.ok, docs_written: pulled.docs_written, errors: pulled.errors.length };
  const all = await local.allDocs({ include_docs: true, conflicts: true });
  out.docs = all.rows.map((r) => r.doc);
  const person = { ...out.docs.find((d) => d.type === 'person') };
  person.notes = 'edited in a browser';
  out.edited = person._id;
  await local.put(person);
  const created = await local.put({ _id: 'browser-made', type: 'person', name: 'Ama Browser', sex: 'female', parent: { _id: 'hc-1' } });
  out.created = created.id;
  const pushed = await local.replicate.to(remote, { batch_size: 50 });
  out.pushed = { ok: pushed.ok, docs_written: pushed.docs_written, errors: pushed.errors.length, failures: pushed.doc_write_failures };
  // The pull after the push brings the server's presentation of each
  // pushed edit: the same body, no conflict.
  const again = await local.replicate.from(remote, { batch_size: 50 });
  out.again = { ok: again.ok, errors: again.errors.length };
  out.editedAfter = await local.get(person._id, { conflicts: true });
  out.createdAfter = await local.get('browser-made', { conflicts: true });
  const anonymous = await fetch(GW + '/v/0/medic');
  out.anonymous = { status: anonymous.status, body: await anonymous.json() };
  const missing = await fetch(GW + '/v/0/medic/no-such-doc', { headers: { Authorization: 'Basic ' + btoa(AUTH.username + ':' + AUTH.password) } });
  out.missing = { status: missing.status, body: await missing.json() };
  // Live sync, as the app runs it: a document the server writes at v7 comes
  // down the continuous feed at v0.
  live = local.sync(remote, { live: true, retry: true, batch_size: 50 });
  live.on('change', async (info) => {
    const doc = info.direction === 'pull' && info.change.docs.find((d) => d._id === 'live-doc');
    if (doc) report(await local.get('live-doc', { conflicts: true }), 'live');
  });
  live.on('error', (e) => report({ error: String(e && (e.stack || e.message || e)) }, 'live'));
  return out;
}
const failed = (e) => ({ error: String(e && (e.stack || e.message || e)), name: e && e.name, status: e && e.status });
scenario().then(report, (e) => report(failed(e)));
</script>`;
}

/**
 * Serves the page and the PouchDB bundle; `result` resolves with what the
 * page posts to `/result`; `live` collects what it posts to `/live`.
 */
async function startPageServer(cleanup, gateway) {
  const bundle = fs.readFileSync(path.join(__dirname, 'node_modules', 'pouchdb', 'dist', 'pouchdb.min.js'));
  let deliver;
  const result = new Promise((resolve) => {
    deliver = resolve;
  });
  const live = [];
  const server = http.createServer((req, res) => {
    if (req.method === 'GET' && req.url === '/') {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
      res.end(pageHtml(gateway));
    } else if (req.method === 'GET' && req.url === '/pouchdb.min.js') {
      res.writeHead(200, { 'content-type': 'text/javascript' });
      res.end(bundle);
    } else if (req.method === 'POST' && (req.url === '/result' || req.url === '/live')) {
      let body = '';
      req.on('data', (chunk) => {
        body += chunk;
      });
      req.on('end', () => {
        res.writeHead(204);
        res.end();
        const report = JSON.parse(body);
        if (req.url === '/live') live.push(report);
        else deliver(report);
      });
    } else {
      res.writeHead(404);
      res.end();
    }
  });
  const port = await h.freePort();
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', resolve);
  });
  cleanup.add(() => new Promise((resolve) => server.close(resolve)));
  return { url: `http://127.0.0.1:${port}/`, result, live };
}

test('browser PouchDB in Chromium syncs through the gateway from another origin (CORS, basic auth, IndexedDB)', { skip, timeout: 180000 }, async (t) => {
  assert.ok(chromium, 'REWIND_BROWSER_REQUIRED=1 but no Chromium was found (install Debian\'s chromium)');
  const cleanup = new h.Cleanup();
  t.after(() => cleanup.run());

  const store = await h.makeStore(cleanup, 'embedded', N);
  await h.upgrade(store, h.LATEST);
  const hash = (await h.rewindWithInput(['hash-password'], PASSWORD)).trim();
  const config = path.join(h.tmpdir(cleanup), 'rewind.toml');
  fs.writeFileSync(config, `[[users]]\nname = "${USER}"\npassword = "${hash}"\ndatabases = ["medic"]\nroles = ["chw"]\n`);
  const gw = await h.startGateway(cleanup, store, { config });
  const page = await startPageServer(cleanup, gw.url);

  const profile = h.tmpdir(cleanup, 'rewind-chromium-');
  const browser = spawn(
    chromium,
    [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      `--user-data-dir=${profile}`,
      page.url,
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let browserLog = '';
  browser.stderr.on('data', (chunk) => {
    browserLog = (browserLog + chunk).slice(-4000);
  });
  cleanup.add(() => h.kill(browser));
  const exited = new Promise((resolve) => browser.once('exit', (code) => resolve({ exited: code })));
  const out = await h.withTimeout(Promise.race([page.result, exited]), 120000, 'the page\'s report');
  assert.ok(!('exited' in out), `Chromium exited (${out.exited}) before the page reported:\n${browserLog}`);
  assert.equal(out.error, undefined, `the page failed: ${out.error} (status ${out.status})`);

  // Pulled at v0 from another origin, every document in v0's shape, in IndexedDB.
  assert.equal(out.adapter, 'idb', 'browser PouchDB stores in IndexedDB');
  assert.equal(out.pulled.ok, true);
  assert.equal(out.pulled.errors, 0);
  assert.equal(out.pulled.docs_written, N, 'a fresh pull writes one revision per document');
  assert.equal(out.docs.length, N);
  for (const doc of out.docs) {
    assert.equal(h.shapeProblem(doc, 0), null, `${doc._id}: ${h.shapeProblem(doc, 0)}`);
    assert.equal(doc._conflicts, undefined, `${doc._id} pulled with a conflict`);
  }
  const want = new Map((await h.sampleAt(N, 0)).map((d) => [d._id, h.bodyOf(d)]));
  for (const doc of out.docs) assert.deepEqual(h.bodyOf(doc), want.get(doc._id), `${doc._id}: its v0 body`);

  // Pushed: the edit and the new document reach the server at v7, translated.
  assert.equal(out.pushed.ok, true);
  assert.equal(out.pushed.failures, 0);
  assert.equal(out.pushed.docs_written, 2);
  assert.equal(out.again.ok, true);
  for (const [doc, notes] of [
    [out.editedAfter, 'edited in a browser'],
    [out.createdAfter, undefined],
  ]) {
    assert.equal(doc._conflicts, undefined, `${doc._id} has a conflict on the phone after the next pull`);
    assert.equal(h.shapeProblem(doc, 0), null, `${doc._id} on the phone: ${h.shapeProblem(doc, 0)}`);
    assert.equal(doc.notes, notes);
  }
  assert.equal(out.createdAfter.name, 'Ama Browser');
  const auth = { authorization: `Basic ${Buffer.from(`${USER}:${PASSWORD}`).toString('base64')}` };
  for (const id of [out.edited, out.created]) {
    const res = await h.http(`${gw.url}/medic/${id}?conflicts=true`, { headers: auth });
    assert.equal(res.status, 200, res.text);
    assert.equal(h.shapeProblem(res.json, h.LATEST), null, `${id} at v7: ${h.shapeProblem(res.json, h.LATEST)}`);
    assert.equal(res.json._conflicts, undefined, `${id} has a conflict on the server`);
  }
  const edited = await h.http(`${gw.url}/medic/${out.edited}`, { headers: auth });
  assert.equal(edited.json.notes, 'edited in a browser');
  const made = await h.http(`${gw.url}/medic/browser-made`, { headers: auth });
  assert.equal(made.json.first_name, 'Ama');

  // Errors a page can read: CORS headers on them too, CouchDB-style JSON.
  assert.equal(out.anonymous.status, 401);
  assert.equal(out.anonymous.body.error, 'unauthorized');
  assert.equal(out.missing.status, 404);
  assert.equal(out.missing.body.error, 'not_found');

  // Live: written at v7 through /medic, it reaches the browser at v0 in
  // v0's shape from its first revision (the gateway journals the push before
  // it stores it: docs/design.md, "What a push writes") and settles there
  // without a conflict.
  const written = await h.http(`${gw.url}/medic/live-doc`, {
    method: 'PUT',
    headers: auth,
    body: { type: 'contact', contact_type: 'person', first_name: 'Esi', last_name: 'Live', sex: 'f' },
  });
  assert.equal(written.status, 201, written.text);
  const settled = (doc) => doc && !doc.error && !doc._conflicts && h.shapeProblem(doc, 0) === null;
  await h
    .waitFor(() => browser.exitCode === null && settled(page.live[page.live.length - 1]), 30000, "live-doc in v0's shape")
    .catch((e) => {
      throw new Error(`${e.message}; the page reported ${JSON.stringify(page.live)}; Chromium: ${browserLog}`);
    });
  for (const seen of page.live) assert.equal(h.shapeProblem(seen, 0), null, `${seen._rev}: ${h.shapeProblem(seen, 0)}`);
  const live = page.live[page.live.length - 1];
  assert.equal(live.name, 'Esi Live');
  assert.equal(live.sex, 'female');
  assert.equal(live.type, 'person');
});
