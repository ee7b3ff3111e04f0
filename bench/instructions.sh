#!/usr/bin/env bash
# Counts the instructions `bayeux serve` (memory engine) executes under a fixed load, with
# valgrind's callgrind: repeatable to about 0.2 % whatever else the machine does, unlike CPU
# time, so a change to the request path can be measured before and after.
#
#   bench/instructions.sh fanout [BINARY]      # 1,000 long-poll subscribers, 10 channels, 20 publishes/s
#   bench/instructions.sh publishes [BINARY]   # publishes only, 2,000/s with 50 in flight
#   bench/instructions.sh ws-fanout [BINARY]   # the fan-out load over WebSocket
#
# BINARY defaults to target/release/bayeux (built if missing). Prints the total and leaves the
# callgrind file (for callgrind_annotate) in target/instructions/. The load runs 1 s of warm-up,
# 5 s measured and 2 s of grace; the server is stopped by PID (SIGINT, then SIGKILL after 20 s).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
# shellcheck source=bench/lib.sh
. bench/lib.sh
LOAD=${1:-fanout}
BIN=${2:-$ROOT/target/release/bayeux}
case $LOAD in
  fanout) FLAGS="--transport long-polling --subscribers 1000 --channels 10 --publishers 2 --rate 20 --in-flight 4" ;;
  ws-fanout) FLAGS="--transport websocket --subscribers 1000 --channels 10 --publishers 2 --rate 20 --in-flight 4" ;;
  publishes) FLAGS="--transport long-polling --subscribers 0 --channels 1 --publishers 1 --rate 2000 --in-flight 50 --payload 0" ;;
  *) echo "usage: $0 fanout|ws-fanout|publishes [BINARY]" >&2; exit 2 ;;
esac
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 2; }
[ -x "$BIN" ] || cargo build --release -p bayeux-cli >&2
BENCH=$ROOT/target/release/bayeux
[ -x "$BENCH" ] || cargo build --release -p bayeux-cli >&2

OUT_DIR=$ROOT/target/instructions
mkdir -p "$OUT_DIR"
OUT=$OUT_DIR/$LOAD.$(date -u +%Y%m%dT%H%M%SZ).callgrind
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$OUT" \
  "$BIN" serve --bind "127.0.0.1:$PORT" --engine memory >"$OUT.server.log" 2>&1 &
SERVER=$!
stop() { stop_pid "$SERVER" INT 200; }
trap stop EXIT

# Up to 60 s for the server to listen (valgrind starts slowly).
for _ in $(seq 1 600); do
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  kill -0 "$SERVER" 2>/dev/null || { cat "$OUT.server.log" >&2; exit 1; }
  sleep 0.1
done

# shellcheck disable=SC2086 # the flags are words
timeout 300 "$BENCH" bench --url "http://127.0.0.1:$PORT/cometd" $FLAGS \
  --warmup 1 --duration 5 --grace 2 --no-progress >"$OUT.bench.json"
stop
trap - EXIT
python3 - "$OUT" "$OUT.bench.json" <<'EOF'
import json, sys
total = next(int(l.split()[1]) for l in open(sys.argv[1]) if l.startswith("summary:"))
r = json.loads(open(sys.argv[2]).read())
print(f"instructions: {total:,}  delivered: {r['delivered']:,}  published: {r['published']:,}  "
      f"lost: {r['lost']}  errors: {sum(r['errors'].values())}")
print(f"callgrind file: {sys.argv[1]}")
EOF
