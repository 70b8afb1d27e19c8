#!/usr/bin/env bash
# turnpike vs coturn vs the bare forwarder, from a clean clone, in one command:
#
#   bench/compare.sh                     # the coturn comparison (about 10 minutes)
#   bench/compare.sh --suite dataplane   # turnpike's backends and GSO vs the forwarder
#   bench/compare.sh --suite streams     # TURN over TCP and TLS vs coturn (about 12 minutes)
#   bench/compare.sh --reps 1 --sizes 100   # any other turnpike-bench compare flag
#
# Builds the release binaries (turnpike, turnpike-bench), installs coturn if it is
# missing (without starting its service), then runs `turnpike-bench compare`, which
# pins the servers to cpu 0 and the load generator to cpu 1 and writes
# bench/out/{compare,dataplane}.{md,json} and the SVG charts. Traffic is loopback only.
#
# Environment: CARGO_TARGET_DIR (default target/), JOBS (cargo -j, default 1 so that a
# shared machine stays usable), COPY_RESULTS=1 to copy the charts to bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(nproc)" -lt 2 ]; then
  echo "compare.sh: needs 2 CPUs (servers on cpu 0, the generator on cpu 1)" >&2
  exit 1
fi

if ! command -v turnserver >/dev/null 2>&1; then
  echo "compare.sh: installing coturn" >&2
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  # Keep the package scripts from starting coturn's own service on 3478.
  policy=/usr/sbin/policy-rc.d
  saved=""
  if [ -e "$policy" ]; then saved="$(mktemp)"; $SUDO cp -p "$policy" "$saved"; fi
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod 755 "$policy"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends coturn >/dev/null
  if [ -n "$saved" ]; then $SUDO cp -p "$saved" "$policy"; rm -f "$saved"; else $SUDO rm -f "$policy"; fi
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now coturn >/dev/null 2>&1 || true
  fi
fi
for tool in taskset turnserver; do
  command -v "$tool" >/dev/null || { echo "compare.sh: $tool not found" >&2; exit 1; }
done

TARGET="${CARGO_TARGET_DIR:-target}"
cargo build --release -j "${JOBS:-1}" -p turnpike -p turnpike-bench

mkdir -p bench/out
"$TARGET/release/turnpike-bench" compare --turnpike "$TARGET/release/turnpike" --out bench/out "$@" &
BENCH=$!
# Interrupted: stop the servers the harness started (its children), then the harness.
cleanup() {
  pkill -TERM -P "$BENCH" 2>/dev/null || true
  kill -TERM "$BENCH" 2>/dev/null || true
  exit 130
}
trap cleanup INT TERM
wait "$BENCH"

if [ "${COPY_RESULTS:-0}" = 1 ]; then
  mkdir -p bench/results
  cp bench/out/*.svg bench/results/
  echo "compare.sh: charts copied to bench/results/" >&2
fi
