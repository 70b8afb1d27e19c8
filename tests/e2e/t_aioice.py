"""aioice (pinned in requirements.txt) against the server under test.

1. aioice.turn.create_turn_endpoint: one UDP allocation relaying to a UDP echo peer on
   127.0.0.1 (aioice binds a channel for the peer, so the data is ChannelData).
2. Two aioice.Connection objects with transport_policy=TransportPolicy.RELAY and the
   server under test as their only TURN server: they gather relay candidates only,
   run ICE over relay<->relay pairs, and exchange data both ways.
3. A wrong password makes the Allocate fail with 401.
"""

from __future__ import annotations

import asyncio

from common import Ctx, Fail, Skip, UdpEcho

try:
    import aioice
    from aioice import stun as aioice_stun
    from aioice import turn as aioice_turn
    from aioice.ice import TransportPolicy
except ImportError as e:  # pragma: no cover - reported as SKIP
    aioice = None
    IMPORT_ERROR = e

MESSAGES = 300
STEP_TIMEOUT = 5.0


class Receiver(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple]] = asyncio.Queue()
        self.errors: list[Exception] = []
        self.closed = asyncio.get_running_loop().create_future()

    def datagram_received(self, data, addr) -> None:  # noqa: ANN001
        self.queue.put_nowait((data, addr))

    def error_received(self, exc) -> None:  # noqa: ANN001
        self.errors.append(exc)

    def connection_lost(self, exc) -> None:  # noqa: ANN001
        if not self.closed.done():
            self.closed.set_result(exc)


async def turn_to_echo(ctx: Ctx, server_addr: tuple[str, int] | None = None,
                       transport: str = "udp", ssl=None) -> str:  # noqa: ANN001
    """server_addr/transport/ssl: as aioice.turn.create_turn_endpoint takes them
    (default: the server's UDP address)."""
    srv = ctx.server
    with UdpEcho() as echo:
        transport, proto = await asyncio.wait_for(
            aioice_turn.create_turn_endpoint(
                Receiver, server_addr=server_addr or srv.addr, username=ctx.creds.user,
                password=ctx.creds.password, lifetime=600, transport=transport, ssl=ssl),
            STEP_TIMEOUT)
        try:
            relayed = transport.get_extra_info("sockname")
            if relayed is None or relayed[0] != srv.listen_ip:
                raise Fail(f"relayed address {relayed} is not on {srv.listen_ip}")
            if relayed[1] not in srv.relay_ports:
                raise Fail(f"relayed port {relayed[1]} outside {srv.relay_ports}")
            for i in range(MESSAGES):
                payload = f"aioice-{i}-".encode() + bytes(i % 200)
                transport.sendto(payload, echo.addr)
                data, addr = await asyncio.wait_for(proto.queue.get(), STEP_TIMEOUT)
                if data != payload or tuple(addr[:2]) != tuple(echo.addr):
                    raise Fail(f"message {i}: got {data[:40]!r} from {addr}")
            if proto.errors:
                raise Fail(f"send errors: {proto.errors[:3]}")
            if echo.sources != {tuple(relayed)}:
                raise Fail(f"the peer saw sources {echo.sources}, expected only the relayed "
                           f"address {relayed}")
        finally:
            transport.close()  # Refresh(LIFETIME=0)
            await asyncio.wait_for(asyncio.shield(proto.closed), STEP_TIMEOUT)
    return f"{MESSAGES} messages echoed via relayed address {relayed[0]}:{relayed[1]}"


async def wrong_password(ctx: Ctx, server_addr: tuple[str, int] | None = None,
                         transport: str = "udp", ssl=None) -> str:  # noqa: ANN001
    try:
        transport, _ = await asyncio.wait_for(
            aioice_turn.create_turn_endpoint(
                Receiver, server_addr=server_addr or ctx.server.addr, username=ctx.creds.user,
                password="not-" + ctx.creds.password, transport=transport, ssl=ssl),
            STEP_TIMEOUT)
    except aioice_stun.TransactionFailed as e:
        code = e.response.error_code
        if code != 401:
            raise Fail(f"expected 401, got {e.response.attributes.get('ERROR-CODE')}")
        return "Allocate refused with 401"
    transport.close()
    raise Fail("allocation succeeded with a wrong password")


