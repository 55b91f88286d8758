#!/usr/bin/env bash
# Cluster mode, end to end: three parley nodes (the release binary) sharing
# one private PostgreSQL and one private Redis, with HAProxy in TCP mode in
# front of them (round robin, no stickiness, so consecutive connections of a
# test land on different nodes). The contract suite runs four times, as an
# external server: against node 1, node 2, node 3 and the balancer (tests
# that need a parley of their own are compiled as ignored; build.rs).
#
# Every run is made whatever the previous ones gave; the script prints a
# summary and exits non-zero if any run failed. Everything it starts runs
# in the foreground of its own background job, so the trap can kill it by
# pid; the trap also removes the temp dir (logs are copied to
# target/cluster-logs first, for a look after a failure).
#
# Needs Debian's postgresql (the highest /usr/lib/postgresql/*/bin is used),
# redis-server and haproxy (.ci/run installs them), curl and ss. As root,
# initdb and postgres run as the `postgres` user (both refuse root).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# The contract tests open many sockets, through HAProxy twice as many.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

started_at=$(date +%s)
# The secret the harness signs with by default (tests/contract/harness.rs);
# it is also passed to the tests explicitly, as PARLEY_TEST_SECRET.
SECRET=$(sed -n 's/^pub const SECRET: &str = "\(.*\)";$/\1/p' tests/contract/harness.rs)
if [ -z "$SECRET" ]; then
    echo "cluster: no \`pub const SECRET\` in tests/contract/harness.rs" >&2
    exit 1
fi

# ---- cleanup ----------------------------------------------------------------
WORK=$(mktemp -d -t parley-cluster.XXXXXX)
# The postgres user must reach its subdirectory.
chmod 0755 "$WORK"
PIDS=() # every process started, in start order; stopped in reverse

