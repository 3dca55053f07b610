# Sourced by the scripts that run test servers (nginx.sh, haproxy.sh, buildgrid.sh).

# True while PID runs. kill -0 alone also succeeds for a zombie, and these daemons are reparented
# to PID 1, which in containers may reap them late; so look at the state in /proc too.
alive() { kill -0 "$1" 2>/dev/null && [ "$(sed 's/.*) //; s/ .*//' "/proc/$1/stat" 2>/dev/null)" != Z ]; }

# Stops the master PID: SIGTERM (both proxies then drop open streams and stop their workers),
# and after 10 s SIGKILL to its whole process group (the master leads one: nginx setsid()s when
# daemonizing, haproxy.sh starts it under setsid), or orphaned workers would keep the port.
stop_master() {
    local pid=$1
    if alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
        if alive "$pid"; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
    fi
}
