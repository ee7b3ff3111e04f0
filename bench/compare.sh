#!/usr/bin/env bash
# Compares `bayeux serve` (memory and disk engine) with Faye 1.4.3 (and, for round trips, a bare
# hyper server) under `bayeux bench`, and writes the results into docs/benchmarks.md.
#
#   bench/compare.sh                      # every case of the comparison
#   bench/compare.sh fanout throughput    # some cases
#   QUICK=1 bench/compare.sh              # shorter runs (warm-up 1 s, window 4 s)
#   bench/compare.sh sweep-subs sweep-channels   # the scaling sweeps (our server only)
#
# Environment: QUICK=1 (short runs), RUNS (default 3), OUT (default docs/benchmarks.md),
# RESULTS (where the raw JSON goes, default target/bench-compare/<time>), IDLE_CLIENTS (default:
# as many as the open-file limit allows, at most 50000), SERVERS (default "faye memory disk"),
# NO_BUILD=1 (use the binaries as they are), WITH_FLOOR=0 (skip the floor runs of the CPU cases:
# examples/send-floor.rs, the system calls alone), CARGO_TARGET_DIR (as cargo).
#
# Every server is started fresh for every run, pinned to CPU 0 (`taskset -c 0`); the bench runs
# on CPU 1 (`taskset -c 1`). Runs are interleaved: run 1 of every server, then run 2, ... Only
# loopback addresses are used, and only the servers this script started are stopped, by PID.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# shellcheck source=bench/lib.sh
. bench/lib.sh

ALL_CASES="fanout throughput many idle-lp idle-ws roundtrips ws-fanout ws-throughput ws-many"
CASES=${*:-$ALL_CASES}
RUNS=${RUNS:-3}
QUICK=${QUICK:-0}
OUT=${OUT:-docs/benchmarks.md}
SERVERS=${SERVERS:-faye memory disk}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BAYEUX=$TARGET_DIR/release/bayeux
HYPER=$TARGET_DIR/release/examples/hyper-fixed
FLOOR=$TARGET_DIR/release/examples/send-floor
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS=${RESULTS:-$ROOT/target/bench-compare/$STAMP}
mkdir -p "$RESULTS"
WORK=$(mktemp -d /tmp/bayeux-compare.XXXXXX)

if [ "$QUICK" = 1 ]; then
  WARMUP=1 DURATION=4 GRACE=2
else
  WARMUP=2 DURATION=10 GRACE=2
fi

# The machine may be shared (other builds): run servers and the bench at a higher priority
# than those, when allowed. NICE=0 turns this off.
NICE=${NICE:--10}
if ! nice -n "$NICE" true 2>/dev/null; then NICE=0; fi
PIN0="nice -n $NICE taskset -c 0"
PIN1="nice -n $NICE taskset -c 1"

log() { echo "[compare $(date +%H:%M:%S)] $*" >&2; }

# --- Open files: every held client is one descriptor in the server and one in the bench. ------
HARD_NOFILE=$(ulimit -Hn)
if [ "$HARD_NOFILE" = unlimited ]; then HARD_NOFILE=1048576; fi
ulimit -n "$HARD_NOFILE"
# The most clients one process can hold: the limit minus room for listeners, logs and the
# publisher's connections, rounded down to a thousand.
MAX_CLIENTS=$(( (HARD_NOFILE - 600) / 1000 * 1000 ))
if [ "$MAX_CLIENTS" -gt 50000 ]; then MAX_CLIENTS=50000; fi
IDLE_CLIENTS=${IDLE_CLIENTS:-$MAX_CLIENTS}
log "open-file limit $HARD_NOFILE per process: idle cases hold $IDLE_CLIENTS clients (50000 wanted)"

# --- Build and install -----------------------------------------------------------------------
if [ "${NO_BUILD:-0}" != 1 ]; then
  log "cargo build --release"
  cargo build --release -p bayeux-cli >&2
  cargo build --release -p bayeux-bench --example hyper-fixed --example send-floor >&2
  log "npm ci (faye 1.4.3) in bench/"
  (cd bench && if [ -d node_modules/faye ]; then :; else npm ci --no-audit --no-fund >&2; fi)
fi
for f in "$BAYEUX" "$HYPER" "$FLOOR" bench/node_modules/faye/package.json; do
  [ -e "$f" ] || { echo "missing $f (run without NO_BUILD=1)" >&2; exit 2; }
done

# --- Servers ----------------------------------------------------------------------------------
SERVER_PID=
PORT=18200

