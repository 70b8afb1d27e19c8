#!/usr/bin/env python3
"""End-to-end tests of a TURN server with third-party clients.

    run.py [--list] [--self-test] [-v] [GROUP ...]
        GROUP: uclient aioice chromium policy uclient-tcp aioice-tcp chromium-tcp

Each group gets a fresh server started from TURN_SERVER_CMD (see server.py and
README.md); every test prints PASS/FAIL/SKIP with its time, the run ends with a line
"N passed, N failed, N skipped" and exits 1 if anything failed, or, when the
environment has CI=true (or 1, yes, on), if anything was skipped.
"""

from __future__ import annotations

import argparse
import doctest
import importlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402
from common import Ctx, Fail, Skip, env_flag, summarize  # noqa: E402
from pki import make_pki  # noqa: E402
from server import Creds, ServerUnderTest, server_templates, template_fields  # noqa: E402

# group name -> module; each module has run(ctx) and uses ctx.server (loopback allowed)
GROUPS = {
    "uclient": "t_uclient",
    "aioice": "t_aioice",
    "chromium": "t_chromium",
    "policy": "t_policy",
    "uclient-tcp": "t_uclient_tcp",
    "aioice-tcp": "t_aioice_tcp",
    "chromium-tcp": "t_chromium_tcp",
}


def run_group(ctx: Ctx, g: str, allow_cmd: str) -> None:
    """One group against a fresh server (loopback peers allowed)."""
    mod = importlib.import_module(GROUPS[g])
    t0 = time.monotonic()
    if getattr(mod, "NEEDS_TLS", False) and "tls_port" not in template_fields(allow_cmd):
        ctx.record(g, "SKIP", 0.0, "the server template has no {tls_port}: TURN over "
                   "TCP/TLS is not configured (see README.md)")
        return
    srv = ServerUnderTest(allow_cmd, g, ctx.workroot, ctx.creds, pki=ctx.pki)
    ctx.server = srv

    def still_alive() -> None:
        if not srv.alive():
            raise Fail(f"server exited with status {srv.proc.returncode} during the tests\n"
                       + srv.log_tail())

    try:
        if not ctx.check(f"{g}: server starts and answers STUN Binding", srv.start):
            return
        try:
            mod.run(ctx)
        except Skip as e:
            ctx.record(g, "SKIP", time.monotonic() - t0, str(e))
        except Exception as e:  # noqa: BLE001 - a group that breaks is a failure
            ctx.record(g, "FAIL", time.monotonic() - t0, f"{type(e).__name__}: {e}")
        ctx.check(f"{g}: server still running after the tests", still_alive)
    finally:
        srv.stop()
        print(f"e2e: group {g} took {time.monotonic() - t0:.1f}s", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("groups", nargs="*", help="groups to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the groups and exit")
    ap.add_argument("--self-test", action="store_true",
                    help="only check the runner's own summary logic (doctests) and exit")
    ap.add_argument("-v", "--verbose", action="store_true", help="print details of passing tests")
    args = ap.parse_args()
    if args.list:
        print("\n".join(GROUPS))
        return 0
    # The exit status is what CI trusts: check its logic before every run (milliseconds).
    selftest = doctest.testmod(common)
    if selftest.failed or args.self_test:
        print(f"e2e: runner self-test: {selftest.attempted - selftest.failed}/{selftest.attempted} passed")
        return 1 if selftest.failed else 0
    groups = args.groups or list(GROUPS)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        ap.error(f"unknown group(s) {unknown}; known: {list(GROUPS)}")

    # Hard bound on the whole run (every test is bounded too; this is the backstop).
    budget = int(os.environ.get("E2E_TIMEOUT", "900"))

    class RunTimeout(BaseException):
        """Not an Exception, so no test's error handling swallows it."""

    def on_alarm(signum, frame):  # noqa: ANN001
        raise RunTimeout(f"end-to-end run exceeded E2E_TIMEOUT={budget}s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(budget)

    keep = env_flag("E2E_KEEP")
    workroot = os.environ.get("E2E_OUT") or tempfile.mkdtemp(prefix="turn-e2e-")
    os.makedirs(workroot, exist_ok=True)
    creds = Creds(
        realm=os.environ.get("TURN_REALM", "turnpike.test"),
        user=os.environ.get("TURN_USER", "e2e-user"),
        password=os.environ.get("TURN_PASSWORD", "pw-" + secrets.token_hex(8)),
    )
    allow_cmd, deny_cmd = server_templates()
    print(f"e2e: server command: {allow_cmd}", flush=True)
    print(f"e2e: deny-loopback command: {deny_cmd or '(none: 403 check skipped)'}", flush=True)
    print(f"e2e: logs in {workroot}", flush=True)

    # A fresh test CA and server certificates per run, for {tls_cert} {tls_key} {tls_ca}.
    try:
        pki = make_pki(os.path.join(workroot, "pki"))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        pki = None
        print(f"e2e: no test PKI ({e}); templates with {{tls_*}} cannot start", flush=True)
    ctx = Ctx(creds=creds, workroot=workroot, verbose=args.verbose, deny_cmd=deny_cmd, pki=pki)
    t_start = time.monotonic()
    try:
        for g in groups:
            run_group(ctx, g, allow_cmd)
    except RunTimeout as e:
        ctx.record("e2e run", "FAIL", time.monotonic() - t_start, str(e))
    signal.alarm(0)

    ci = env_flag("CI")
    line, status = summarize(ctx.results, ci)
    print(f"e2e: total {time.monotonic() - t_start:.1f}s")
    for what in ("FAIL", "SKIP") if ci else ("FAIL",):
        names = [r.name for r in ctx.results if r.status == what]
        if names:
            print(f"e2e: {'failed' if what == 'FAIL' else 'skipped'}: " + "; ".join(names))
    if status:
        print(f"e2e: logs kept in {workroot}")
    elif not keep and not os.environ.get("E2E_OUT"):
        shutil.rmtree(workroot, ignore_errors=True)
    print(line)
    return status


if __name__ == "__main__":
    sys.exit(main())
