#!/usr/bin/env bash
# A one-machine Ray cluster on loopback, for trying `ray job submit` the way a real
# cluster is used. Token auth is on: the cluster and `ray job submit` both read the
# token from ~/.ray/auth_token (made here once with `ray get-auth-token --generate`),
# or from RAY_AUTH_TOKEN when set. Ray replaces 127.0.0.1 with the machine's own
# interface address for its internal connections; nothing leaves the machine.
#
#   infra/local-cluster.sh start            # head on 127.0.0.1, 2 CPUs, dashboard :8265
#   infra/local-cluster.sh submit SOURCE --index INDEX [framekv ingest options]
#   infra/local-cluster.sh stop             # `ray stop`: stops every Ray cluster of this user here
set -euo pipefail
cd "$(dirname "$0")/.."
RAY="${RAY:-.venv/bin/ray}"
PORT="${FRAMEKV_RAY_PORT:-6379}"
DASH="${FRAMEKV_DASHBOARD_PORT:-8265}"
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 RAY_AUTH_MODE=token

case "${1:-}" in
  start)
    [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -s ~/.ray/auth_token ] || "$RAY" get-auth-token --generate >/dev/null
    "$RAY" start --head --node-ip-address=127.0.0.1 --port="$PORT" \
      --dashboard-host=127.0.0.1 --dashboard-port="$DASH" \
      --num-cpus="${FRAMEKV_NUM_CPUS:-2}" --disable-usage-stats
    ;;
  submit)
    shift
    "$RAY" job submit --address "http://127.0.0.1:$DASH" --working-dir . \
      --runtime-env-json '{"excludes": [".venv", ".git", "demo-index", "demo-archive", "bench/scratch"]}' \
      -- "${PYTHON:-$PWD/.venv/bin/python}" -m jobs.ingest "$@" --address auto
    ;;
  stop)
    "$RAY" stop
    ;;
  *)
    echo "usage: $0 start | submit SOURCE --index INDEX [options] | stop" >&2
    exit 2
    ;;
esac
