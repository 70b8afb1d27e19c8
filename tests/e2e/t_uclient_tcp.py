"""coturn's turnutils_uclient over TCP (-t) and TLS (-t -S) to the server, UDP relay to
turnutils_peer as echo peer (as in t_uclient.py; the relayed transport stays UDP).

Flags: -t TCP to the server; -S "secure": TLS over TCP (with -t; without -t it means
DTLS). -c one allocation per client, -s Send/Data indications instead of channels,
-m 10 clients, -n messages per client; the summary is parsed as in t_uclient.py.

What uclient (coturn 4.6.1) does over TLS, read in its source and checked here:
  - it verifies nothing by default (SSL_VERIFY_NONE). -E CA takes effect only when a
    client certificate is also given with -i/-k (the server never asks for it, so it
    is never sent); then the chain is verified (SSL_VERIFY_PEER), but never the host
    name: there is no SSL_set1_host, and it sends no SNI. So the TLS runs here pass
    -E {tls_ca} -i/-k (the turn.test pair, used only to switch verification on), and
    a run that trusts only another CA must fail;
  - every TLS connection picks one of four OpenSSL contexts at random: TLS_client
    (up to TLS 1.3), TLSv1, TLSv1.1, TLSv1.2 client methods, all with the cipher
    list "ALL". Debian's OpenSSL 3 refuses TLS 1.0/1.1 at its security level, so those
    handshakes fail, and uclient retries on a new connection (up to 32 times per
    connection). The server must answer such a ClientHello with an alert or a close,
    and keep serving;
  - ALPN offered: "http/1.1", "stun.turn", "stun.nat-discovery".
"""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter

from common import Ctx, Fail, Skip
from t_uclient import PEER, RE_TOTALS, UCLIENT, Peer, check_zero_loss, run_uclient

NEEDS_TLS = True  # run.py skips the group for a template without {tls_port}

CLIENTS, MESSAGES = 10, 50
RE_TLS = re.compile(r"client session connected with cipher (\S+), method=(\S+)")


def tls_flags(ctx: Ctx, ca: str | None = None) -> list[str]:
    p = ctx.pki
    return ["-t", "-S", "-E", ca or p.ca, "-i", p.server.cert, "-k", p.server.key]


def tls_summary(ctx: Ctx, tag: str) -> str:
    """The TLS versions and ciphers uclient reported, from its saved log."""
    with open(os.path.join(ctx.workroot, f"uclient{tag}.log")) as f:
        text = f.read()
    got = Counter(f"{m}/{c}" for c, m in RE_TLS.findall(text))
    failed = text.count("tls_connect: cannot connect")
    return (", ".join(f"{n}x {k}" for k, n in got.most_common())
            + f"; {failed} handshakes refused (uclient's TLS 1.0/1.1 contexts), retried")


def run(ctx: Ctx) -> None:
    for tool in (UCLIENT, PEER):
        if shutil.which(tool) is None:
            raise Skip(f"{tool} not installed (tests/scripts/setup-deps.sh)")
    if ctx.pki is None:
        raise Skip("no test PKI (openssl CLI missing?)")
    srv = ctx.server
    peer = Peer(ctx)
    peer.start()
    m, n = CLIENTS, MESSAGES
    base = ["-c", "-m", str(m), "-n", str(n)]
    try:
        ctx.check(f"uclient-tcp: TCP, channels, {m} clients (-t -c -m {m})",
                  lambda: check_zero_loss(ctx, peer, ["-t", *base], m * n, "-tcp-channels"))
        ctx.check(f"uclient-tcp: TCP, Send indications, {m} clients (-t -c -s -m {m})",
                  lambda: check_zero_loss(ctx, peer, ["-t", "-s", *base], m * n, "-tcp-send"))

        def tls(extra: list[str], tag: str) -> str:
            detail = check_zero_loss(ctx, peer, [*tls_flags(ctx), *extra, *base], m * n, tag,
                                     port=srv.tls_port)
            return detail + "; " + tls_summary(ctx, tag)

        ctx.check(f"uclient-tcp: TLS, channels, {m} clients, chain verified (-t -S -E -c -m {m})",
                  lambda: tls([], "-tls-channels"))
        ctx.check(f"uclient-tcp: TLS, Send indications, {m} clients (-t -S -E -c -s -m {m})",
                  lambda: tls(["-s"], "-tls-send"))

        def untrusted_ca() -> str:
            # Proves that -E really verifies (and so that the runs above did).
            rc, text = run_uclient(ctx, peer, [*tls_flags(ctx, ctx.pki.untrusted_ca),
                                               "-c", "-n", "5"],
                                   timeout=60, tag="-tls-untrusted", port=srv.tls_port)
            totals = RE_TOTALS.findall(text)
            recv = int(totals[-1][1]) if totals else 0
            if rc == 0 or recv > 0:
                raise Fail(f"uclient trusting only another CA: exit {rc}, {recv} echoed\n"
                           + text[-1500:])
            if "certificate verify failed" not in text:
                raise Fail(f"uclient failed (exit {rc}) but not on the certificate:\n"
                           + text[-1500:])
            return f"refused: certificate verify failed (exit {rc})"

        ctx.check("uclient-tcp: TLS, a client that trusts only another CA fails",
                  untrusted_ca)

        def wrong_password(flags: list[str], port: int, tag: str) -> str:
            rc, text = run_uclient(ctx, peer, [*flags, "-c", "-n", "5"],
                                   password="not-" + ctx.creds.password, timeout=30,
                                   tag=tag, port=port)
            totals = RE_TOTALS.findall(text)
            recv = int(totals[-1][1]) if totals else 0
            if rc == 0 or recv > 0:
                raise Fail(f"uclient with a wrong password: exit {rc}, {recv} echoed\n"
                           + text[-1500:])
            return f"refused (exit {rc})"

        ctx.check("uclient-tcp: wrong password is refused over TCP",
                  lambda: wrong_password(["-t"], srv.port, "-tcp-wrongpass"))
        ctx.check("uclient-tcp: wrong password is refused over TLS",
                  lambda: wrong_password(tls_flags(ctx), srv.tls_port, "-tls-wrongpass"))
    finally:
        peer.stop()
