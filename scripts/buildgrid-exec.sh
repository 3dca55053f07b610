#!/usr/bin/env bash
# Runs a BuildGrid 0.4.4 REAPI *execution* server for end-to-end tests: Execution, Operations,
# ActionCache, CAS, ByteStream, Capabilities and Bots (instance name "") on 127.0.0.1:PORT, with
# its SQL scheduler on a private PostgreSQL cluster and one test worker (scripts/bgd-worker.py)
# that really runs the actions. Requires scripts/setup-test-env.sh to have been run.
#   scripts/buildgrid-exec.sh start DIR PORT
#   scripts/buildgrid-exec.sh stop DIR
# Environment (start):
#   WORKER_CAPACITY=N       actions the worker runs at once (default 4)
#   OPERATION_KEEPALIVE=S   Execute/WaitExecution streams re-send the current Operation after S
#                           seconds without a change (whole seconds; default 2)
# Files in DIR: exec.yml (bgd config), bgd.log, cas-data/, pg/ (the cluster, kept across
# stop/start of the same DIR like cas-data), postgres.log, migrate.log, worker.log (one line
# "executed <action hash>/<size>" per action the worker starts), worker.stderr.log, *.pid.
# Stop leaves no process behind: worker (and any action it runs), bgd, then PostgreSQL.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/daemon-lib.sh"
BGD=$ROOT/target/venv/bin/bgd
PY=$ROOT/target/venv/bin/python

usage() { echo "usage: $0 start DIR PORT | stop DIR" >&2; exit 2; }

# PostgreSQL refuses to run as root: as root, run its programs as the "postgres" user that
# Debian's package creates. setpriv execs in place (no forked parent like runuser/su), so the
# pid that the shell sees is the postmaster's.
AS_PG=()
if [ "$(id -u)" = 0 ]; then AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups --); fi

