#!/usr/bin/env bash
# Scale-out benchmark (docs/scaleout.md): `bayeux bench` through a round-robin TCP proxy
# (crates/bayeux-cli/examples/rr_proxy.rs) in front of 1, 2 or 3 `bayeux serve --engine redis`
# nodes sharing one redis-server, or of one node on the disk engine; and the Redis commands per
# published message, from `INFO commandstats` sampled inside the measured window.
#
#   bench/scaleout.sh disk 1            # one node, disk engine
#   bench/scaleout.sh redis 3           # three nodes on one Redis
#   SUBSCRIBERS=1000 RATE=200 bench/scaleout.sh redis 1
#
# Environment: SUBSCRIBERS (300), CHANNELS (10), PUBLISHERS (2), RATE (1000), IN_FLIGHT (4),
# WARMUP (2), DURATION (10), GRACE (2), SERVE_ARGS (more `bayeux serve` flags, e.g.
# "--lazy-delay-ms 20"), APPENDFSYNC (Redis' appendfsync: always (default) or everysec), CARGO_TARGET_DIR (as cargo; release binaries are used as they are:
# build them with `cargo build --release -p bayeux-cli --bin bayeux --example rr_proxy`),
# RESULTS (directory for the raw output, default target/bench-scaleout/<time>).
#
# Prints one line of JSON: the bench's result plus `cpu` (CPU seconds per process kind over the
# measured window) and `redis` (command calls in the sampled part of the window, per command,
# and per published message split into the publish path and the session path). Only loopback
# addresses are used; only the processes started here are stopped, by PID.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ENGINE=${1:?usage: bench/scaleout.sh disk|redis NODES}
NODES=${2:-1}
SUBSCRIBERS=${SUBSCRIBERS:-300}
CHANNELS=${CHANNELS:-10}
PUBLISHERS=${PUBLISHERS:-2}
RATE=${RATE:-1000}
IN_FLIGHT=${IN_FLIGHT:-4}
APPENDFSYNC=${APPENDFSYNC:-always}
SERVE_ARGS=${SERVE_ARGS:-}
WARMUP=${WARMUP:-2}
DURATION=${DURATION:-10}
GRACE=${GRACE:-2}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BAYEUX=$TARGET_DIR/release/bayeux
PROXY=$TARGET_DIR/release/examples/rr_proxy
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS=${RESULTS:-$ROOT/target/bench-scaleout/$STAMP}
mkdir -p "$RESULTS"
WORK=$(mktemp -d /tmp/bayeux-scaleout.XXXXXX)
PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

for bin in "$BAYEUX" "$PROXY"; do
  [ -x "$bin" ] || { echo "missing $bin: cargo build --release -p bayeux-cli --bin bayeux --example rr_proxy" >&2; exit 2; }
done

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Starts a process whose first stdout line is `LISTENING X`; sets $LISTENING and $STARTED_PID.
start_listening() {
  local log=$1; shift
  "$@" > "$log.out" 2> "$log.err" &
  STARTED_PID=$!
  PIDS+=("$STARTED_PID")
  for _ in $(seq 1 200); do
    if grep -q '^LISTENING ' "$log.out" 2>/dev/null; then
      LISTENING=$(sed -n 's/^LISTENING //p' "$log.out" | head -1)
      return 0
    fi
    sleep 0.05
  done
  echo "no LISTENING line from $*: $(tail -3 "$log.err")" >&2
  exit 1
}

REDIS_PORT=
REDIS_PID=
if [ "$ENGINE" = redis ]; then
  command -v redis-server >/dev/null || { echo "redis-server not on PATH" >&2; exit 2; }
  REDIS_PORT=$(free_port)
  mkdir -p "$WORK/redis"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly yes \
    --appendfsync "$APPENDFSYNC" --dir "$WORK/redis" --logfile "$WORK/redis/redis.log" --daemonize no &
  REDIS_PID=$!
  PIDS+=("$REDIS_PID")
  for _ in $(seq 1 200); do
    [ "$(redis-cli -p "$REDIS_PORT" PING 2>/dev/null)" = PONG ] && break
    sleep 0.05
  done
fi

NODE_PIDS=()
BACKENDS=()
for i in $(seq 1 "$NODES"); do
  if [ "$ENGINE" = redis ]; then
    start_listening "$WORK/node$i" "$BAYEUX" serve --bind 127.0.0.1:0 --engine redis \
      --redis-url "redis://127.0.0.1:$REDIS_PORT/0" --redis-prefix "bench-$STAMP:" $SERVE_ARGS
  else
    mkdir -p "$WORK/data$i"
    start_listening "$WORK/node$i" "$BAYEUX" serve --bind 127.0.0.1:0 --engine disk \
      --data-dir "$WORK/data$i" $SERVE_ARGS
  fi
  NODE_PIDS+=("$STARTED_PID")
  BACKENDS+=("$(echo "$LISTENING" | sed -E 's#^http://([^/]+)/.*#\1#')")
  CPATH=$(echo "$LISTENING" | sed -E 's#^http://[^/]+(/.*)$#\1#')
