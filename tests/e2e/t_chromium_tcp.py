"""Headless Chromium with TURN over TCP and over TLS: the page and checks of
t_chromium.py (two relay-only RTCPeerConnections, 1000 messages echoed on a data
channel, relay<->relay selected), with one ICE server:

  turn:127.0.0.1:PORT?transport=tcp        every local candidate's relayProtocol is "tcp"
  turns:turn.test:TLSPORT?transport=tcp    every local candidate's relayProtocol is "tls"

Name: --host-resolver-rules maps turn.test to 127.0.0.1 (Chromium resolves a TURN
server's name in its network service, where the rules apply; every other name still
resolves to nothing).

Trust: the run's test CA is added to an NSS database in a temporary HOME
($HOME/.pki/nssdb, `certutil -A -t C,,`), which Chromium on Linux reads for locally
trusted roots; the certificate is then verified for real, host name included. (The
other way, --ignore-certificate-errors-spki-list=<base64 SHA-256 of the SPKI>, does
apply to TURN/TLS sockets too, but it waives every error of a matching chain, the name
mismatch included, so the negative tests below could not fail: it is not used.)

Negative: TLS by IP (turns:127.0.0.1:TLSPORT: the certificate has no IP address) and a
server that presents the wrong.test certificate (a second server; a stdlib client first
shows that its TLS works for wrong.test) must give no relay candidate, only
icecandidateerror 701, within the page's bound.

Chromium's TLS ClientHello (Chromium 156): TLS 1.3 and 1.2, SNI = the URL's host name
(none for an IP), no ALPN.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess

import stunmsg
from common import Ctx, Fail, Skip
from pki import SERVER_NAME, WRONG_NAME
from server import ServerUnderTest
from t_chromium import CHROMIUM_FLAGS, find_chromium, relay_data_channel, run_page, wrong_credential

NEEDS_TLS = True  # run.py skips the group for a template without {tls_port}
NEGATIVE_TIMEOUT_S = 20

# As t_chromium's flags, with turn.test (and wrong.test) resolving to the loopback.
FLAGS = [f for f in CHROMIUM_FLAGS if not f.startswith("--host-resolver-rules=")] + [
    f"--host-resolver-rules=MAP {SERVER_NAME} 127.0.0.1, MAP {WRONG_NAME} 127.0.0.1, "
    "MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]


def trust_test_ca(ca_pem: str):  # noqa: ANN201
    """prepare() for run_page: HOME in the fresh profile, with an NSS database that
    trusts the test CA for TLS servers."""
    def prepare(profile: str, env: dict) -> None:
        home = os.path.join(profile, "home")
        db = os.path.join(home, ".pki", "nssdb")
        os.makedirs(db)
        for argv in (["certutil", "-N", "-d", f"sql:{db}", "--empty-password"],
                     ["certutil", "-A", "-d", f"sql:{db}", "-t", "C,,", "-n", "turnpike-e2e-ca",
                      "-i", ca_pem]):
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
            if r.returncode != 0:
                raise Fail(f"{' '.join(argv)}: exit {r.returncode}: "
                           + r.stderr.decode(errors="replace")[-500:])
        env["HOME"] = home
    return prepare


def no_relay(ctx: Ctx, chromium: str, url: str, tag: str) -> str:
    """The page must gather no relay candidate and report icecandidateerror 701."""
    r = run_page(ctx, chromium, ctx.creds.password, tag, url=url, flags=FLAGS,
                 prepare=trust_test_ca(ctx.pki.ca), timeout_s=NEGATIVE_TIMEOUT_S)
    if r.get("echoed") or any((r.get("gathered") or {}).values()):
        raise Fail(f"relay candidates or data through {url}: {json.dumps(r)[:800]}")
    errors = r.get("iceErrors") or []
    if not any(e.split(": ", 1)[-1].startswith("701") for e in errors):
        raise Fail(f"expected icecandidateerror 701, got {errors}; page: {r.get('error')}")
    return f"no relay candidate; icecandidateerror: {errors[0]}"


def wrong_certificate(ctx: Ctx, chromium: str) -> str:
    """A second server with the wrong.test certificate (signed by the trusted CA)."""
    srv = ServerUnderTest(ctx.server.template, "chromium-tcp-wrongcert", ctx.workroot,
                          ctx.creds, pki=ctx.pki, cert=ctx.pki.wrong)
    srv.start()
    try:
        # Control: its TLS works, for the name it does carry.
        c = ssl.create_default_context(cafile=ctx.pki.ca)
        _, version = stunmsg.binding_over_stream(srv.tls_addr, timeout=5, ssl_context=c,
                                                 server_hostname=WRONG_NAME)
        try:
            stunmsg.binding_over_stream(srv.tls_addr, timeout=5, ssl_context=c,
                                        server_hostname=SERVER_NAME)
            raise Fail("python ssl accepted the wrong.test certificate for turn.test")
        except ssl.SSLCertVerificationError:
            pass
        saved, ctx.server = ctx.server, srv
        try:
            detail = no_relay(ctx, chromium, f"turns:{SERVER_NAME}:{srv.tls_port}?transport=tcp",
                              "-tls-wrongcert")
        finally:
            ctx.server = saved
        if not srv.alive():
            raise Fail("the wrong-certificate server exited\n" + srv.log_tail())
    finally:
        srv.stop()
    return f"(its TLS works for {WRONG_NAME}, {version}) {detail}"


def run(ctx: Ctx) -> None:
    chromium = find_chromium()
    if chromium is None:
        raise Skip("chromium not installed (tests/scripts/setup-deps.sh)")
    if ctx.pki is None:
        raise Skip("no test PKI (openssl CLI missing?)")
    if shutil.which("certutil") is None:
        raise Skip("certutil (libnss3-tools) not installed (tests/scripts/setup-deps.sh)")
    srv = ctx.server
    tcp_url = f"turn:{srv.listen_ip}:{srv.port}?transport=tcp"
    tls_url = f"turns:{SERVER_NAME}:{srv.tls_port}?transport=tcp"
    trust = trust_test_ca(ctx.pki.ca)
    ctx.check("chromium-tcp: relay-only data channel over TURN/TCP (turn:127.0.0.1:PORT"
              "?transport=tcp), 1000 messages, relay<->relay, relayProtocol tcp",
              lambda: relay_data_channel(ctx, chromium, tcp_url, "tcp", "-tcp", flags=FLAGS,
                                         prepare=trust))
    ctx.check("chromium-tcp: relay-only data channel over TURN/TLS (turns:turn.test, test CA "
              "in an NSS db), 1000 messages, relay<->relay, relayProtocol tls",
              lambda: relay_data_channel(ctx, chromium, tls_url, "tls", "-tls", flags=FLAGS,
                                         prepare=trust))
    ctx.check("chromium-tcp: TURN/TLS by IP (not a name in the certificate) gathers no relay "
              "candidate (701)",
              lambda: no_relay(ctx, chromium,
                               f"turns:{srv.listen_ip}:{srv.tls_port}?transport=tcp", "-tls-byip"))
    ctx.check("chromium-tcp: a server presenting the wrong.test certificate is refused for "
              "turns:turn.test (701)",
              lambda: wrong_certificate(ctx, chromium))
    ctx.check("chromium-tcp: wrong credential over TURN/TLS gathers no relay candidate (401)",
              lambda: wrong_credential(ctx, chromium, tls_url, "-tls-wrongpass", flags=FLAGS,
                                       prepare=trust))
