#!/usr/bin/env bash
# Upgrade throughput, one table: on pouchdb-server, the Node CHT-style
# migration (shared/baseline/migrate-baseline.js), `rewind upgrade` with the
# same transform (examples/baseline), and raw `_bulk_docs` of pre-built docs
# (gen.js load); on the embedded store, `rewind upgrade` and `rewind
# rollback`. Wall time, docs/s and peak RSS of the migrating process.
# The embedded rows run on files `rewind sample` has just made, so in the
# current layout (revision bodies in a rowid table; files made before it
# answer the same but slower). The machine's other load moves every row:
# compare rows of one run (docs/design.md, "Known limits", engine speed).
#
# usage: N=20000 scripts/bench-upgrade.sh      (N=1000000 for the big run; not for CI)
#        BATCH=500 to force a batch size (default: rewind's own, sized to the store)
# Needs node, `npm ci --prefix tests/pouchdb`, and ../shared/baseline (or BASELINE=dir).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
N=${N:-20000}
BATCH=${BATCH:-}
batch=()
[ -n "$BATCH" ] && batch=(--batch "$BATCH")
baseline=${BASELINE:-$root/../shared/baseline}
modules=$root/tests/pouchdb/node_modules
[ -d "$modules/pouchdb-server" ] || { echo "bench: run \`npm ci --prefix tests/pouchdb\` first" >&2; exit 1; }
[ -f "$baseline/migrate-baseline.js" ] || { echo "bench: $baseline/migrate-baseline.js not found (set BASELINE=dir)" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "bench: needs /usr/bin/time (GNU time) for peak RSS" >&2; exit 1; }
export NODE_PATH=$modules

echo "bench: building rewind (release)" >&2
cargo build --release -q -p rewind-cli
rewind=$root/target/release/rewind

tmp=$(mktemp -d -t rewind-bench.XXXXXX)
server=
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true; rm -rf "$tmp"' EXIT
# shellcheck source=scripts/pouchdb-server.sh
. "$root/scripts/pouchdb-server.sh"
start_pouchdb_server "$tmp" || exit 1

rows=()
declare -A secs_of cpu_of
# measure NAME DOCS COMMAND...: wall seconds and peak RSS of COMMAND.
measure() {
  local name=$1 docs=$2; shift 2
  local t0 t1 secs rss cpu0 cpu
  cpu0=$(server_ticks)
  t0=$(date +%s.%N)
  /usr/bin/time -v -o "$tmp/time" "$@" >"$tmp/out" 2>"$tmp/err" || { echo "bench: $name failed:" >&2; cat "$tmp/out" "$tmp/err" >&2; exit 1; }
  t1=$(date +%s.%N)
  secs=$(echo "$t1 - $t0" | bc -l)
  # gen.js ("load: N docs in S s") times its own writes:
  # after them node waits for fetch's keep-alive sockets to close (~6 s),
  # which is not the server's time.
  own=$(sed -n 's/^load: .* in \([0-9.]*\) s .*/\1/p' "$tmp/out" | head -1)
  [ -n "$own" ] && [ "$own" != 0.0 ] && secs=$own
  rss=$(awk -F': ' '/Maximum resident set size/ {print int($2/1024)}' "$tmp/time")
  cpu=$(echo "($(server_ticks) - $cpu0) / $ticks" | bc -l)
  secs_of[$name]=$secs
  cpu_of[$name]=$cpu
  rows+=("$(printf '%-58s %9d %8.1f %10.0f %8s %10.1f' "$name" "$docs" "$secs" "$(echo "$docs / $secs" | bc -l)" "${rss} MB" "$cpu")")
}
# CPU time pouchdb-server has used (its JavaScript thread and leveldb's):
# the server is what limits every pouchdb-server row.
ticks=$(getconf CLK_TCK)
server_ticks() { awk '{print $14 + $15}' "/proc/$server/stat"; }