cleanup() {
  stop_holder
  stop_server
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Starts server $1 on a new port, pinned to CPU 0; sets SERVER_PID and URL.
start_server() {
  local kind=$1 log=$2
  PORT=$((PORT + 1))
  case $kind in
    faye)
      URL=http://127.0.0.1:$PORT/faye
      $PIN0 node bench/faye-server.js "$PORT" >"$log" 2>&1 &
      ;;
    memory)
      URL=http://127.0.0.1:$PORT/cometd
      RUST_LOG=warn $PIN0 "$BAYEUX" serve --bind "127.0.0.1:$PORT" --engine memory \
        >"$log" 2>&1 &
      ;;
    disk)
      URL=http://127.0.0.1:$PORT/cometd
      rm -rf "$WORK/data"
      RUST_LOG=warn $PIN0 "$BAYEUX" serve --bind "127.0.0.1:$PORT" --engine disk \
        --data-dir "$WORK/data" >"$log" 2>&1 &
      ;;
    hyper)
      URL=http://127.0.0.1:$PORT/cometd
      $PIN0 "$HYPER" "127.0.0.1:$PORT" >"$log" 2>&1 &
      ;;
    floor)
      URL=127.0.0.1:$PORT
      # shellcheck disable=SC2046 # word splitting of the flags is wanted
      $PIN0 "$FLOOR" serve --bind "127.0.0.1:$PORT" $(floor_flags "$FLOOR_CASE" serve) >"$log" 2>&1 &
      ;;
    *) echo "unknown server $kind" >&2; exit 2 ;;
  esac
  SERVER_PID=$!
  # Up to 20 s for the port to accept connections.
  local i
  for i in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
      return 0
    fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      echo "server $kind exited at startup; log:" >&2
      cat "$log" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "server $kind did not listen on $PORT within 20 s" >&2
  exit 1
}

# Stops the server this script started (SIGTERM, then SIGKILL after 10 s).
stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  local pid=$SERVER_PID
  SERVER_PID=
  stop_pid "$pid" TERM 100
}

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# --- Cases ------------------------------------------------------------------------------------
# Prints the bench flags of case $1 (the URL, timing and --server-pid are added later).
case_flags() {
  case $1 in
    fanout) echo "--transport long-polling --subscribers 1000 --channels 10 --publishers 2 --rate 200 --in-flight 4" ;;
    throughput) echo "--transport long-polling --subscribers 100 --channels 1 --publishers 1 --rate 0 --in-flight 64" ;;
    many) echo "--transport long-polling --subscribers 10000 --channels 100 --publishers 1 --rate 100 --in-flight 8 --source-addrs 4" ;;
    idle-lp) echo "--transport long-polling --subscribers $IDLE_CLIENTS --channels 100 --publishers 1 --rate 1 --in-flight 1 --source-addrs 8" ;;
    idle-ws) echo "--transport websocket --subscribers $IDLE_CLIENTS --channels 100 --publishers 1 --rate 1 --in-flight 1 --source-addrs 8" ;;
    roundtrips) echo "--transport long-polling --subscribers 0 --channels 1 --publishers 1 --rate 0 --in-flight 50 --payload 0" ;;
    ws-fanout) echo "--transport websocket --subscribers 1000 --channels 10 --publishers 2 --rate 200 --in-flight 4" ;;
    ws-throughput) echo "--transport websocket --subscribers 100 --channels 1 --publishers 1 --rate 0 --in-flight 64" ;;
    ws-many) echo "--transport websocket --subscribers 10000 --channels 100 --publishers 1 --rate 100 --in-flight 8 --source-addrs 4" ;;
    sweep-subs-*) # sweep-subs-N: N long-polling clients on 100 channels, 1 message/s each
      echo "--transport long-polling --subscribers ${1#sweep-subs-} --channels 100 --publishers 1 --rate 100 --in-flight 8 --source-addrs 4" ;;
    sweep-channels-*) # the fan-out case with S idle subscriptions on S other channels
      echo "--transport long-polling --subscribers 1000 --channels 10 --publishers 2 --rate 200 --in-flight 4" ;;
    *) echo "unknown case $1" >&2; exit 2 ;;
  esac
}

# The value of flag --$2 in the bench flags $1.
flag_value() { echo "$1" | sed -n "s/.*--$2 \([^ ]*\).*/\1/p"; }

# The floor of a CPU case (crates/bayeux-bench/examples/send-floor.rs): the same deliveries per
# second on the same number of connections, with nothing but the system calls, taken from the
# case's own bench flags (connections = subscribers, bursts = publishes/s, burst = subscribers /
# channels). Frames are the size our server writes (a long-polling answer of 414 bytes to a
# connect of 225, a WebSocket frame of 166 bytes, as strace shows them). Prints the flags of
# role $2 (serve or load) for case $1.
floor_flags() {
  local flags subs pattern=lp frame=414
  flags=$(case_flags "$1")
  subs=$(flag_value "$flags" subscribers)
  if [ "$(flag_value "$flags" transport)" = websocket ]; then pattern=ws frame=166; fi
  if [ "$2" = serve ]; then
    echo "--pattern $pattern --burst $((subs / $(flag_value "$flags" channels))) --rate $(flag_value "$flags" rate) --frame $frame"
  else
    echo "--pattern $pattern --sockets $subs --frame $frame --request 225"
  fi
}

