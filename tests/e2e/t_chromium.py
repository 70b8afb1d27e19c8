"""Headless Chromium (Debian's /usr/bin/chromium): two RTCPeerConnections in one page,
iceTransportPolicy 'relay', the server under test as the only ICE server, a data channel
echoing 1000 messages; getStats() must show a relay<->relay selected pair.

The page is served by a stdlib HTTP server on 127.0.0.1 and POSTs its result back, so
no DevTools client is needed. Chromium gathers no relay candidate towards a TURN server
on 127.0.0.1 unless started with --allow-loopback-in-peer-connection.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from common import Ctx, Fail, Skip

HERE = os.path.dirname(os.path.abspath(__file__))
MESSAGES = 1000
PAGE_TIMEOUT_S = 45


def find_chromium() -> str | None:
    for c in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", "chromium",
              "chromium-browser", "google-chrome"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-quic", "--disable-dev-shm-usage", "--disable-extensions",
    "--disable-default-apps", "--mute-audio", "--no-default-browser-check",
    # Keep the browser from reaching out: no pings, reports, phishing or crash
    # uploads, and every host name except the loopback literal resolves to nothing.
    "--no-pings", "--disable-domain-reliability", "--disable-breakpad",
    "--disable-client-side-phishing-detection", "--metrics-recording-only",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    # Without it Chromium gathers no relay candidate through a TURN server on loopback.
    "--allow-loopback-in-peer-connection",
]


class PageServer:
    def __init__(self, config: dict, log_path: str, page_path: str | None = None) -> None:
        self.result: dict | None = None
        self.got_result = threading.Event()
        self.logs: list[str] = []
        page = open(page_path or os.path.join(HERE, "chromium_page.html"), "rb").read()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt, *args):  # noqa: ANN001
                with open(log_path, "a") as f:
                    f.write("http: " + (fmt % args) + "\n")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the browser was closed right after the page's last POST

            def do_GET(self):  # noqa: N802
                if self.path in ("/", "/index.html"):
                    self._send(200, page, "text/html; charset=utf-8")
                elif self.path == "/config":
                    self._send(200, json.dumps(config).encode(), "application/json")
                else:
                    self._send(404, b"", "text/plain")

            def do_POST(self):  # noqa: N802
                n = min(int(self.headers.get("Content-Length", "0")), 1 << 20)
                body = self.rfile.read(n)
                if self.path == "/result":
                    try:
                        outer.result = json.loads(body)
                    except ValueError:
                        outer.result = {"error": "unparsable result: " + body[:200].decode(errors="replace")}
                    outer.got_result.set()
                elif self.path == "/log":
                    outer.logs.append(body.decode(errors="replace"))
                    with open(log_path, "a") as f:
                        f.write("page: " + body.decode(errors="replace") + "\n")
                self._send(204 if self.path in ("/result", "/log") else 404, b"", "text/plain")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def run_page(ctx: Ctx, chromium: str, credential: str, tag: str, url: str | None = None,
             flags: list[str] | None = None, prepare=None,  # noqa: ANN001
             timeout_s: float = PAGE_TIMEOUT_S, messages: int = MESSAGES) -> dict:
    """Serve the page, run Chromium on it, return the result the page POSTed.

    url: the one ICE server URL (default turn:HOST:PORT?transport=udp); flags: the
    Chromium flags (default CHROMIUM_FLAGS); prepare(profile, env): called before the
    start with the fresh profile folder and the environment to adjust (HOME, say)."""
    srv = ctx.server
    log_path = os.path.join(ctx.workroot, f"chromium{tag}.log")
    config = {"url": url or f"turn:{srv.listen_ip}:{srv.port}?transport=udp",
              "username": ctx.creds.user,
              "credential": credential, "messages": messages,
              "timeoutMs": int(timeout_s * 1000)}
    page = PageServer(config, log_path)
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=ctx.workroot)
    # Chromium leaves org.chromium.Chromium.* folders in TMPDIR: keep them in ours.
    tmp = os.path.join(profile, "tmp")
    os.makedirs(tmp)
    env = dict(os.environ, TMPDIR=tmp)
    if prepare is not None:
        prepare(profile, env)
    argv = [chromium, *(CHROMIUM_FLAGS if flags is None else flags),
            f"--user-data-dir={profile}", f"http://127.0.0.1:{page.port}/"]
    proc = None
    try:
        with open(log_path, "ab") as log:
            log.write((" ".join(argv) + "\n").encode())
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.monotonic() + timeout_s + 30
        while not page.got_result.wait(0.2):
            if proc.poll() is not None:
                raise Fail(f"chromium exited with status {proc.returncode} before the page "
                           f"reported (see {log_path})")
            if time.monotonic() > deadline:
                raise Fail(f"no result from the page within {timeout_s + 30:.0f}s; page log: "
                           + " | ".join(page.logs[-10:]))
        r = page.result or {}
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
    return r


def relay_data_channel(ctx: Ctx, chromium: str, url: str | None = None,
                       relay_protocol: str = "udp", tag: str = "", messages: int = MESSAGES,
                       **page_kw) -> str:
    """The page with one ICE server (url; default TURN over UDP): relay candidates only,
    1000 messages echoed, relay<->relay selected on both sides, and every local relay
    candidate's relayProtocol (client<->server transport) equal to relay_protocol."""
    r = run_page(ctx, chromium, ctx.creds.password, tag, url=url, messages=messages, **page_kw)
    summary = json.dumps({k: r.get(k) for k in ("echoed", "error", "gathered", "iceErrors",
                                                 "pair1", "pair2", "ice1", "ice2",
                                                 "local1", "local2")})
    if r.get("error"):
        raise Fail(f"page: {r['error']}\n{summary}")
    if r.get("echoed") != messages:
        raise Fail(f"echoed {r.get('echoed')} of {messages}\n{summary}")
    for name in ("pc1", "pc2"):
        types = set((r.get("gathered") or {}).get(name) or [])
        if types != {"relay"}:
            raise Fail(f"{name} gathered candidate types {sorted(types)}, expected relay only\n{summary}")
    # Chromium 156 reports relayProtocol; an older one that leaves it out passes for UDP.
    ok_protocols = (None, "udp") if relay_protocol == "udp" else (relay_protocol,)
    for key in ("pair1", "pair2"):
        p = r.get(key) or {}
        lt = (p.get("local") or {}).get("type")
        rt = (p.get("remote") or {}).get("type")
        if (lt, rt) != ("relay", "relay"):
            raise Fail(f"{key}: selected pair {lt}<->{rt}, expected relay<->relay\n{summary}")
        if (p.get("local") or {}).get("relayProtocol") not in ok_protocols:
            raise Fail(f"{key}: relayProtocol {(p.get('local') or {}).get('relayProtocol')}, "
                       f"expected {relay_protocol}\n{summary}")
    for key in ("local1", "local2"):
        for c in r.get(key) or []:
            if c.get("type") != "relay" or c.get("relayProtocol") not in ok_protocols:
                raise Fail(f"{key}: local candidate {c}, expected relay over {relay_protocol}")
    p1 = r["pair1"]
    ua = r.get("userAgent", "")
    ver = ua.split("Chrome/")[1].split()[0] if "Chrome/" in ua else "?"
    proto = p1["local"].get("relayProtocol")
    return (f"{messages} messages echoed, selected pair relay<->relay "
            f"{p1['local']['address']}:{p1['local']['port']} <-> "
            f"{p1['remote']['address']}:{p1['remote']['port']}"
            + (f", relayProtocol {proto}" if proto else "") + f" (Chromium {ver})")


