#!/usr/bin/env bash
# The web side, against the real parley binary: clients/js under Node's test
# runner, the console in Chromium (playwright-core pinned in
# tests/browser/package-lock.json), and schemathesis against /api/openapi.json.
# Installs what it needs idempotently (Debian chromium, npm ci, schemathesis
# in a venv under ~/.cache). Each step ends with "N passed, N failed"; the
# script exits non-zero when any step fails.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
SCHEMATHESIS_VERSION=4.32.5
failed_steps=0

step_done() { # name passed failed
    echo "== $1: $2 passed, $3 failed"
    if [ "$3" -ne 0 ] || [ "$2" -eq 0 ]; then failed_steps=$((failed_steps + 1)); fi
}

# ---- installs (quick when already there) -----------------------------------
if ! command -v chromium > /dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null
fi
if ! command -v node > /dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm > /dev/null
fi
NODE_MAJOR=$(node -p 'process.versions.node.split(".")[0]')
if [ "$NODE_MAJOR" -lt 20 ]; then
    echo "web: Node $NODE_MAJOR has no WebSocket client; clients/js and the browser test need Node >= 20" >&2
    exit 1
fi
# Node 20 has WebSocket behind a flag; 22 on has it by default.
NODE_WS=()
[ "$NODE_MAJOR" -lt 22 ] && NODE_WS=(--experimental-websocket)
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error > /dev/null)
VENV="${XDG_CACHE_HOME:-$HOME/.cache}/parley-ci/venv"
if ! "$VENV/bin/st" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
    python3 -m venv "$VENV" 2>/dev/null || {
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv > /dev/null
        python3 -m venv "$VENV"
    }
    "$VENV/bin/pip" install -q "schemathesis==$SCHEMATHESIS_VERSION"
fi
cargo build -q -p parley
export PARLEY_BIN="$ROOT/target/debug/parley"

# node --test (TAP) → "N passed, N failed"
node_step() { # name dir file...
    local name=$1 dir=$2; shift 2
    local log; log=$(mktemp)
    (cd "$dir" && node "${NODE_WS[@]}" --test --test-reporter=tap "$@") > "$log" 2>&1
    local rc=$?
    grep -E '^(not ok|ok) ' "$log"
    [ $rc -ne 0 ] && cat "$log"
    local pass fail
    pass=$(sed -n 's/^# pass //p' "$log" | tail -1)
    fail=$(sed -n 's/^# fail //p' "$log" | tail -1)
    [ $rc -ne 0 ] && [ "${fail:-0}" -eq 0 ] && fail=1
    step_done "$name" "${pass:-0}" "${fail:-1}"
    rm -f "$log"
}

node_step "clients/js (node --test)" clients/js test/policy.test.js test/client.test.js
node_step "console in Chromium" tests/browser console.test.js

# ---- schemathesis against a zero-configuration parley --------------------
DATA=$(mktemp -d)
ST_DIR=$(mktemp -d)
OUT=$(mktemp)
"$PARLEY_BIN" --listen 127.0.0.1:0 --data-dir "$DATA" > "$OUT" 2> "$DATA.log" &
PID=$!
for _ in $(seq 100); do grep -q "listening on" "$OUT" && break; sleep 0.1; done
URL=$(sed -n 's/^listening on //p' "$OUT")
st_pass=0 st_fail=0
if [ -z "$URL" ]; then
    echo "schemathesis: parley did not start" >&2
    st_fail=1
else
    USER_TOKEN=$(curl -sf -X POST "$URL/api/console/token" -d '{"username":"schemathesis"}' |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
    SERVICE_TOKEN=$("$PARLEY_BIN" token svc --service --data-dir "$DATA")
    # Every check but positive_data_acceptance: the WebSocket paths answer a
    # plain GET with 426 (documented), and valid ids mostly name nothing.
    run_st() { # name token extra...
        local name=$1 token=$2; shift 2
        # From the temp dir: schemathesis keeps its example cache in the working directory.
        if (cd "$ST_DIR" && "$VENV/bin/st" run "$URL/api/openapi.json" -H "Authorization: Bearer $token" \
            --checks all --exclude-checks positive_data_acceptance \
            --max-examples 40 --request-timeout 10 --generation-deterministic "$@") > "$OUT.st" 2>&1; then
            st_pass=$((st_pass + 1)); echo "ok - schemathesis $name"
        else
            st_fail=$((st_fail + 1)); echo "not ok - schemathesis $name"; cat "$OUT.st"
        fi
        grep -E "generated" "$OUT.st" | tail -1
    }
    run_st "(user token, every operation)" "$USER_TOKEN"
    run_st "(service token, POST /api/notifications/)" "$SERVICE_TOKEN" \
        --include-path /api/notifications/ --include-method POST
fi
kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null
rm -rf "$DATA" "$DATA.log" "$OUT" "$OUT.st" "$ST_DIR"
step_done "schemathesis" "$st_pass" "$st_fail"

if [ "$failed_steps" -ne 0 ]; then
    echo "web: $failed_steps step(s) failed" >&2
    exit 1
fi
echo "web: all steps passed"
