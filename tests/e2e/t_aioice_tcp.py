"""aioice (pinned in requirements.txt) over TURN-over-TCP and TURN-over-TLS.

aioice.turn.create_turn_endpoint(transport="tcp", ssl=...) and aioice.Connection(
turn_transport="tcp", turn_ssl=...) hand `ssl` straight to asyncio's
loop.create_connection(host=server_addr[0], port=server_addr[1], ssl=ssl). So:
  - ssl=True means ssl.create_default_context(): the system CAs (or SSL_CERT_FILE),
    verification on, host name checked; an ssl.SSLContext is used as given. Here a
    context that trusts only the run's test CA (ssl.create_default_context(cafile=…)),
    so nothing depends on the process environment;
  - the host name that is verified, and sent as SNI, is server_addr[0] (asyncio's
    server_hostname defaults to host). So the server is addressed as ("turn.test",
    tls_port), and turn.test must resolve: the test patches getaddrinfo of its own
    event loop (each check runs in a fresh asyncio.run loop) to map turn.test to
    127.0.0.1; /etc/hosts is not touched and no other process is affected;
  - a Python ssl client offers TLS 1.2 and 1.3 (OpenSSL 3 defaults), and no ALPN.

Checks: a stdlib Binding over TLS (version and verification); one allocation relaying
to a UDP echo peer over TCP and over TLS; two relay-only Connections doing ICE and
exchanging data over TCP and over TLS; TLS to a name the certificate does not carry,
or with only the system CAs, fails verification; a wrong password gets 401 over TCP
and over TLS.
"""

from __future__ import annotations

import asyncio
import ssl

import stunmsg
from common import Ctx, Fail, Skip
from pki import SERVER_NAME

try:
    import aioice  # noqa: F401
    from aioice import turn as aioice_turn
    from t_aioice import Receiver, STEP_TIMEOUT, ice_relay_only, turn_to_echo, wrong_password
except ImportError as e:  # pragma: no cover - reported as SKIP
    aioice = None
    IMPORT_ERROR = e

NEEDS_TLS = True  # run.py skips the group for a template without {tls_port}


def tls_context(ctx: Ctx) -> ssl.SSLContext:
    """Trusts the run's test CA only; verification and host name check on."""
    return ssl.create_default_context(cafile=ctx.pki.ca)


def resolve_test_name(ip: str) -> None:
    """Make the running event loop resolve turn.test to ip (this loop only)."""
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo

    async def getaddrinfo(host, port, *args, **kw):  # noqa: ANN001, ANN202
        if isinstance(host, (bytes, str)) and host in (SERVER_NAME, SERVER_NAME.encode()):
            host = ip
        return await real(host, port, *args, **kw)

    loop.getaddrinfo = getaddrinfo  # type: ignore[method-assign]


async def with_test_name(ctx: Ctx, coro_fn) -> str:  # noqa: ANN001
    resolve_test_name(ctx.server.listen_ip)
    return await coro_fn()


def stdlib_tls_binding(ctx: Ctx) -> str:
    """Python's ssl (the one aioice uses) against the TLS port: SNI turn.test, verified
    against the test CA; the server must answer a Binding over it. TLS 1.3 is preferred
    by the client; the version is reported."""
    c = tls_context(ctx)
    msg, version = stunmsg.binding_over_stream(ctx.server.tls_addr, timeout=5,
                                               ssl_context=c, server_hostname=SERVER_NAME)
    mapped = msg.xor_address(stunmsg.XOR_MAPPED_ADDRESS)
    c12 = tls_context(ctx)
    c12.maximum_version = ssl.TLSVersion.TLSv1_2
    _, v12 = stunmsg.binding_over_stream(ctx.server.tls_addr, timeout=5, ssl_context=c12,
                                         server_hostname=SERVER_NAME)
    return (f"{version} (client offered 1.2+1.3), also {v12} when 1.2 only; "
            f"XOR-MAPPED-ADDRESS {mapped}")


def tls_refused(ctx: Ctx) -> str:
    """The certificate check is real: by IP (the certificate has only DNS:turn.test),
    and with the system CAs only (ssl=True), the TLS connection fails."""
    tls_port = ctx.server.tls_port
    seen = []

    async def attempt(server_addr: tuple[str, int], tls) -> str:  # noqa: ANN001
        resolve_test_name(ctx.server.listen_ip)
        try:
            t, _ = await asyncio.wait_for(
                aioice_turn.create_turn_endpoint(
                    Receiver, server_addr=server_addr, username=ctx.creds.user,
                    password=ctx.creds.password, transport="tcp", ssl=tls),
                STEP_TIMEOUT)
        except ssl.SSLCertVerificationError as e:
            return e.verify_message
        t.close()
        raise Fail(f"TLS to {server_addr} with {tls!r} was accepted")

    seen.append("by IP 127.0.0.1: " + asyncio.run(
        attempt((ctx.server.listen_ip, tls_port), tls_context(ctx))))
    seen.append("ssl=True (system CAs): " + asyncio.run(attempt((SERVER_NAME, tls_port), True)))
    return "; ".join(seen)


def run(ctx: Ctx) -> None:
    if aioice is None:
        raise Skip(f"aioice not importable ({IMPORT_ERROR}); run tests/scripts/setup-deps.sh")
    if ctx.pki is None:
        raise Skip("no test PKI (openssl CLI missing?)")
    srv = ctx.server
    tcp_addr = srv.addr
    tls_addr = (SERVER_NAME, srv.tls_port)

    ctx.check("aioice-tcp: Python ssl Binding over TLS, turn.test verified against the test CA",
              lambda: stdlib_tls_binding(ctx))
    ctx.check("aioice-tcp: TURN allocation over TCP relays to a UDP echo peer",
              lambda: asyncio.run(turn_to_echo(ctx, tcp_addr, "tcp")))
    ctx.check("aioice-tcp: TURN allocation over TLS (turn.test) relays to a UDP echo peer",
              lambda: asyncio.run(with_test_name(
                  ctx, lambda: turn_to_echo(ctx, tls_addr, "tcp", tls_context(ctx)))))
    ctx.check("aioice-tcp: ICE between two Connections, relay-only, TURN over TCP",
              lambda: asyncio.run(ice_relay_only(ctx, tcp_addr, "tcp")))
    ctx.check("aioice-tcp: ICE between two Connections, relay-only, TURN over TLS",
              lambda: asyncio.run(with_test_name(
                  ctx, lambda: ice_relay_only(ctx, tls_addr, "tcp", tls_context(ctx)))))
    ctx.check("aioice-tcp: TLS by IP or without the test CA fails certificate verification",
              lambda: tls_refused(ctx))
    ctx.check("aioice-tcp: wrong password is refused with 401 over TCP",
              lambda: asyncio.run(wrong_password(ctx, tcp_addr, "tcp")))
    ctx.check("aioice-tcp: wrong password is refused with 401 over TLS",
              lambda: asyncio.run(with_test_name(
                  ctx, lambda: wrong_password(ctx, tls_addr, "tcp", tls_context(ctx)))))