async def ice_relay_only(ctx: Ctx, turn_server: tuple[str, int] | None = None,
                         transport: str = "udp", ssl=None) -> str:  # noqa: ANN001
    """turn_server/transport/ssl: aioice.Connection's turn_server, turn_transport and
    turn_ssl (a bool or an ssl.SSLContext, handed on to loop.create_connection)."""
    srv = ctx.server
    kw = dict(turn_server=turn_server or srv.addr, turn_username=ctx.creds.user,
              turn_password=ctx.creds.password, turn_transport=transport,
              turn_ssl=ssl or False,
              use_ipv4=True, use_ipv6=False, transport_policy=TransportPolicy.RELAY)
    a = aioice.Connection(ice_controlling=True, **kw)
    b = aioice.Connection(ice_controlling=False, **kw)
    try:
        await asyncio.wait_for(asyncio.gather(a.gather_candidates(), b.gather_candidates()),
                               15)
        for name, c in (("A", a), ("B", b)):
            types = [x.type for x in c.local_candidates]
            if not types:
                raise Fail(f"{name} gathered no candidate (no relay candidate from the server)")
            if set(types) != {"relay"}:
                raise Fail(f"{name} gathered {types}, expected relay only")
            for cand in c.local_candidates:
                if cand.port not in srv.relay_ports:
                    raise Fail(f"{name}'s relay candidate port {cand.port} outside the range")
        for x, y in ((a, b), (b, a)):
            for cand in y.local_candidates:
                await x.add_remote_candidate(cand)
            await x.add_remote_candidate(None)
            x.remote_username = y.local_username
            x.remote_password = y.local_password
        await asyncio.wait_for(asyncio.gather(a.connect(), b.connect()), 30)

        pair = a._nominated.get(1)  # aioice keeps the selected pair per component here
        if pair is None:
            raise Fail("no nominated pair on the controlling side")
        lt, rt = pair.local_candidate.type, pair.remote_candidate.type
        if (lt, rt) != ("relay", "relay"):
            raise Fail(f"selected pair is {lt}<->{rt}, expected relay<->relay")

        for i in range(100):
            msg = f"a->b {i}".encode()
            await a.send(msg)
            got = await asyncio.wait_for(b.recv(), STEP_TIMEOUT)
            if got != msg:
                raise Fail(f"b received {got!r}, expected {msg!r}")
            reply = f"b->a {i}".encode() + bytes(i)
            await b.send(reply)
            got = await asyncio.wait_for(a.recv(), STEP_TIMEOUT)
            if got != reply:
                raise Fail(f"a received {got[:20]!r}, expected {reply[:20]!r}")
        return (f"relay<->relay {pair.local_candidate.host}:{pair.local_candidate.port} <-> "
                f"{pair.remote_candidate.host}:{pair.remote_candidate.port}, 200 messages")
    finally:
        await asyncio.wait_for(asyncio.gather(a.close(), b.close(), return_exceptions=True), 10)


def run(ctx: Ctx) -> None:
    if aioice is None:
        raise Skip(f"aioice not importable ({IMPORT_ERROR}); run tests/scripts/setup-deps.sh")
    ctx.check("aioice: TURN allocation relays to a UDP echo peer (aioice.turn)",
              lambda: asyncio.run(turn_to_echo(ctx)))
    ctx.check("aioice: ICE between two Connections, relay-only policy",
              lambda: asyncio.run(ice_relay_only(ctx)))
    ctx.check("aioice: wrong password is refused with 401",
              lambda: asyncio.run(wrong_password(ctx)))
