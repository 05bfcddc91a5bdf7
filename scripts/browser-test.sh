#!/usr/bin/env bash
# The console in a real browser: starts `demo` (with its load of simulated dashboards) on
# loopback ports the system picks, loads the console in headless Chromium (screenshot kept at
# target/console.png, DOM after the script has polled and drawn) and as served (the figures
# the server wrote into the HTML, what a browser without JavaScript shows), and checks that the page shows the
# budget figures /status.json reports for the same second, and never the demo token.
#
# Chromium and jq come from Debian's packages, installed when missing (as root). Without apt
# or root the test is skipped with a message, except under CI (CI set), where it fails.
set -euo pipefail
cd "$(dirname "$0")/.."

skip_or_fail() {
  if [ -n "${CI:-}" ]; then
    echo "browser test: $1 (CI is set: failing)" >&2
    exit 1
  fi
  echo "browser test SKIPPED: $1" >&2
  exit 0
}

browser=""
for candidate in chromium chromium-browser; do
  if command -v "$candidate" >/dev/null 2>&1; then browser=$candidate; break; fi
done
missing=""
[ -n "$browser" ] || missing="chromium"
command -v jq >/dev/null 2>&1 || missing="$missing jq"
if [ -n "$missing" ]; then
  command -v apt-get >/dev/null 2>&1 || skip_or_fail "needs$missing and apt-get is not available"
  [ "$(id -u)" = 0 ] || skip_or_fail "needs$missing: install as root, e.g. 'sudo apt-get install -y$missing'"
  apt-get update
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing
  browser=chromium
fi

target=${CARGO_TARGET_DIR:-target}
cargo build --bin kommo-fanout
mkdir -p target
work=$(mktemp -d)
demo_pid=""
cleanup() {
  if [ -n "$demo_pid" ]; then kill "$demo_pid" 2>/dev/null || true; wait "$demo_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

"$target/debug/kommo-fanout" demo --sim-listen 127.0.0.1:0 --listen 127.0.0.1:0 \
  --admin-listen 127.0.0.1:0 --leads 5000 >"$work/demo.out" 2>"$work/demo.err" &
demo_pid=$!

# Polls `$1` (a command) every 200 ms until it succeeds; fails naming `$2` after 60 s.
eventually() {
  for _ in $(seq 300); do
    if eval "$1"; then return 0; fi
    sleep 0.2
  done
  echo "browser test: $2: not within 60 s" >&2
  cat "$work/demo.err" >&2
  exit 1
}

eventually 'grep -q "^  console:" "$work/demo.out"' "the demo prints the console's address"
console=$(sed -n 's/^  console: *//p' "$work/demo.out" | head -n1)
# The console's address is among the demo's first lines.
head -n3 "$work/demo.out" | grep -q "^  console:" || { echo "console not among the first lines" >&2; exit 1; }
status() { curl -sf "${console}status.json"; }
# The demo's dashboards have spent some of the budget, and the chart has ten seconds to show.
eventually 'status | jq -e "([.history.sent[]] | add > 0) and (.history.at | length >= 10)" >/dev/null' \
  "the demo's load reaches the upstream"

chrome() {
  # --no-sandbox: Chromium refuses to run as root with its sandbox (CI containers run as root).
  "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,1400 \
    --virtual-time-budget=4000 "$@" 2>>"$work/chromium.err"
}

chrome --screenshot="$PWD/target/console.png" "$console"
[ -s target/console.png ] || { echo "no screenshot" >&2; cat "$work/chromium.err" >&2; exit 1; }
chrome --dump-dom "$console" >"$work/live.html"
json=$(status)

# `key value` lines of the page's budget figures.
figures() { grep -o 'data-k="budget\.[a-z0-9_]*">[^<]*' "$1" | sed 's/^data-k="budget\.\([a-z0-9_]*\)">/\1 /'; }
# A JSON value as the page prints it (the page's `fmt`).
printed() { jq -r "$1 | if . == null then \"\u2013\" elif . == true then \"yes\" elif . == false then \"no\" else tostring end" <<<"$json"; }

check_page() { # check_page FILE WHAT
  local file=$1 what=$2 at row n=0
  at=$(figures "$file" | sed -n 's/^at //p')
  [ -n "$at" ] || { echo "$what: no budget figures in the page" >&2; exit 1; }
  # The row of that second in /status.json's history (read after the page, so it holds it).
  row=$(jq -r --argjson at "$at" '.history.at | index($at) // empty' <<<"$json")
  [ -n "$row" ] || { echo "$what: second $at not in the history" >&2; exit 1; }
  while read -r key value; do
    case $key in
      at) want=$at ;;
      slots_taken | queued) want=$(printed ".history.$key[$row]") ;;
      sent_last_s) want=$(printed ".history.sent[$row]") ;;
      limit | window_s | upstream_429_total | blocks_total | paused_for_429 | block_cooldown_remaining_s) want=$(printed ".budget.$key") ;;
      *) continue ;;
    esac
    if [ "$value" != "$want" ]; then
      echo "$what: budget.$key is '$value' on the page, '$want' in /status.json" >&2
      exit 1
    fi
    n=$((n + 1))
  done < <(figures "$file")
  [ "$n" -ge 8 ] || { echo "$what: only $n budget figures compared" >&2; exit 1; }
  if grep -q 'demo-token' "$file"; then echo "$what: the page holds the demo token" >&2; exit 1; fi
  echo "browser test: $what shows the budget of second $at as /status.json does ($n figures)"
}

# With JavaScript: the script has polled and drawn the chart.
grep -q 'data-drawn="js"' "$work/live.html" || { echo "the chart was not drawn by the script" >&2; exit 1; }
grep -q 'id="state">live' "$work/live.html" || { echo "the page is not live" >&2; exit 1; }
check_page "$work/live.html" "the live page"

# Without JavaScript: the HTML as the server sends it, before any script runs (headless
# Chromium's --dump-dom itself needs scripts, so the page is read as a browser receives it).
curl -sf "$console" >"$work/static.html"
json=$(status)
grep -q 'data-drawn="server"' "$work/static.html" || { echo "no server-drawn chart" >&2; exit 1; }
grep -q '<polyline' "$work/static.html" || { echo "the static chart has no line" >&2; exit 1; }
check_page "$work/static.html" "the page without JavaScript"
if grep -q 'demo-token' <<<"$json"; then echo "/status.json holds the demo token" >&2; exit 1; fi
echo "browser test: passed; screenshot at target/console.png"
