#!/usr/bin/env bash
# Runs a private three-node Garage cluster (an S3-compatible object store; garage 2.5.0, installed
# by scripts/setup-test-env.sh) on loopback for tests: replication factor 3 (every object on all
# three nodes, quorum 2), sqlite metadata, a bucket "blob-access" and a key allowed on it.
#   scripts/garage.sh start DIR S3PORT   # a fresh cluster (whatever DIR held is stopped and wiped)
#   scripts/garage.sh stop-node DIR I    # stops node I (1..3), keeping its data
#   scripts/garage.sh start-node DIR I   # restarts node I with the same config and data
#   scripts/garage.sh stop DIR           # stops all nodes; nothing is left running
# Ports of node I: S3 on 127.0.0.1:S3PORT+I-1, RPC on S3PORT+I+2, admin (GET /health) on
# S3PORT+I+5. A cluster uses the 9 ports S3PORT..S3PORT+8, so clusters that run at the same time
# need S3PORTs at least 9 apart. S3 is path-style (http://127.0.0.1:PORT/blob-access/KEY).
# Files in DIR: env (shell lines AWS_ACCESS_KEY_ID=, AWS_SECRET_ACCESS_KEY=, AWS_REGION=garage,
# AWS_DEFAULT_REGION=garage), nodeI/garage.toml, nodeI/meta, nodeI/data, nodeI.log, nodeI.pid.
# Environment: GARAGE=path of the garage binary (default: garage on PATH, else
# $CARGO_HOME/bin/garage); GARAGE_LOG=RUST_LOG of the servers (default netapp=info,garage=info:
# one line per S3 request).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/daemon-lib.sh"

usage() { echo "usage: $0 start DIR S3PORT | stop-node DIR I | start-node DIR I | stop DIR" >&2; exit 2; }

BUCKET=blob-access
SERVER_LOG=${GARAGE_LOG:-netapp=info,garage=info}
# Garage reads these from the environment and they override its config file: a caller's would
# point the CLI at another cluster or give the nodes another secret. RUST_LOG: a test's
# RUST_LOG=debug would flood the node logs (the servers get $SERVER_LOG instead).
unset RUST_LOG GARAGE_RPC_HOST GARAGE_CONFIG_FILE GARAGE_RPC_SECRET GARAGE_RPC_SECRET_FILE \
    GARAGE_ADMIN_TOKEN GARAGE_ADMIN_TOKEN_FILE GARAGE_METRICS_TOKEN GARAGE_METRICS_TOKEN_FILE \
    GARAGE_ALLOW_WORLD_READABLE_SECRETS
export NO_COLOR=1   # plain logs (Garage colours them even into a file)

find_garage() {
    if [ -n "${GARAGE:-}" ]; then
        command -v "$GARAGE" && return
        echo "garage: GARAGE=$GARAGE is not an executable" >&2; return 1
    fi
    command -v garage && return
    local g=${CARGO_HOME:-$HOME/.cargo}/bin/garage
    [ -x "$g" ] && { echo "$g"; return; }
    echo "garage: no garage binary (GARAGE, PATH, $g): run scripts/setup-test-env.sh" >&2
    return 1
}

# Seconds (with ms) since $t0, for the timing line.
t0=$(date +%s%N)
elapsed() { local t; t=$(date +%s%N); printf '%d.%03d' $(((t - t0) / 1000000000)) $(((t - t0) / 1000000 % 1000)); }