case_servers() {
  case $1 in
    roundtrips) echo "$SERVERS hyper" ;;
    fanout|many|ws-fanout|ws-many)
      if [ "${WITH_FLOOR:-1}" = 1 ]; then echo "$SERVERS floor"; else echo "$SERVERS"; fi ;;
    sweep-*) echo "${SWEEP_SERVERS:-memory}" ;;
    *) echo "$SERVERS" ;;
  esac
}

# Expands the sweep pseudo-cases.
expand_cases() {
  local c
  for c in $CASES; do
    case $c in
      sweep-subs)
        local n
        for n in 1000 5000 10000 "$MAX_CLIENTS"; do echo "sweep-subs-$n"; done | uniq ;;
      sweep-channels)
        echo sweep-channels-0 sweep-channels-1000 sweep-channels-10000 sweep-channels-100000 ;;
      *) echo "$c" ;;
    esac
  done
}

HOLDER_PID=
# Subscribes S sessions' worth of idle channels (/idle/0 ... /idle/S-1) and keeps them alive
# until stopped: the helper is bench/hold-subscriptions.py.
start_holder() {
  local s=$1 log=$2
  HOLDER_PID=
  [ "$s" -gt 0 ] || return 0
  $PIN1 python3 bench/hold-subscriptions.py "$URL" "$s" >"$log" 2>&1 &
  HOLDER_PID=$!
  local i
  for i in $(seq 1 600); do
    if grep -q '^READY' "$log" 2>/dev/null; then return 0; fi
    kill -0 "$HOLDER_PID" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.1
  done
  echo "holder not ready within 60 s" >&2
  exit 1
}
stop_holder() {
  [ -n "$HOLDER_PID" ] || return 0
  kill -TERM "$HOLDER_PID" 2>/dev/null || true
  wait "$HOLDER_PID" 2>/dev/null || true
  HOLDER_PID=
}

# One run: case $1, server $2, run number $3.
run_one() {
  local c=$1 kind=$2 run=$3
  local name=$c.$kind.$run
  FLOOR_CASE=$c
  start_server "$kind" "$RESULTS/$name.server.log"
  local base_kb
  sleep 0.5
  base_kb=$(rss_kb "$SERVER_PID")
  case $c in sweep-channels-*) start_holder "${c#sweep-channels-}" "$RESULTS/$name.holder.log" ;; esac
  local flags
  flags=$(case_flags "$c")
  local cmd="$PIN1 $BAYEUX bench --url $URL $flags --warmup $WARMUP --duration $DURATION --grace $GRACE --server-pid $SERVER_PID --no-progress"
  if [ "$kind" = floor ]; then
    cmd="$PIN1 $FLOOR load --addr $URL $(floor_flags "$c" load) --warmup $WARMUP --duration $DURATION --server-pid $SERVER_PID"
  fi
  echo "$cmd" >"$RESULTS/$name.cmd"
  log "$name: $flags"
  local status=0
  # Bounded: setup (at most 120 s) + the run + disconnects.
  timeout --kill-after=10 $((180 + WARMUP + DURATION + GRACE)) $cmd \
    >"$RESULTS/$name.json" 2>"$RESULTS/$name.bench.log" || status=$?
  stop_holder
  stop_server
  echo "{\"case\":\"$c\",\"server\":\"$kind\",\"run\":$run,\"exit\":$status,\"base_rss_kb\":${base_kb:-0}}" \
    >"$RESULTS/$name.meta.json"
  if [ "$status" -ne 0 ] && [ "$status" -ne 1 ]; then
    log "$name: bench exited with $status (see $RESULTS/$name.bench.log)"
  fi
  # Let TIME_WAIT sockets and the page cache settle a little between runs.
  sleep 1
}

{
  echo "started $STAMP"
  echo "cpu: $(lscpu | sed -n 's/^Model name: *//p') ($(nproc) CPUs)"
  echo "memory: $(free -g | awk '/^Mem:/ {print $2}') GiB"
  echo "kernel: $(uname -r)"
  echo "rustc: $(rustc --version)"
  echo "node: $(node --version)"
  echo "faye: $(node -p "require('./bench/node_modules/faye/package.json').version")"
  echo "git: $(git rev-parse --short HEAD)$(git diff --quiet -- crates || echo ' (+ uncommitted changes)')"
  echo "nofile: $HARD_NOFILE"
  echo "nice: $NICE (servers and bench; other processes on the machine run at 0)"
  echo "quick: $QUICK warmup $WARMUP duration $DURATION grace $GRACE runs $RUNS"
  echo "load-before: $(cut -d' ' -f1-3 /proc/loadavg)"
} >>"$RESULTS/machine.txt"

EXPANDED=$(expand_cases)
for c in $EXPANDED; do
  for run in $(seq 1 "$RUNS"); do
    for kind in $(case_servers "$c"); do
      run_one "$c" "$kind" "$run"
    done
  done
done
echo "load-after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$RESULTS/machine.txt"

log "results in $RESULTS; writing $OUT"
python3 bench/report.py "$RESULTS" "$OUT"
