"""Starting and stopping the TURN server under test from a command template.

The interface (see README.md):

  TURN_SERVER_CMD               template of the command that starts the server with
                                loopback peers ALLOWED (the relay tests use peers on
                                127.0.0.1). Default: coturn's turnserver.
  TURN_SERVER_CMD_DENY_LOOPBACK template of the same server with its default peer
                                policy (loopback peers refused). Default: coturn without
                                --allow-loopback-peers when TURN_SERVER_CMD is unset;
                                when TURN_SERVER_CMD is set and this is not, the 403
                                check is skipped.

Placeholders, substituted in every word of the template after shell-like splitting:
  {listen_ip} {port} {realm} {user} {password} {relay_min} {relay_max} {workdir}
  {tls_port} {tls_cert} {tls_key} {tls_ca}
A literal brace is written {{ or }}. A template that uses {tls_port} declares that the
server serves TURN over TCP on {port} and over TLS on {tls_port}, with the certificate
{tls_cert} (PEM, DNS name turn.test, signed by the per-run test CA {tls_ca}) and its key
{tls_key}; the TCP/TLS groups are skipped for a template without it.

The server counts as ready when it answers a STUN Binding request over UDP on
{listen_ip}:{port} and, if the template uses {tls_port}, also a Binding over TCP on
{listen_ip}:{port} and accepts TCP connections on {listen_ip}:{tls_port}; it must do so
within TURN_READY_TIMEOUT seconds (default 20).
"""

from __future__ import annotations

import os
import random
import shlex
import signal
import socket
import string
import subprocess
import time
from dataclasses import dataclass

import stunmsg
from pki import CertFiles, Pki

COTURN_CMD = (
    "turnserver -n --no-cli --listening-ip={listen_ip} --relay-ip={listen_ip} "
    "--listening-port={port} --tls-listening-port={tls_port} "
    "--cert={tls_cert} --pkey={tls_key} "
    "--min-port={relay_min} --max-port={relay_max} "
    "--realm={realm} --user={user}:{password} --lt-cred-mech --fingerprint "
    "--allow-loopback-peers --no-dtls --no-tcp-relay "
    "--log-file=stdout --simple-log --pidfile={workdir}/turnserver.pid "
    "--userdb={workdir}/turndb"
)
COTURN_DENY_LOOPBACK_CMD = COTURN_CMD.replace(" --allow-loopback-peers", "")

RELAY_RANGE_SIZE = 256


def server_templates() -> tuple[str, str | None]:
    """(allow-loopback template, deny-loopback template or None)."""
    cmd = os.environ.get("TURN_SERVER_CMD", "").strip()
    deny = os.environ.get("TURN_SERVER_CMD_DENY_LOOPBACK", "").strip()
    if not cmd:
        return COTURN_CMD, deny or COTURN_DENY_LOOPBACK_CMD
    return cmd, deny or None


def _bindable(ip: str, port: int, kind: int) -> bool:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, kind) as s:
        try:
            s.bind((ip, port))
            return True
        except OSError:
            return False


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = f.read().split()
            return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def pick_listen_port(ip: str, avoid: range) -> int:
    """A port free for both UDP and TCP on ip (the kernel picks it)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
            port = s.getsockname()[1]
        if port not in avoid and _bindable(ip, port, socket.SOCK_STREAM):
            return port
    raise RuntimeError("could not find a free listening port")


def pick_tcp_port(ip: str, avoid: set[int]) -> int:
    """A TCP port free on ip (the kernel picks it), not in avoid."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port
    raise RuntimeError("could not find a free TCP port")


def template_fields(template: str) -> set[str]:
    """The placeholder names a template uses ({{ and }} are literal braces)."""
    names = set()
    try:
        for word in shlex.split(template):
            names.update(f for _, f, _, _ in string.Formatter().parse(word) if f)
    except ValueError:
        pass
    return names


