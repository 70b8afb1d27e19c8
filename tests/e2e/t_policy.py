"""Peer policy and long-term authentication, with the stdlib STUN client (stunmsg.py).

Against the main server (TURN_SERVER_CMD, loopback peers allowed):
  - an unauthenticated Allocate gets 401 with REALM and NONCE; a wrong password gets
    401; the right one gets an allocation whose success response carries a valid
    MESSAGE-INTEGRITY;
  - CreatePermission for a peer on 127.0.0.1 succeeds, and data goes both ways with
    Send/Data indications and with a ChannelBind + ChannelData;
    with EXPECT_LOOPBACK_FORBIDDEN=1 it must instead be refused with 403 (for a server
    started so that it forbids loopback peers).
Against the deny-loopback server (TURN_SERVER_CMD_DENY_LOOPBACK; coturn without
--allow-loopback-peers by default): CreatePermission and ChannelBind for loopback
peers get 403 and a Send indication to one never reaches it.
"""

from __future__ import annotations

import struct
import time

import stunmsg as S
from common import Ctx, Fail, Skip, UdpEcho, env_flag
from server import ServerUnderTest


def _desc(resp: S.Message) -> str:
    if resp.cls == S.SUCCESS:
        return "success"
    return f"error {resp.error_code()} {resp.error_reason()!r}"


def auth_checks(ctx: Ctx, srv: ServerUnderTest) -> str:
    # 1. No credentials: 401 with REALM and NONCE, and no allocation.
    with S.TurnClient(srv.addr, ctx.creds.user, ctx.creds.password) as c:
        req = S.Message(S.ALLOCATE, S.REQUEST).add(S.REQUESTED_TRANSPORT, bytes([17, 0, 0, 0]))
        resp = c.transact(req, key=None)
        if resp.cls != S.ERROR or resp.error_code() != 401:
            raise Fail(f"unauthenticated Allocate: {_desc(resp)}, expected 401")
        if resp.get(S.REALM) is None or resp.get(S.NONCE) is None:
            raise Fail("401 without REALM or NONCE")
        realm = resp.get(S.REALM).decode()
        if realm != ctx.creds.realm:
            raise Fail(f"REALM {realm!r}, expected {ctx.creds.realm!r}")
    # 2. Wrong password: still 401 after the authenticated retry.
    with S.TurnClient(srv.addr, ctx.creds.user, "not-" + ctx.creds.password) as c:
        resp = c.allocate()
        if resp.cls != S.ERROR or resp.error_code() != 401:
            raise Fail(f"Allocate with a wrong password: {_desc(resp)}, expected 401")
    # 3. Unknown user: 401.
    with S.TurnClient(srv.addr, "no-such-user", ctx.creds.password) as c:
        resp = c.allocate()
        if resp.cls != S.ERROR or resp.error_code() != 401:
            raise Fail(f"Allocate for an unknown user: {_desc(resp)}, expected 401")
    # 4. Right credentials: an allocation, integrity-protected response.
    with S.TurnClient(srv.addr, ctx.creds.user, ctx.creds.password) as c:
        resp = c.allocate()
        if resp.cls != S.SUCCESS:
            raise Fail(f"Allocate: {_desc(resp)}")
        relayed = resp.xor_address(S.XOR_RELAYED_ADDRESS)
        mapped = resp.xor_address(S.XOR_MAPPED_ADDRESS)
        lifetime = resp.lifetime()
        if relayed is None or mapped is None or not lifetime:
            raise Fail(f"Allocate success lacks XOR-RELAYED/XOR-MAPPED/LIFETIME: {resp.attrs}")
        if mapped != c.sock.getsockname()[:2]:
            raise Fail(f"XOR-MAPPED-ADDRESS {mapped} != client address {c.sock.getsockname()}")
        if relayed[1] not in srv.relay_ports:
            raise Fail(f"relayed port {relayed[1]} outside {srv.relay_ports}")
        # A second Allocate on the same 5-tuple is a 437 (allocation mismatch).
        again = c.allocate()
        if again.cls != S.ERROR or again.error_code() != 437:
            raise Fail(f"second Allocate on the same 5-tuple: {_desc(again)}, expected 437")
        gone = c.refresh(0)
        if gone.cls != S.SUCCESS:
            raise Fail(f"Refresh(LIFETIME=0): {_desc(gone)}")
    return f"401 realm/nonce, wrong password 401, allocation {relayed[0]}:{relayed[1]} lifetime {lifetime}s, 437, deleted"


