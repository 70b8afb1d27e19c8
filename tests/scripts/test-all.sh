#!/usr/bin/env bash
# The project's test command. Installs what the tests need (idempotently: coturn's
# tools, Chromium, a Python venv with aioice), then runs every test of the workspace and
# the end-to-end suite with third-party clients against the real binary, on both I/O
# backends.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"

tests/scripts/setup-deps.sh

cargo build --workspace --locked --bins
cargo test --workspace --locked -- --test-threads=2

bin="$PWD/target/debug/turnpike"
common="--listen {listen_ip}:{port} --listen-tcp {listen_ip}:{port} --listen-tls {listen_ip}:{tls_port} --tls-cert {tls_cert} --tls-key {tls_key} --relay-ports {relay_min}-{relay_max} --realm {realm} --user {user}:{password} --grpc-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --workers 2 --legacy-channel-numbers"
for backend in uring mmsg; do
  echo "== end-to-end suite, io backend: $backend =="
  TURN_SERVER_CMD="$bin serve $common --io-backend $backend --allow-peer 127.0.0.0/8" \
  TURN_SERVER_CMD_DENY_LOOPBACK="$bin serve $common --io-backend $backend" \
  E2E_SKIP_SETUP=1 tests/e2e/run.sh
done
# The front door (issue #23): the TLS and TCP listeners share their ports with a web
# backend (here one that is down: web connections are refused cleanly); coturn's
# uclient (-t, -t -S), aioice over TCP and TLS, and Chromium's TURN and TURNS must go
# through the demux to TURN unchanged. nginx and Chromium loading a page through the
# same ports are tests/tests/front_door.rs (in the cargo test run above).
echo "== end-to-end suite through the front door (shared ports, web backend down) =="
TURN_SERVER_CMD="$bin serve $common --io-backend uring --allow-peer 127.0.0.0/8 --https-backend 127.0.0.1:9 --http-backend 127.0.0.1:9 --backend-proxy-protocol" \
TURN_SERVER_CMD_DENY_LOOPBACK="$bin serve $common --io-backend uring" \
E2E_SKIP_SETUP=1 tests/e2e/run.sh uclient-tcp aioice-tcp chromium-tcp
