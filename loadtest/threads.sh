#!/usr/bin/env bash
# One chat run against a parley build, then its CPU and context switches per
# thread, read from /proc/<pid>/task/*/{stat,status} at the end of the run
# (README, "The commit log of 2026-12-02"):
#   loadtest/threads.sh [RATE] [SECONDS] [PARLEY_BIN]     e.g. loadtest/threads.sh 500 20
# Prints the load summary, the commit-time histogram sum/count from /metrics,
# and per thread: CPU seconds (user + system) and voluntary/involuntary
# context switches; then the switches per message over all threads.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${1:-500}; SECS=${2:-20}; BIN=${3:-target/release/parley}
PORT=18800; DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
ulimit -n "$(ulimit -Hn)"
"$BIN" --listen "127.0.0.1:$PORT" --data-dir "$DIR/data" --jwt-secret s > "$DIR/server.log" 2>&1 &
PID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/healthz" > /dev/null && break; sleep 0.2; done
target/release/parley-load chat --url "http://127.0.0.1:$PORT" --secret s --pid "$PID" \
    --conversations 1000 --members 5 --rate "$RATE" --duration "$SECS" | grep -E "latency|server CPU|loss"
curl -s "http://127.0.0.1:$PORT/metrics" | grep -E "^parley_store_(flush_seconds|group_size)_(sum|count)"
python3 - "$PID" "$((RATE * SECS))" <<'PY'
import glob, os, sys
pid, messages = sys.argv[1], int(sys.argv[2])
tick = os.sysconf("SC_CLK_TCK")
threads, total = {}, 0
for t in glob.glob(f"/proc/{pid}/task/*"):
    name = open(f"{t}/comm").read().strip()
    name = "sled-io" if name.startswith("sled-io") else name
    f = open(f"{t}/stat").read().rsplit(")", 1)[1].split()
    cpu = (int(f[11]) + int(f[12])) / tick
    st = dict(l.split(":", 1) for l in open(f"{t}/status"))
    v, n = int(st["voluntary_ctxt_switches"]), int(st["nonvoluntary_ctxt_switches"])
    a = threads.setdefault(name, [0.0, 0, 0])
    a[0] += cpu; a[1] += v; a[2] += n
    total += v + n
for name, (cpu, v, n) in sorted(threads.items()):
    print(f"  {name:18} CPU {cpu:6.2f} s  switches {v:7} voluntary {n:7} involuntary")
print(f"  context switches per message: {total / messages:.1f}")
PY
kill "$PID"; wait "$PID" 2>/dev/null || true
