#!/usr/bin/env bash
# The quick test path for newcomers: the whole workspace with `cargo test`, as any user,
# with nothing installed beyond Rust (and a C compiler for ring). Suites that need what
# this machine may not have (root for network namespaces, raw sockets and XDP; etcd;
# coturn's tools; libfaketime) report themselves skipped instead of failing; the list is
# printed at the end, with the reasons. The full run, which installs all of that and fails
# rather than skips, is tests/scripts/test-all.sh (what CI runs).
set -uo pipefail
cd "$(dirname "$0")/../.."
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --workspace -- --nocapture --test-threads=2 >"$log" 2>&1
status=$?
grep -E '^test result|^test .* FAILED|panicked at' "$log"
echo "== skipped, and why =="
grep -hoiE '(skip|skipped): .*' "$log" | sort | uniq -c || echo "(nothing skipped)"
exit "$status"
