#!/usr/bin/env bash
# The fuzz targets on a stable toolchain (libFuzzer's coverage flags need
# nightly; see fuzz/README.md): build both targets, then run each target's
# oracle over every stored corpus input (fuzz/tests/corpus.rs). The fuzz
# crate is its own workspace; its build shares nothing with the root one, so
# it gets its own target dir. libfuzzer-sys compiles libFuzzer with a C++
# compiler, installed here if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v c++ >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq g++ >/dev/null
fi

(cd fuzz && cargo fmt -- --check)
cargo clippy --manifest-path fuzz/Cargo.toml --target-dir target/fuzz --all-targets -- -D warnings
cargo build --manifest-path fuzz/Cargo.toml --target-dir target/fuzz --bins
cargo test --manifest-path fuzz/Cargo.toml --target-dir target/fuzz
