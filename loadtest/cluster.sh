#!/usr/bin/env bash
# Cluster mode under load, in one sitting on this machine: parley nodes on a
# private PostgreSQL and a private Redis, driven by parley-load with its
# sockets spread over the nodes (no balancer: the tool itself sends socket i
# to node i % 3, and a chat conversation's members to different nodes).
#   loadtest/cluster.sh                      (as root: initdb/postgres run as `postgres`)
#   ROUNDS=3 RATES="500 2000" loadtest/cluster.sh
#   OUT=dir    (default loadtest/results/cluster-<date>)
#   FANOUT_MESSAGES=n   messages of the fan-out run (default 1000)
#   SCENARIOS="chat"    only the chat runs ("fanout chat" by default)
# Each round:
#   fanout  one plain parley (default mode: its own data dir, no cluster
#           flags), then three cluster nodes, the same run both times:
#           1 conversation, 15,000 subscriber sockets of 150 users (100
#           sockets per user, as in the earlier 5,000-socket runs), the
#           publisher on node 1, 1,000 messages, 16 in flight; prints CPU-seconds
#           per million deliveries of both and their ratio (cluster / single).
#   chat    three cluster nodes, 1,000 conversations x 5 members, each
#           conversation's members on different nodes, open loop at each
#           rate of RATES (20 s at 500 msg/s, 10 s above): p50/p99/p99.9,
#           server CPU summed over the nodes and per node, lost, sent.
# Every run gets fresh nodes on a fresh database (createdb per run), so runs
# do not depend on each other; PostgreSQL and Redis stay up for the sitting.
# PostgreSQL keeps its defaults (fsync and synchronous_commit on): the
# figures include honest durability. The CPU of PostgreSQL and Redis over
# each whole tool run (set-up and connect included) is reported next to the
# nodes' (which the tool measures over the publishing / sending window only).
# The machine has 2 cores: the nodes, PostgreSQL, Redis and the load
# generator all share them.
# Text lines go to stdout; each run's JSON line (with "setup", "round" and
# the engines' CPU added) is appended to $OUT/all.jsonl; each run's full
# output, the tool's stderr and every node's log stay in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
started_at=$(date +%s)

ROUNDS=${ROUNDS:-1}
RATES=${RATES:-"500 2000"}
# Which scenarios to run: "fanout chat" (default), or either alone.
SCENARIOS=${SCENARIOS:-"fanout chat"}
OUT="${OUT:-loadtest/results/cluster-$(date -u +%Y-%m-%d)}"
SECRET="cluster-secret"
NODES=${NODES:-3}
# The fan-out run (the same for one node and for the cluster): 15 million
# deliveries, ~15 s on this machine either way (bound by the two cores that
# the client shares with the servers).
FANOUT_ARGS=(--subscribers 15000 --users 150 --messages "${FANOUT_MESSAGES:-1000}" --in-flight "${FANOUT_IN_FLIGHT:-16}")
# 15,000 sockets in one process (single node) and in the tool's workers.
ulimit -n "$(ulimit -Hn)"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
TCK=$(getconf CLK_TCK)

# ---- cleanup ----------------------------------------------------------------
WORK=$(mktemp -d -t parley-loadcluster.XXXXXX)
# The postgres user must reach its subdirectory.
chmod 0755 "$WORK"
NODE_PIDS=()   # the nodes of the current run
LOAD_PID=""    # the current parley-load (its workers exit when it does)
PG_PID=""      # the postmaster (read from postmaster.pid)
PG_WRAP=""     # runuser, postgres' parent
REDIS_PID=""

# SIGTERM (or the given signal), up to ~20 s, then SIGKILL.
stop_pid() { # pid [signal]
    local pid=$1 sig=${2:-TERM}
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill "-$sig" "$pid" 2>/dev/null || true
    for _ in $(seq 1 200); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local p
    stop_pid "$LOAD_PID"
    for p in "${NODE_PIDS[@]}"; do stop_pid "$p"; done
    stop_pid "$REDIS_PID"
    # An immediate shutdown: the data is deleted anyway.
    stop_pid "$PG_PID" QUIT
    stop_pid "$PG_WRAP"
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- helpers ----------------------------------------------------------------
TAKEN=" "
# A port in 20000-30000 that nothing listens on and this script has not
# handed out yet.
free_port() {
    local p
    for _ in $(seq 1 200); do
        p=$((20000 + RANDOM % 10001))
        case "$TAKEN" in *" $p "*) continue ;; esac
        if [ -z "$(ss -Hltn "sport = :$p")" ]; then
            TAKEN="$TAKEN$p "
            echo "$p"
            return 0
        fi
    done
    echo "cluster.sh: no free port in 20000-30000" >&2
    return 1
}

