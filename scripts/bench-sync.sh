#!/usr/bin/env bash
# Sync throughput, one table, everything measured in the same run:
#  1. `rewind copy` between two pouchdb-server databases against PouchDB 9
#     replication between the same two (`PouchDB.replicate(src, dst)`, both over HTTP);
#     the source is loaded with shared/baseline/gen.js.
#  2. A PouchDB 9 phone (node, memory adapter, batch_size 100, as replicate-baseline.js)
#     pulling N docs: (a) straight from pouchdb-server; (b) through `rewind serve --couch`
#     at the server's version (`/medic`, no translation); (c) through the same gateway
#     translated to version 0 (`/v/0/medic`, after `rewind upgrade --to 7` with examples/cht);
#     (d) from `rewind serve --data` on the embedded store (`rewind sample`, version 0);
#     (e) from `rewind serve --data` on a `rewind copy` of (b)'s database and companion, so
#     (e)/(b) compares the two stores behind the same gateway, same data, same presentation.
#     (a)-(c) and (e) pull the same upgraded db (`rewind sample` + upgrade to 7).
#  4. A phone back from the field pushing PUSHES edits (default 500): (a) straight to
#     pouchdb-server at v7; (b) at v0 through `rewind serve --couch` (each edit translated to
#     v7, journaled, checked against what rewind wrote on its ancestors).
#  3. The embedded gateway's peak RSS (VmHWM) with 50 live PouchDB replications
#     (`live: true`, one node process, each from scratch into its own memory db) for LIVE_SECS.
# Node times are taken inside node (PouchDB's `require` excluded); `rewind copy` is timed
# as a whole process, start-up included, so the copy ratio is if anything understated.
#
# usage: N=20000 scripts/bench-sync.sh      (or scripts/bench-sync.sh 20000)
# Needs node, `npm ci --prefix tests/pouchdb`, and ../shared/baseline (or BASELINE=dir).
# Everything listens on 127.0.0.1; every server started here is stopped on exit.
#
# "docs" is PouchDB's docs_written: revisions written, one per leaf (tombstoned conflict
# branches included), so it exceeds N when the source serves more than one leaf per doc.
#
# one run on 2026-11-26 (third session), N=20000, LIVE_SECS=10, CLIENTS=50, 2-core machine
# (before step 4 existed):
#   step                                                              docs     secs    docs/s  notes
#   1. rewind copy src → dst (pouchdb-server, whole process)       20000      6.9      2897
#   1. PouchDB.replicate(src, dst) over HTTP (node)                  20000     10.2      1956
#   2a. pull straight from pouchdb-server (/medic, v7)               20000      7.5      2654  pouchdb-server CPU 6.6 s
#   2b. pull via rewind serve --couch, /medic (v7, no translation)  143880     24.5      5862  pouchdb-server CPU 16.3 s
#   2c. pull via rewind serve --couch, /v/0/medic (7 → 0)          20000     19.4      1030  pouchdb-server CPU 15.6 s
#   2e. pull via rewind serve --data, /medic (2b's db copied, v7)   143880     11.5     12487
#   2d. pull via rewind serve --data, /medic (embedded, v0)          20000      5.1      3941
#   3. 50 live pulls, one node process, 10 s (embedded gateway)      65500       10      6550  gateway peak RSS 226 MB; 0 client errors
#
#   pull: (b)/(a) = 3.26×, (c)/(a) = 2.58× (target ≤ 1.15×), (d)/(a) = 0.67×
#   server: pouchdb-server CPU for (b)/(a) = 2.46×, (c)/(a) = 2.36×: the floor on this server
#   (one JavaScript thread) for a gateway that reads each document's journal besides it.
#   The same day at N=2000, with step 4: 4a 0.4 s, 4b 3.8 s (8.8×; 2.2 s after the push
#   wrote journals and translations a batch at a time).
#   Earlier: (c)/(a) was 5.3–5.9× at N=2000 and grew with N (the leaves of a batch came from a
#   `filter=_doc_ids` changes feed, which pouchdb-server answers by scanning the database);
#   before that 58× (`_bulk_get` presented each revision on its own). 2b's 7.2 revisions per
#   document are the view plus tombstones retiring the other versions' and contexts' views
#   (docs/design.md, "Revisions" and Known limits); 2d: 1 per document.
#   Late on 2026-11-26 (N=20000): (c)/(a) = 2.39×, server CPU 2.14× (journals read with
#   `_bulk_get`); 2b reads 4.6 revisions per document (an epoch's context retires only the
#   views of the version it served); 4a 2.0 s, 4b 13.2 s.
#   2026-11-27, N=20000: (c)/(a) = 1.56-1.71x in the morning (the phone's _bulk_get answered from
#   the cache's revision index), 1.29x in the evening (changes pages read ahead, views hashed
#   without a copy per version), server CPU 1.05x; 4a 2.0 s, 4b 5.8 s.
#   Later on 2026-11-27, with ladders (docs/design.md, "Revisions"): 2b reads one revision per
#   document (1.44-1.53x; it read 2.0 while every run started an epoch, 4.6 before ladders);
#   (c)/(a) 1.29-1.35x; 4b/4a 3.4-3.6x.
#   2026-11-27, second session (gzip from 1 KiB, HEAD, attachment endpoints): (c)/(a) 1.27x,
#   (b)/(a) 1.34x, (d)/(a) 0.55x, 4b/4a 2.92x, 50 live clients 181 MB; copy 1.38x replicate.
#   2026-11-27, third session (copy pipelined, first revisions from the feed; mimalloc without
#   transparent huge pages): copy 2.12x replicate (4.8 s against 10.2 s); 50 live clients
#   140 MB; (c)/(a) 1.37x, (b)/(a) 1.32x on a slower machine that hour (the direct pull took
#   7.8 s) — side by side on one server, the gateway before/after the allocator change pulled
#   /v/0 in 10.6-11.0 / 10.2-10.3 s with 4.75 / 4.3-4.4 s of CPU and 212 / 192 MB peak.
#   2026-11-27, fifth session: N=100000 before its changes: (c)/(a) 1.17x (the direct pull took
#   47.5 s), 4b/4a 4.34x (the first push after the pull presented 80,000 documents again). After
#   them (views equal to the one before not hashed again, _bulk_get without copies, zlib-rs gzip,
#   revisions presented lately remembered apart), N=20000: (c)/(a) 1.24x with pouchdb-server CPU
#   at 1.14x the direct pull's (the floor on this server), (b)/(a) 1.23x, 4b/4a 1.51x, copy 1.98x,
#   50 live clients 104,300 docs in 10 s at 103 MB peak.
#   2026-11-28 (pushes journal before they store; a slow hour: the direct pull took 11.5 s),
#   N=20000: (c)/(a) 1.38x, (b)/(a) 1.37x, server CPU 1.19x, (d)/(a) 0.39x, 4b/4a 1.41x,
#   50 live clients 118 MB peak.
#   2026-11-28, N=100000 (the issue's size): (c)/(a) 1.36x (direct 38.3 s, gateway 52.0 s), (b)/(a)
#   1.34x, server CPU 1.15x, (d)/(a) 0.51x, 4b/4a 1.30x, 50 live clients 133 MB peak, copy 1.79x.
#   The server was busy 88% of the direct pull and 75% of the gateway's: see docs/design.md,
#   Known limits.
#   2026-11-28, pages read ahead a chunk at a time (1,000 rows in one store read of the feed,
#   one _bulk_get of leaves and one of journals, two chunks ahead), N=100000, two runs on a
#   slow day (the direct pull took 61.2 / 58.4 s): (c)/(a) 1.09x / 0.99x, (b)/(a) 1.07x /
#   0.94x, server CPU 0.94x / 0.86x, (d)/(a) 0.38x / 0.43x, 4b/4a 1.40x / 1.49x, 50 live
#   clients 174 / 154 MB peak, copy 1.90x / 1.87x. A third run (copy reading 1,000 changes per
#   batch; direct pull 54.9 s): (c)/(a) 0.97x, (b)/(a) 1.24x (server 1.03x), server CPU for (c)
#   0.83x, (d)/(a) 0.38x, 4b/4a 1.47x, 50 live clients 173 MB, copy 1.89x.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
N=${1:-${N:-20000}}
CLIENTS=${CLIENTS:-50}
PUSHES=${PUSHES:-500}        # documents a phone edits and pushes in step 4
LIVE_SECS=${LIVE_SECS:-20}
TMO=${TMO:-900}            # seconds any single step may take before the bench gives up
baseline=${BASELINE:-$root/../shared/baseline}
modules=$root/tests/pouchdb/node_modules
[ -d "$modules/pouchdb-server" ] || { echo "bench: run \`npm ci --prefix tests/pouchdb\` first" >&2; exit 1; }
[ -d "$modules/pouchdb-adapter-memory" ] || { echo "bench: pouchdb-adapter-memory missing from $modules" >&2; exit 1; }
[ -f "$baseline/gen.js" ] || { echo "bench: $baseline/gen.js not found (set BASELINE=dir)" >&2; exit 1; }
export NODE_PATH=$modules

