#!/usr/bin/env bash
# Soak the rollback drill: `rewind drill --seed S --docs 100 --devices 5 --kill`
# for COUNT seeds from START_SEED, with the release binary, and sum up the
# JSON reports: drills run, drills failed (an invariant did not hold or the
# drill errored), lost edits (invariant 1's counterexamples) and spurious
# conflicts (invariant 2's counterexamples).
#
#   scripts/soak-drill.sh [COUNT=100] [START_SEED=1]
#
# REWIND_BIN overrides the binary (default target/release/rewind, built if missing).
# Reports of failed drills are kept in $SOAK_DIR (default: a temp dir, printed).
set -uo pipefail

COUNT=${1:-100}
START=${2:-1}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${REWIND_BIN:-$ROOT/target/release/rewind}
if [[ ! -x $BIN ]]; then
  (cd "$ROOT" && cargo build --release -p rewind-cli) || exit 2
fi
DIR=${SOAK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/rewind-soak-XXXXXX")}
mkdir -p "$DIR"

ran=0 failed=0 lost=0 spurious=0 kills=0
failed_seeds=()
for ((seed = START; seed < START + COUNT; seed++)); do
  report=$DIR/drill-$seed.json
  log=$DIR/drill-$seed.log
  rm -f "$report"
  timeout 600 "$BIN" drill --seed "$seed" --docs 100 --devices 5 --kill --report "$report" >"$log" 2>&1
  rc=$?
  ran=$((ran + 1))
  if [[ -s $report ]]; then
    read -r l s k holds < <(python3 - "$report" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
count = lambda n: sum(len(i.get("counterexamples", [])) for i in r["invariants"] if i["number"] == n)
print(count(1), count(2), r.get("kills", 0), int(bool(r.get("holds"))))
PY
    ) || { l=0 s=0 k=0 holds=0; }
  else
    l=0 s=0 k=0 holds=0
  fi
  lost=$((lost + l))
  spurious=$((spurious + s))
  kills=$((kills + k))
  if [[ $rc -ne 0 || $holds -ne 1 ]]; then
    failed=$((failed + 1))
    failed_seeds+=("$seed")
    echo "seed $seed: FAILED (exit $rc, $l lost edits, $s spurious conflicts; $log)"
  else
    echo "seed $seed: ok ($k kills)"
    rm -f "$report" "$log"
  fi
done

echo "soak: $ran drills run, $failed failed${failed_seeds:+ (seeds ${failed_seeds[*]})}, $kills SIGKILLs"
[[ $failed -gt 0 ]] && echo "soak: failed reports and logs in $DIR"
echo "soak: $ran drills, $lost lost edits, $spurious spurious conflicts"
[[ $failed -eq 0 ]]