die_with_log() { # message log
    echo "cluster.sh: $1; the last lines of $2:" >&2
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

# CPU seconds (utime + stime) of a process and all its descendants.
tree_cpu() { # pid
    python3 - "$1" "$TCK" <<'PY'
import os, sys
root, tck = int(sys.argv[1]), int(sys.argv[2])
kids, ticks = {}, {}
for d in os.listdir("/proc"):
    if not d.isdigit():
        continue
    try:
        f = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        continue
    kids.setdefault(int(f[1]), []).append(int(d))
    ticks[int(d)] = int(f[11]) + int(f[12])
todo, total = [root], 0
while todo:
    p = todo.pop()
    total += ticks.get(p, 0)
    todo += kids.get(p, [])
print(f"{total / tck:.2f}")
PY
}

# ---- build --------------------------------------------------------------------
cargo build --release --bin parley -p parley
cargo build --release -p parley-load
# Copies, so that a build by someone else during the sitting cannot swap the
# binaries between runs (parley-load re-executes itself for its workers).
mkdir "$WORK/bin"
cp target/release/parley target/release/parley-load "$WORK/bin/"
B="$WORK/bin/parley-load"
PARLEY="$WORK/bin/parley"
REV=$(git rev-parse --short HEAD)
DIRTY=$(git status --porcelain -- src Cargo.toml Cargo.lock migrations 2>/dev/null | wc -l)
echo "cluster.sh: parley at $REV$([ "$DIRTY" -gt 0 ] && echo " + $DIRTY uncommitted file(s) in src/ etc."), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"

# ---- PostgreSQL -----------------------------------------------------------------
PG_BIN=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null |
    sort -V | tail -n 1)
if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/postgres" ]; then
    echo "cluster.sh: no PostgreSQL under /usr/lib/postgresql/*/bin (apt-get install postgresql)" >&2
    exit 1
fi
# initdb and postgres refuse to run as root.
AS_PG=()
if [ "$(id -u)" -eq 0 ]; then
    AS_PG=(runuser -u postgres --)
fi
mkdir "$WORK/pg"
[ "$(id -u)" -eq 0 ] && chown postgres:postgres "$WORK/pg"
PG_PORT=$(free_port)
PGDATA="$WORK/pg/data"
"${AS_PG[@]}" "$PG_BIN/initdb" -D "$PGDATA" -U parley --auth=trust -E UTF8 --no-locale \
    > "$OUT/postgres.log" 2>&1 || die_with_log "initdb failed" "$OUT/postgres.log"
# Defaults otherwise: fsync, synchronous_commit and full_page_writes on.
"${AS_PG[@]}" "$PG_BIN/postgres" -D "$PGDATA" -p "$PG_PORT" -k "$WORK/pg" \
    -c listen_addresses=127.0.0.1 -c max_connections=200 >> "$OUT/postgres.log" 2>&1 &
PG_WRAP=$!
wait_until postgres "$PG_WRAP" "$OUT/postgres.log" \
    "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -U parley -d postgres
