"""Shared pieces of the end-to-end runner: results, the per-group context, ports."""

from __future__ import annotations

import os
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from pki import Pki
from server import Creds, ServerUnderTest


class Fail(Exception):
    """A test assertion failed."""


class Skip(Exception):
    """The test cannot run here (missing tool, or not configured)."""


@dataclass
class Result:
    name: str
    status: str  # PASS, FAIL, SKIP
    seconds: float
    detail: str = ""


@dataclass
class Ctx:
    creds: Creds
    workroot: str
    server: ServerUnderTest | None = None
    deny_cmd: str | None = None
    pki: Pki | None = None  # the run's test CA and server certificates (pki.py)
    results: list[Result] = field(default_factory=list)
    verbose: bool = False

    def record(self, name: str, status: str, seconds: float, detail: str = "") -> None:
        r = Result(name, status, seconds, detail)
        self.results.append(r)
        first, _, rest = detail.partition("\n")
        line = f"{status} {name} ({seconds:.1f}s)" + (f": {first}" if first else "")
        print(line, flush=True)
        if rest and (status == "FAIL" or self.verbose):
            print("    " + rest.replace("\n", "\n    "), flush=True)

    def check(self, name: str, fn: Callable[[], str | None]) -> bool:
        """Run one test; it passes unless it raises. Its return value is a detail."""
        t0 = time.monotonic()
        try:
            detail = fn() or ""
        except Skip as e:
            self.record(name, "SKIP", time.monotonic() - t0, str(e))
            return True
        except Fail as e:
            self.record(name, "FAIL", time.monotonic() - t0, str(e))
            return False
        except Exception as e:  # noqa: BLE001 - any error is a failure of that test
            tb = traceback.format_exc(limit=6)
            self.record(name, "FAIL", time.monotonic() - t0, f"{type(e).__name__}: {e}\n{tb}")
            return False
        self.record(name, "PASS", time.monotonic() - t0, detail)
        return True


def udp_port_free(ip: str, avoid: range = range(0)) -> int:
    """A UDP port that the kernel reports free now (for a helper that needs a number)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port
    raise RuntimeError("no free UDP port")


class UdpEcho:
    """A UDP echo peer on 127.0.0.1 in a thread; records who sent what. Bounded: it
    stops after max_packets or when closed."""

    def __init__(self, ip: str = "127.0.0.1", max_packets: int = 100_000) -> None:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((ip, 0))
        self.sock.settimeout(0.2)
        self.addr = self.sock.getsockname()[:2]
        self.sources: set[tuple[str, int]] = set()
        self.count = 0
        self.max_packets = max_packets
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set() and self.count < self.max_packets:
            try:
                data, src = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            self.count += 1
            self.sources.add(src[:2])
            try:
                self.sock.sendto(data, src)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()

    def __enter__(self) -> "UdpEcho":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def summarize(results: list[Result], ci: bool) -> tuple[str, int]:
    """The run's last line and exit status. A failure fails the run; under CI a skip
    does too, so that a green CI run means every third-party client really ran (a
    missing browser or Python package is a SKIP locally).

    >>> r = lambda s: Result("t", s, 0.0)
    >>> summarize([r("PASS"), r("SKIP")], ci=False)
    ('1 passed, 0 failed, 1 skipped', 0)
    >>> summarize([r("PASS"), r("SKIP")], ci=True)
    ('1 passed, 0 failed, 1 skipped (CI is set: a skipped test fails the run)', 1)
    >>> summarize([r("PASS"), r("FAIL")], ci=False)
    ('1 passed, 1 failed, 0 skipped', 1)
    >>> summarize([r("PASS")], ci=True)
    ('1 passed, 0 failed, 0 skipped', 0)
    """
    n_pass = sum(r.status == "PASS" for r in results)
    n_fail = sum(r.status == "FAIL" for r in results)
    n_skip = sum(r.status == "SKIP" for r in results)
    line = f"{n_pass} passed, {n_fail} failed, {n_skip} skipped"
    skip_fails = ci and n_skip > 0
    if skip_fails:
        line += " (CI is set: a skipped test fails the run)"
    return line, 1 if n_fail or skip_fails else 0
