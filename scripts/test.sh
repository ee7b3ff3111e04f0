#!/usr/bin/env bash
# The whole test suite: formatting, lints, docs, every Rust test (the Redis engine's included:
# each starts its own redis-server on a free port), and interoperability tests with real
# third-party clients and servers from npm (CometD JS, Faye, jsforce, cometd-nodejs-server).
# Works on a fresh machine with Rust and Node 20; installs redis-server with apt-get when it is
# missing and the script runs as root; the interop tests install the pinned npm packages (npm ci).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s (%ss)\n' "$*" "$SECONDS"; }

step "redis-server"
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "redis-server not on PATH: installing it with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server is not on PATH and cannot be installed here (needs root and apt-get):" >&2
    echo "install it (Debian/Ubuntu: apt-get install -y redis-server; macOS: brew install redis)." >&2
    echo "The Redis tests will fail until it is." >&2
  fi
fi
command -v redis-server >/dev/null 2>&1 && redis-server --version

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

step "cargo test"
cargo test --workspace

step "interop tests (npm clients against bayeux serve)"
# cargo test built the binary (the CLI's tests run it); build it only if it is missing.
[ -x target/debug/bayeux ] || cargo build -p bayeux-cli
BAYEUX_BIN="$PWD/target/debug/bayeux" bash interop/run.sh

step "done"
