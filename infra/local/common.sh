# Settings and helpers of infra/local/up.sh and down.sh (sourced, not run). Each setting
# can be given in the environment. Linux: processes are told apart by /proc.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV_BIN="${FRAMEKV_VENV_BIN:-$REPO/.venv/bin}"
STATE="${FRAMEKV_LOCAL_STATE:-${TMPDIR:-/tmp}/framekv-local-$(id -u)}"  # pid files, logs, token, env
RAY_PORT="${FRAMEKV_RAY_PORT:-6379}"                     # GCS: workers and drivers join here
DASHBOARD_PORT="${FRAMEKV_DASHBOARD_PORT:-8265}"         # dashboard and job server (ray job submit)
CLIENT_PORT="${FRAMEKV_CLIENT_PORT:-10001}"              # Ray client (ray://)
HEAD_AGENT_PORT="${FRAMEKV_HEAD_AGENT_PORT:-52365}"      # each node's dashboard agent needs its own
WORKER_AGENT_PORT="${FRAMEKV_WORKER_AGENT_PORT:-52366}"
S3_PORT="${FRAMEKV_S3_PORT:-9000}"                       # moto_server
WORKER_CPUS="${FRAMEKV_WORKER_CPUS:-2}"
OBJECT_STORE_BYTES="${FRAMEKV_OBJECT_STORE_BYTES:-500000000}"

# A live process's start time (clock ticks since boot): with its pid, it names the
# process even after the pid is reused. Fails for a process gone or a zombie.
start_time() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  set -- ${stat##*) }
  [ "$1" != Z ] && echo "${20}"
}

# Prints the pid of NAME (head, worker, s3) when its pid file names a live process.
running() {
  local pid started
  read -r pid started 2>/dev/null <"$STATE/$1.pid" || return 1
  [ -n "$pid" ] && [ "$(start_time "$pid")" = "$started" ] && echo "$pid"
}
