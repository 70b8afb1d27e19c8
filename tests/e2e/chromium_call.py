"""A headless Chromium call through one TURN server, both ends relay-only on it (run by
tests/tests/xdp.rs with `ip netns exec` in the clients' namespace).

The page (chromium_call_page.html): two RTCPeerConnections, the server as the one ICE
server, each sending the other audio and video from Chromium's fake capture devices
for SECONDS. Passes when both selected pairs are relay<->relay at EXPECTED_IP and each
end received audio and video (frames decoded).

    chromium_call.py URL USER PASSWORD EXPECTED_IP SECONDS WORKDIR

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

from t_chromium import CHROMIUM_FLAGS, PageServer, find_chromium  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MEDIA_FLAGS = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
               "--autoplay-policy=no-user-gesture-required"]


def run_page(chromium: str, url: str, user: str, password: str, seconds: int,
             workdir: str) -> dict:
    log_path = os.path.join(workdir, "chromium-call.log")
    config = {"url": url, "username": user, "credential": password, "seconds": seconds}
    page = PageServer(config, log_path, os.path.join(HERE, "chromium_call_page.html"))
    # Short paths: Chromium's singleton socket lives under TMPDIR (at most 107 bytes).
    profile = tempfile.mkdtemp(prefix="p", dir=workdir)
    tmp = tempfile.mkdtemp(prefix="t", dir=workdir)
    env = dict(os.environ, TMPDIR=tmp, HOME=profile)
    argv = [chromium, *CHROMIUM_FLAGS, *MEDIA_FLAGS, f"--user-data-dir={profile}",
            f"http://127.0.0.1:{page.port}/"]
    proc = None
    try:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.monotonic() + seconds + 60
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
    """Why the call failed, or None."""
    if r.get("error"):
        return f"page: {r['error']}"
    for key in ("pair1", "pair2"):
        p = r.get(key) or {}
        local, remote = p.get("local") or {}, p.get("remote") or {}
        if (local.get("type"), remote.get("type")) != ("relay", "relay"):
            return f"{key}: selected pair {local.get('type')}<->{remote.get('type')}"
        if local.get("address") != expected_ip or remote.get("address") != expected_ip:
            return f"{key}: selected pair {local.get('address')}<->{remote.get('address')}"
    for key in ("media1", "media2"):
        m = r.get(key) or {}
        for kind in ("in_audio", "in_video"):
            if (m.get(kind) or {}).get("packets", 0) < 50:
                return f"{key}: {kind} {m.get(kind)}"
        if (m.get("in_video") or {}).get("framesDecoded", 0) < 10:
            return f"{key}: video frames decoded {m.get('in_video')}"
    return None


def main() -> int:
    url, user, password, expected_ip, seconds, workdir = sys.argv[1:7]
    chromium = find_chromium()
    if chromium is None:
        print("chromium not installed (tests/scripts/setup-deps.sh)", file=sys.stderr)
        return 77
    r = run_page(chromium, url, user, password, int(seconds), workdir)
    why = check(r, expected_ip)
    print(json.dumps({k: r.get(k) for k in ("error", "ice1", "ice2", "iceErrors", "pair1",
                                            "pair2", "media1", "media2")}))
    if why:
        print(why, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
