"""A small STUN/TURN client in the Python standard library (RFC 8489, RFC 8656).

Enough for the end-to-end tests: Binding (readiness probe), Allocate, Refresh,
CreatePermission, ChannelBind, Send/Data indications and ChannelData, with the
long-term credential mechanism (401 -> REALM/NONCE -> MESSAGE-INTEGRITY keyed with
MD5(user:realm:password)) and FINGERPRINT. It is independent of the server under test
and of aioice, so that a bug shared by both cannot hide itself.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import ipaddress
import os
import socket
import struct
import time
from dataclasses import dataclass, field

MAGIC_COOKIE = 0x2112A442
FINGERPRINT_XOR = 0x5354554E

# Methods
BINDING = 0x001
ALLOCATE = 0x003
REFRESH = 0x004
SEND = 0x006
DATA = 0x007
CREATE_PERMISSION = 0x008
CHANNEL_BIND = 0x009

# Classes
REQUEST = 0b00
INDICATION = 0b01
SUCCESS = 0b10
ERROR = 0b11

# Attributes
MAPPED_ADDRESS = 0x0001
USERNAME = 0x0006
MESSAGE_INTEGRITY = 0x0008
ERROR_CODE = 0x0009
UNKNOWN_ATTRIBUTES = 0x000A
CHANNEL_NUMBER = 0x000C
LIFETIME = 0x000D
XOR_PEER_ADDRESS = 0x0012
DATA_ATTR = 0x0013
REALM = 0x0014
NONCE = 0x0015
XOR_RELAYED_ADDRESS = 0x0016
REQUESTED_ADDRESS_FAMILY = 0x0017
EVEN_PORT = 0x0018
REQUESTED_TRANSPORT = 0x0019
DONT_FRAGMENT = 0x001A
XOR_MAPPED_ADDRESS = 0x0020
RESERVATION_TOKEN = 0x0022
SOFTWARE = 0x8022
FINGERPRINT = 0x8028

XOR_ADDRESS_ATTRS = (XOR_PEER_ADDRESS, XOR_RELAYED_ADDRESS, XOR_MAPPED_ADDRESS)
UDP_PROTO = 17


class StunError(Exception):
    pass


def message_type(method: int, cls: int) -> int:
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((cls & 0b01) << 4)
        | ((cls & 0b10) << 7)
    )


def split_type(mtype: int) -> tuple[int, int]:
    method = (mtype & 0x000F) | ((mtype & 0x00E0) >> 1) | ((mtype & 0x3E00) >> 2)
    cls = ((mtype >> 4) & 0b01) | ((mtype >> 7) & 0b10)
    return method, cls


def long_term_key(user: str, realm: str, password: str) -> bytes:
    return hashlib.md5(f"{user}:{realm}:{password}".encode()).digest()


def encode_xor_address(addr: tuple[str, int], txid: bytes) -> bytes:
    ip = ipaddress.ip_address(addr[0])
    port = addr[1] ^ (MAGIC_COOKIE >> 16)
    if ip.version == 4:
        x = int(ip) ^ MAGIC_COOKIE
        return struct.pack("!BBHI", 0, 1, port, x)
    key = struct.pack("!I", MAGIC_COOKIE) + txid
    raw = bytes(a ^ b for a, b in zip(ip.packed, key))
    return struct.pack("!BBH", 0, 2, port) + raw


def decode_xor_address(value: bytes, txid: bytes) -> tuple[str, int]:
    if len(value) < 8:
        raise StunError("short address attribute")
    _, family, xport = struct.unpack("!BBH", value[:4])
    port = xport ^ (MAGIC_COOKIE >> 16)
    if family == 1:
        (x,) = struct.unpack("!I", value[4:8])
        return str(ipaddress.IPv4Address(x ^ MAGIC_COOKIE)), port
    if family == 2 and len(value) >= 20:
        key = struct.pack("!I", MAGIC_COOKIE) + txid
        raw = bytes(a ^ b for a, b in zip(value[4:20], key))
        return str(ipaddress.IPv6Address(raw)), port
    raise StunError(f"bad address family {family}")


def _pad(b: bytes) -> bytes:
    return b + bytes((4 - len(b) % 4) % 4)


@dataclass
class Message:
    method: int
    cls: int
    txid: bytes = field(default_factory=lambda: os.urandom(12))
    attrs: list[tuple[int, bytes]] = field(default_factory=list)
    raw: bytes = b""

    # ---- building
    def add(self, atype: int, value: bytes) -> "Message":
        self.attrs.append((atype, value))
        return self

    def add_xor_address(self, atype: int, addr: tuple[str, int]) -> "Message":
        return self.add(atype, encode_xor_address(addr, self.txid))

    def encode(self, key: bytes | None = None, fingerprint: bool = True) -> bytes:
        body = b""
        for atype, value in self.attrs:
            body += struct.pack("!HH", atype, len(value)) + _pad(value)
        mtype = message_type(self.method, self.cls)
        if key is not None:
            length = len(body) + 24
            head = struct.pack("!HHI", mtype, length, MAGIC_COOKIE) + self.txid
            mac = hmac.new(key, head + body, hashlib.sha1).digest()
            body += struct.pack("!HH", MESSAGE_INTEGRITY, 20) + mac
        if fingerprint:
            length = len(body) + 8
            head = struct.pack("!HHI", mtype, length, MAGIC_COOKIE) + self.txid
            crc = (binascii.crc32(head + body) & 0xFFFFFFFF) ^ FINGERPRINT_XOR
            body += struct.pack("!HHI", FINGERPRINT, 4, crc)
        return struct.pack("!HHI", mtype, len(body), MAGIC_COOKIE) + self.txid + body

    # ---- reading
    def get(self, atype: int) -> bytes | None:
        for t, v in self.attrs:
            if t == atype:
                return v
        return None

    def xor_address(self, atype: int) -> tuple[str, int] | None:
        v = self.get(atype)
        return None if v is None else decode_xor_address(v, self.txid)

    def error_code(self) -> int | None:
        v = self.get(ERROR_CODE)
        if v is None or len(v) < 4:
            return None
        return (v[2] & 0x7) * 100 + v[3]

    def error_reason(self) -> str:
        v = self.get(ERROR_CODE)
        return v[4:].decode(errors="replace") if v else ""

    def lifetime(self) -> int | None:
        v = self.get(LIFETIME)
        return None if v is None else struct.unpack("!I", v[:4])[0]

    def check_integrity(self, key: bytes) -> bool:
        """Verify MESSAGE-INTEGRITY of a parsed message (RFC 8489 section 14.5)."""
        raw = self.raw
        pos = 20
        while pos + 4 <= len(raw):
            atype, alen = struct.unpack("!HH", raw[pos : pos + 4])
            if atype == MESSAGE_INTEGRITY:
                head = bytearray(raw[:20])
                struct.pack_into("!H", head, 2, pos - 20 + 24)
                mac = hmac.new(key, bytes(head) + raw[20:pos], hashlib.sha1).digest()
                return hmac.compare_digest(mac, raw[pos + 4 : pos + 24])
            pos += 4 + alen + (4 - alen % 4) % 4
        return False

    def has_valid_fingerprint(self) -> bool | None:
        """None when there is no FINGERPRINT, else whether it is right."""
        raw = self.raw
        if len(raw) < 28:
            return None
        atype, alen = struct.unpack("!HH", raw[-8:-4])
        if atype != FINGERPRINT or alen != 4:
            return None
        (crc,) = struct.unpack("!I", raw[-4:])
        return crc == ((binascii.crc32(raw[:-8]) & 0xFFFFFFFF) ^ FINGERPRINT_XOR)


def is_stun(data: bytes) -> bool:
    return (
        len(data) >= 20
        and data[0] < 4
        and struct.unpack("!I", data[4:8])[0] == MAGIC_COOKIE
    )


def parse(data: bytes) -> Message:
    if not is_stun(data):
        raise StunError("not a STUN message")
    mtype, length, _ = struct.unpack("!HHI", data[:8])
    if length % 4 or 20 + length > len(data):
        raise StunError("bad STUN length")
    method, cls = split_type(mtype)
    msg = Message(method, cls, txid=data[8:20], raw=data[: 20 + length])
    pos, end = 20, 20 + length
    while pos + 4 <= end:
        atype, alen = struct.unpack("!HH", data[pos : pos + 4])
        if pos + 4 + alen > end:
            raise StunError("attribute overruns message")
        msg.attrs.append((atype, data[pos + 4 : pos + 4 + alen]))
        pos += 4 + alen + (4 - alen % 4) % 4
    return msg


def binding_request() -> Message:
    return Message(BINDING, REQUEST)


def probe_binding(server: tuple[str, int], timeout: float = 0.3) -> Message | None:
    """One Binding request over UDP; returns the success response or None."""
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        req = binding_request()
        try:
            s.sendto(req.encode(fingerprint=True), server)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                data, _ = s.recvfrom(2048)
                try:
                    msg = parse(data)
                except StunError:
                    continue
                if msg.txid == req.txid and msg.cls == SUCCESS:
                    return msg
        except OSError:
            return None
    return None


def binding_over_stream(server: tuple[str, int], timeout: float = 1.0, ssl_context=None,
                        server_hostname: str | None = None) -> tuple[Message, str | None]:
    """One Binding request over TCP, or over TLS when ssl_context is given, on a fresh
    connection. Returns (success response, the TLS version or None); raises OSError
    (ssl.SSLError is one) or StunError."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(server, timeout=timeout) as raw:
        s = raw if ssl_context is None else ssl_context.wrap_socket(
            raw, server_hostname=server_hostname)
        try:
            version = s.version() if ssl_context is not None else None
            req = binding_request()
            s.sendall(req.encode(fingerprint=True))
            buf = b""
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StunError("no Binding response in time")
                s.settimeout(left)
                chunk = s.recv(4096)
                if not chunk:
                    raise StunError(f"connection closed after {len(buf)} bytes")
                buf += chunk
                if len(buf) >= 20 and len(buf) >= 20 + struct.unpack("!H", buf[2:4])[0]:
                    msg = parse(buf)
                    if msg.txid != req.txid or msg.cls != SUCCESS:
                        raise StunError(f"unexpected answer: method {msg.method} class {msg.cls}")
                    return msg, version
        finally:
            if s is not raw:
                s.close()


