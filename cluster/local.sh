#!/usr/bin/env bash
# A two-node Ray cluster on this machine (127.0.0.1) with token authentication and the Jobs API, for
# trying vitpipe the way it runs on many machines:
#
#   cluster/local.sh start      # head (GCS 6379, dashboard + Jobs API 8265) and a second worker node
#   vitpipe submit jobs/smoke.yaml --address http://127.0.0.1:8265 --run-dir /tmp/vitpipe-runs/smoke --wait
#   cluster/local.sh status
#   cluster/local.sh stop       # stops these two nodes, nothing else
#
# Settings: CPUS_PER_NODE (1), RAY_PORT (6379), DASHBOARD_PORT (8265), STATE_DIR (/tmp/vitpipe-local-cluster:
# pids, logs, each node's Ray temp dir). The token: RAY_AUTH_TOKEN when set, else ~/.ray/auth_token
# (generated when missing); clients find it the same way. Each node gets its own temp dir: two nodes
# sharing one would unpack a job's working_dir into the same folder at the same time.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${VENV_BIN:-$ROOT/.venv/bin}
export PATH="$BIN:$PATH"  # a job's driver runs `python` from this PATH: the project's environment
export RAY_AUTH_MODE=token  # every node, and every `ray` client, must agree on this
PORT=${RAY_PORT:-6379}
DASHBOARD=${DASHBOARD_PORT:-8265}
CPUS=${CPUS_PER_NODE:-1}
STATE=${STATE_DIR:-/tmp/vitpipe-local-cluster}

free_port() {
  python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Wait until a node's `ray start --block` says it is up; fail with its log if it exits first.
wait_up() {
  local node=$1
  for _ in $(seq 120); do
    if grep -q "block forever" "$STATE/$node.log" 2>/dev/null; then return 0; fi
    if ! kill -0 "$(cat "$STATE/$node.pid")" 2>/dev/null; then
      echo "the $node node did not start:" >&2
      tail -20 "$STATE/$node.log" >&2
      return 1
    fi
    sleep 0.5
  done
  echo "the $node node did not start within 60 s; see $STATE/$node.log" >&2
  return 1
}

# Stop the nodes: SIGTERM to each `ray start --block`, which stops the processes it started (raylet, GCS,
# dashboard, workers) in about 3 s; SIGKILL for whatever of its process group still runs after 20 s. The
# nodes are started with RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: Ray's default drains a SIGTERMed node for
# up to 30 s until its leases are returned, which after a job held the head past the 20 s (the whole
# cluster stops, so there is nowhere to drain to). A zombie counts as stopped: it runs nothing and this
# machine's init reaps it when it gets to it.
group_alive() {
  ps -eo pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { found = 1 } END { exit !found }'
}

# Wait up to $1 half-seconds until no process group of the other arguments has a live process.
wait_gone() {
  local tries=$1 pid alive
  shift
  for _ in $(seq "$tries"); do
    alive=0
    for pid in "$@"; do
      if group_alive "$pid"; then alive=1; fi
    done
    [ "$alive" = 1 ] || return 0
    sleep 0.5
  done
  return 1
}

stop_nodes() {
  local node pid
  local -a pids=()
  for node in "$@"; do
    [ -f "$STATE/$node.pid" ] || continue
    pid=$(cat "$STATE/$node.pid")
    kill -TERM "$pid" 2>/dev/null || true
    pids+=("$pid")
  done
  if [ "${#pids[@]}" -gt 0 ] && ! wait_gone 40 "${pids[@]}"; then
    for pid in "${pids[@]}"; do
      kill -KILL -- "-$pid" 2>/dev/null || true
    done
    wait_gone 10 "${pids[@]}" || echo "processes of node group(s) ${pids[*]} outlived SIGKILL" >&2
  fi
  for node in "$@"; do
    rm -f "$STATE/$node.pid"
  done
}

case "${1:-}" in
  start)
    if [ -f "$STATE/head.pid" ] && kill -0 "$(cat "$STATE/head.pid")" 2>/dev/null; then
      echo "already running (head pid $(cat "$STATE/head.pid")); cluster/local.sh stop first" >&2
      exit 1
    fi
    mkdir -p "$STATE"
    if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -f ~/.ray/auth_token ]; then
      ray get-auth-token --generate >/dev/null  # the shared token, in ~/.ray/auth_token
    fi
    RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 setsid ray start --head --block --node-ip-address 127.0.0.1 --port "$PORT" --num-cpus "$CPUS" \
      --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD" \
      --dashboard-agent-listen-port "$(free_port)" --disable-usage-stats --temp-dir "$STATE/head" \
      >"$STATE/head.log" 2>&1 &
    echo $! >"$STATE/head.pid"
    wait_up head
    RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 setsid ray start --block --address "127.0.0.1:$PORT" --node-ip-address 127.0.0.1 --num-cpus "$CPUS" \
      --dashboard-agent-listen-port "$(free_port)" --disable-usage-stats --temp-dir "$STATE/worker" \
      >"$STATE/worker.log" 2>&1 &
    echo $! >"$STATE/worker.pid"
    wait_up worker
    echo "two-node Ray cluster: GCS 127.0.0.1:$PORT, Jobs API http://127.0.0.1:$DASHBOARD (token auth)"
    ;;
  stop)
    stop_nodes worker head
    echo "stopped"
    ;;
  status)
    ray status --address "127.0.0.1:$PORT"
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
