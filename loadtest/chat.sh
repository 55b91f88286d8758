#!/usr/bin/env bash
# The chat scenario, parley against uWebSockets.js, alternating run by run in
# one sitting (each server fresh per run; parley in its default
# configuration):
#   loadtest/chat.sh [ROUNDS] [RATES]        e.g. loadtest/chat.sh 3 "500 5000"
#   PARLEY=path/to/parley  (default target/release/parley)
#   PEERS=dir              (default ../shared/peers; uws must be there)
# 1,000 conversations × 5 members; 20 s at 500 msg/s, 10 s at higher rates.
# Prints one line per run (p50/p99/p99.9 send→receive, server CPU, lost) and
# appends the JSON lines to $OUT/all.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}; RATES=${2:-"500 5000"}
PARLEY=${PARLEY:-target/release/parley}
PEERS=${PEERS:-../shared/peers}
OUT="${OUT:-loadtest/results/chat-$(date -u +%Y-%m-%d)}"
B=target/release/parley-load
PORT=18755; SECRET=chat-secret
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)"
run() { # server rate
    rm -rf "$OUT/data"
    case $1 in
        parley) "$PARLEY" --listen "127.0.0.1:$PORT" --data-dir "$OUT/data" --jwt-secret "$SECRET" > "$OUT/server.log" 2>&1 & ;;
        uws) JWT_SECRET=$SECRET "$PEERS/uws/run.sh" "$PORT" > "$OUT/server.log" 2>&1 & ;;
    esac
    local pid=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/healthz" > /dev/null && break; sleep 0.2; done
    local secs=20; [ "$2" -gt 500 ] && secs=10
    "$B" chat --url "http://127.0.0.1:$PORT" --secret "$SECRET" --pid "$pid" \
        --conversations 1000 --members 5 --rate "$2" --duration "$secs" > "$OUT/$1-$2.txt"
    tail -n 1 "$OUT/$1-$2.txt" | sed "s/^{/{\"server\":\"$1\",/" >> "$OUT/all.jsonl"
    python3 - "$OUT/$1-$2.txt" "$1" "$2" <<'PY'
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
l = r.get('latency', {})
print(f"{sys.argv[2]:6} {sys.argv[3]:>5} msg/s: p50 {l.get('p50_ms')} p99 {l.get('p99_ms')} p99.9 {l.get('p999_ms')} ms, "
      f"server CPU {r.get('server_cpu_s')} s, lost {r.get('loss')}, sent {r.get('sent')}")
PY
    kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; sleep 1
}
for rate in $RATES; do
    for _ in $(seq "$ROUNDS"); do
        run parley "$rate"
        run uws "$rate"
    done
done
rm -rf "$OUT/data"