def loopback_allowed(ctx: Ctx, srv: ServerUnderTest) -> str:
    with UdpEcho() as echo, S.TurnClient(srv.addr, ctx.creds.user, ctx.creds.password) as c:
        resp = c.allocate()
        if resp.cls != S.SUCCESS:
            raise Fail(f"Allocate: {_desc(resp)}")
        relayed = resp.xor_address(S.XOR_RELAYED_ADDRESS)
        resp = c.create_permission(echo.addr)
        if resp.cls != S.SUCCESS:
            raise Fail(f"CreatePermission {echo.addr[0]}: {_desc(resp)}, expected success")
        # Send indication -> peer -> Data indication.
        for i in range(20):
            payload = b"send-ind-%d" % i
            c.send_indication(echo.addr, payload)
            got = _recv_data(c, 2.0)
            if got is None:
                raise Fail(f"no Data indication for Send indication {i}")
            peer, data = got
            if peer != tuple(echo.addr) or data != payload:
                raise Fail(f"Data indication from {peer} with {data!r}, expected {payload!r}")
        # ChannelBind + ChannelData both ways.
        resp = c.channel_bind(0x4001, echo.addr)
        if resp.cls != S.SUCCESS:
            raise Fail(f"ChannelBind: {_desc(resp)}")
        for i in range(20):
            payload = b"chan-%d" % i + bytes(i)
            c.send_channel_data(0x4001, payload)
            got = _recv_data(c, 2.0)
            if got is None or got != (0x4001, payload):
                raise Fail(f"ChannelData {i}: got {got!r}")
        if echo.sources != {tuple(relayed)}:
            raise Fail(f"peer saw sources {echo.sources}, expected {relayed}")
        c.refresh(0)
    return f"CreatePermission {echo.addr[0]} ok; 20 Send/Data and 20 ChannelData round trips"


def loopback_forbidden(ctx: Ctx, srv: ServerUnderTest) -> str:
    with UdpEcho() as echo, S.TurnClient(srv.addr, ctx.creds.user, ctx.creds.password) as c:
        resp = c.allocate()
        if resp.cls != S.SUCCESS:
            raise Fail(f"Allocate: {_desc(resp)}")
        seen = []
        for peer in (echo.addr, ("127.0.0.2", echo.addr[1]), ("127.255.255.254", 9)):
            resp = c.create_permission(peer)
            if resp.cls != S.ERROR or resp.error_code() != 403:
                raise Fail(f"CreatePermission {peer[0]}: {_desc(resp)}, expected 403")
            seen.append(f"CreatePermission {peer[0]} 403")
        resp = c.channel_bind(0x4000, echo.addr)
        if resp.cls != S.ERROR or resp.error_code() != 403:
            raise Fail(f"ChannelBind {echo.addr[0]}: {_desc(resp)}, expected 403")
        seen.append("ChannelBind 403")
        # An IPv4 allocation never reaches an IPv6 loopback peer, whatever the reason
        # (403 forbidden or 443 address family mismatch).
        for peer in (("::1", echo.addr[1]), ("::ffff:127.0.0.1", echo.addr[1])):
            resp = c.create_permission(peer)
            if resp.cls == S.SUCCESS:
                raise Fail(f"CreatePermission {peer[0]} succeeded")
            seen.append(f"{peer[0]} {resp.error_code()}")
        c.send_indication(echo.addr, b"must not arrive")
        time.sleep(0.5)
        if echo.count:
            raise Fail(f"a Send indication reached the loopback peer ({echo.count} datagrams)")
        c.refresh(0)
    return "; ".join(seen) + "; Send indication dropped"


def _recv_data(c: S.TurnClient, timeout: float):
    """Next Data indication (peer, data) or ChannelData (channel, data) from the server."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pkt = c.recv(max(0.01, deadline - time.monotonic()))
        if pkt is None:
            return None
        if 0x40 <= pkt[0] <= 0x4F and len(pkt) >= 4:
            ch, n = struct.unpack("!HH", pkt[:4])
            return ch, pkt[4 : 4 + n]
        if S.is_stun(pkt):
            m = S.parse(pkt)
            if m.method == S.DATA and m.cls == S.INDICATION:
                return m.xor_address(S.XOR_PEER_ADDRESS), m.get(S.DATA_ATTR)
    return None


def run(ctx: Ctx) -> None:
    srv = ctx.server
    ctx.check("policy: long-term auth (401 REALM/NONCE, wrong password, 437, delete)",
              lambda: auth_checks(ctx, srv))
    if env_flag("EXPECT_LOOPBACK_FORBIDDEN"):
        ctx.check("policy: main server refuses loopback peers with 403 (EXPECT_LOOPBACK_FORBIDDEN=1)",
                  lambda: loopback_forbidden(ctx, srv))
    else:
        ctx.check("policy: loopback peer allowed, Send/Data and ChannelData relayed",
                  lambda: loopback_allowed(ctx, srv))

    name = "policy: deny-loopback server refuses loopback peers with 403"
    if not ctx.deny_cmd:
        def not_configured() -> None:
            raise Skip("TURN_SERVER_CMD_DENY_LOOPBACK not set")

        ctx.check(name, not_configured)
        return

    deny = ServerUnderTest(ctx.deny_cmd, "policy-deny", ctx.workroot, ctx.creds, pki=ctx.pki)

    def still_running() -> None:
        if not deny.alive():
            raise Fail("deny-loopback server exited\n" + deny.log_tail())

    try:
        if ctx.check("policy: deny-loopback server starts", deny.start):
            ctx.check(name, lambda: loopback_forbidden(ctx, deny))
            ctx.check("policy: deny-loopback server still running", still_running)
    finally:
        deny.stop()
