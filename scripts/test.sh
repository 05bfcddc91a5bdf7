#!/usr/bin/env bash
# Runs every test of the project on a fresh machine: formatting, lints, unit, property and
# end-to-end tests; the benchmarks are built so they keep compiling. Installs what the tests
# need when it is missing. Lints and tests cover the workspace: the proxy and the simulator
# (`sim/`, with its own unit tests).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is required (https://rustup.rs)" >&2
  exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true

# The Redis tests start a real redis-server (they fail, never skip, without one), and CI checks
# that docker-compose.yml parses with Debian's docker-compose (no container engine runs here).
# Install each from Debian's packages when it is missing; that needs root.
apt_updated=""
need_package() { # need_package COMMAND PACKAGE
  if command -v "$1" >/dev/null 2>&1; then
    return
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "$1 is required (Debian package $2): install it as root, e.g. 'sudo apt-get install -y $2'" >&2
    exit 1
  fi
  if [ -z "$apt_updated" ]; then
    apt-get update
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$2"
}
need_package redis-server redis-server
need_package docker-compose docker-compose
docker-compose -f docker-compose.yml config -q
docker-compose -f docker-compose.yml --profile monitoring config -q

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The benchmarks build in their own (release) profile, as `cargo bench` runs them; not run here.
cargo bench --no-run

# The tests, then one closing line that sums every runner's results.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --doc 2>&1 | tee "$log"
cargo test --workspace --all-targets 2>&1 | tee -a "$log"
# The fan-out, relay and pass-through tests again against a simulator that spells its JSON as
# PHP does (escaped slashes, `\u0026`-style escapes) and as a pretty-printer does.
for style in php pretty; do
  KOMMO_FANOUT_TEST_JSON_STYLE=$style cargo test --test e2e -- fanout:: passthrough:: 2>&1 | tee -a "$log"
done
# The console in headless Chromium against a running demo (installs Chromium and jq from
# Debian's packages when missing; screenshot at target/console.png).
scripts/browser-test.sh 2>&1 | tee -a "$log"
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
