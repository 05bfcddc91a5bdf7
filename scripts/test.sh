#!/usr/bin/env bash
# Runs every test of the project on a fresh machine: formatting, lints, unit, property and
# end-to-end tests, and a single pass of each micro-benchmark (so benchmarks keep compiling and
# running, as `cargo test --all-targets` does for criterion benches). Installs what the tests need when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is required (https://rustup.rs)" >&2
  exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
cargo test --doc