def probe_binding_stream(server: tuple[str, int], timeout: float = 0.5) -> Message | None:
    """Readiness probe: a Binding over TCP; the response or None."""
    try:
        return binding_over_stream(server, timeout)[0]
    except (OSError, StunError):
        return None


class TurnClient:
    """A blocking TURN client over UDP with long-term credentials.

    Each request is retransmitted on a bounded RFC 8489-like schedule (RTO 250 ms,
    doubling, at most `tries` sends), so a silent server fails the test quickly
    instead of hanging it.
    """

    def __init__(
        self,
        server: tuple[str, int],
        user: str,
        password: str,
        local_ip: str = "127.0.0.1",
        tries: int = 5,
    ) -> None:
        self.server = server
        self.user = user
        self.password = password
        self.realm: str | None = None
        self.nonce: bytes | None = None
        self.key: bytes | None = None
        self.tries = tries
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((local_ip, 0))
        self.pending: list[bytes] = []  # non-response datagrams received meanwhile

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "TurnClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- raw transaction
    def transact(self, req: Message, key: bytes | None) -> Message:
        data = req.encode(key=key)
        rto = 0.25
        for _ in range(self.tries):
            self.sock.sendto(data, self.server)
            deadline = time.monotonic() + rto
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.sock.settimeout(left)
                try:
                    pkt, _ = self.sock.recvfrom(65535)
                except socket.timeout:
                    break
                if is_stun(pkt):
                    try:
                        msg = parse(pkt)
                    except StunError:
                        continue
                    if msg.txid == req.txid and msg.cls in (SUCCESS, ERROR):
                        if msg.has_valid_fingerprint() is False:
                            raise StunError("response with a bad FINGERPRINT")
                        return msg
                self.pending.append(pkt)
            rto *= 2
        raise StunError(f"no response to method 0x{req.method:03x} after {self.tries} tries")

    # ---- authenticated request with the 401/438 dance
    def _add_auth(self, req: Message) -> Message:
        assert self.realm is not None and self.nonce is not None
        attrs = [(t, v) for t, v in req.attrs if t not in (USERNAME, REALM, NONCE)]
        req.attrs = attrs + [
            (USERNAME, self.user.encode()),
            (REALM, self.realm.encode()),
            (NONCE, self.nonce),
        ]
        req.txid = os.urandom(12)
        return req

    def request(self, method: int, attrs: list[tuple[int, bytes]] | None = None,
                build=None) -> Message:
        """Send an authenticated request, learning REALM/NONCE from a 401 or 438.

        `build(msg)` may add attributes that depend on the transaction id (XOR
        addresses); it is called again for every new transaction id.
        """
        for _ in range(3):
            req = Message(method, REQUEST, attrs=list(attrs or []))
            if self.key is not None:
                self._add_auth(req)
            if build is not None:
                build(req)
            resp = self.transact(req, self.key)
            if resp.cls == SUCCESS:
                if self.key is not None and not resp.check_integrity(self.key):
                    raise StunError("success response without a valid MESSAGE-INTEGRITY")
                return resp
            code = resp.error_code()
            realm, nonce = resp.get(REALM), resp.get(NONCE)
            if code == 401 and self.key is None and realm is not None and nonce is not None:
                self.realm, self.nonce = realm.decode(), nonce
                self.key = long_term_key(self.user, self.realm, self.password)
                continue
            if code == 438 and nonce is not None and self.key is not None:
                self.nonce = nonce
                if realm is not None:
                    self.realm = realm.decode()
                continue
            return resp
        return resp

    # ---- TURN operations
    def allocate(self, lifetime: int | None = None, even_port: bool = False) -> Message:
        attrs = [(REQUESTED_TRANSPORT, bytes([UDP_PROTO, 0, 0, 0]))]
        if lifetime is not None:
            attrs.append((LIFETIME, struct.pack("!I", lifetime)))
        if even_port:
            attrs.append((EVEN_PORT, b"\x00"))
        return self.request(ALLOCATE, attrs)

    def refresh(self, lifetime: int) -> Message:
        return self.request(REFRESH, [(LIFETIME, struct.pack("!I", lifetime))])

    def create_permission(self, peer: tuple[str, int]) -> Message:
        return self.request(
            CREATE_PERMISSION, build=lambda m: m.add_xor_address(XOR_PEER_ADDRESS, peer)
        )

    def channel_bind(self, channel: int, peer: tuple[str, int]) -> Message:
        def build(m: Message) -> None:
            m.add(CHANNEL_NUMBER, struct.pack("!HH", channel, 0))
            m.add_xor_address(XOR_PEER_ADDRESS, peer)

        return self.request(CHANNEL_BIND, build=build)

    def send_indication(self, peer: tuple[str, int], data: bytes) -> None:
        m = Message(SEND, INDICATION)
        m.add_xor_address(XOR_PEER_ADDRESS, peer)
        m.add(DATA_ATTR, data)
        self.sock.sendto(m.encode(fingerprint=True), self.server)

    def send_channel_data(self, channel: int, data: bytes) -> None:
        self.sock.sendto(struct.pack("!HH", channel, len(data)) + _pad(data), self.server)

    def recv(self, timeout: float) -> bytes | None:
        """The next datagram from the server that is not a transaction response."""
        if self.pending:
            return self.pending.pop(0)
        self.sock.settimeout(timeout)
        try:
            pkt, _ = self.sock.recvfrom(65535)
            return pkt
        except socket.timeout:
            return None
