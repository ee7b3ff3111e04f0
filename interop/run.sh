#!/usr/bin/env bash
# Runs the interop tests: real third-party Bayeux clients (CometD JS with its ack extension,
# Faye, jsforce) from npm against `bayeux serve` (plain and --salesforce). Needs Node 20+ and
# npm; installs the pinned packages locally (no globals).
#
# Environment:
#   BAYEUX_BIN          server binary to test (default: ../target/debug/bayeux, built here)
#   BAYEUX_SKIP_BUILD=1 do not run `cargo build -p bayeux-cli` when BAYEUX_BIN is unset
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 20 ]; then
  echo "interop: Node 20 or newer is required (found $(node --version))" >&2
  exit 1
fi

# Install (or reinstall) node_modules when missing or when the lock file changed since.
lock_sum=$(node -e '
  const c = require("crypto").createHash("sha256");
  for (const f of ["package.json", "package-lock.json"]) c.update(require("fs").readFileSync(f));
  console.log(c.digest("hex"));')
stamp=node_modules/.interop-installed
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$lock_sum" ]; then
  echo "interop: npm ci" >&2
  npm ci --no-audit --no-fund --loglevel=error
  echo "$lock_sum" > "$stamp"
fi

if [ -z "${BAYEUX_BIN:-}" ]; then
  if [ "${BAYEUX_SKIP_BUILD:-0}" != "1" ] && command -v cargo >/dev/null 2>&1; then
    (cd .. && cargo build -q -p bayeux-cli)
  fi
  if [ -n "${CARGO_TARGET_DIR:-}" ]; then
    export BAYEUX_BIN="$CARGO_TARGET_DIR/debug/bayeux"
  fi
fi

exec node --test test/
