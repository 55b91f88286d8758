#!/usr/bin/env bash
# One sitting: every scenario against parley and, when present, the comparison
# peers (uWebSockets.js and Node `ws`), each server started fresh per
# scenario, one after another on this machine.
#   loadtest/compare.sh [OUT_DIR]       (default: loadtest/results/<date>)
#   PEERS=dir   where the peers live (<dir>/uws/run.sh, <dir>/node-ws/run.sh;
#               default ../shared/peers); a peer that is absent is skipped.
#   SERVERS="parley uws"  choose servers.
# Needs: cargo (builds parley and parley-load in release); node + npm for the peers.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-loadtest/results/$(date -u +%Y-%m-%d)}"
PEERS="${PEERS:-../shared/peers}"
SECRET=compare-secret
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)"
cargo build --release -q -p parley -p parley-load
B=target/release/parley-load
PORT=18555

start() { # name -> sets PID, URL
    case "$1" in
        parley)
            rm -rf "$OUT/data"
            target/release/parley --listen "127.0.0.1:$PORT" --data-dir "$OUT/data" \
                --jwt-secret "$SECRET" > "$OUT/server.log" 2>&1 &
            PID=$! ;;
        uws|node-ws)
            JWT_SECRET=$SECRET "$PEERS/$1/run.sh" "$PORT" > "$OUT/server.log" 2>&1 &
            PID=$! ;;
    esac
    URL="http://127.0.0.1:$PORT"
    for _ in $(seq 100); do curl -sf "$URL/healthz" > /dev/null && return; sleep 0.2; done
    echo "$1 did not start" >&2; exit 1
}
stop() { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; sleep 1; }

for server in ${SERVERS:-parley uws node-ws}; do
    if [ "$server" != parley ] && [ ! -x "$PEERS/$server/run.sh" ]; then
        echo "== $server: skipped (no $PEERS/$server/run.sh; set PEERS to the peers' directory to compare)" >&2
        continue
    fi
    for scenario in density fanout chat; do
        start "$server"
        case $scenario in
            density) args=(--counts 5000,10000,18000 --in-flight 256 --idle-secs 10) ;;
            fanout)  args=(--subscribers 5000 --messages 300 --in-flight 16) ;;
            chat)    args=(--conversations 1000 --members 5 --rate 500 --duration 20) ;;
        esac
        echo "== $server $scenario" >&2
        $B "$scenario" --url "$URL" --secret "$SECRET" --pid "$PID" "${args[@]}" \
            | tee "$OUT/$server-$scenario.txt" | grep -v '^{' >&2
        tail -n 1 "$OUT/$server-$scenario.txt" | sed "s/^{/{\"server\":\"$server\",/" >> "$OUT/all.jsonl"
        stop
    done
done
rm -rf "$OUT/data"
echo "results: $OUT/all.jsonl" >&2
