#!/usr/bin/env bash
# The project's test command: installs what the tests need (idempotently), then runs
# every test of the workspace, the end-to-end tests against third-party clients included.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
cargo test --workspace --all-targets --locked -- --test-threads=2
