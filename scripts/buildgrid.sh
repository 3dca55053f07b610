#!/usr/bin/env bash
# Runs a BuildGrid 0.4.4 server (REAPI ContentAddressableStorage + ByteStream, instance name "")
# for end-to-end tests; CAS-only unless "action-cache" is given, which adds the ActionCache
# service. Requires scripts/setup-test-env.sh to have been run.
#   scripts/buildgrid.sh start DIR PORT [action-cache]   # config DIR/cas.yml, blobs
#                                                        # DIR/cas-data, log DIR/bgd.log
#   scripts/buildgrid.sh stop DIR
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/daemon-lib.sh"
BGD=$ROOT/target/venv/bin/bgd

usage() { echo "usage: $0 start DIR PORT [action-cache] | stop DIR" >&2; exit 2; }

stop() {
    local pidfile=$1/bgd.pid pid
    [ -s "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        # bgd shuts down its gRPC server and thread pools on SIGTERM; give it 10 s, then force.
        for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
        if alive "$pid"; then
            kill -KILL -- "-$pid" 2>/dev/null || true   # setsid made it a process-group leader
            while alive "$pid"; do sleep 0.05; done
        fi
    fi
    rm -f "$pidfile"
}

[ $# -ge 2 ] || usage
cmd=$1; DIR=$(mkdir -p "$2" && cd "$2" && pwd)
case $cmd in
start)
    [ $# -eq 3 ] || { [ $# -eq 4 ] && [ "$4" = action-cache ]; } || usage
    PORT=$3
    [ -x "$BGD" ] || { echo "$BGD missing: run scripts/setup-test-env.sh" >&2; exit 1; }
    stop "$DIR"   # never leak a previous server for the same DIR
    # The readiness probe below only sees "something accepts on PORT", so refuse a busy port up
    # front (bgd itself would fail to bind, with so_reuseport off, but only after ~2 s).
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
        echo "buildgrid: 127.0.0.1:$PORT is already in use" >&2; exit 1
    fi
    mkdir -p "$DIR/cas-data" "$DIR/tmp"
    # Notes on the settings (verified against buildgrid 0.4.4's parser and reference.yml):
    # - grpc.so_reuseport 0: with gRPC's default (on) a second server could silently share PORT.
    # - max message lengths: gRPC's default receive limit is 4 MiB. BuildGrid's own client writes
    #   ByteStream chunks of <= 4 MiB - 1 KiB and serves Read in 1 MiB chunks, but clients under
    #   test may send bigger WriteRequests; 64 MiB keeps the limit out of the way. Blob size is
    #   unlimited (blobs > 4 MiB are spooled to a temp file under $TMPDIR, then moved into place).
    # - thread-pool-size: also caps concurrent RPCs (maximum_concurrent_rpcs); the default is
    #   5 x CPUs = 10 here, and every open stream holds one thread.
    # - stream-blob false: the default streaming read path over-reads the last 1 MiB block when
    #   read_limit is set and is not a multiple of 1 MiB (offset+limit < size), then fails the
    #   Read with DATA_LOSS. The non-streaming path reads the open blob file in 1 MiB blocks too
    #   (no whole-blob buffering) and honours read_offset/read_limit exactly.
    # - action cache (optional): in memory, ActionResult messages stored in the CAS storage. On
    #   GetActionResult it answers NOT_FOUND (and forgets the entry) if any output, stdout or
    #   stderr blob is missing from the CAS. Failed results are not cached, so a hit is always
    #   a successful action (Bazel never uploads failed ones anyway).
    caches="" ac_service=""
    if [ $# -eq 4 ]; then
        caches='caches:
  - !lru-action-cache &action-cache
    storage: *cas-storage
    max-cached-refs: 100000
    allow-updates: true
    cache-failed-actions: false
'
        ac_service='      - !action-cache
        cache: *action-cache'
    fi
    cat > "$DIR/cas.yml" <<YAML
server:
  - !channel
    address: "127.0.0.1:$PORT"
    insecure-mode: true

grpc-server-options:
  grpc.so_reuseport: 0
  grpc.max_receive_message_length: 67108864
  grpc.max_send_message_length: 67108864

thread-pool-size: 64

storages:
  - !disk-storage &cas-storage
    path: "$DIR/cas-data"

${caches}
instances:
  - name: ''
    services:
      - !cas
        storage: *cas-storage
      - !bytestream
        storage: *cas-storage
        stream-blob: false
${ac_service}
YAML
    # setsid: own session, so the server outlives this script and ignores the caller's ^C.
    # TMPDIR: BuildGrid spools large uploads with tempfile.TemporaryFile(); keep them in DIR.
    TMPDIR=$DIR/tmp nohup setsid "$BGD" server start "$DIR/cas.yml" \
        >"$DIR/bgd.log" 2>&1 </dev/null &
    echo $! > "$DIR/bgd.pid"
    pid=$!
    # Ready once the port accepts TCP connections (bgd binds only after parsing the config).
    for _ in $(seq 600); do
        if ! alive "$pid"; then
            echo "buildgrid exited during startup; $DIR/bgd.log:" >&2; cat "$DIR/bgd.log" >&2
            rm -f "$DIR/bgd.pid"; exit 1
        fi
        if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
            echo "buildgrid: listening on 127.0.0.1:$PORT (pid $pid, dir $DIR)"; exit 0
        fi
        sleep 0.1
    done
    echo "buildgrid did not listen on 127.0.0.1:$PORT within 60 s; $DIR/bgd.log:" >&2
    cat "$DIR/bgd.log" >&2
    stop "$DIR"; exit 1 ;;
stop)
    stop "$DIR"; echo "buildgrid: stopped ($DIR)" ;;
*) usage ;;
esac