# runuser may stay as postgres' parent: the postmaster's own pid is in its
# pid file (the trap signals it directly, and its CPU is measured from it).
PG_PID=$(head -n 1 "$PGDATA/postmaster.pid")
psql_q() { "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U parley -d postgres -Atc "$1"; }
echo "cluster.sh: postgres $("$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT" \
    "(fsync $(psql_q 'show fsync'), synchronous_commit $(psql_q 'show synchronous_commit'))"

# ---- Redis ------------------------------------------------------------------------
mkdir "$WORK/redis"
REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$WORK/redis" > "$OUT/redis.log" 2>&1 &
REDIS_PID=$!
redis_ok() { [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; }
wait_until redis "$REDIS_PID" "$OUT/redis.log" redis_ok
REDIS_URL="redis://127.0.0.1:$REDIS_PORT/"
echo "cluster.sh: redis $(redis-server --version | awk '{print $3}' | cut -d= -f2) on 127.0.0.1:$REDIS_PORT"

# ---- nodes ------------------------------------------------------------------------
# Starts the nodes of run `name`: "single" is one plain parley on its own
# data dir; "cluster" is $NODES nodes on a database created for this run.
# Sets NODE_PIDS, URLS (comma list), PIDS (comma list).
start_nodes() { # name setup
    local name=$1 setup=$2 n port db args
    NODE_PIDS=()
    local urls=() hosts=()
    if [ "$setup" = single ]; then
        args=()
        n=1
    else
        db="run_${name//-/_}"
        "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U parley "$db"
        args=(--database-url "postgres://parley@127.0.0.1:$PG_PORT/$db" --redis-url "$REDIS_URL")
        n=$NODES
    fi
    for i in $(seq 1 "$n"); do
        port=$(free_port)
        mkdir -p "$WORK/$name/node$i"
        "$PARLEY" --listen "127.0.0.1:$port" --data-dir "$WORK/$name/node$i" \
            --jwt-secret "$SECRET" "${args[@]}" < /dev/null > "$OUT/$name-node$i.log" 2>&1 &
        NODE_PIDS+=("$!")
        hosts+=("127.0.0.1:$port")
        urls+=("http://127.0.0.1:$port")
    done
    for i in $(seq 1 "$n"); do
        wait_until "parley node $i of $name" "${NODE_PIDS[i - 1]}" "$OUT/$name-node$i.log" \
            healthz_ok "${hosts[i - 1]}"
    done
    URLS=$(IFS=,; echo "${urls[*]}")
    PIDS=$(IFS=,; echo "${NODE_PIDS[*]}")
}

# Stops the nodes (SIGTERM: a cluster node drains its sockets, none are
# left by then) and prints anything odd: an exit code other than 0, or
# WARN/ERROR lines in a node's log.
stop_nodes() { # name
    local name=$1 i=0 p rc log odd
    for p in "${NODE_PIDS[@]}"; do
        i=$((i + 1))
        kill -TERM "$p" 2>/dev/null || true
        rc=0
        for _ in $(seq 1 200); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$p" 2>/dev/null; then
            echo "  $name node $i: still running 20 s after SIGTERM; killed"
            kill -KILL "$p" 2>/dev/null || true
        fi
        wait "$p" 2>/dev/null || rc=$?
        [ "$rc" -eq 0 ] || echo "  $name node $i: exit code $rc"
        log="$OUT/$name-node$i.log"
        odd=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -cE ' (WARN|ERROR) |panicked' || true)
        if [ "$odd" -gt 0 ]; then
            echo "  $name node $i: $odd WARN/ERROR line(s) in $log, first ones:"
            sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -E ' (WARN|ERROR) |panicked' | head -n 5 | cut -c1-300 | sed 's/^/      /'
        fi
    done
    NODE_PIDS=()
    rm -rf "${WORK:?}/$name"
}

# One tool run against the nodes started for `name`: its output in
# $OUT/<name>.txt (stderr in .err); the JSON line, with the setup, round
# and the engines' CPU added, appended to all.jsonl. Returns the tool's exit code.
load() { # name setup round scenario args...
    local name=$1 setup=$2 round=$3 scenario=$4 rc=0 pg0 rd0 pg1 rd1
    shift 4
    pg0=$(tree_cpu "$PG_PID"); rd0=$(tree_cpu "$REDIS_PID")
    "$B" "$scenario" --url "$URLS" --secret "$SECRET" --pid "$PIDS" "$@" \
        > "$OUT/$name.txt" 2> "$OUT/$name.err" &
    LOAD_PID=$!
    wait "$LOAD_PID" || rc=$?
    LOAD_PID=""
    pg1=$(tree_cpu "$PG_PID"); rd1=$(tree_cpu "$REDIS_PID")
    python3 - "$OUT/$name.txt" "$setup" "$round" "$REV" "$pg0" "$pg1" "$rd0" "$rd1" >> "$OUT/all.jsonl" <<'PY'
import json, sys
path, setup, rnd, rev, pg0, pg1, rd0, rd1 = sys.argv[1:]
lines = [l for l in open(path).read().splitlines() if l.startswith("{")]
r = json.loads(lines[-1]) if lines else {"error": "no JSON line"}
out = {"setup": setup, "round": int(rnd), "parley_rev": rev}
out.update(r)
# Over the whole tool run (set-up and connect included), not the tool's window.
out["postgres_cpu_s_whole_run"] = round(float(pg1) - float(pg0), 2)
out["redis_cpu_s_whole_run"] = round(float(rd1) - float(rd0), 2)
print(json.dumps(out))
PY
    if [ "$rc" -ne 0 ]; then
        echo "  $name: parley-load exited $rc: $(tail -n 1 "$OUT/$name.txt" | cut -c1-300)"
        tail -n 3 "$OUT/$name.err" | sed 's/^/      /'
    fi
    return "$rc"
}

# Fields of the last JSON line of all.jsonl, as one text line.
summary() { # kind
    python3 - "$OUT/all.jsonl" "$1" <<'PY'
import json, sys
r = json.loads(open(sys.argv[1]).read().splitlines()[-1])
kind = sys.argv[2]
if "error" in r:
    print(f"  error: {r['error']}"); sys.exit()
l = r.get("latency", {})
per = r.get("server_cpu_s_per_pid")
per = " (per node " + " / ".join(f"{c:.2f}" for c in per) + ")" if per else ""
closed = f", closed by server {r['closed_by_server']} {r['close_reasons']}" if r.get("closed_by_server") else ""
failed = r.get("connect", {}).get("failed", 0)
failed = f", connect failures {failed} {r['connect']['errors']}" if failed else ""
eng = f"; postgres {r['postgres_cpu_s_whole_run']} s, redis {r['redis_cpu_s_whole_run']} s CPU over the whole run"
if kind == "fanout":
    print(f"  {r['setup']:7} fanout: {r['server_cpu_s_per_million_deliveries']} CPU-s per million deliveries, "
          f"server CPU {r['server_cpu_s']} s{per}, {r['deliveries']} deliveries in {r['seconds']} s "
          f"({r['deliveries_per_s']:.0f}/s), p50 {l.get('p50_ms')} p99 {l.get('p99_ms')} ms, "
          f"lost {r['loss']}, sent {r['sent']}{failed}{closed}{eng}")
else:
    print(f"  chat {r['rate']:>5.0f} msg/s x {r['duration_s']:.0f} s: p50 {l.get('p50_ms')} p99 {l.get('p99_ms')} "
          f"p99.9 {l.get('p999_ms')} ms, server CPU {r['server_cpu_s']} s{per}, lost {r['loss']}, sent {r['sent']} "
          f"(send lag max {r['send_lag_ms']['max']} ms){failed}{closed}{eng}")
PY
}

field() { # json-field -> value of the last JSON line
    python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1]).get(sys.argv[2]))' \
        "$OUT/all.jsonl" "$1"
}

