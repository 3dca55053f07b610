#!/usr/bin/env bash
# Installs what the end-to-end tests need: nginx and HAProxy (as gRPC proxies, run unprivileged
# per test by scripts/nginx.sh and scripts/haproxy.sh), Bazel 4.2.3 (a real REAPI client, run by
# tests/support/bazel.rs), BuildGrid 0.4.4 (a real REAPI server, run by scripts/buildgrid.sh and,
# with execution, by scripts/buildgrid-exec.sh) in a Python venv at target/venv, and PostgreSQL
# (for buildgrid-exec.sh's scheduler), Garage 2.5.0 (an S3 object store, run as a private
# three-node cluster by scripts/garage.sh) and awscli (in the venv, an S3 client).
# Idempotent: a second run only checks and exits in ~1 s.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."   # everything below is relative to the repo root

VENV=target/venv
REQS=scripts/requirements-test.txt
STAMP=$VENV/.requirements-test.sha256   # hash of $REQS the venv was last built from

# --- Debian packages -------------------------------------------------------------------------
# Only touch apt if something is missing, and then update the package lists once.
export DEBIAN_FRONTEND=noninteractive
apt_updated=0
apt_install() {
    echo "setup-test-env: installing Debian package(s) $*"
    [ "$apt_updated" = 1 ] || { apt-get update -qq; apt_updated=1; }
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Installs package $1, whose postinst would start the system service $2 (pid file $3): tests run
# their own instances on free ports (scripts/nginx.sh, scripts/haproxy.sh), never the service.
apt_install_without_service() {
    local pkg=$1 service=$2 pidfile=$3 created_policy=0
    # Stop the postinst from starting it (nginx on port 80, haproxy with /etc/haproxy's
    # config). policy-rc.d exit 101 = "action forbidden".
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        created_policy=1
    fi
    apt_install "$pkg"
    if [ "$created_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
    # Belt and braces: if it got started anyway (e.g. systemd ignored policy-rc.d), stop it and
    # keep it from starting at boot.
    if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        echo "setup-test-env: stopping the system $service service the package started"
        kill "$(cat "$pidfile")" || true
    fi
    command -v systemctl >/dev/null 2>&1 && systemctl disable --now "$service" >/dev/null 2>&1 || true
}

# nginx-light has the grpc_pass and http2 modules.
if ! command -v nginx >/dev/null 2>&1; then
    apt_install_without_service nginx-light nginx /run/nginx.pid
else
    echo "setup-test-env: nginx already installed ($(nginx -v 2>&1))"
fi

# HAProxy (2.6 on Debian 12) is a second h2c gRPC proxy, with its own ways of ending streams.
if ! command -v haproxy >/dev/null 2>&1; then
    apt_install_without_service haproxy haproxy /run/haproxy.pid
else
    echo "setup-test-env: haproxy already installed ($(haproxy -v | head -1))"
fi

# b3sum: the BLAKE3 reference tool, what `put --digest-function blake3` is checked against.
if ! command -v b3sum >/dev/null 2>&1; then
    apt_install b3sum
else
    echo "setup-test-env: b3sum already installed ($(b3sum --version))"
fi

# bazel-bootstrap is Debian's Bazel 4.2.3, with its JDK, self-contained: builds need no download.
# It has no Recommends; without its dependencies' ones it still builds the tests' genrules.
if ! command -v bazel >/dev/null 2>&1; then
    apt_install bazel-bootstrap
else
    v=$(dpkg-query -W -f='${Version}' bazel-bootstrap 2>/dev/null || echo "not Debian's")
    echo "setup-test-env: bazel already installed ($v)"
fi

# PostgreSQL: BuildGrid's execution scheduler is SQL only and refuses sqlite, so
# scripts/buildgrid-exec.sh runs a private cluster per test DIR (initdb + postgres from
# /usr/lib/postgresql/VERSION/bin). The package's postinst would create and start the system
# cluster "main" on port 5432; only the start is kept from happening (the idle cluster is harmless).
if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
    apt_install_without_service postgresql postgresql /run/postgresql/15-main.pid
else
    echo "setup-test-env: postgresql already installed ($(ls -d /usr/lib/postgresql/*/bin/initdb | tail -1))"
fi

# openssl makes the private CAs of the TLS tests with real clients.
command -v openssl >/dev/null 2>&1 || apt_install openssl

# --- Garage (S3 object store) ----------------------------------------------------------------
# Not packaged by Debian: cargo builds the crates.io release once (long: ~500 crates), with
# --locked so that its own Cargo.lock, not newer dependencies, is used. Only $CARGO_HOME/bin is
# checked: scripts/garage.sh uses a garage on PATH first and falls back to that one.
GARAGE_BIN=${CARGO_HOME:-$HOME/.cargo}/bin/garage
if [ ! -x "$GARAGE_BIN" ]; then
    command -v cargo >/dev/null 2>&1 || { echo "setup-test-env: cargo missing (needed to build garage)" >&2; exit 1; }
    echo "setup-test-env: building garage 2.5.0 with cargo install (takes a while)"
    cargo install garage --locked --version 2.5.0
else
    echo "setup-test-env: garage already installed ($("$GARAGE_BIN" --version 2>/dev/null | head -1 | cut -d' ' -f1-2))"
fi

# --- Python venv with BuildGrid and awscli ---------------------------------------------------
# buildgrid 0.4.4 requires Python >= 3.11; prefer $PYTHON, then python3, then python3.11.
PY=""
for cand in "${PYTHON:-}" python3 python3.11 /usr/bin/python3; do
    [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 &&
        "$cand" -c 'import sys, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null &&
        { PY=$cand; break; }
done
if [ -z "$PY" ]; then
    # Debian 12's python3 is 3.11 but ships ensurepip (needed by "python3 -m venv") separately.
    apt_install python3-venv
    PY=/usr/bin/python3
fi

want=$(sha256sum "$REQS" | cut -d' ' -f1)
# Fast path: the venv was built from this exact requirements file and still imports.
if [ -x "$VENV/bin/bgd" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ] &&
   "$VENV/bin/python" -c 'import buildgrid, grpc, psycopg2, awscli' 2>/dev/null; then
    echo "setup-test-env: $VENV already has buildgrid and awscli ($REQS unchanged)"
else
    echo "setup-test-env: creating $VENV with $($PY --version) and installing $REQS"
    rm -rf "$VENV"   # a half-built or stale venv is cheaper to rebuild than to repair
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check --no-input -r "$REQS"
    # Smoke checks (each bgd start costs ~1.5 s, so only after an install): fail here rather
    # than in a test if buildgrid does not import with these pins.
    "$VENV/bin/bgd" --help >/dev/null
    "$VENV/bin/bgd" server start --help >/dev/null
    "$VENV/bin/bgd" cas --help >/dev/null
    "$VENV/bin/python" -c 'import psycopg2' >/dev/null
    "$VENV/bin/aws" --version >/dev/null
    echo "$want" > "$STAMP"
fi

# Debian's nginx-light has grpc_pass; make sure a differently built nginx does too.
if nginx -V 2>&1 | grep -q -- --without-http_grpc_module; then
    echo "setup-test-env: $(command -v nginx) lacks the grpc module" >&2; exit 1
fi
echo "setup-test-env: OK (bgd at $VENV/bin/bgd, nginx at $(command -v nginx)," \
    "haproxy at $(command -v haproxy), garage at $GARAGE_BIN, aws at $VENV/bin/aws," \
    "bazel at $(command -v bazel), postgres at $(ls -d /usr/lib/postgresql/*/bin | tail -1))"
