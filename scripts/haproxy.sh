#!/usr/bin/env bash
# Runs a private HAProxy (not the system service) as an HTTP/2 gRPC reverse proxy for tests.
#   scripts/haproxy.sh start DIR PORT UPSTREAM_PORT  # 127.0.0.1:PORT (h2c) -> h2c 127.0.0.1:UPSTREAM_PORT
#   scripts/haproxy.sh reload DIR                    # new worker; the old one is killed 300 ms
#                                                    # later with its streams (returns once reloaded)
#   scripts/haproxy.sh stop DIR
# Everything (config, pid, log) lives in DIR; the log has HAProxy's messages and one line per
# request with its termination state ("KD--": killed by hard-stop-after while sending data).
#
# What cuts a long ByteStream Read (seen on the wire with HAProxy 2.6.12): a reload (SIGUSR2 to
# the master) soft-stops the old worker, which sends GOAWAY (NO_ERROR, last stream 2^31-1) and
# lets streams in flight go on; hard-stop-after then ends each of them with an empty DATA frame
# with END_STREAM, without trailers or RST_STREAM (a clean-looking but truncated stream), and
# the connection closes. An upload still waiting for its response gets RST_STREAM REFUSED_STREAM
# instead, though its bytes went to the server. timeout client/server do not cut a stream that
# moves data: they are inactivity timers (a 256 MiB read lasting 1.3 s passed with both at 200 ms).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/daemon-lib.sh"

usage() { echo "usage: $0 start DIR PORT UPSTREAM_PORT | reload DIR | stop DIR" >&2; exit 2; }

# The master's pid, as start saw it: it keeps it across reloads, while HAProxy rewrites its own
# pid file on each (so that file is briefly missing, and a stop reading it then would miss).
master_pid() { [ -s "$1/master.pid" ] && cat "$1/master.pid"; }

stop() {
    local pid
    pid=$(master_pid "$1") || return 0
    stop_master "$pid"
    rm -f "$1/master.pid" "$1/haproxy.pid"
}

# How many reloads the master reported as done, or as failed.
count() { grep -c "^\[.*\] *([0-9]*) : Loading $2" "$1/haproxy.log" || true; }

[ $# -ge 2 ] || usage
cmd=$1
# Only start makes DIR: a reload or stop after the test removed it must not make it again.
if [ "$cmd" = start ]; then mkdir -p "$2"; fi
DIR=$(cd "$2" 2>/dev/null && pwd) || { echo "haproxy: no directory $2" >&2; exit 1; }
case $cmd in
start)
    [ $# -eq 4 ] || usage
    PORT=$3 UPSTREAM=$4
    stop "$DIR"
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
        echo "haproxy: 127.0.0.1:$PORT is already in use" >&2; exit 1
    fi
    cat > "$DIR/haproxy.cfg" <<CONF
global
    master-worker
    nbthread 1
    # Old workers kill what is still open this long after a reload (the behaviour under test).
    hard-stop-after 300ms
    log stderr format raw local0 info
    # The h2 receive window of each stream (64 KiB by default) caps a read's throughput.
    tune.h2.initial-window-size 1048576

defaults
    mode http
    log global
    option httplog
    option dontlognull   # no lines for the readiness probes below
    timeout connect 10s
    timeout client 1h
    timeout server 1h

frontend grpc
    bind 127.0.0.1:$PORT proto h2
    default_backend upstream

backend upstream
    server s1 127.0.0.1:$UPSTREAM proto h2
CONF
    : > "$DIR/haproxy.log"
    # The master stays in the foreground (-W without -D) in its own session, so that stop can
    # kill the whole group; its messages and the workers' log lines go to DIR/haproxy.log.
    setsid haproxy -W -f "$DIR/haproxy.cfg" -p "$DIR/haproxy.pid" \
        </dev/null >>"$DIR/haproxy.log" 2>&1 &
    pid=$!
    echo "$pid" > "$DIR/master.pid"
    for _ in $(seq 100); do
        alive "$pid" || break
        if [ "$(count "$DIR" success)" -gt 0 ] && (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
            echo "haproxy: 127.0.0.1:$PORT -> 127.0.0.1:$UPSTREAM (master pid $pid, dir $DIR)"
            exit 0
        fi
        sleep 0.1
    done
    echo "haproxy is not accepting on 127.0.0.1:$PORT; $DIR/haproxy.log:" >&2; cat "$DIR/haproxy.log" >&2
    stop "$DIR"; exit 1 ;;
reload)
    pid=$(master_pid "$DIR") || { echo "haproxy not running in $DIR" >&2; exit 1; }
    # Wait for the new master's word: signals sent during a reload make only one more reload,
    # and the caller counts reloads.
    done=$(count "$DIR" success) failed=$(count "$DIR" failure)
    kill -USR2 "$pid"
    for _ in $(seq 200); do
        [ "$(count "$DIR" success)" -gt "$done" ] && exit 0
        [ "$(count "$DIR" failure)" -gt "$failed" ] && break
        sleep 0.05
    done
    echo "haproxy in $DIR did not reload; $DIR/haproxy.log:" >&2; tail -20 "$DIR/haproxy.log" >&2
    exit 1 ;;
stop)
    stop "$DIR"; echo "haproxy: stopped ($DIR)" ;;
*) usage ;;
esac
