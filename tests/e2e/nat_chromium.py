"""Headless Chromium through a TURN server behind a 1:1 NAT (run by tests/tests/nat.rs
with `ip netns exec` in its "internet" namespace).

The page of t_chromium.py: two RTCPeerConnections, relay only, the server's public
address as the one ICE server, a data channel echoing 1000 messages. Passes when every
relay candidate gathered has the expected (public) address, the selected pair is
relay<->relay on both sides and every message came back.

    nat_chromium.py URL USER PASSWORD EXPECTED_IP WORKDIR

Exit status: 0 pass, 1 fail (the reason on stderr), 77 Chromium missing. The last line
on stdout is a JSON summary.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from t_chromium import CHROMIUM_FLAGS, MESSAGES, PageServer, find_chromium  # noqa: E402

PAGE_TIMEOUT_S = 45


def run_page(chromium: str, url: str, user: str, password: str, workdir: str) -> dict:
    log_path = os.path.join(workdir, "chromium-nat.log")
    config = {"url": url, "username": user, "credential": password, "messages": MESSAGES,
              "timeoutMs": PAGE_TIMEOUT_S * 1000}
    page = PageServer(config, log_path)
    # Short paths: Chromium's singleton socket lives under TMPDIR, and a Unix socket
    # path has at most 107 bytes.
    profile = tempfile.mkdtemp(prefix="p", dir=workdir)
    tmp = tempfile.mkdtemp(prefix="t", dir=workdir)
    env = dict(os.environ, TMPDIR=tmp, HOME=profile)
    argv = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
            f"http://127.0.0.1:{page.port}/"]
    proc = None
    try:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.monotonic() + PAGE_TIMEOUT_S + 30
        while not page.got_result.wait(0.2):
            if proc.poll() is not None:
                return {"error": f"chromium exited with {proc.returncode} (see {log_path})"}
            if time.monotonic() > deadline:
                return {"error": "no result from the page; page log: " + " | ".join(page.logs[-10:])}
        return page.result or {}
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        page.close()
        shutil.rmtree(profile, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


def check(r: dict, expected_ip: str) -> str | None:
    """Why the run failed, or None."""
    if r.get("error"):
        return f"page: {r['error']}"
    if r.get("echoed") != MESSAGES:
        return f"echoed {r.get('echoed')} of {MESSAGES}"
    candidates = (r.get("local1") or []) + (r.get("local2") or [])
    if not candidates:
        return "no local candidate in the stats"
    for c in candidates:
        if c.get("type") != "relay" or c.get("address") != expected_ip:
            return f"local candidate {c}: expected a relay candidate at {expected_ip}"
    for key in ("pair1", "pair2"):
        p = r.get(key) or {}
        local, remote = p.get("local") or {}, p.get("remote") or {}
        if (local.get("type"), remote.get("type")) != ("relay", "relay"):
            return f"{key}: selected pair {local.get('type')}<->{remote.get('type')}"
        if local.get("address") != expected_ip or remote.get("address") != expected_ip:
            return f"{key}: selected pair {local.get('address')}<->{remote.get('address')}"
    return None


def main() -> int:
    url, user, password, expected_ip, workdir = sys.argv[1:6]
    chromium = find_chromium()
    if chromium is None:
        print("chromium not installed (tests/scripts/setup-deps.sh)", file=sys.stderr)
        return 77
    r = run_page(chromium, url, user, password, workdir)
    why = check(r, expected_ip)
    summary = {k: r.get(k) for k in ("echoed", "error", "gathered", "iceErrors", "pair1",
                                      "pair2", "local1", "local2")}
    print(json.dumps(summary))
    if why:
        print(why, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
