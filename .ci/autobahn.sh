#!/usr/bin/env bash
# RFC 6455 conformance: Autobahn|Testsuite's fuzzing client (cases 1-7, 9,
# 10; 12 and 13 are permessage-deflate, which parley does not negotiate)
# against examples/echo.rs, which runs parley's own socket engine with an
# echo handler. Prints the counts by behaviour and fails on any case that is
# not OK, NON-STRICT or INFORMATIONAL (for the case or for its close).
#
# Needs Python 2.7 from pyenv (autobahntestsuite runs on nothing newer);
# installs autobahntestsuite and its pinned dependencies into
# target/autobahn-py once. The HTML report lands in target/autobahn/report.
set -euo pipefail
cd "$(dirname "$0")/.."

PYROOT="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
PY="$PYROOT/versions/2.7.18/bin/python"
if [ ! -x "$PY" ]; then
  echo "autobahn: no Python 2.7.18 at $PY (pyenv install 2.7.18)" >&2
  exit 1
fi
export PYTHONUSERBASE="$PWD/target/autobahn-py"
WSTEST="$PYTHONUSERBASE/bin/wstest"
if ! "$WSTEST" --autobahnversion >/dev/null 2>&1; then
  # The wheel pins every dependency to a version that still supports 2.7.
  "$PY" -m pip install --user --quiet --disable-pip-version-check autobahntestsuite==25.10.1
fi

cargo build --release --quiet --example echo
out=target/autobahn
rm -rf "$out/report"
mkdir -p "$out"
target/release/examples/echo 127.0.0.1:0 >"$out/echo.log" 2>&1 &
echo_pid=$!
trap 'kill "$echo_pid" 2>/dev/null || true' EXIT
url=""
for _ in $(seq 1 100); do
  url="$(sed -n 's/^echo listening on \(ws:.*\)$/\1/p' "$out/echo.log")"
  [ -n "$url" ] && break
  sleep 0.1
done
[ -n "$url" ] || { echo "autobahn: the echo server did not start:" >&2; cat "$out/echo.log" >&2; exit 1; }

cat >"$out/fuzzingclient.json" <<JSON
{
  "outdir": "./report",
  "servers": [{"agent": "parley", "url": "$url"}],
  "cases": ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*"],
  "exclude-cases": [],
  "exclude-agent-cases": {}
}
JSON
started=$(date +%s)
(cd "$out" && timeout 900 "$WSTEST" -m fuzzingclient -s fuzzingclient.json >wstest.log 2>&1) || {
  echo "autobahn: wstest failed or timed out; its log:" >&2
  tail -n 40 "$out/wstest.log" >&2
  exit 1
}
echo "autobahn: wstest ran in $(( $(date +%s) - started )) s"

python3 - "$out/report/index.json" <<'PY'
import collections, json, sys
cases = json.load(open(sys.argv[1]))["parley"]
good = {"OK", "NON-STRICT", "INFORMATIONAL"}
by, by_close, bad = collections.Counter(), collections.Counter(), []
for case, r in sorted(cases.items(), key=lambda kv: [int(p) for p in kv[0].split(".")]):
    by[r["behavior"]] += 1
    by_close[r["behaviorClose"]] += 1
    if r["behavior"] not in good or r["behaviorClose"] not in good:
        bad.append("%s: %s (close %s, code %s)" % (case, r["behavior"], r["behaviorClose"], r.get("remoteCloseCode")))
print("autobahn: %d cases" % len(cases))
print("autobahn: behaviour: " + ", ".join("%s %d" % kv for kv in sorted(by.items())))
print("autobahn: close behaviour: " + ", ".join("%s %d" % kv for kv in sorted(by_close.items())))
for line in bad:
    print("autobahn: FAILED " + line)
sys.exit(1 if bad else 0)
PY
