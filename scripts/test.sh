#!/usr/bin/env bash
# The whole test suite: formatting, lints, docs, Rust tests, and interoperability tests with
# real third-party clients from npm. Works on a fresh machine with Rust and Node 20.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

step "cargo test"
cargo test --workspace

step "interop tests (npm clients)"
cargo build -p bayeux-cli
BAYEUX_BIN="$PWD/target/debug/bayeux" bash interop/run.sh
