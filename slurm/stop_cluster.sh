#!/usr/bin/env bash
# Stop the cluster started by start_cluster.sh: slurmd, slurmctld, slurmdbd, MariaDB, munged.
# SIGTERM by PID file, SIGKILL after 5 s (slurmd may ignore SIGTERM when the controller is gone).
set -uo pipefail
STATE="$(realpath -m "${1:?usage: $0 STATE_DIR}")"
for name in slurmd slurmctld slurmdbd mariadbd munged; do
  pidfile="$STATE/run/$name.pid"
  [ -f "$pidfile" ] || continue
  pid="$(cat "$pidfile")"
  kill "$pid" 2>/dev/null || continue
  for _ in $(seq 1 25); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -9 "$pid" 2>/dev/null || true
done
exit 0
