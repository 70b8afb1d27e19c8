#!/usr/bin/env bash
# End-to-end tests of a TURN server with third-party clients (coturn's uclient, aioice,
# headless Chromium, a stdlib STUN client). See tests/e2e/README.md.
#
#   tests/e2e/run.sh [GROUP ...]   GROUP: uclient aioice chromium policy
#                                         uclient-tcp aioice-tcp chromium-tcp (TURN over TCP/TLS)
#
# The server under test is started from $TURN_SERVER_CMD (default: coturn's turnserver).
# Dependencies are installed first by tests/scripts/setup-deps.sh (idempotent, quick
# when already done); set E2E_SKIP_SETUP=1 to skip that step.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
if [ "${E2E_SKIP_SETUP:-0}" != 1 ]; then
  "$HERE/../scripts/setup-deps.sh"
fi
exec "$HERE/.venv/bin/python" "$HERE/run.py" "$@"
