# Shell helpers shared by the bench scripts (sourced, not run).

# Stops process $1, which the calling script started: signal $2 (TERM, INT), then SIGKILL if it
# is still there after $3 tenths of a second; reaps it either way.
stop_pid() {
  local pid=$1 signal=$2 tenths=$3 i
  kill "-$signal" "$pid" 2>/dev/null || return 0
  for i in $(seq 1 "$tenths"); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