# ---- the runs ------------------------------------------------------------------
failures=0
for round in $(seq 1 "$ROUNDS"); do
    echo "== round $round of $ROUNDS ($(date -u +%H:%M:%S) UTC, load average $(cut -d' ' -f1-3 /proc/loadavg))"
    # fan-out: one plain node, then the cluster
    if [[ " $SCENARIOS " == *" fanout "* ]]; then
    name="r$round-fanout-single"
    start_nodes "$name" single
    load "$name" single "$round" fanout "${FANOUT_ARGS[@]}" || failures=$((failures + 1))
    summary fanout
    single=$(field server_cpu_s_per_million_deliveries)
    stop_nodes "$name"; sleep 1
    name="r$round-fanout-cluster"
    start_nodes "$name" cluster
    load "$name" cluster "$round" fanout "${FANOUT_ARGS[@]}" || failures=$((failures + 1))
    summary fanout
    cluster=$(field server_cpu_s_per_million_deliveries)
    stop_nodes "$name"; sleep 1
    python3 - "$single" "$cluster" <<'PY'
import sys
try:
    s, c = float(sys.argv[1]), float(sys.argv[2])
    print(f"  fanout CPU-s per million deliveries: single {s:.3f}, cluster of 3 {c:.3f}, ratio cluster/single {c / s:.2f}")
except ValueError:
    print(f"  fanout CPU-s per million deliveries: single {sys.argv[1]}, cluster {sys.argv[2]}: no ratio")
PY
    fi
    # chat: the cluster at each rate
    [[ " $SCENARIOS " == *" chat "* ]] || continue
    for rate in $RATES; do
        secs=20; [ "$rate" -gt 500 ] && secs=10
        name="r$round-chat-$rate"
        start_nodes "$name" cluster
        load "$name" cluster "$round" chat --conversations 1000 --members 5 \
            --rate "$rate" --duration "$secs" || failures=$((failures + 1))
        summary chat
        stop_nodes "$name"; sleep 1
    done
done
# The engines' logs: anything above the ordinary (but Redis' start-up
# warning about vm.overcommit_memory, which concerns background saves: off here).
for log in "$OUT/postgres.log" "$OUT/redis.log"; do
    odd=$(grep -E 'ERROR|FATAL|PANIC|WARNING' "$log" | grep -vc 'Memory overcommit must be enabled' || true)
    if [ "$odd" -gt 0 ]; then
        echo "  $(basename "$log"): $odd ERROR/FATAL/WARNING line(s):"
        grep -E 'ERROR|FATAL|PANIC|WARNING' "$log" | grep -v 'Memory overcommit must be enabled' |
            head -n 5 | cut -c1-300 | sed 's/^/      /'
    fi
done
echo "cluster.sh: done in $(($(date +%s) - started_at)) s; JSON lines in $OUT/all.jsonl"
[ "$failures" -eq 0 ] || { echo "cluster.sh: $failures run(s) failed" >&2; exit 1; }
