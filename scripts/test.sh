#!/usr/bin/env bash
# The whole test suite: formatting, lints, docs, Rust tests, the Redis engine's tests (against a
# redis-server each test starts on a free port; installed here when missing and run as root), and
# interoperability tests with real third-party clients from npm. Works on a fresh machine with
# Rust and Node 20.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

step "redis-server (Redis tests start their own on a free port)"
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "redis-server not on PATH: installing it with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server is not on PATH and cannot be installed here (needs root and apt-get):" >&2
    echo "install it (Debian/Ubuntu: apt-get install -y redis-server; macOS: brew install redis)." >&2
    echo "The Redis engine tests below will fail until it is." >&2
  fi
fi
command -v redis-server >/dev/null 2>&1 && redis-server --version

step "cargo test"
cargo test --workspace

step "cargo clippy (Redis engine)"
cargo clippy -p bayeux-engine --all-features --all-targets -- -D warnings

step "cargo test (Redis engine)"
cargo test -p bayeux-engine --features redis

step "interop tests (npm clients)"
cargo build -p bayeux-cli
BAYEUX_BIN="$PWD/target/debug/bayeux" bash interop/run.sh
