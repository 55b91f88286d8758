#!/usr/bin/env bash
# Start-up after a crash: time from starting parley to `/healthz` 200 on a
# data dir left by `examples/crash_fill` (1,000,000 messages, the last
# 100,000 only in the commit log, then an abort):
#   loadtest/startup.sh [TOTAL] [UNCHECKPOINTED]
set -euo pipefail
cd "$(dirname "$0")/.."
TOTAL=${1:-1000000}; TAIL=${2:-100000}
DIR=$(mktemp -d); PORT=18855
trap 'rm -rf "$DIR"' EXIT
cargo build --release -q -p parley --bin parley --example crash_fill
target/release/examples/crash_fill "$DIR/data" "$TOTAL" "$TAIL" 2>&1 | grep -v Aborted || true
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
start=$(date +%s.%N)
target/release/parley --listen "127.0.0.1:$PORT" --data-dir "$DIR/data" --jwt-secret s > "$DIR/server.log" 2>&1 &
pid=$!
until curl -sf "http://127.0.0.1:$PORT/healthz" > /dev/null; do sleep 0.01; done
end=$(date +%s.%N)
echo "start-up to /healthz 200: $(python3 -c "print(round($end - $start, 3))") s (page cache dropped first: cold)"
grep -h "replayed" "$DIR/server.log" | sed 's/\x1b\[[0-9;]*m//g' || true
curl -sf "http://127.0.0.1:$PORT/metrics" > /dev/null
kill "$pid"; wait "$pid" 2>/dev/null || true
