#!/usr/bin/env bash
# The whole test suite, as CI runs it, on a fresh machine: installs what the
# end-to-end tests need (nginx and HAProxy from Debian, BuildGrid in a venv under
# target/), then runs lints and every test. The end-to-end tests start and stop
# their own BuildGrid, nginx and HAProxy on free loopback ports through
# scripts/buildgrid.sh, scripts/nginx.sh and scripts/haproxy.sh.
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
# cargo takes a registry crate's name and version for its identity: it unpacks the workspace's
# crates from its temporary overlay registry into $CARGO_HOME/registry/src/-<hash>/ only once,
# and reuses what it compiled of them. On a machine that ran this check before, it would verify
# the crates against older sources of the same version 0.1.0 (CI failed so once). So the check
# gets its own target directory, and both start empty.
package_target=target/package-check
rm -rf "${CARGO_HOME:-$HOME/.cargo}"/registry/src/-*/ "$package_target"
CARGO_TARGET_DIR="$package_target" cargo package --workspace --locked --allow-dirty --quiet
rm -rf "$package_target"
echo "== cargo test"
cargo test --workspace --locked -- --test-threads="${TEST_THREADS:-2}"
# A test that replaced /dev/null with a file (as `get -o /dev/null` once did) would break
# everything after it on this machine: it must still be the character device 1:3.
echo "== /dev/null is still a character device"
[ -c /dev/null ] && [ "$(stat -c %t:%T /dev/null)" = 1:3 ] ||
    { echo "/dev/null was replaced: $(ls -l /dev/null)" >&2; exit 1; }