s3_port() { echo $((S3PORT + $1 - 1)); }
rpc_port() { echo $((S3PORT + $1 + 2)); }
admin_port() { echo $((S3PORT + $1 + 5)); }
busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The garage CLI against node $1 (it talks RPC to the node named in that node's config).
g() { local i=$1; shift; "$GARAGE_BIN" -c "$DIR/node$i/garage.toml" "$@"; }

# Node $1's GET /health: prints the HTTP status and the first line of the body ("000" while the
# admin port does not answer). 200 "Garage is fully operational" = all storage nodes up from this
# node's view; 200 "...some storage nodes are unavailable" = degraded but with quorum; 503 = no
# layout yet or no quorum. --noproxy: a caller's http_proxy must not see loopback requests.
health() {
    local body
    body=$(curl -sS --noproxy '*' -m 2 -w '\n%{http_code}' "http://127.0.0.1:$(admin_port "$1")/health" 2>/dev/null) ||
        { echo 000; return; }
    echo "$(tail -1 <<<"$body") $(head -1 <<<"$body")"
}

# A real S3 round trip through node $1's endpoint with the key in DIR/env: PUT 64 KiB, GET it back
# (compared), DELETE. SigV4 by hand so that this needs nothing but python3. Prints why it failed.
s3_probe() {
    (set -a; source "$DIR/env"; set +a
     exec python3 - "$(s3_port "$1")" "$BUCKET" <<'PY'
import datetime, hashlib, hmac, os, sys, urllib.error, urllib.request
port, bucket = sys.argv[1], sys.argv[2]
ak, sk, region = (os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"))
host, path = f"127.0.0.1:{port}", f"/{bucket}/garage-sh-probe-{port}"
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

def call(method, body=b""):
    amz = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    payload = hashlib.sha256(body).hexdigest()
    hdrs = {"host": host, "x-amz-content-sha256": payload, "x-amz-date": amz}
    signed = ";".join(sorted(hdrs))
    canon = "\n".join([method, path, "", *(f"{k}:{hdrs[k]}" for k in sorted(hdrs)), "", signed, payload])
    scope = f"{amz[:8]}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz, scope, hashlib.sha256(canon.encode()).hexdigest()])
    k = ("AWS4" + sk).encode()
    for part in (amz[:8], region, "s3", "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    del hdrs["host"]   # urllib sends the same Host itself
    hdrs["Authorization"] = f"AWS4-HMAC-SHA256 Credential={ak}/{scope}, SignedHeaders={signed}, Signature={sig}"
    req = urllib.request.Request(f"http://{host}{path}", data=body if method == "PUT" else None,
                                 method=method, headers=hdrs)
    with opener.open(req, timeout=5) as r:
        return r.read()

try:
    data = os.urandom(65536)
    call("PUT", data)
    if call("GET") != data:
        sys.exit("GET returned other bytes than the PUT")
    call("DELETE")
except urllib.error.HTTPError as e:
    sys.exit(f"{e.code} {e.reason}: {e.read()[:300]!r}")
except OSError as e:
    sys.exit(str(e))
PY
    )
}

# Starts node $1's server in its own session (setsid: it outlives this script, ignores the
# caller's ^C, and stop can kill its whole group).
start_server() {
    local i=$1
    RUST_LOG=$SERVER_LOG nohup setsid "$GARAGE_BIN" -c "$DIR/node$i/garage.toml" server \
        >>"$DIR/node$i.log" 2>&1 </dev/null &
    echo $! > "$DIR/node$i.pid"
}

# Waits until node $1's admin API answers (any status: 503 before the layout is applied).
wait_answers() {
    local i=$1 pid
    pid=$(cat "$DIR/node$i.pid")
    for _ in $(seq 300); do
        alive "$pid" || fail "node $i exited during startup"
        [ "$(health "$i")" != 000 ] && return 0
        sleep 0.1
    done
    fail "node $i did not answer on 127.0.0.1:$(admin_port "$i") within 30 s"
}

# Stops the nodes given as numbers: SIGTERM to all at once (Garage then closes its connections and
# flushes sqlite), up to 10 s, then SIGKILL to each survivor's process group.
stop_nodes() {
    local i pid pids=()
    for i in "$@"; do
        [ -s "$DIR/node$i.pid" ] || continue
        pid=$(cat "$DIR/node$i.pid")
        alive "$pid" && kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
        if alive "$pid"; then
            echo "garage: pid $pid ignored SIGTERM for 10 s; killing it" >&2
            kill -KILL -- "-$pid" 2>/dev/null || true
            while alive "$pid"; do sleep 0.05; done
        fi
    done
    for i in "$@"; do rm -f "$DIR/node$i.pid"; done
}

show_logs() {
    local f
    for f in "$DIR"/node[123].log; do
        [ -s "$f" ] && { echo "--- $f (last 30 lines)" >&2; tail -30 "$f" >&2; }
    done
    return 0
}

node_arg() { case $1 in 1|2|3) ;; *) echo "garage: node must be 1, 2 or 3, not $1" >&2; exit 2 ;; esac; }

[ $# -ge 2 ] || usage
cmd=$1
# Only start makes DIR: the others on a missing DIR (e.g. removed by the test) must not.
if [ "$cmd" = start ]; then mkdir -p "$2"; fi
DIR=$(cd "$2" 2>/dev/null && pwd) || { echo "garage: no directory $2" >&2; exit 1; }
case $cmd in
start)
    [ $# -eq 3 ] || usage
    S3PORT=$3
    GARAGE_BIN=$(find_garage)
    command -v curl >/dev/null || { echo "garage: curl missing" >&2; exit 1; }
    # A fresh cluster each time: an old node's layout and node key would not match the new
    # secret and layout, so stop whatever runs in DIR and remove its data.
    stop_nodes 1 2 3
    rm -rf "$DIR"/node[123] "$DIR"/node[123].log "$DIR/env"
    for p in $(seq "$S3PORT" $((S3PORT + 8))); do
        busy "$p" && { echo "garage: 127.0.0.1:$p is already in use (cluster ports $S3PORT..$((S3PORT + 8)))" >&2; exit 1; }
    done
    fail() { echo "garage: $*" >&2; show_logs; stop_nodes 1 2 3; exit 1; }

    # --- config and servers -----------------------------------------------------------------
    # One shared secret: nodes only talk to peers that know it (32 bytes, hex).
    SECRET=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
    for i in 1 2 3; do
        mkdir -p "$DIR/node$i/meta" "$DIR/node$i/data"
        # compression_level none: test blobs are mostly random; zstd would only cost CPU.
        # root_domain: also serves vhost-style requests for BUCKET.s3.garage.localhost (clients
        # here use path style); CompleteMultipartUpload's Location names that host.
        cat > "$DIR/node$i/garage.toml" <<TOML
metadata_dir = "$DIR/node$i/meta"
data_dir = "$DIR/node$i/data"
db_engine = "sqlite"
replication_factor = 3
compression_level = "none"
rpc_bind_addr = "127.0.0.1:$(rpc_port "$i")"
rpc_public_addr = "127.0.0.1:$(rpc_port "$i")"
rpc_secret = "$SECRET"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$(s3_port "$i")"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$(admin_port "$i")"
TOML
        chmod 600 "$DIR/node$i/garage.toml"   # it holds the secret
        start_server "$i"
    done
    for i in 1 2 3; do wait_answers "$i"; done
    t_srv=$(elapsed)

    # --- cluster: connect, layout ------------------------------------------------------------
    # Node 1 learns the others; Garage's peering then connects 2 and 3 to each other too.
    declare -A ID
    for i in 1 2 3; do
        id=$(g "$i" node id -q 2>>"$DIR/node$i.log") || fail "garage node id failed for node $i"
        ID[$i]=${id%%@*}
    done
    for i in 2 3; do
        g 1 node connect "${ID[$i]}@127.0.0.1:$(rpc_port "$i")" >/dev/null ||
            fail "node 1 could not connect to node $i"
    done
    for i in 1 2 3; do
        g 1 layout assign -z dc1 -c 1G "${ID[$i]}" >/dev/null || fail "layout assign of node $i failed"
    done
    g 1 layout apply --version 1 >/dev/null || fail "layout apply failed"
    # The layout reaches the other nodes by gossip; a node serves requests once it has it and
    # sees its peers up.
    for _ in $(seq 600); do
        ok=1
        for i in 1 2 3; do
            case $(health "$i") in "200 Garage is fully operational") ;; *) ok=0 ;; esac
        done
        [ "$ok" = 1 ] && break
        sleep 0.1
    done
    [ "$ok" = 1 ] || fail "the cluster was not fully operational within 60 s" \
        "(health: 1: $(health 1); 2: $(health 2); 3: $(health 3))"
    t_layout=$(elapsed)

    # --- bucket and key ----------------------------------------------------------------------
    g 1 bucket info "$BUCKET" >/dev/null 2>&1 || g 1 bucket create "$BUCKET" >/dev/null ||
        fail "bucket create failed"
    keyinfo=$(g 1 key create "$BUCKET") || fail "key create failed"
    KEY_ID=$(awk '/^Key ID:/ {print $3}' <<<"$keyinfo")
    SECRET_KEY=$(awk '/^Secret key:/ {print $3}' <<<"$keyinfo")
    [ -n "$KEY_ID" ] && [ -n "$SECRET_KEY" ] || fail "no key in the output of garage key create: $keyinfo"
    g 1 bucket allow --read --write --owner "$BUCKET" --key "$KEY_ID" >/dev/null ||
        fail "bucket allow failed"
    umask 077   # env holds the secret key
    # The region must be "garage" (s3_region): Garage refuses a SigV4 scope with another one.
    # awscli/boto3 read AWS_DEFAULT_REGION, not AWS_REGION, and only get away with the wrong
    # default for requests whose error body names the region (not HEAD, which then gets 400).
    printf 'AWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\nAWS_REGION=garage\nAWS_DEFAULT_REGION=garage\n' \
        "$KEY_ID" "$SECRET_KEY" > "$DIR/env.tmp"
    mv "$DIR/env.tmp" "$DIR/env"
    t_key=$(elapsed)

    # --- ready: a real PUT/GET through each node's S3 endpoint ------------------------------
    for i in 1 2 3; do
        for _ in $(seq 150); do
            err=$(s3_probe "$i" 2>&1) && break
            sleep 0.2
        done
        [ -z "$err" ] || fail "S3 PUT/GET through node $i (127.0.0.1:$(s3_port "$i")) failed for 30 s: $err"
    done
    echo "garage: 3 nodes, S3 on 127.0.0.1:$S3PORT-$((S3PORT + 2)), bucket $BUCKET, keys in $DIR/env" \
        "(ready in $(elapsed) s: servers $t_srv, layout $t_layout, bucket+key $t_key)" ;;
