#!/usr/bin/env bash
# Prints a currently free loopback TCP port (the kernel picks it; there is an unavoidable race
# until the caller binds it, so servers here are started with SO_REUSEPORT off and fail loudly).
set -euo pipefail
exec python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