# Stops the daemon in pid file $1 with signal $2, waiting up to 10 s, then SIGKILLs every
# process of its session (setsid made it a session leader; this also catches actions that the
# worker runs in their own process groups), and waits until it is gone.
stop_pidfile() {
    local pidfile=$1 sig=$2 pid
    [ -s "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if alive "$pid"; then
        kill "-$sig" "$pid" 2>/dev/null || true
        for _ in $(seq 200); do alive "$pid" || break; sleep 0.05; done
        if alive "$pid"; then
            echo "buildgrid-exec: $(basename "$pidfile" .pid) ignored SIG$sig for 10 s; killing it" >&2
            pkill -KILL -s "$pid" 2>/dev/null || true
            while alive "$pid"; do sleep 0.05; done
        fi
    fi
    # After a clean exit too: nothing of that session may survive (e.g. an action's children).
    pkill -KILL -s "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

stop_postgres() {
    local dir=$1 pid
    [ -s "$dir/postgres.pid" ] || return 0
    pid=$(cat "$dir/postgres.pid")
    if alive "$pid"; then
        # SIGINT = "fast" shutdown: ends the sessions, checkpoints (cheap: fsync is off), exits.
        kill -INT "$pid" 2>/dev/null || true
        for _ in $(seq 100); do alive "$pid" || break; sleep 0.05; done
        if alive "$pid"; then
            echo "buildgrid-exec: postgres did not stop in 5 s; killing it" >&2
            # Its children each lead their own session (InitPostmasterChild calls setsid), so
            # find them by parent; they would also exit on their own once the postmaster is gone.
            pkill -KILL -P "$pid" 2>/dev/null || true
            kill -KILL "$pid" 2>/dev/null || true
            while alive "$pid"; do sleep 0.05; done
        fi
    fi
    rm -f "$dir/postgres.pid"
}

stop() {
    stop_pidfile "$1/worker.pid" TERM   # first: it would only log errors once bgd is gone
    # bgd shuts down its gRPC server and thread pools on SIGTERM.
    stop_pidfile "$1/bgd.pid" TERM
    stop_postgres "$1"
    rm -f "$1/worker.ready"
}

# Seconds (with ms) since $t0, for the timing line.
t0=$(date +%s%N)
elapsed() { local t; t=$(date +%s%N); printf '%d.%03d' $(((t - t0) / 1000000000)) $(((t - t0) / 1000000 % 1000)); }

[ $# -ge 2 ] || usage
cmd=$1; DIR=$(mkdir -p "$2" && cd "$2" && pwd)
case $cmd in
start)
    [ $# -eq 3 ] || usage
    PORT=$3
    [ -x "$BGD" ] || { echo "$BGD missing: run scripts/setup-test-env.sh" >&2; exit 1; }
    PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    [ -n "$PGBIN" ] || { echo "PostgreSQL missing: run scripts/setup-test-env.sh" >&2; exit 1; }
    stop "$DIR"   # never leak a previous server for the same DIR
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
        echo "buildgrid-exec: 127.0.0.1:$PORT is already in use" >&2; exit 1
    fi
    # Any failure from here on: stop whatever was started, and show the logs.
    fail() {
        echo "buildgrid-exec: $*" >&2
        for f in postgres.log migrate.log bgd.log worker.stderr.log; do
            [ -s "$DIR/$f" ] && { echo "--- $DIR/$f (last 30 lines)" >&2; tail -30 "$DIR/$f" >&2; }
        done
        stop "$DIR"; exit 1
    }
    mkdir -p "$DIR/cas-data" "$DIR/tmp" "$DIR/pg"

    # --- PostgreSQL: BuildGrid's scheduler is SQL only and refuses sqlite -------------------
    if [ "$(id -u)" = 0 ]; then
        # The postgres user must reach DIR/pg: DIR is often a 0700 temp dir, so let others
        # traverse it (search only, no listing); the cluster itself is postgres-owned 0700.
        chmod o+x "$DIR"
        chown postgres:postgres "$DIR/pg"
        "${AS_PG[@]}" test -w "$DIR/pg" ||
            fail "user postgres cannot reach $DIR/pg (a parent directory is not searchable)"
    fi
    if [ ! -s "$DIR/pg/PG_VERSION" ]; then
        # trust: only this machine's users can reach the socket/loopback port anyway.
        "${AS_PG[@]}" "$PGBIN/initdb" -D "$DIR/pg" -A trust -U postgres -E UTF8 --locale=C --no-sync \
            >"$DIR/postgres.log" 2>&1 || fail "initdb failed"
        rm -f "$DIR/migrated"
    fi
    # Unix socket in DIR/pg, no TCP. A socket path is limited to 107 bytes; for a longer DIR
    # listen on a free loopback port instead (racy, but postgres then fails loudly).
    if [ ${#DIR} -le 80 ]; then
        listen=(-c listen_addresses= -c "unix_socket_directories=$DIR/pg")
        CONN="postgresql+psycopg2://postgres@/postgres?host=$DIR/pg"
        pg_ready=(-h "$DIR/pg")
    else
        PGPORT=$("$ROOT/scripts/free-port.sh")
        listen=(-c listen_addresses=127.0.0.1 -c unix_socket_directories= -p "$PGPORT")
        CONN="postgresql+psycopg2://postgres@127.0.0.1:$PGPORT/postgres"
        pg_ready=(-h 127.0.0.1 -p "$PGPORT")
    fi
    # Test-only durability settings: losing the database in a crash does not matter here.
    nohup setsid "${AS_PG[@]}" "$PGBIN/postgres" -D "$DIR/pg" \
        "${listen[@]}" -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
        -c shared_buffers=32MB -c max_connections=200 -c log_min_messages=warning \
        >>"$DIR/postgres.log" 2>&1 </dev/null &
    echo $! > "$DIR/postgres.pid"
    pid=$!
    for _ in $(seq 300); do
        alive "$pid" || fail "postgres exited during startup"
        "$PGBIN/pg_isready" -q "${pg_ready[@]}" -U postgres -d postgres && break
        sleep 0.05
    done
    "$PGBIN/pg_isready" -q "${pg_ready[@]}" -U postgres -d postgres ||
        fail "postgres not ready within 15 s"
    t_pg=$(elapsed)

    # --- Schema (alembic; done once per cluster) -------------------------------------------
    if [ ! -e "$DIR/migrated" ]; then
        "$BGD" migrate apply "$CONN" >"$DIR/migrate.log" 2>&1 || fail "bgd migrate apply failed"
        touch "$DIR/migrated"
    fi
    t_mig=$(elapsed)

    # --- bgd -------------------------------------------------------------------------------
    # Settings shared with scripts/buildgrid.sh (see the notes there): so_reuseport off, 64 MiB
    # message limits, thread-pool-size 64 (every open Execute/WaitExecution stream and the
    # worker's long poll hold a thread), stream-blob false, in-memory action cache that does not
    # cache failed results. Execution-specific, checked against buildgrid 0.4.4's parser:
    # - !sql-scheduler's default assigner polls for queued jobs every 1 s (+ up to 100 % jitter),
    #   which would add ~1 s per action; 0.05 s keeps the queue latency negligible. A job that
    #   finds no bot is retried after failure-backoff (default 5 s), and the bot's row is locked
    #   (the assigner skips locked rows) while the worker's UpdateBotSession runs: an action
    #   queued just then waited 5 s with the worker idle. 0.1 s: a retry costs one query.
    # - action-cache on the scheduler: Execute with skip_cache_lookup=false answers from the
    #   cache (cached_result=true, no worker run) and completed results fill it.
    # - property-set: actions may set OSFamily/ISA (matched against the worker's linux/x86-64)
    #   and container-image (ignored); any other platform property is refused with
    #   FAILED_PRECONDITION. Actions without properties run on any bot.
    # - bot-session-keepalive-timeout 60: a worker silent for 60 s is dropped and its jobs
    #   requeued (the worker heartbeats every <= 24 s).
    # - operation-stream-keepalive-timeout: see OPERATION_KEEPALIVE above (bgd default: 600).
    cat > "$DIR/exec.yml" <<YAML
server:
  - !channel
    address: "127.0.0.1:$PORT"
    insecure-mode: true

grpc-server-options:
  grpc.so_reuseport: 0
  grpc.max_receive_message_length: 67108864
  grpc.max_send_message_length: 67108864

thread-pool-size: 64

connections:
  - !sql-connection &sql
    connection-string: "$CONN"
    pool-size: 20
    max-overflow: 40
    pool-timeout: 30

storages:
  - !disk-storage &cas-storage
    path: "$DIR/cas-data"

caches:
  - !lru-action-cache &action-cache
    storage: *cas-storage
    max-cached-refs: 100000
    allow-updates: true
    cache-failed-actions: false

schedulers:
  - !sql-scheduler &scheduler
    sql: *sql
    storage: *cas-storage
    action-cache: *action-cache
    property-set: !dynamic-property-set
      match-property-keys: [OSFamily, ISA]
      wildcard-property-keys: [container-image]
    bot-session-keepalive-timeout: 60
    assigners:
      - !priority-age-assigner
        interval: 0.05
        jitter-factor: 0.05
        failure-backoff: 0.1

instances:
  - name: ''
    services:
      - !cas
        storage: *cas-storage
      - !bytestream
        storage: *cas-storage
        stream-blob: false
      - !action-cache
        cache: *action-cache
      - !execution
        scheduler: *scheduler
        operation-stream-keepalive-timeout: ${OPERATION_KEEPALIVE:-2}
YAML
    # setsid: own session, so the server outlives this script and ignores the caller's ^C.
    # TMPDIR: BuildGrid spools large uploads with tempfile.TemporaryFile(); keep them in DIR.
    TMPDIR=$DIR/tmp nohup setsid "$BGD" server start "$DIR/exec.yml" \
        >"$DIR/bgd.log" 2>&1 </dev/null &
    echo $! > "$DIR/bgd.pid"
    pid=$!
    for _ in $(seq 600); do
        alive "$pid" || fail "bgd exited during startup"
        (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
        sleep 0.1
    done
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null || fail "bgd did not listen within 60 s"
    t_bgd=$(elapsed)

    # --- worker ----------------------------------------------------------------------------
    # Ready once its bot session exists (it writes worker.ready right after CreateBotSession).
    rm -f "$DIR/worker.ready"
    PYTHONUNBUFFERED=1 nohup setsid "$PY" "$ROOT/scripts/bgd-worker.py" --remote "127.0.0.1:$PORT" \
        --dir "$DIR" --capacity "${WORKER_CAPACITY:-4}" --ready-file "$DIR/worker.ready" \
        >>"$DIR/worker.stderr.log" 2>&1 </dev/null &
    echo $! > "$DIR/worker.pid"
    pid=$!
    for _ in $(seq 300); do
        alive "$pid" || fail "the worker exited during startup"
        [ -e "$DIR/worker.ready" ] && break
        sleep 0.05
    done
    [ -e "$DIR/worker.ready" ] || fail "the worker did not open a bot session within 15 s"
    echo "buildgrid-exec: listening on 127.0.0.1:$PORT (dir $DIR; ready in $(elapsed) s:" \
        "postgres $t_pg, migrate $t_mig, bgd $t_bgd)" ;;
stop)
    stop "$DIR"; echo "buildgrid-exec: stopped ($DIR; $(elapsed) s)" ;;
*) usage ;;
esac
