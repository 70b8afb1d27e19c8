"""coturn's turnutils_uclient against the server under test, with turnutils_peer as
the UDP echo peer.

uclient flags used (turnutils_uclient has no --help; `-h` is a flag, "hang on"):
  -c      no RTCP connections: one allocation per client. Without -c each client
          makes an RTP/RTCP pair of allocations (EVEN-PORT with the R bit, then the
          RESERVATION-TOKEN for the odd port).
  -s      send with Send indications (Data indications back) instead of channels.
  -m N    N clients; -n N messages per client (per allocation); -l message length.
  -e/-r   peer address/port; -L local address; -p server port; -u/-w credentials.
Never -G (extra requests) here. uclient exits 0 even at 100 % loss, so the summary
lines are parsed:  "start_mclient: tot_send_msgs=N, tot_recv_msgs=M" and
"Total lost packets N (x%), total send dropped N (x%)".
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

from common import Ctx, Fail, Skip, udp_port_free

UCLIENT = "turnutils_uclient"
PEER = "turnutils_peer"

RE_TOTALS = re.compile(r"start_mclient: tot_send_msgs=(\d+), tot_recv_msgs=(\d+)")
RE_RELAY = re.compile(r"Received relay addr: [\d.]+:(\d+)")
RE_LOST = re.compile(r"Total lost packets (\d+) \(([\d.]+)%\), total send dropped (\d+)")


class Peer:
    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log = os.path.join(ctx.workroot, "turnutils_peer.log")

    def start(self) -> None:
        for _ in range(5):
            self.port = udp_port_free("127.0.0.1", avoid=self.ctx.server.relay_ports)
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(
                    [PEER, "-L", "127.0.0.1", "-p", str(self.port)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            time.sleep(0.3)
            if self.proc.poll() is None:
                return
        raise Fail(f"{PEER} would not start (see {self.log})")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)


def run_uclient(ctx: Ctx, peer: Peer, flags: list[str], password: str | None = None,
                timeout: float = 60.0, tag: str = "", port: int | None = None) -> tuple[int, str]:
    """port: the server port to use (default the server's {port}; the TLS tests pass
    {tls_port})."""
    srv = ctx.server
    argv = [UCLIENT, *flags, "-L", "127.0.0.1", "-e", "127.0.0.1", "-r", str(peer.port),
            "-p", str(port or srv.port), "-u", ctx.creds.user,
            "-w", ctx.creds.password if password is None else password, srv.listen_ip]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=5)
        raise Fail(f"uclient {' '.join(flags)} did not finish within {timeout:.0f}s\n"
                   + out.decode(errors="replace")[-2000:])
    finally:
        if proc.poll() is None:  # interrupted (run time limit): leave nothing behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    text = out.decode(errors="replace")
    with open(os.path.join(ctx.workroot, f"uclient{tag}.log"), "w") as f:
        f.write(" ".join(argv) + "\n" + text)
    return proc.returncode, text


def check_zero_loss(ctx: Ctx, peer: Peer, flags: list[str], expected_msgs: int,
                    tag: str, rtp_pairs: bool = False, port: int | None = None) -> str:
    rc, text = run_uclient(ctx, peer, (["-v"] if rtp_pairs else []) + flags, tag=tag,
                           port=port)
    totals = RE_TOTALS.findall(text)
    lost = RE_LOST.search(text)
    if not totals or not lost:
        raise Fail(f"uclient printed no summary (exit {rc}):\n{text[-2000:]}")
    sent, recv = map(int, totals[-1])
    n_lost, pct, dropped = int(lost.group(1)), lost.group(2), int(lost.group(3))
    if "ERROR" in text:
        errs = [l for l in text.splitlines() if "ERROR" in l][:5]
        raise Fail("uclient reported errors:\n" + "\n".join(errs))
    if sent != expected_msgs or recv != expected_msgs or n_lost != 0 or dropped != 0:
        raise Fail(f"sent={sent} recv={recv} (expected {expected_msgs}), "
                   f"lost={n_lost} ({pct}%), send dropped={dropped}; exit {rc}")
    if rtp_pairs:
        # EVEN-PORT(R) gives an even relay port and reserves the next one, which the
        # RTCP allocation then gets with the RESERVATION-TOKEN (uclient -v prints both).
        ports = {int(p) for p in RE_RELAY.findall(text)}
        pairs = sorted(p for p in ports if p % 2 == 0 and p + 1 in ports)
        if not pairs:
            raise Fail(f"no even/odd RTP/RTCP relay port pair among {sorted(ports)}")
        return f"{sent} sent, {recv} echoed, 0 lost; relay port pairs {pairs}/+1"
    return f"{sent} sent, {recv} echoed, 0 lost"


def run(ctx: Ctx) -> None:
    for tool in (UCLIENT, PEER):
        if shutil.which(tool) is None:
            raise Skip(f"{tool} not installed (tests/scripts/setup-deps.sh)")
    peer = Peer(ctx)
    peer.start()
    try:
        n = 100
        ctx.check("uclient: UDP with channels (-c)",
                  lambda: check_zero_loss(ctx, peer, ["-c", "-n", str(n)], n, "-channels"))
        ctx.check("uclient: Send indications (-c -s)",
                  lambda: check_zero_loss(ctx, peer, ["-c", "-s", "-n", str(n)], n, "-send"))
        # Without -c: RTP+RTCP allocation pairs (EVEN-PORT + RESERVATION-TOKEN); the
        # totals count both allocations of the pair.
        ctx.check("uclient: RTP+RTCP pairs, EVEN-PORT/RESERVATION-TOKEN (no -c)",
                  lambda: check_zero_loss(ctx, peer, ["-n", str(n)], 2 * n, "-rtp-rtcp",
                                          rtp_pairs=True))
        m, n20 = 20, 50
        ctx.check("uclient: 20 clients with channels (-c -m 20)",
                  lambda: check_zero_loss(ctx, peer, ["-c", "-m", str(m), "-n", str(n20)],
                                          m * n20, "-m20"))

        def wrong_password() -> str:
            rc, text = run_uclient(ctx, peer, ["-c", "-n", "5"], password="not-" + ctx.creds.password,
                                   timeout=30, tag="-wrongpass")
            totals = RE_TOTALS.findall(text)
            recv = int(totals[-1][1]) if totals else 0
            if rc == 0 or recv > 0:
                raise Fail(f"uclient with a wrong password: exit {rc}, {recv} messages echoed\n"
                           + text[-1500:])
            return f"refused (exit {rc})"

        ctx.check("uclient: wrong password is refused", wrong_password)
    finally:
        peer.stop()
