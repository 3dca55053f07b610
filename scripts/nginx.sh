#!/usr/bin/env bash
# Runs a private nginx (not the system service) as an HTTP/2 gRPC reverse proxy for tests.
#   scripts/nginx.sh start DIR PORT UPSTREAM_PORT  # 127.0.0.1:PORT (h2c) -> grpc://127.0.0.1:UPSTREAM_PORT
#     NGINX_KEEPALIVE_REQUESTS=N: GOAWAY to a client after N requests on a connection (default: never)
#   scripts/nginx.sh reload DIR                    # SIGHUP: new workers; old ones get 200 ms to finish
#   scripts/nginx.sh stop DIR
# Everything (config, pid, logs, temp files) lives in DIR.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/daemon-lib.sh"

usage() { echo "usage: $0 start DIR PORT UPSTREAM_PORT | reload DIR | stop DIR" >&2; exit 2; }

master_pid() { [ -s "$1/nginx.pid" ] && cat "$1/nginx.pid"; }

stop() {
    local pid
    pid=$(master_pid "$1") || return 0
    stop_master "$pid"
    rm -f "$1/nginx.pid"
}

[ $# -ge 2 ] || usage
cmd=$1; DIR=$(mkdir -p "$2" && cd "$2" && pwd)
case $cmd in
start)
    [ $# -eq 4 ] || usage
    PORT=$3 UPSTREAM=$4
    stop "$DIR"
    # Fail fast on a busy port (nginx itself retries bind() for 2.5 s before giving up).
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
        echo "nginx: 127.0.0.1:$PORT is already in use" >&2; exit 1
    fi
    mkdir -p "$DIR/tmp"
    # As root, workers default to user "nobody" group "nobody", which Debian lacks (it has
    # nogroup), and they could not write DIR anyway; run them as root. Non-root: no directive.
    user_line=""
    if [ "$(id -u)" = 0 ]; then user_line="user root;"; fi
    cat > "$DIR/nginx.conf" <<CONF
$user_line
worker_processes 1;
# On reload/stop, old workers close whatever is still open after 200 ms (the behaviour under
# test). Short, so that a read lasting more than a reload period plus this is always cut.
worker_shutdown_timeout 200ms;
pid $DIR/nginx.pid;
error_log $DIR/error.log info;
daemon on;

events { worker_connections 1024; }

http {
    access_log $DIR/access.log;
    client_body_temp_path $DIR/tmp/client_body;
    proxy_temp_path $DIR/tmp/proxy;
    fastcgi_temp_path $DIR/tmp/fastcgi;
    uwsgi_temp_path $DIR/tmp/uwsgi;
    scgi_temp_path $DIR/tmp/scgi;

    # Big, long-lived gRPC streams: no body size cap, long idle timeouts, and no per-connection
    # request cap (keepalive_requests, default 1000, makes nginx send GOAWAY to h2 clients).
    client_max_body_size 0;
    client_body_timeout 1h;
    keepalive_timeout 1h;
    keepalive_requests ${NGINX_KEEPALIVE_REQUESTS:-1000000};
    send_timeout 1h;

    server {
        # nginx 1.22 (Debian 12): "http2" is a parameter of listen (plaintext h2c, prior knowledge).
        listen 127.0.0.1:$PORT http2;
        location / {
            grpc_pass grpc://127.0.0.1:$UPSTREAM;
            grpc_connect_timeout 10s;
            grpc_read_timeout 1h;
            grpc_send_timeout 1h;
            grpc_buffer_size 1m;   # response read buffer; the 4k/8k default costs throughput
        }
    }
}
CONF
    # -e: the compiled-in error log (/var/log/nginx/error.log) is opened before the config is read.
    nginx -e "$DIR/error.log" -p "$DIR" -c "$DIR/nginx.conf" || {
        echo "nginx failed to start; $DIR/error.log:" >&2; cat "$DIR/error.log" >&2 || true; exit 1; }
    # With "daemon on" the listener is bound before nginx returns; check anyway.
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
            echo "nginx: 127.0.0.1:$PORT -> 127.0.0.1:$UPSTREAM (master pid $(master_pid "$DIR"), dir $DIR)"
            exit 0
        fi
        sleep 0.1
    done
    echo "nginx is not accepting on 127.0.0.1:$PORT; $DIR/error.log:" >&2; cat "$DIR/error.log" >&2
    stop "$DIR"; exit 1 ;;
reload)
    pid=$(master_pid "$DIR") || { echo "nginx not running in $DIR" >&2; exit 1; }
    kill -HUP "$pid" ;;
stop)
    stop "$DIR"; echo "nginx: stopped ($DIR)" ;;
*) usage ;;
esac