def wrong_credential(ctx: Ctx, chromium: str, url: str | None = None, tag: str = "-wrongpass",
                     **page_kw) -> str:
    r = run_page(ctx, chromium, "not-" + ctx.creds.password, tag, url=url, **page_kw)
    if r.get("echoed") or any((r.get("gathered") or {}).values()):
        raise Fail(f"relay candidates or data with a wrong credential: {json.dumps(r)[:800]}")
    errors = r.get("iceErrors") or []
    if not any(e.split(": ", 1)[-1].startswith("401") for e in errors):
        raise Fail(f"expected icecandidateerror 401, got {errors}")
    return f"no relay candidate; icecandidateerror: {errors[0]}"


UPGRADE_MESSAGES = 150000


def across_upgrade(ctx: Ctx, chromium: str) -> str:
    """A relay-only data channel (150,000 messages, several seconds) while turnpike serve is
    upgraded (SIGUSR2: the binary at its path takes over its sockets and allocations):
    every message is echoed, and the new process serves on."""
    srv = ctx.server
    if "serve" not in srv.argv:
        raise Skip("the server under test is not `turnpike serve`")
    old = srv.proc.pid
    handed: dict = {}

    def upgrade() -> None:
        # Once the page has started echoing (Chromium starts and ICE completes in
        # about a second here).
        time.sleep(3)
        os.kill(old, signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with open(srv.log_path, "rb") as f:
                text = f.read().decode(errors="replace")
            if "turnpike handed over to pid " in text:
                pid = int(text.split("turnpike handed over to pid ")[1].split()[0])
                srv.successor = pid
                handed["pid"] = pid
                handed["at"] = time.monotonic()
                return
            time.sleep(0.05)

    t = threading.Thread(target=upgrade, daemon=True)
    t.start()
    detail = relay_data_channel(ctx, chromium, tag="-upgrade", messages=UPGRADE_MESSAGES,
                                timeout_s=90)
    ended = time.monotonic()
    t.join(timeout=40)
    if "pid" not in handed:
        raise Fail("the upgrade did not happen during the call\n" + srv.log_tail())
    if ended - handed["at"] < 0.3:
        raise Fail(f"the call went on only {ended - handed['at']:.1f}s after the upgrade: "
                   "it did not clearly cross it (raise UPGRADE_MESSAGES)")
    if srv.proc.poll() is None:
        raise Fail("the old process still runs after the upgrade")
    return (f"{detail}; served from pid {old}, then pid {handed['pid']} "
            f"({ended - handed['at']:.1f}s of the call after the hand-over)")


def run(ctx: Ctx) -> None:
    chromium = find_chromium()
    if chromium is None:
        raise Skip("chromium not installed (tests/scripts/setup-deps.sh)")
    ctx.check("chromium: relay-only data channel echoes 1000 messages, relay<->relay pair",
              lambda: relay_data_channel(ctx, chromium))
    ctx.check("chromium: wrong credential gathers no relay candidate (401)",
              lambda: wrong_credential(ctx, chromium))
    ctx.check("chromium: the data channel echoes on while serve is upgraded (SIGUSR2)",
              lambda: across_upgrade(ctx, chromium))