# SIGTERM (SIGQUIT for postgres: an immediate shutdown, since its data is
# deleted anyway), up to ~10 s, then SIGKILL.
stop_pid() { # pid signal
    local pid=$1 sig=$2
    kill -0 "$pid" 2>/dev/null || return 0
    kill "-$sig" "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        if [ "${PIDS[i]}" = "${PG_PID:-}" ]; then
            stop_pid "${PIDS[i]}" QUIT
        else
            stop_pid "${PIDS[i]}" TERM
        fi
    done
    mkdir -p "$ROOT/target/cluster-logs"
    cp "$WORK"/*.log "$ROOT/target/cluster-logs/" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- helpers ----------------------------------------------------------------
TAKEN=" "
# Sets PORT to a port in 20000-30000 that nothing listens on and that this
# script has not handed out yet (a global, not an echo: TAKEN must survive,
# which it would not in a $(...) subshell). Another process may still take
# it before we bind it: each start below fails loudly then.
free_port() {
    local p
    for _ in $(seq 1 200); do
        p=$((20000 + RANDOM % 10001))
        case "$TAKEN" in *" $p "*) continue ;; esac
        if [ -z "$(ss -Hltn "sport = :$p")" ]; then
            TAKEN="$TAKEN$p "
            PORT=$p
            return 0
        fi
    done
    echo "cluster: no free port in 20000-30000" >&2
    return 1
}

# Prints the tail of a log and exits.
die_with_log() { # message log
    echo "cluster: $1; the last lines of $2:" >&2
    tail -n 40 "$2" >&2 || true
    exit 1
}

# Polls `check` every 0.2 s for ~30 s while `pid` lives.
wait_until() { # what pid log check...
    local what=$1 pid=$2 log=$3
    shift 3
    for _ in $(seq 1 150); do
        "$@" && return 0
        kill -0 "$pid" 2>/dev/null || die_with_log "$what exited while starting" "$log"
        sleep 0.2
    done
    die_with_log "$what did not become ready within 30 s" "$log"
}

healthz_ok() { # host:port
    [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$1/healthz")" = 200 ]
}

# initdb and postgres refuse to run as root: as root, run them as `postgres`.
# A prefix rather than a function: a function started with `&` runs in a
# subshell whose pid is $!, and postgres would outlive it; setpriv execs, so
# $! is postgres itself and the trap signals the right process.
AS_PG=()
if [ "$(id -u)" -eq 0 ]; then
    AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups --)
fi

# ---- build ------------------------------------------------------------------
cargo build --release --bin parley
PARLEY="$ROOT/target/release/parley"

# ---- PostgreSQL ---------------------------------------------------------------
PG_BIN=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null |
    sort -V | tail -n 1)
if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/postgres" ]; then
    echo "cluster: no PostgreSQL under /usr/lib/postgresql/*/bin (apt-get install postgresql)" >&2
    exit 1
fi
mkdir "$WORK/pg"
if [ "$(id -u)" -eq 0 ]; then chown postgres:postgres "$WORK/pg"; fi
free_port
PG_PORT=$PORT
"${AS_PG[@]}" "$PG_BIN/initdb" -D "$WORK/pg/data" -U parley --auth=trust -E UTF8 --no-locale --no-sync \
    > "$WORK/postgres.log" 2>&1 || die_with_log "initdb failed" "$WORK/postgres.log"
"${AS_PG[@]}" "$PG_BIN/postgres" -D "$WORK/pg/data" -p "$PG_PORT" -k "$WORK/pg" \
    -c listen_addresses=127.0.0.1 -c max_connections=200 >> "$WORK/postgres.log" 2>&1 &
PG_PID=$!
PIDS+=("$PG_PID")
wait_until postgres "$PG_PID" "$WORK/postgres.log" \
    "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"
"$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U parley parley
DATABASE_URL="postgres://parley@127.0.0.1:$PG_PORT/parley"
echo "cluster: postgres ($PG_BIN) on 127.0.0.1:$PG_PORT"

# ---- Redis --------------------------------------------------------------------
mkdir "$WORK/redis"
free_port
REDIS_PORT=$PORT
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$WORK/redis" > "$WORK/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
redis_ok() { [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; }
wait_until redis "$REDIS_PID" "$WORK/redis.log" redis_ok
REDIS_URL="redis://127.0.0.1:$REDIS_PORT/"
echo "cluster: redis on 127.0.0.1:$REDIS_PORT"

# ---- three parley nodes ---------------------------------------------------------
NODES=()
NODE_PIDS=()
for n in 1 2 3; do
    free_port
    port=$PORT
    mkdir "$WORK/node$n"
    "$PARLEY" --listen "127.0.0.1:$port" --data-dir "$WORK/node$n" --jwt-secret "$SECRET" \
        --database-url "$DATABASE_URL" --redis-url "$REDIS_URL" \
        < /dev/null > "$WORK/node$n.log" 2>&1 &
    NODE_PIDS+=("$!")
    PIDS+=("$!")
    NODES+=("127.0.0.1:$port")
done
for i in 0 1 2; do
    wait_until "parley node $((i + 1))" "${NODE_PIDS[i]}" "$WORK/node$((i + 1)).log" \
        healthz_ok "${NODES[i]}"
    echo "cluster: parley node $((i + 1)) on ${NODES[i]}"
done

# ---- HAProxy ------------------------------------------------------------------
free_port
LB_PORT=$PORT
cat > "$WORK/haproxy.cfg" << CFG
global
    # No maxconn: HAProxy derives it from the fd limit (each connection
    # takes two), where a fixed one may exceed what the limit allows.
    # One line per connection, with its node and how it ended
    # (target/cluster-logs/haproxy.log).
    log stdout format raw local0 info

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    # WebSockets stay open for a whole test; never cut them for idleness.
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h

frontend parley
    bind 127.0.0.1:$LB_PORT
    default_backend nodes

backend nodes
    # Every new connection goes to the next node: no stickiness at all.
    balance roundrobin
    server node1 ${NODES[0]} check
    server node2 ${NODES[1]} check
    server node3 ${NODES[2]} check
CFG
# -db: stay in the foreground (no daemon), so $! is haproxy itself.
/usr/sbin/haproxy -db -f "$WORK/haproxy.cfg" > "$WORK/haproxy.log" 2>&1 &
LB_PID=$!
PIDS+=("$LB_PID")
BALANCER="127.0.0.1:$LB_PORT"
wait_until haproxy "$LB_PID" "$WORK/haproxy.log" healthz_ok "$BALANCER"
echo "cluster: haproxy on $BALANCER (round robin over ${NODES[*]})"

# ---- the contract suite, four times -----------------------------------------------
NAMES=("node 1" "node 2" "node 3" "balancer")
TARGETS=("${NODES[@]}" "$BALANCER")
SUMMARY=()
DEAD=" "
failed_runs=0
for i in 0 1 2 3; do
    echo
    echo "================================================================"
    echo "== cluster: contract suite against ${NAMES[i]} (${TARGETS[i]})"
    echo "================================================================"
    log="$WORK/contract-$((i + 1)).log"
    rc=0
    skip=()
    if [ "$i" -eq 3 ]; then
        # Through a TCP proxy, an answer sent before the request was read
        # whole (close 1009 for an oversized frame, 413 for an oversized
        # body) races with the reset the kernel sends for the unread bytes,
        # and the proxy may drop the answer: a property of TCP proxies, not
        # of the cluster. These run against every node directly above.
        skip=(--skip _closed_with_1009 --skip _413_before)
        echo "(skipping, through the proxy only: ${skip[*]})"
    fi
    PARLEY_TEST_EXTERNAL="${TARGETS[i]}" PARLEY_TEST_SECRET="$SECRET" \
        cargo test --test contract -- "${skip[@]}" 2>&1 | tee "$log" || rc=$?
    counts=$(grep -E '^test result: ' "$log" | tail -n 1 | sed 's/^test result: //') || true
    [ -n "$counts" ] || counts="no test result (exit $rc)"
    SUMMARY+=("${NAMES[i]}: ${counts}")
    if [ "$rc" -ne 0 ]; then
        # Each failed test with the first two lines of its panic message
        # (cargo prints a "---- NAME stdout ----" block per failed test).
        while IFS= read -r line; do
            SUMMARY+=("    $line")
        done < <(awk '
            /^---- .* stdout ----$/ { name = $2; grab = 0; seen = 0; next }
            name != "" && !seen && /panicked at/ { print "FAILED " name; grab = 2; seen = 1; next }
            /^stack backtrace:$/ || /^note: / { grab = 0 }
            grab > 0 { print "      " substr($0, 1, 200); grab-- }
        ' "$log")
    fi
    # Every process must have survived the run.
    for pid in "${PIDS[@]}"; do
        case "$DEAD" in *" $pid "*) continue ;; esac
        if ! kill -0 "$pid" 2>/dev/null; then
            DEAD="$DEAD$pid "
            SUMMARY+=("    a server process ($pid) died during this run; see target/cluster-logs")
            rc=1
        fi
    done
    if [ "$rc" -ne 0 ]; then failed_runs=$((failed_runs + 1)); fi
done

echo
echo "== cluster: summary ($(($(date +%s) - started_at)) s)"
printf '%s\n' "${SUMMARY[@]}"
if [ "$failed_runs" -ne 0 ]; then
    echo "cluster: $failed_runs of ${#TARGETS[@]} runs failed" >&2
    exit 1
fi
echo "cluster: all ${#TARGETS[@]} runs passed"