def accepts_tcp(addr: tuple[str, int], timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(addr, timeout=timeout):
            return True
    except OSError:
        return False


def pick_relay_range(ip: str, size: int = RELAY_RANGE_SIZE) -> range:
    """An even-aligned block of UDP ports, all currently free, outside the kernel's
    ephemeral range where possible (so clients' own sockets do not take them)."""
    lo_e, hi_e = _ephemeral_range()
    spans = [(10000, lo_e - size), (hi_e + 1, 65535 - size)]
    spans = [(a, b) for a, b in spans if b > a]
    rnd = random.Random()
    for _ in range(40):
        a, b = rnd.choice(spans)
        base = rnd.randrange(a, b) & ~1
        ports = range(base, base + size)
        if all(_bindable(ip, p, socket.SOCK_DGRAM) for p in ports):
            return ports
    raise RuntimeError("could not find a free relay port range")


@dataclass
class Creds:
    realm: str
    user: str
    password: str


class ServerUnderTest:
    """One running instance of the server under test, in its own process group."""

    def __init__(self, template: str, name: str, workroot: str, creds: Creds,
                 listen_ip: str = "127.0.0.1", pki: Pki | None = None,
                 cert: CertFiles | None = None) -> None:
        """pki: the run's test PKI (for the {tls_*} placeholders); cert: the identity
        the server presents (default pki.server, DNS:turn.test)."""
        self.template = template
        self.pki = pki
        self.cert = cert or (pki.server if pki else None)
        # A template with {tls_port} serves TURN over TCP on {port} and TLS on {tls_port}.
        self.tls = "tls_port" in template_fields(template)
        self.name = name
        self.creds = creds
        self.listen_ip = listen_ip
        self.workdir = os.path.join(workroot, name)
        os.makedirs(self.workdir, exist_ok=True)
        self.log_path = os.path.join(self.workdir, "server.log")
        self.proc: subprocess.Popen | None = None
        # After a binary upgrade (SIGUSR2 to turnpike serve): the process that took over,
        # in the first one's process group.
        self.successor: int | None = None
        self.port = 0
        self.tls_port = 0
        self.relay_ports = range(0)
        self.argv: list[str] = []

    @property
    def addr(self) -> tuple[str, int]:
        return (self.listen_ip, self.port)

    @property
    def tls_addr(self) -> tuple[str, int]:
        return (self.listen_ip, self.tls_port)

    def render(self) -> list[str]:
        if self.tls and (self.pki is None or self.cert is None):
            raise RuntimeError("the template uses {tls_port} but there is no test PKI "
                               "(is the openssl CLI installed?)")
        values = {
            "listen_ip": self.listen_ip,
            "port": self.port,
            "realm": self.creds.realm,
            "user": self.creds.user,
            "password": self.creds.password,
            "relay_min": self.relay_ports.start,
            "relay_max": self.relay_ports.stop - 1,
            "workdir": self.workdir,
            "tls_port": self.tls_port,
        }
        if self.pki is not None and self.cert is not None:
            values.update(tls_cert=self.cert.cert, tls_key=self.cert.key, tls_ca=self.pki.ca)
        try:
            return [w.format(**values) for w in shlex.split(self.template)]
        except (KeyError, IndexError, ValueError) as e:
            raise RuntimeError(f"bad server command template {self.template!r}: {e!r}")

    def start(self, ready_timeout: float | None = None) -> None:
        if ready_timeout is None:
            ready_timeout = float(os.environ.get("TURN_READY_TIMEOUT", "20"))
        last_error = ""
        for attempt in range(3):  # a lost race for a free port is retried
            self.relay_ports = pick_relay_range(self.listen_ip)
            self.port = pick_listen_port(self.listen_ip, self.relay_ports)
            avoid = set(self.relay_ports) | {self.port - 1, self.port, self.port + 1}
            self.tls_port = pick_tcp_port(self.listen_ip, avoid) if self.tls else 0
            self.argv = self.render()
            log = open(self.log_path, "ab")
            log.write(f"\n=== start {attempt}: {shlex.join(self.argv)}\n".encode())
            log.flush()
            try:
                self.proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )
            except OSError as e:
                log.close()
                raise RuntimeError(f"cannot start {self.argv[0]!r}: {e}") from e
            log.close()
            deadline = time.monotonic() + ready_timeout
            # Readiness, in order: a Binding over UDP; with {tls_port} in the template,
            # also a Binding over TCP on {port} and a TCP accept on {tls_port}.
            checks = [(f"a STUN Binding over UDP on {self.listen_ip}:{self.port}",
                       lambda: stunmsg.probe_binding(self.addr, timeout=0.2) is not None)]
            if self.tls:
                checks += [
                    (f"a STUN Binding over TCP on {self.listen_ip}:{self.port}",
                     lambda: stunmsg.probe_binding_stream(self.addr, timeout=0.5) is not None),
                    (f"a TCP connection on the TLS port {self.listen_ip}:{self.tls_port}",
                     lambda: accepts_tcp(self.tls_addr)),
                ]
            pending = list(checks)
            while time.monotonic() < deadline and pending and self.proc.poll() is None:
                if pending[0][1]():
                    pending.pop(0)
                    continue
                time.sleep(0.1)
            if not pending:
                return
            if self.proc.poll() is None:
                self.stop()
                raise RuntimeError(
                    f"server {self.name} did not answer {pending[0][0]} "
                    f"within {ready_timeout:.0f}s\n" + self.log_tail())
            last_error = f"exited with status {self.proc.returncode} before it was ready"
        raise RuntimeError(f"server {self.name} {last_error}\n" + self.log_tail())

    def alive(self) -> bool:
        if self.successor is not None:
            try:
                os.kill(self.successor, 0)
                return True
            except ProcessLookupError:
                return False
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM the server's process group, SIGKILL after 5 s. Returns its status."""
        p = self.proc
        if p is None:
            return None
        if self.successor is not None:
            # The first process has handed over and exited; its group holds the
            # successor.
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and self.alive():
                time.sleep(0.05)
            if self.alive():
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.poll()
            return 0
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=5)
        return p.returncode

    def log_tail(self, lines: int = 25) -> str:
        try:
            with open(self.log_path, "rb") as f:
                tail = f.read().decode(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "--- tail of " + self.log_path + "\n" + "\n".join(tail)

    def __enter__(self) -> "ServerUnderTest":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