start-node)
    [ $# -eq 3 ] || usage
    I=$3; node_arg "$I"
    GARAGE_BIN=$(find_garage)
    [ -s "$DIR/node$I/garage.toml" ] && [ -s "$DIR/env" ] ||
        { echo "garage: no cluster in $DIR (run start first)" >&2; exit 1; }
    if [ -s "$DIR/node$I.pid" ] && alive "$(cat "$DIR/node$I.pid")"; then
        echo "garage: node $I already runs (pid $(cat "$DIR/node$I.pid"))" >&2; exit 1
    fi
    # Node 1's first api_bind_addr is its S3 one ([s3_api] comes before [admin]): S3PORT.
    S3PORT=$(sed -n 's/^api_bind_addr = "127.0.0.1:\([0-9]*\)"$/\1/p' "$DIR/node1/garage.toml" | head -1)
    for p in "$(s3_port "$I")" "$(rpc_port "$I")" "$(admin_port "$I")"; do
        busy "$p" && { echo "garage: 127.0.0.1:$p (node $I) is already in use" >&2; exit 1; }
    done
    # A failed restart leaves the node stopped, as it was.
    fail() { echo "garage: $*" >&2; show_logs; stop_nodes "$I"; exit 1; }
    echo "--- start-node $(date -u +%FT%TZ)" >>"$DIR/node$I.log"
    start_server "$I"
    wait_answers "$I"
    # Reconnect it now. On its own it would wait for the others' next retry (every 30 s) or its
    # discovery loop, which runs every 60 s and on start only knows the peer list it saved at its
    # previous start (empty for a node whose cluster was made since).
    want="200 Garage is fully operational"
    for j in 1 2 3; do
        [ "$j" = "$I" ] && continue
        if [ -s "$DIR/node$j.pid" ] && alive "$(cat "$DIR/node$j.pid")"; then
            id=$(g "$j" node id -q 2>>"$DIR/node$j.log") || fail "garage node id failed for node $j"
            g "$I" node connect "$id" >/dev/null || fail "node $I could not connect to node $j"
        else
            want="200 "   # degraded, but with quorum if the third node runs
        fi
    done
    # With all nodes running, wait until it sees both (a test may stop another one right after).
    for _ in $(seq 300); do
        case $(health "$I") in "$want"*) break ;; esac
        sleep 0.1
    done
    h=$(health "$I")
    case $h in "$want"*) ;; *) fail "node $I not ready within 30 s (health: $h)" ;; esac
    for _ in $(seq 150); do
        err=$(s3_probe "$I" 2>&1) && break
        sleep 0.2
    done
    [ -z "$err" ] || fail "S3 PUT/GET through node $I failed for 30 s: $err"
    echo "garage: node $I started (S3 on 127.0.0.1:$(s3_port "$I"); ready in $(elapsed) s)" ;;
stop-node)
    [ $# -eq 3 ] || usage
    I=$3; node_arg "$I"
    stop_nodes "$I"; echo "garage: node $I stopped ($DIR; $(elapsed) s)" ;;
stop)
    [ $# -eq 2 ] || usage
    stop_nodes 1 2 3; echo "garage: stopped ($DIR; $(elapsed) s)" ;;
*) usage ;;
esac
