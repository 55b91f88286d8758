#!/usr/bin/env bash
# Two parley builds side by side in one sitting, alternating run by run, so
# drift of the machine hits both alike:
#   loadtest/ab.sh BEFORE_BIN AFTER_BIN [ROUNDS] [SCENARIOS]
# e.g. git worktree add /tmp/before <rev> && (cd /tmp/before && cargo build --release -p parley)
#      cargo build --release -p parley -p parley-load
#      loadtest/ab.sh /tmp/before/target/release/parley target/release/parley 4 "fanout density"
# Prints one summary line per run and appends the JSON lines to $OUT/all.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
BEFORE=$1; AFTER=$2; ROUNDS=${3:-3}; SCENARIOS=${4:-"fanout density"}
OUT="${OUT:-loadtest/results/ab-$(date -u +%Y-%m-%d)}"
B=target/release/parley-load
PORT=18655; SECRET=ab-secret
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)"
run() { # name bin scenario
    rm -rf "$OUT/data"
    "$2" --listen "127.0.0.1:$PORT" --data-dir "$OUT/data" --jwt-secret "$SECRET" > "$OUT/server.log" 2>&1 &
    local pid=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/healthz" > /dev/null && break; sleep 0.2; done
    case $3 in
        density) args=(--counts 5000,10000,18000 --in-flight 256 --idle-secs 10) ;;
        fanout)  args=(--subscribers 5000 --messages "${FANOUT_MESSAGES:-300}" --in-flight "${FANOUT_IN_FLIGHT:-16}") ;;
        chat)    args=(--conversations 1000 --members 5 --rate 500 --duration 20) ;;
    esac
    "$B" "$3" --url "http://127.0.0.1:$PORT" --secret "$SECRET" --pid "$pid" "${args[@]}" > "$OUT/$1-$3.txt"
    tail -n 1 "$OUT/$1-$3.txt" | sed "s/^{/{\"server\":\"$1\",/" >> "$OUT/all.jsonl"
    echo "$1 $3: $(grep -E 'RSS slope|CPU-s per million' "$OUT/$1-$3.txt" | sed 's/^ *//')"
    kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; sleep 1
}
for scenario in $SCENARIOS; do
    for _ in $(seq "$ROUNDS"); do
        run before "$BEFORE" "$scenario"
        run after "$AFTER" "$scenario"
    done
done
rm -rf "$OUT/data"