done
start_listening "$WORK/proxy" "$PROXY" 127.0.0.1:0 "${BACKENDS[@]}"
PROXY_PID=$STARTED_PID
URL="http://$LISTENING$CPATH"

cpu_ticks() { # utime+stime of the given PIDs, in clock ticks
  local total=0
  for pid in "$@"; do
    # Fields 14 and 15 of /proc/PID/stat (after the parenthesised command name).
    local t
    t=$(sed -E 's/^.*\) //' "/proc/$pid/stat" | awk '{print $12 + $13}')
    total=$((total + t))
  done
  echo "$total"
}

# Samples every second: time, CPU ticks of nodes / redis / proxy, and INFO commandstats.
sampler() {
  local n=0
  while [ -e "$WORK/sampling" ] && [ $n -lt 3600 ]; do
    n=$((n + 1))
    local now
    now=$(date +%s.%N)
    {
      echo "time:$now"
      echo "cpu_nodes:$(cpu_ticks "${NODE_PIDS[@]}")"
      echo "cpu_proxy:$(cpu_ticks "$PROXY_PID")"
      if [ -n "$REDIS_PID" ]; then
        echo "cpu_redis:$(cpu_ticks "$REDIS_PID")"
        redis-cli -p "$REDIS_PORT" INFO commandstats | tr -d '\r' | grep '^cmdstat_' || true
      fi
    } > "$WORK/sample.$(printf %05d $n)"
    sleep 1
  done
}

touch "$WORK/sampling"
[ -n "$REDIS_PORT" ] && redis-cli -p "$REDIS_PORT" CONFIG RESETSTAT >/dev/null
sampler &
SAMPLER_PID=$!
PIDS+=("$SAMPLER_PID")
BENCH_START=$(date +%s.%N)
"$BAYEUX" bench --url "$URL" --subscribers "$SUBSCRIBERS" --channels "$CHANNELS" \
  --publishers "$PUBLISHERS" --rate "$RATE" --in-flight "$IN_FLIGHT" --warmup "$WARMUP" --duration "$DURATION" \
  --grace "$GRACE" --server-pid "${NODE_PIDS[0]}" --no-progress \
  > "$RESULTS/$ENGINE-$NODES-$SUBSCRIBERS.json" 2> "$WORK/bench.err"
rm -f "$WORK/sampling"
wait "$SAMPLER_PID" 2>/dev/null || true
cp -r "$WORK"/sample.* "$RESULTS/" 2>/dev/null || true

python3 - "$RESULTS/$ENGINE-$NODES-$SUBSCRIBERS.json" "$BENCH_START" "$WARMUP" "$DURATION" \
  "$(getconf CLK_TCK)" "$WORK" "$ENGINE" "$NODES" "$SERVE_ARGS" "$APPENDFSYNC" <<'EOF'
import glob, json, sys
path, start, warmup, duration, tck, work, engine, nodes = sys.argv[1:9]
report = json.load(open(path))
start, warmup, duration, tck = float(start), float(warmup), float(duration), float(tck)
window = (start + report["setup_secs"] + warmup, start + report["setup_secs"] + warmup + duration)
samples = []
for f in sorted(glob.glob(work + "/sample.*")):
    d = {}
    for line in open(f):
        k, _, v = line.strip().partition(":")
        d[k] = v
    if "time" in d:
        samples.append(d)
inside = [s for s in samples if window[0] + 0.5 <= float(s["time"]) <= window[1] - 0.5]
out = {"engine": engine, "nodes": int(nodes), "serve_args": sys.argv[9], "appendfsync": sys.argv[10],
       "bench": report}
if len(inside) >= 2:
    a, b = inside[0], inside[-1]
    secs = float(b["time"]) - float(a["time"])
    out["sampled_secs"] = round(secs, 2)
    out["cpu_cores"] = {k: round((int(b[k]) - int(a[k])) / tck / secs, 2)
                        for k in ("cpu_nodes", "cpu_proxy", "cpu_redis") if k in a}
    def calls(s):
        c = {}
        for k, v in s.items():
            if k.startswith("cmdstat_"):
                c[k[8:]] = int(v.split("calls=")[1].split(",")[0])
        return c
    ca, cb = calls(a), calls(b)
    delta = {k: cb.get(k, 0) - ca.get(k, 0) for k in set(ca) | set(cb)}
    delta = {k: v for k, v in delta.items() if v > 0 and k != "info"}
    if delta:
        appends = delta.get("xadd", 0)
        # The append script: EVALSHA + HMGET, TIME, XADD, HSET, PUBLISH (docs/engine-redis.md).
        publish_path = 6 * appends
        pings = delta.get("ping", 0)
        total = sum(delta.values())
        session_path = total - publish_path - pings
        out["redis"] = {
            "calls": dict(sorted(delta.items())),
            "appends": appends,
            "per_message": {
                "total": round(total / max(appends, 1), 2),
                "publish_path": round(publish_path / max(appends, 1), 2),
                "session_path": round(session_path / max(appends, 1), 2),
                "pings": round(pings / max(appends, 1), 3),
            },
        }
print(json.dumps(out))
EOF
