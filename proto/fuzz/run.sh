#!/usr/bin/env bash
# Builds and runs the `parse` fuzz target on the stable toolchain.
#
#   proto/fuzz/run.sh [SECONDS] [LIBFUZZER_ARGS...]
#
# SECONDS defaults to 60. Installs what it needs (cargo-fuzz, a C++ compiler for
# libFuzzer) if missing. New inputs go to corpus/parse (gitignored), crashes to
# artifacts/parse; seeds/ is read but never written. Exits non-zero if the target crashed.
# Honours CARGO_TARGET_DIR and CARGO_BUILD_JOBS; pin to a core with `taskset -c 1`.
set -euo pipefail
cd "$(dirname "$0")"

duration="${1:-60}"
shift || true

# Stable only: `--sanitizer none` keeps cargo-fuzz's flags to stable ones (sancov
# instrumentation via -Cpasses and -Cllvm-args, --cfg fuzzing); every sanitizer needs -Z.
if command -v rustup >/dev/null; then
    export RUSTUP_TOOLCHAIN="${RUSTUP_TOOLCHAIN:-stable}"
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --version '^0.13' --locked
fi
if ! command -v c++ >/dev/null; then
    # libfuzzer-sys compiles libFuzzer's C++ sources.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && apt-get install -y -qq g++
    else
        echo "run.sh: a C++ compiler (c++) is needed to build libFuzzer" >&2
        exit 1
    fi
fi

mkdir -p corpus/parse
exec cargo fuzz run --sanitizer none parse corpus/parse seeds -- \
    -max_total_time="$duration" -dict=stun.dict -print_final_stats=1 "$@"