echo "bench: N=$N, loading pouchdb-server" >&2
node "$baseline/gen.js" "$N" "$url/node" >/dev/null
measure "pouchdb-server: raw _bulk_docs of pre-built docs (gen.js)" "$N" node "$baseline/gen.js" "$N" "$url/raw"
raw_line=$(cat "$tmp/out")
measure "pouchdb-server: Node CHT-style migration (migrate-baseline)" "$N" node "$baseline/migrate-baseline.js" "$url/node"
node_line=$(cat "$tmp/out")
node "$baseline/gen.js" "$N" "$url/rewind" >/dev/null
measure "pouchdb-server: rewind upgrade 0 → 2 (examples/baseline)" "$N" \
  "$rewind" upgrade --db "$url/rewind" --migrations examples/baseline ${batch[@]+"${batch[@]}"}
measure "pouchdb-server: rewind rollback 2 → 0" "$N" \
  "$rewind" rollback --db "$url/rewind" --migrations examples/baseline --to 0 ${batch[@]+"${batch[@]}"}

echo "bench: loading the embedded store" >&2
measure "embedded: raw bulk_docs insert of the sample (rewind sample)" "$N" \
  "$rewind" sample --docs "$N" --seed 1 --db "$tmp/e.db"
measure "embedded: rewind upgrade 0 → 2 (examples/baseline)" "$N" \
  "$rewind" upgrade --db "$tmp/e.db" --migrations examples/baseline ${batch[@]+"${batch[@]}"}
measure "embedded: rewind rollback 2 → 0" "$N" \
  "$rewind" rollback --db "$tmp/e.db" --migrations examples/baseline --to 0 ${batch[@]+"${batch[@]}"}
"$rewind" sample --docs "$N" --seed 1 --db "$tmp/cht.db" >/dev/null
measure "embedded: rewind upgrade 0 → 7 (examples/cht)" "$N" \
  "$rewind" upgrade --db "$tmp/cht.db" --migrations examples/cht ${batch[@]+"${batch[@]}"}
measure "embedded: rewind rollback 7 → 0 (examples/cht)" "$N" \
  "$rewind" rollback --db "$tmp/cht.db" --migrations examples/cht --to 0 ${batch[@]+"${batch[@]}"}

echo
echo "N = $N documents (docs/s = documents in the database / wall time; rewind --batch ${BATCH:-default: 500 HTTP, 2000 embedded})"
printf '%-58s %9s %8s %10s %8s %10s\n' "step" "docs" "secs" "docs/s" "peak RSS" "server CPU s"
for r in "${rows[@]}"; do echo "$r"; done
echo
echo "raw:  $raw_line"
echo "node: $node_line"
# The issue's targets, from the rows above (same run, same machine).
ratio() { echo "${secs_of[$1]} / ${secs_of[$2]}" | bc -l; }
echo
printf 'targets: rewind upgrade vs Node migration (pouchdb-server) %.2fx (>= 1.85x)\n' \
  "$(ratio "pouchdb-server: Node CHT-style migration (migrate-baseline)" "pouchdb-server: rewind upgrade 0 → 2 (examples/baseline)")"
printf 'targets: rewind upgrade vs raw _bulk_docs (pouchdb-server)  %.0f%% (>= 80%%)\n' \
  "$(echo "100 * $(ratio "pouchdb-server: raw _bulk_docs of pre-built docs (gen.js)" "pouchdb-server: rewind upgrade 0 → 2 (examples/baseline)")" | bc -l)"
raw="pouchdb-server: raw _bulk_docs of pre-built docs (gen.js)"
nodem="pouchdb-server: Node CHT-style migration (migrate-baseline)"
printf 'floor:   pouchdb-server CPU for the raw load %.1f s, for the Node migration (one read and one write per document) %.1f s:\n' \
  "${cpu_of[$raw]}" "${cpu_of[$nodem]}"
printf '         on this server no migration that reads and writes every document gets past ~%.0f%% of raw\n' \
  "$(echo "100 * ${cpu_of[$raw]} / ${cpu_of[$nodem]}" | bc -l)"
printf 'targets: embedded upgrade 0 → 7 %.0f docs/s (>= 50000); rollback/upgrade speed %.2f (>= 1)\n' \
  "$(echo "$N / ${secs_of["embedded: rewind upgrade 0 → 7 (examples/cht)"]}" | bc -l)" \
  "$(ratio "embedded: rewind upgrade 0 → 7 (examples/cht)" "embedded: rewind rollback 7 → 0 (examples/cht)")"