echo "bench: building rewind (release)" >&2
cargo build --release -q -p rewind-cli
rewind=$root/target/release/rewind

tmp=$(mktemp -d -t rewind-bench.XXXXXX)
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# shellcheck source=scripts/pouchdb-server.sh
. "$root/scripts/pouchdb-server.sh"
# wait_up URL PID: until URL answers, or fail if PID died or 30 s passed.
wait_up() {
  for _ in $(seq 1 150); do
    curl -fs "$1" >/dev/null 2>&1 && return 0
    kill -0 "$2" 2>/dev/null || { echo "bench: server for $1 exited" >&2; return 1; }
    sleep 0.2
  done
  echo "bench: $1 did not answer in 30 s" >&2; return 1
}
# gateway NAME ARGS...: start `rewind serve ARGS --listen 127.0.0.1:0`; sets gw_pid, gw_url
# from the address it says it serves on once it listens (the port it bound: no other
# process's server on a port picked in advance is measured instead).
gateway() {
  local name=$1; shift
  "$rewind" serve "$@" --listen 127.0.0.1:0 >"$tmp/$name.log" 2>&1 &
  gw_pid=$!; pids+=("$gw_pid"); gw_url=
  for _ in $(seq 1 150); do
    gw_url=$(sed -n 's/.* on \(http:\/\/127\.0\.0\.1:[0-9]*\) (.*/\1/p' "$tmp/$name.log" | head -1)
    [ -n "$gw_url" ] && break
    kill -0 "$gw_pid" 2>/dev/null || break
    sleep 0.2
  done
  [ -n "$gw_url" ] || { echo "bench: rewind serve ($name) did not start:" >&2; cat "$tmp/$name.log" >&2; exit 1; }
  wait_up "$gw_url/" "$gw_pid" || { cat "$tmp/$name.log" >&2; exit 1; }
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
hwm() { awk '/VmHWM/ {print int($2/1024)}' "/proc/$1/status"; }
rss() { awk '/VmRSS/ {print int($2/1024)}' "/proc/$1/status"; }
doc_count() { curl -fs "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["doc_count"])'; }
# run NAME COMMAND...: bounded by TMO; its stdout is in $tmp/out; on failure print and exit.
run() {
  local name=$1; shift
  timeout "$TMO" "$@" >"$tmp/out" 2>"$tmp/err" || { echo "bench: $name failed (rc $?):" >&2; cat "$tmp/out" "$tmp/err" >&2; exit 1; }
}

cat >"$tmp/replicate.js" <<'EOF'
// node replicate.js SRC DST: PouchDB.replicate over HTTP; prints "DOCS SECS".
const PouchDB = require('pouchdb');
const t0 = Date.now();
PouchDB.replicate(process.argv[2], process.argv[3], { batch_size: 100 }).then((r) => {
  console.log(r.docs_written, (Date.now() - t0) / 1000);
}).catch((e) => { console.error(e); process.exit(1); });
EOF
cat >"$tmp/pull.js" <<'EOF'
// node pull.js URL: a phone (memory adapter) pulls the whole db; prints "DOCS SECS".
const PouchDB = require('pouchdb');
PouchDB.plugin(require('pouchdb-adapter-memory'));
const local = new PouchDB('phone', { adapter: 'memory' });
const t0 = Date.now();
local.replicate.from(process.argv[2], { batch_size: 100 }).then((r) => {
  console.log(r.docs_written, (Date.now() - t0) / 1000);
}).catch((e) => { console.error(e); process.exit(1); });
EOF
cat >"$tmp/push.js" <<'EOF'
// node push.js URL EDITS: a phone pulls URL, edits EDITS docs, pushes; prints "DOCS SECS FAILURES"
// (the push alone is timed).
const PouchDB = require('pouchdb');
PouchDB.plugin(require('pouchdb-adapter-memory'));
(async () => {
  const local = new PouchDB('phone', { adapter: 'memory' });
  await local.replicate.from(process.argv[2], { batch_size: 100 });
  const all = await local.allDocs({ include_docs: true, limit: +process.argv[3] });
  await local.bulkDocs(all.rows.map((r) => ({ ...r.doc, bench_note: 'edited in the field' })));
  const t0 = Date.now();
  const r = await local.replicate.to(process.argv[2], { batch_size: 100 });
  console.log(r.docs_written, (Date.now() - t0) / 1000, r.doc_write_failures);
})().catch((e) => { console.error(e); process.exit(1); });
EOF
cat >"$tmp/live.js" <<'EOF'
// node live.js URL CLIENTS SECS: CLIENTS live pulls (each into its own memory db) for SECS,
// then cancels them all; prints "DOCS_RECEIVED ERRORS".
const PouchDB = require('pouchdb');
PouchDB.plugin(require('pouchdb-adapter-memory'));
const [url, n, secs] = [process.argv[2], +process.argv[3], +process.argv[4]];
let docs = 0, errors = 0;
const reps = Array.from({ length: n }, (_, i) => {
  const r = new PouchDB(`live-${i}`, { adapter: 'memory' })
    .replicate.from(url, { live: true, retry: false, batch_size: 100 });
  r.on('change', (info) => { docs += info.docs.length; });
  r.on('error', (e) => { errors++; console.error(`client ${i}:`, e && e.message); });
  return r;
});
setTimeout(() => {
  reps.forEach((r) => r.cancel());
  console.log(docs, errors);
  setTimeout(() => process.exit(0), 500);
}, secs * 1000);
EOF

rows=()
row() { rows+=("$(printf '%-62s %7s %8s %9s  %s' "$@")"); }
rate() { echo "$1 / $2" | bc -l | xargs printf '%.0f'; }
ratio() { echo "$1 / $2" | bc -l | xargs printf '%.2f'; }

# --- pouchdb-server ---------------------------------------------------------------------
start_pouchdb_server "$tmp/couch" || exit 1
pids+=("$server")

# --- 1. copy ----------------------------------------------------------------------------
echo "bench: N=$N, 1. rewind copy vs PouchDB.replicate" >&2
run "gen.js load" node "$baseline/gen.js" "$N" "$url/src"
t0=$(date +%s.%N)
run "rewind copy" "$rewind" copy "$url/src" "$url/dst-rewind"
copy_secs=$(echo "$(date +%s.%N) - $t0" | bc -l)
copy_docs=$(doc_count "$url/dst-rewind")
row "1. rewind copy src → dst (pouchdb-server, whole process)" "$copy_docs" "$(printf '%.1f' "$copy_secs")" "$(rate "$copy_docs" "$copy_secs")" ""
run "PouchDB.replicate" node "$tmp/replicate.js" "$url/src" "$url/dst-pouch"
read -r rep_docs rep_secs <"$tmp/out"
row "1. PouchDB.replicate(src, dst) over HTTP (node)" "$rep_docs" "$(printf '%.1f' "$rep_secs")" "$(rate "$rep_docs" "$rep_secs")" ""
copy_ratio=$(ratio "$rep_secs" "$copy_secs")
[ "$copy_docs" = "$N" ] && [ "$(doc_count "$url/dst-pouch")" = "$N" ] || echo "bench: warning: copies hold $copy_docs / $(doc_count "$url/dst-pouch") docs, not $N" >&2

# --- 2. pulls ---------------------------------------------------------------------------
echo "bench: 2. loading medic (rewind sample) and upgrading it to 7" >&2
run "rewind sample into pouchdb-server" "$rewind" sample --docs "$N" --seed 1 --db "$url/medic"
run "rewind upgrade --to 7" "$rewind" upgrade --db "$url/medic" --migrations examples/cht --to 7
# CPU seconds pouchdb-server has used (its JavaScript thread and leveldb's):
# what limits every pull from it, direct or through the gateway.
ticks=$(getconf CLK_TCK)
server_cpu() { awk -v t="$ticks" '{printf "%.2f", ($14 + $15) / t}' "/proc/$server/stat"; }
pull() { # pull LABEL URL [PID]: one phone pull, row with seconds and docs/s; sets p_secs, p_cpu
  local cpu0; cpu0=$(server_cpu)
  run "$1" node "$tmp/pull.js" "$2"
  p_cpu=$(echo "$(server_cpu) - $cpu0" | bc -l)
  local docs; read -r docs p_secs <"$tmp/out"
  [ "$docs" = "$N" ] || echo "bench: warning: $1 pulled $docs docs, not $N" >&2
  row "$1" "$docs" "$(printf '%.1f' "$p_secs")" "$(rate "$docs" "$p_secs")" \
    "pouchdb-server CPU $(printf '%.1f' "$p_cpu") s${3:+; gateway peak RSS $(hwm "$3") MB}"
}
echo "bench: 2a. pull straight from pouchdb-server" >&2
pull "2a. pull straight from pouchdb-server (/medic, v7)" "$url/medic"; a_secs=$p_secs; a_cpu=$p_cpu
gateway couch --couch "$url" --db medic --migrations examples/cht; couch_gw=$gw_pid
echo "bench: 2b. pull through the gateway, no translation" >&2
pull "2b. pull via rewind serve --couch, /medic (v7, no translation)" "$gw_url/medic" "$couch_gw"; b_secs=$p_secs; b_cpu=$p_cpu
echo "bench: 2c. pull through the gateway, translated to version 0" >&2
pull "2c. pull via rewind serve --couch, /v/0/medic (7 → 0)" "$gw_url/v/0/medic" "$couch_gw"; c_secs=$p_secs; c_cpu=$p_cpu
echo "bench: 2e. the same upgraded db, copied to the embedded store (before step 4 edits it)" >&2
mkdir -p "$tmp/data2"
run "rewind copy medic to the embedded store" "$rewind" copy "$url/medic" "$tmp/data2/medic.db"
run "rewind copy medic-rewind to the embedded store" "$rewind" copy "$url/medic-rewind" "$tmp/data2/medic.db-rewind"
# A phone back from the field pushes its edits: PUSHES documents edited at v7 straight
# to pouchdb-server, and at v0 through the gateway (each translated to v7 and journaled).
push() { # push LABEL URL [PID]: a phone pulls URL, edits PUSHES docs, pushes them; sets q_secs
  local cpu0; cpu0=$(server_cpu)
  run "$1" node "$tmp/push.js" "$2" "$PUSHES"
  local docs failures; read -r docs q_secs failures <"$tmp/out"
  local cpu; cpu=$(echo "$(server_cpu) - $cpu0" | bc -l)
  [ "$docs" = "$PUSHES" ] && [ "$failures" = 0 ] || echo "bench: warning: $1 pushed $docs docs ($failures failures), not $PUSHES" >&2
  row "$1" "$docs" "$(printf '%.1f' "$q_secs")" "$(rate "$docs" "$q_secs")" \
    "pouchdb-server CPU during pull and push $(printf '%.1f' "$cpu") s${3:+; gateway peak RSS $(hwm "$3") MB}"
}
echo "bench: 4. a phone pushes $PUSHES edits, straight and through the gateway at v0" >&2
push "4a. push $PUSHES edits straight to pouchdb-server (v7)" "$url/medic"; qa_secs=$q_secs
push "4b. push $PUSHES edits via rewind serve --couch, /v/0/medic" "$gw_url/v/0/medic" "$couch_gw"; qb_secs=$q_secs
stop "$couch_gw"
gateway embedded2 --data "$tmp/data2" --migrations examples/cht; emb2_gw=$gw_pid
pull "2e. pull via rewind serve --data, /medic (2b's db copied, v7)" "$gw_url/medic" "$emb2_gw"; e_secs=$p_secs
stop "$emb2_gw"
echo "bench: 2d. pull from the embedded gateway" >&2
mkdir -p "$tmp/data"
run "rewind sample into the embedded store" "$rewind" sample --docs "$N" --seed 1 --db "$tmp/data/medic.db"
gateway embedded --data "$tmp/data" --migrations examples/cht; emb_gw=$gw_pid
pull "2d. pull via rewind serve --data, /medic (embedded, v0)" "$gw_url/medic" "$emb_gw"; d_secs=$p_secs
stop "$emb_gw"

# --- 3. live clients --------------------------------------------------------------------
echo "bench: 3. $CLIENTS live clients against a fresh embedded gateway for $LIVE_SECS s" >&2
gateway live --data "$tmp/data" --migrations examples/cht; live_gw=$gw_pid
idle=$(hwm "$live_gw")
run "live clients" timeout $((LIVE_SECS + 60)) node "$tmp/live.js" "$gw_url/medic" "$CLIENTS" "$LIVE_SECS"
read -r live_docs live_errors <"$tmp/out"
row "3. $CLIENTS live pulls, one node process, ${LIVE_SECS} s (embedded gateway)" "$live_docs" "$LIVE_SECS" "$(rate "$live_docs" "$LIVE_SECS")" \
  "gateway peak RSS $(hwm "$live_gw") MB (idle $idle MB, now $(rss "$live_gw") MB); $live_errors client errors"
stop "$live_gw"

echo
echo "N = $N documents; docs/s = documents written by the replication / its seconds"
printf '%-62s %7s %8s %9s  %s\n' "step" "docs" "secs" "docs/s" "notes"
for r in "${rows[@]}"; do echo "$r"; done
echo
echo "copy: rewind copy is $copy_ratio× PouchDB.replicate (target ≥ 2×)"
echo "pull: (b)/(a) = $(ratio "$b_secs" "$a_secs")×, (c)/(a) = $(ratio "$c_secs" "$a_secs")× (target ≤ 1.15×), (d)/(a) = $(ratio "$d_secs" "$a_secs")× (time; < 1 is faster)"
echo "server: pouchdb-server CPU for (b)/(a) = $(ratio "$b_cpu" "$a_cpu")×, (c)/(a) = $(ratio "$c_cpu" "$a_cpu")× (the gateway reads each document's journal besides the document, in requests of up to 1,000 documents where the phone asks for 100: on a server that runs one JavaScript thread, the pull takes at least about this ratio)"
echo "push: (4b)/(4a) = $(ratio "$qb_secs" "$qa_secs")× (no target; each pushed document is translated, journaled and checked for what rewind wrote on its ancestors)"
echo "store: (e)/(b) = $(ratio "$e_secs" "$b_secs")× (the same database and presentation behind the gateway, embedded store vs pouchdb-server; < 1: embedded faster)"
