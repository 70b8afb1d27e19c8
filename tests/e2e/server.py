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
A literal brace is written {{ or }}.

The server counts as ready when it answers a STUN Binding request over UDP on
{listen_ip}:{port}; it must do so within TURN_READY_TIMEOUT seconds (default 20).
"""

from __future__ import annotations

import os
import random
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

import stunmsg

COTURN_CMD = (
    "turnserver -n --no-cli --listening-ip={listen_ip} --relay-ip={listen_ip} "
    "--listening-port={port} --min-port={relay_min} --max-port={relay_max} "
    "--realm={realm} --user={user}:{password} --lt-cred-mech --fingerprint "
    "--allow-loopback-peers --no-tls --no-dtls --no-tcp-relay "
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
                 listen_ip: str = "127.0.0.1") -> None:
        self.template = template
        self.name = name
        self.creds = creds
        self.listen_ip = listen_ip
        self.workdir = os.path.join(workroot, name)
        os.makedirs(self.workdir, exist_ok=True)
        self.log_path = os.path.join(self.workdir, "server.log")
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.relay_ports = range(0)
        self.argv: list[str] = []

    @property
    def addr(self) -> tuple[str, int]:
        return (self.listen_ip, self.port)

    def render(self) -> list[str]:
        values = {
            "listen_ip": self.listen_ip,
            "port": self.port,
            "realm": self.creds.realm,
            "user": self.creds.user,
            "password": self.creds.password,
            "relay_min": self.relay_ports.start,
            "relay_max": self.relay_ports.stop - 1,
            "workdir": self.workdir,
        }
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
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    last_error = f"exited with status {self.proc.returncode} before it was ready"
                    break
                if stunmsg.probe_binding(self.addr, timeout=0.2) is not None:
                    return
                time.sleep(0.1)
            else:
                self.stop()
                raise RuntimeError(
                    f"server {self.name} did not answer a STUN Binding on "
                    f"{self.listen_ip}:{self.port} within {ready_timeout:.0f}s\n"
                    + self.log_tail())
        raise RuntimeError(f"server {self.name} {last_error}\n" + self.log_tail())

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM the server's process group, SIGKILL after 5 s. Returns its status."""
        p = self.proc
        if p is None:
            return None
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
