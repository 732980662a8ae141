#!/usr/bin/env bash
# A two-node Ray cluster on this machine (127.0.0.1) with token authentication, for trying vitpipe
# against a "real" cluster the way it runs on many machines:
#
#   cluster/local.sh start        # head (port 6379) + a second worker node
#   export RAY_AUTH_MODE=token    # clients send the token only in token mode
#   vitpipe info --address 127.0.0.1:6379
#   cluster/local.sh stop         # `ray stop`: stops every Ray process of this user on this machine
#
# CPUS_PER_NODE (default 1) and RAY_PORT (default 6379) adjust it.
set -euo pipefail
cd "$(dirname "$0")/.."
RAY=${RAY:-.venv/bin/ray}
PORT=${RAY_PORT:-6379}
CPUS=${CPUS_PER_NODE:-1}
export RAY_AUTH_MODE=token  # every node, and every client, must agree on this

case "${1:-}" in
  start)
    "$RAY" get-auth-token --generate >/dev/null  # the shared token, in ~/.ray/auth_token
    "$RAY" start --head --node-ip-address 127.0.0.1 --port "$PORT" --num-cpus "$CPUS" \
      --disable-usage-stats --include-dashboard false >/dev/null
    "$RAY" start --address "127.0.0.1:$PORT" --node-ip-address 127.0.0.1 --num-cpus "$CPUS" \
      --disable-usage-stats >/dev/null
    echo "two-node Ray cluster at 127.0.0.1:$PORT; token in ~/.ray/auth_token"
    echo "clients: export RAY_AUTH_MODE=token; vitpipe info --address 127.0.0.1:$PORT"
    ;;
  stop)
    "$RAY" stop >/dev/null
    echo "stopped"
    ;;
  status)
    "$RAY" status --address "127.0.0.1:$PORT"
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
