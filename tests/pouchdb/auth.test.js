'use strict';
// `rewind serve --couch` acts for each user with the user's own credentials.
// A PouchDB phone that logged in with CouchDB's `_session` sends only its
// `AuthSession` cookie; the gateway must open the user's databases upstream
// with that cookie. pouchdb-server does not enforce `_security`, but it runs
// `validate_doc_update` with the session's user, so a design document that
// refuses writes without a user tells which credentials reached upstream.
//
// Run with a release build: REWIND_BIN=target/release/rewind npm test -- auth.test.js

const { test } = require('node:test');
const assert = require('node:assert/strict');
const h = require('./lib/harness');

const PouchDB = require('pouchdb');
PouchDB.plugin(require('pouchdb-adapter-memory'));

const ADMIN = 'admin:secret-admin';

/** A PouchDB handle on `url` that sends `cookie` (and nothing else) on every request. */
function withCookie(url, cookie) {
  return new PouchDB(url, {
    skip_setup: true,
    fetch: (u, opts) => {
      if (cookie) opts.headers.set('Cookie', cookie);
      return PouchDB.fetch(u, opts);
    },
  });
}

test('replication with only an AuthSession cookie reaches CouchDB as its user', async (t) => {
  const cleanup = new h.Cleanup();
  t.after(() => cleanup.run());
  const store = await h.makeStore(cleanup, 'couch', 10);
  const up = store.couch;
  // The companion exists before admin party ends (users may not create databases).
  assert.equal((await h.http(`${up}/${h.DB}-rewind`, { method: 'PUT' })).status, 201);
  assert.equal((await h.http(`${up}/_config/admins/admin`, { method: 'PUT', body: 'secret-admin' })).status, 200);
  const auth = { authorization: `Basic ${Buffer.from(ADMIN).toString('base64')}` };
  const user = await h.http(`${up}/_users/org.couchdb.user:alice`, {
    method: 'PUT',
    headers: auth,
    body: { name: 'alice', password: 'alice-pw', roles: [], type: 'user' },
  });
  assert.equal(user.status, 201, user.text);
  const ddoc = await h.http(`${up}/${h.DB}/_design/login`, {
    method: 'PUT',
    headers: auth,
    body: {
      validate_doc_update:
        "function (doc, old, userCtx) { if (!userCtx.name) { throw({forbidden: 'log in first'}); } }",
    },
  });
  assert.equal(ddoc.status, 201, ddoc.text);
  const session = await h.http(`${up}/_session`, { method: 'POST', body: { name: 'alice', password: 'alice-pw' } });
  const cookie = (session.headers.get('set-cookie') || '').split(';')[0];
  assert.match(cookie, /^AuthSession=/, 'pouchdb-server gave a session cookie');

  const gw = await h.startGateway(cleanup, { couch: up });
  const url = `${gw.url}/${h.DB}`;

  // Without the cookie upstream refuses the write: the check can fail.
  const anonymous = new PouchDB('anonymous', { adapter: 'memory' });
  await anonymous.put({ _id: 'from-anonymous', note: 'no session' });
  const refused = await anonymous.replicate.to(withCookie(url, null)).catch((e) => ({ error: e }));
  const anonymousDoc = await h.http(`${up}/${h.DB}/from-anonymous`, { headers: auth });
  assert.equal(anonymousDoc.status, 404, `an anonymous push must not land: ${JSON.stringify(refused)}`);
  // Refused at a version the gateway translates from (v7, the server at
  // v0): the gateway journals the translation before it stores the
  // revision, and puts the journal back when upstream refuses it.
  const anonymous7 = new PouchDB('anonymous7', { adapter: 'memory' });
  await anonymous7.put({ _id: 'from-anonymous-v7', type: 'contact', contact_type: 'person', first_name: 'No', last_name: 'Session' });
  await anonymous7.replicate.to(withCookie(`${gw.url}/v/7/${h.DB}`, null)).catch((e) => ({ error: e }));
  assert.equal((await h.http(`${up}/${h.DB}/from-anonymous-v7`, { headers: auth })).status, 404);
  const journal = await h.http(`${up}/${h.DB}-rewind/journal:from-anonymous-v7`, { headers: auth });
  assert.ok(journal.status === 404 || JSON.stringify(journal.json.images || []) === '[]', `a journal entry was left: ${journal.text}`);
  await anonymous7.destroy();

  // With only the cookie: pushed, and pulled back, through the gateway.
  const phone = new PouchDB('alice-phone', { adapter: 'memory' });
  await phone.put({ _id: 'from-alice', note: 'alice with a session cookie' });
  const pushed = await phone.replicate.to(withCookie(url, cookie));
  assert.equal(pushed.docs_written, 1, JSON.stringify(pushed));
  const landed = await h.http(`${up}/${h.DB}/from-alice`, { headers: auth });
  assert.equal(landed.status, 200, landed.text);
  assert.equal(landed.json.note, 'alice with a session cookie');
  const pulled = await phone.replicate.from(withCookie(url, cookie));
  assert.ok(pulled.docs_written >= 10, `pulled ${pulled.docs_written}`);
  await phone.destroy();
  await anonymous.destroy();
});
