#!/usr/bin/env bash
# A framekv cluster on this machine, on loopback: a Ray head that runs only drivers
# (num-cpus 0, as on Kubernetes), one Ray worker, and an S3 endpoint (moto_server from
# .venv) to try the s3:// paths. Idempotent: what already runs is kept. Token auth is on
# (Ray's internal connections use this machine's interface address, not only loopback).
#
#   infra/local/up.sh
#   source "$(infra/local/up.sh --env)"     # RAY_ADDRESS, the token, AWS_* of this cluster
#   ray job submit --working-dir . -- python -m jobs.ingest s3://videos/ --index s3://index/ --address auto
#   infra/local/down.sh
#
# Settings (environment; infra/local/common.sh): FRAMEKV_LOCAL_STATE (state dir),
# FRAMEKV_RAY_PORT, FRAMEKV_DASHBOARD_PORT, FRAMEKV_CLIENT_PORT, FRAMEKV_HEAD_AGENT_PORT,
# FRAMEKV_WORKER_AGENT_PORT, FRAMEKV_S3_PORT, FRAMEKV_WORKER_CPUS, FRAMEKV_OBJECT_STORE_BYTES.
set -euo pipefail
source "$(dirname "$0")/common.sh"
if [ "${1:-}" = --env ]; then echo "$STATE/env"; exit 0; fi

mkdir -p "$STATE"
chmod 700 "$STATE"
[ -s "$STATE/auth_token" ] ||
  (umask 077; "$VENV_BIN/python" -c "import secrets; print(secrets.token_hex(32))" >"$STATE/auth_token")
cat >"$STATE/env" <<ENV
export PATH="$VENV_BIN:\$PATH"   # \`python\` in job entrypoints is the venv's, as in the image
export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STATE/auth_token
export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
export AWS_DEFAULT_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
ENV
source "$STATE/env"
unset RAY_ADDRESS  # `ray start` reads it as the cluster to join

# start NAME CMD...: runs CMD in a session of its own (down.sh ends that session's
# processes), logs to STATE/NAME.log, records "pid start-time" in STATE/NAME.pid.
start() {
  local name="$1" pid; shift
  if pid="$(running "$name")"; then echo "$name: running (pid $pid)"; return; fi
  setsid "$@" >"$STATE/$name.log" 2>&1 </dev/null &
  echo "$! $(start_time $!)" >"$STATE/$name.pid"
  echo "$name: started (pid $!, log $STATE/$name.log)"
}

# wait_for NAME WHAT CMD...: until CMD succeeds; fails when NAME's process has ended.
wait_for() {
  local name="$1" what="$2"; shift 2
  for _ in $(seq 120); do
    "$@" >/dev/null 2>&1 && return 0
    running "$name" >/dev/null || { echo "$name exited; its log:" >&2; tail -n 20 "$STATE/$name.log" >&2; exit 1; }
    sleep 1
  done
  echo "$name: no $what after 120 s (log $STATE/$name.log)" >&2
  exit 1
}

alive_nodes() {  # the number of live Ray nodes, from the dashboard's state API
  "$VENV_BIN/python" - "$DASHBOARD_PORT" "$STATE/auth_token" <<'PY'
import json, sys, urllib.request
port, token_file = sys.argv[1], sys.argv[2]
req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v0/nodes",
                             headers={"Authorization": "Bearer " + open(token_file).read().strip()})
nodes = json.load(urllib.request.urlopen(req, timeout=5))["data"]["result"]["result"]
print(sum(n["state"] == "ALIVE" for n in nodes))
PY
}

two_nodes() { [ "$(alive_nodes)" -ge 2 ]; }

start head "$VENV_BIN/ray" start --head --block --node-ip-address=127.0.0.1 --port="$RAY_PORT" \
  --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --ray-client-server-port="$CLIENT_PORT" \
  --dashboard-agent-listen-port="$HEAD_AGENT_PORT" --num-cpus=0 \
  --object-store-memory="$OBJECT_STORE_BYTES" --temp-dir="$STATE/ray" --disable-usage-stats
wait_for head "dashboard on 127.0.0.1:$DASHBOARD_PORT" alive_nodes

start worker "$VENV_BIN/ray" start --block --address="127.0.0.1:$RAY_PORT" --node-ip-address=127.0.0.1 \
  --dashboard-agent-listen-port="$WORKER_AGENT_PORT" --num-cpus="$WORKER_CPUS" \
  --object-store-memory="$OBJECT_STORE_BYTES" --temp-dir="$STATE/ray-worker" --disable-usage-stats
wait_for worker "second Ray node" two_nodes

start s3 "$VENV_BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT"
wait_for s3 "S3 on 127.0.0.1:$S3_PORT" "$VENV_BIN/python" -c \
  "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$S3_PORT/moto-api/', timeout=2)"

echo "up: Ray head 127.0.0.1:$RAY_PORT (dashboard http://127.0.0.1:$DASHBOARD_PORT), S3 http://127.0.0.1:$S3_PORT"
echo "    source $STATE/env"
