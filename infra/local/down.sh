#!/usr/bin/env bash
# Stops what infra/local/up.sh started (same settings: infra/local/common.sh): the
# processes of each session named by a pid file in the state dir (up.sh starts every
# service with setsid), and nothing else. Idempotent.
set -euo pipefail
source "$(dirname "$0")/common.sh"

members() { ps -o pid=,stat= -s "$1" 2>/dev/null | awk '$2 !~ /^Z/ {print $1}'; }  # live pids of session $1

stop() {  # stop NAME: TERM every process of its session, KILL what is left after 20 s
  local name="$1" pid left
  if ! pid="$(running "$name")"; then
    read -r pid _ 2>/dev/null <"$STATE/$name.pid" || { echo "$name: not running"; return; }
    if [ -n "$(members "$pid")" ]; then  # the leader is gone, so the session may not be ours
      echo "$name: pid $pid has exited but its session still has processes (ps -s $pid); not touched" >&2
      return 1
    fi
    rm -f "$STATE/$name.pid"
    echo "$name: not running"
    return
  fi
  kill -TERM $(members "$pid") 2>/dev/null || true
  for _ in $(seq 40); do
    left="$(members "$pid")"
    [ -z "$left" ] && break
    sleep 0.5
  done
  if [ -n "$left" ]; then
    kill -KILL $left 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(members "$pid")" ] && break; sleep 0.2; done
  fi
  rm -f "$STATE/$name.pid"
  echo "$name: stopped (pid $pid)"
}

for name in s3 worker head; do stop "$name"; done
