#!/usr/bin/env bash
# Soak the PouchDB acceptance test (tests/pouchdb/drill.test.js): five real
# PouchDB phones through `rewind serve`, the engine SIGKILLed in each of its
# four runs, a restore from a backup, on each store, for COUNT seeds from
# START_SEED. Sums what every drill found: drills run, drills failed, lost
# edits and spurious conflicts (both must be 0).
#
#   scripts/soak-pouchdb-drill.sh [COUNT=20] [START_SEED=1]
#
# REWIND_DRILL_STORES picks the stores (default embedded,couch); REWIND_BIN
# the binary (default target/release/rewind, built). Each seed takes ~15 s
# on the embedded store and ~35 s on pouchdb-server (2 cores). Reports and
# the node log are kept in $SOAK_DIR (default: a temp dir, printed).
set -uo pipefail

COUNT=${1:-20}
START=${2:-1}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
if [[ -z ${REWIND_BIN:-} ]]; then
  cargo build --release -q -p rewind-cli || exit 2
  export REWIND_BIN=$ROOT/target/release/rewind
fi
[[ -d tests/pouchdb/node_modules ]] || npm ci --prefix tests/pouchdb --no-audit --no-fund >&2 || exit 2
DIR=${SOAK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/rewind-pouchdb-soak-XXXXXX")}
mkdir -p "$DIR"

seeds=$(seq -s, "$START" $((START + COUNT - 1)))
echo "soak: seeds $START..$((START + COUNT - 1)) on ${REWIND_DRILL_STORES:-embedded,couch}; log in $DIR/node.log"
REWIND_DRILL_SEEDS=$seeds REWIND_DRILL_REPORT=$DIR \
  node --test --test-concurrency=1 tests/pouchdb/drill.test.js >"$DIR/node.log" 2>&1
grep -E '^    (not )?ok ' "$DIR/node.log"

python3 - "$DIR" <<'PY'
import glob, json, re, sys
d = sys.argv[1]
log = open(f"{d}/node.log").read()
passed = len(re.findall(r"^    ok ", log, re.M))
failed = len(re.findall(r"^    not ok ", log, re.M))
reports = [json.load(open(f)) for f in sorted(glob.glob(f"{d}/drill-*.json"))]
lost = sum(len(r["lost"]) for r in reports)
spurious = sum(len(r["conflicts"]) for r in reports)
kills = sum(r["kills"] for r in reports)
for r in reports:
    for what in r["lost"][:3]:
        print(f"  {r['store']} seed {r['seed']}: lost {what}")
    for what in r["conflicts"][:3]:
        print(f"  {r['store']} seed {r['seed']}: conflict {what}")
print(f"soak: {passed + failed} drills run, {failed} failed, {kills} SIGKILLs, {len(reports)} reached the checks")
print(f"soak: {passed + failed} drills, {lost} lost edits, {spurious} spurious conflicts")
sys.exit(0 if failed == 0 and lost == 0 and spurious == 0 and len(reports) == passed + failed else 1)
PY
