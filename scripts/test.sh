#!/usr/bin/env bash
# The whole test suite, as CI runs it, on a fresh machine: installs what the
# end-to-end tests need (nginx from Debian, BuildGrid in a venv under target/),
# then runs lints and every test. The end-to-end tests start and stop their own
# BuildGrid and nginx on free loopback ports through scripts/buildgrid.sh and
# scripts/nginx.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-test-env.sh

# Tests that need real servers fail (instead of skipping) when this is set.
export BLOB_ACCESS_REAL_SERVERS=1
export PATH="$PWD/target/venv/bin:$PATH"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo package (the crates stay publishable: each packaged crate builds on its own)"
cargo package --workspace --locked --allow-dirty --quiet
echo "== cargo test"
cargo test --workspace --locked -- --test-threads="${TEST_THREADS:-2}"
