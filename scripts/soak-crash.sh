#!/usr/bin/env bash
# Soak test of crash safety: kill -9 `rewind upgrade` and `rewind rollback`
# hundreds of times at random points (on the embedded store and on
# pouchdb-server), resume each time, and check that every document is
# migrated exactly once and restored byte for byte.
#
# usage: scripts/soak-crash.sh [KILLS] [SEED]     (default 300 kills, a seed from the clock)
# Needs `npm ci --prefix tests/pouchdb` for the pouchdb-server half.
set -uo pipefail
cd "$(dirname "$0")/.."
kills=${1:-${REWIND_CRASH_KILLS:-300}}
seed=${2:-${REWIND_CRASH_SEED:-$(date +%s)}}
log=$(mktemp -t rewind-soak.XXXXXX)
echo "soak: $kills kills per run and backend, seed $seed (log: $log)"
start=$(date +%s)
REWIND_CRASH_KILLS=$kills REWIND_CRASH_SEED=$seed \
  cargo test -p rewind-cli --test engine -- kill_9 --include-ignored --nocapture --test-threads 1 >"$log" 2>&1
status=$?
secs=$(( $(date +%s) - start ))
echo
printf '%-60s %s\n' "test" "result"
grep -E '^test kill_9' "$log" | sed -E 's/^test (.*) \.\.\. (.*)$/\1 \2/' | awk '{printf "%-60s %s\n", $1, $2}'
echo
grep -E 'killed [0-9]+ times' "$log" | sed 's/^/  /'
echo
if [ $status -eq 0 ]; then
  echo "soak: PASSED in ${secs} s (seed $seed)"
else
  echo "soak: FAILED in ${secs} s (seed $seed); first failure:"
  grep -m1 -A8 'panicked' "$log" | cut -c1-400
  echo "rerun with: scripts/soak-crash.sh $kills $seed"
fi
exit $status
