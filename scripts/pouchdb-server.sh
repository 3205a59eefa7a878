# Sourced by the bench scripts (needs `$modules`, the tests/pouchdb node_modules).
#
# start_pouchdb_server DIR: starts pouchdb-server on 127.0.0.1 with its data and
# server.log in DIR; sets `server` (its pid), `port` and `url`. It is up when its own
# "has started on" line says so and it answers: a server answering on the port may be
# another process's (the port was taken between picking it and the bind), which this one
# says ("already in use") before it exits; then another port is tried, five times at most.
# Returns 1, with the log on stderr, when it did not start.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_pouchdb_server() {
  local dir=$1
  mkdir -p "$dir"
  for _ in 1 2 3 4 5; do
    port=$(free_port)
    (cd "$dir" && exec node "$modules/pouchdb-server/bin/pouchdb-server" --host 127.0.0.1 --port "$port" --dir "$dir" >"$dir/server.log" 2>&1) &
    server=$!; url=http://127.0.0.1:$port
    for _ in $(seq 1 300); do
      if grep -q "has started on $url/" "$dir/server.log" 2>/dev/null; then
        for _ in $(seq 1 150); do curl -fs "$url/" >/dev/null 2>&1 && return 0; sleep 0.2; done
        break
      fi
      grep -q "already in use" "$dir/server.log" 2>/dev/null && break
      kill -0 "$server" 2>/dev/null || break
      sleep 0.2
    done
    kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true
  done
  server=
  echo "pouchdb-server did not start:" >&2; cat "$dir/server.log" >&2
  return 1
}
