"""UDP relay benchmark: datagram rates direct, through socat and through flowtap, loss counted.

    python benchmarks/udp.py [--seconds 1] [--rounds 9] [--mode M] [--size B] [--path P]

Modes, each for 64 B and 1,400 B datagrams, one client, every peer a process of its own:
- `ping-pong`: one datagram in flight, echoed back (latency bound).
- `rr-window`: request/response with a window of datagrams in flight, echoed back.
- `one-way`: datagrams to a sink that acknowledges its count straight to the client (not
  through the relay), so the client keeps a bounded window in flight: a rate the path sustains.
Loss is what was sent and never arrived (for one-way, counted by the sink). socat runs as
`socat UDP-LISTEN:P,fork,reuseaddr UDP:127.0.0.1:Q`; flowtap as `flowtap run --udp` (its
defaults, which busy-poll while datagrams are dense), and `flowtap-sleeping` adds
`--busy-poll 0` to show what busy polling is worth.
By default the client and the echo send runs of datagrams with UDP segmentation offload, as
QUIC stacks do, so the load generator leaves the CPUs to the relay; flowtap receives such a
run whole (UDP_GRO), which socat cannot. `--plain-client` sends one datagram per system call
instead: every relay then receives datagram by datagram.
`relay us/dgram` is the relay's CPU time (user + system, all its processes) per datagram it
relayed: steadier than rates, which depend on how the shared CPUs are divided between the
client, the peer and the relay. flowtap's includes its busy polling: while it polls a whole
CPU, the figure only mirrors its rate (`flowtap-sleeping` shows the work per datagram).
Target: flowtap at >= 1.5x socat's rate with 0 loss.

A relay adds a hop to every round trip, so where the direct path itself (client and peer,
no relay) stays under 1.5x socat's rate, the target is out of any relay's reach and becomes
the direct path's rate. That happens to ping-pong on machines where waking a peer that
sleeps in a receive is most of a round trip (a VM whose idle vCPUs halt: socat wakes four
processes per round trip, the direct path two). The verdict names every row judged so, with
both ratios; rates and ratios are printed as measured either way.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from processes import stop_processes

HOST = "127.0.0.1"
SIZES = (64, 1400)
RR_WINDOW = 16
ONE_WAY_WINDOW = 64
ACK_EVERY = 32
MODES = ("ping-pong", "rr-window", "one-way")
PATHS = ("direct", "socat", "flowtap", "flowtap-sleeping")
LISTENING = re.compile(r"^listening udp \S+:(\d+) -> ")
_SOL_UDP = 17
_UDP_SEGMENT = 103


# -- peers (run as `udp.py --peer echo|sink`) ---------------------------------------------------


class Sender:
    """Sends runs of one payload cheaply: with UDP_SEGMENT, each copy still its own datagram."""

    def __init__(self, sock: socket.socket, payload: bytes, *, batched: bool) -> None:
        self._sock = sock
        self._payload = payload
        self._per_call = min(64, 65_000 // len(payload)) if batched and payload else 1
        self._runs: dict[int, bytes] = {}
        self._segment = [(_SOL_UDP, _UDP_SEGMENT, struct.pack("=H", len(payload)))]

    def send(self, count: int, address: tuple[str, int] | None = None) -> None:
        while count > 0:
            k = min(count, self._per_call)
            count -= k
            if k == 1:
                if address is None:
                    self._sock.send(self._payload)
                else:
                    self._sock.sendto(self._payload, address)
                continue
            run = self._runs.get(k)
            if run is None:
                run = self._runs[k] = self._payload * k
            if address is None:
                self._sock.sendmsg([run], self._segment)
            else:
                self._sock.sendmsg([run], self._segment, 0, address)


def run_echo(batched: bool) -> None:
    """Echo every datagram to its sender; back-to-back equal ones leave as one run."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((HOST, 0))
    print(sock.getsockname()[1], flush=True)
    buf = bytearray(65_536)
    view = memoryview(buf)
    recvfrom_into = sock.recvfrom_into
    senders: dict[tuple[bytes, bool], Sender] = {}
    while True:
        n, addr = recvfrom_into(buf)  # blocks for the first of a burst
        payload = bytes(buf[:n])
        count = 1
        while True:
            try:
                m, other = recvfrom_into(buf, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            if m == n and other == addr and view[:m] == payload:
                count += 1
                continue
            _sender(senders, sock, payload, batched).send(count, addr)
            n, addr, payload, count = m, other, bytes(buf[:m]), 1
        _sender(senders, sock, payload, batched).send(count, addr)


def _sender(
    senders: dict[tuple[bytes, bool], Sender], sock: socket.socket, payload: bytes, batched: bool
) -> Sender:
    sender = senders.get((payload, batched))
    if sender is None:
        sender = senders[(payload, batched)] = Sender(sock, payload, batched=batched)
    return sender


def run_sink(ack_port: int) -> None:
    """Count datagrams, one receive each; acknowledge the count to the client directly."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((HOST, 0))
    ack = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ack.connect((HOST, ack_port))
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    print(sock.getsockname()[1], flush=True)
    buf = bytearray(65_536)
    recv_into = sock.recv_into
    count = acked = 0
    while True:
        try:
            recv_into(buf, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            if count != acked:
                acked = count
                ack.send(count.to_bytes(8, "big"))
            poller.poll(50)
            continue
        count += 1
        if count - acked >= ACK_EVERY:
            acked = count
            ack.send(count.to_bytes(8, "big"))


# -- paths -----------------------------------------------------------------------------------


def start_peer(kind: str, *args: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--peer", kind, *args], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def flowtap_command() -> list[str]:
    exe = shutil.which("flowtap", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "flowtap.inspector.cli"]


def cpu_seconds(group: int) -> float:
    """User + system CPU time of the processes in process group `group` (exited ones not)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group:  # fields[2] is the process group
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


@dataclass
class RelayPath:
    port: int
    group: int | None  # the relay's process group, None when direct

    def cpu_seconds(self) -> float:
        return 0.0 if self.group is None else cpu_seconds(self.group)


@contextmanager
def path_to(kind: str, upstream_port: int) -> Iterator[RelayPath]:
    """Where a client sends for `kind` (see PATHS) towards upstream_port."""
    if kind == "direct":
        yield RelayPath(upstream_port, None)
        return
    if kind == "socat":
        port = free_udp_port()
        proc = subprocess.Popen(
            [
                "socat",
                f"UDP-LISTEN:{port},bind={HOST},fork,reuseaddr",
                f"UDP:{HOST}:{upstream_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,  # its forked children are stopped with it, as a group
        )
        time.sleep(0.3)  # socat prints nothing when ready; give it a moment to bind
    else:
        proc = subprocess.Popen(
            [
                *flowtap_command(),
                "run",
                "--udp",
                "--listen",
                f"{HOST}:0",
                "--upstream",
                f"{HOST}:{upstream_port}",
                *(["--busy-poll", "0"] if kind == "flowtap-sleeping" else []),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        assert proc.stdout is not None
        match = LISTENING.match(proc.stdout.readline())
        assert match, "flowtap did not start"
        port = int(match.group(1))
    try:
        yield RelayPath(port, proc.pid)
    finally:
        if kind == "socat":
            os.killpg(proc.pid, signal.SIGTERM)
        stop_processes([proc])


# -- clients ---------------------------------------------------------------------------------


@dataclass
class Result:
    delivered: int
    lost: int
    seconds: float
    hops: int  # datagrams the relay moves per delivered one
    relay_cpu_s: float = 0.0

    @property
    def relay_us_per_datagram(self) -> float:
        return self.relay_cpu_s / (self.delivered * self.hops) * 1e6 if self.delivered else 0.0

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0


def _wait_readable(poller: select.poll, timeout_s: float) -> bool:
    return bool(poller.poll(timeout_s * 1000))


def request_response(port: int, size: int, window: int, seconds: float, *, batched: bool) -> Result:
    """Echoed datagrams with `window` in flight; a reply missing for 0.2 s counts as lost.

    Replies are collected as they come, and as many new requests go out as replies came in.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.connect((HOST, port))
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    sender = Sender(sock, os.urandom(size), batched=batched)
    buf = bytearray(65_536)
    recv_into = sock.recv_into
    dontwait = socket.MSG_DONTWAIT
    sent = received = lost = 0
    started = time.monotonic()
    end = started + seconds
    sender.send(window)
    sent += window
    while True:
        got = 0
        while True:
            try:
                n = recv_into(buf, 0, dontwait)
            except BlockingIOError:
                break
            assert n == size
            got += 1
        if not got:
            if _wait_readable(poller, 0.2):
                continue
            lost = sent - received  # nothing came back for 0.2 s: what is in flight is lost
            if time.monotonic() >= end:
                break
            sender.send(window)
            sent += window
            continue
        received += got
        if time.monotonic() >= end:
            break
        sender.send(got)
        sent += got
    elapsed = time.monotonic() - started
    # Collect what is still in flight: it is not lost, only late for the clock.
    while sent - received - lost > 0:
        try:
            recv_into(buf, 0, dontwait)
        except BlockingIOError:
            if not _wait_readable(poller, 0.2):
                lost = sent - received
                break
            continue
        received += 1
    sock.close()
    return Result(received, lost, elapsed, hops=2)


def one_way(
    port: int, ack_sock: socket.socket, size: int, seconds: float, *, batched: bool
) -> Result:
    """Datagrams to the sink with at most ONE_WAY_WINDOW not yet acknowledged."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((HOST, port))
    sender = Sender(sock, os.urandom(size), batched=batched)
    poller = select.poll()
    poller.register(ack_sock, select.POLLIN)
    buf = bytearray(16)
    recv_into = ack_sock.recv_into
    sent = acked = base = 0  # base: acknowledgements count from here after a stall
    started = last = time.monotonic()
    end = started + seconds
    while True:
        room = ONE_WAY_WINDOW - (sent - (base + acked))
        if room > 0:
            sender.send(room)
            sent += room
        if not _wait_readable(poller, 0.5):
            base = sent - acked  # give up on what is in flight; counted as loss below
            if time.monotonic() >= end:
                break
            continue
        while True:
            try:
                recv_into(buf, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            acked = int.from_bytes(buf[:8], "big")
        last = time.monotonic()
        if last >= end:
            break
    # The final count: the sink acknowledges within 50 ms of going quiet.
    while _wait_readable(poller, 0.3):
        recv_into(buf)
        acked = int.from_bytes(buf[:8], "big")
    sock.close()
    return Result(acked, sent - acked, last - started, hops=1)


def measure(
    mode: str, kind: str, size: int, echo_port: int, seconds: float, *, batched: bool
) -> Result:
    if mode != "one-way":
        with path_to(kind, echo_port) as path:
            window = 1 if mode == "ping-pong" else RR_WINDOW
            before = path.cpu_seconds()
            result = request_response(path.port, size, window, seconds, batched=batched)
            result.relay_cpu_s = path.cpu_seconds() - before
            return result
    # A fresh sink (and acknowledgement socket) per run, so counts start at zero.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ack_sock:
        ack_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        ack_sock.bind((HOST, 0))
        sink, sink_port = start_peer("sink", str(ack_sock.getsockname()[1]))
        try:
            with path_to(kind, sink_port) as path:
                before = path.cpu_seconds()
                result = one_way(path.port, ack_sock, size, seconds, batched=batched)
                result.relay_cpu_s = path.cpu_seconds() - before
                return result
        finally:
            stop_processes([sink])


# -- the run ---------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement (default 1)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=9,
        help="measurements per row, the paths taking turns; the median is shown (default 9: "
        "socat's own rate varies by a factor of 1.7 between runs, and on a shared machine "
        "spells of a few seconds slow every path's peers by a third)",
    )
    parser.add_argument(
        "--mode", action="append", choices=MODES, help="only this mode (repeatable)"
    )
    parser.add_argument(
        "--path",
        action="append",
        choices=PATHS,
        help="only this path (repeatable; socat and direct are always measured as baselines)",
    )
    parser.add_argument("--size", action="append", type=int, help="only this datagram size")
    parser.add_argument(
        "--plain-client",
        action="store_true",
        help="client and echo send one datagram per system call (default: runs with "
        "UDP_SEGMENT, so the load generator leaves the CPUs to the relay)",
    )
    parser.add_argument("--peer", choices=["echo", "sink"], help=argparse.SUPPRESS)
    parser.add_argument("peer_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer == "echo":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        run_echo(batched=args.peer_args == ["batched"])
        return 0
    if args.peer == "sink":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        run_sink(int(args.peer_args[0]))
        return 0
    if shutil.which("socat") is None:
        print("socat is not installed: run tests/setup-debian.sh", file=sys.stderr)
        return 2
    print(
        f"UDP relay benchmark: median of {args.rounds} x {args.seconds:g} s per row, paths "
        f"taking turns; {os.cpu_count()} CPUs (shared)\n"
    )
    print(
        f"{'mode':<10} {'size':>6} {'path':<16} {'datagrams/s':>12} {'loss':>6} "
        f"{'vs socat':>9} {'vs direct':>10} {'relay us/dgram':>15}"
    )
    modes = args.mode or MODES
    paths = [p for p in PATHS if p in ("direct", "socat") or not args.path or p in args.path]
    batched = not args.plain_client
    echo, echo_port = start_peer("echo", *(["batched"] if batched else []))
    verdicts: list[Verdict] = []
    try:
        for mode in modes:
            for size in args.size or SIZES:
                runs: dict[str, list[Result]] = {kind: [] for kind in paths}
                for _ in range(max(1, args.rounds)):  # taking turns spreads the noise evenly
                    for kind in paths:
                        result = measure(mode, kind, size, echo_port, args.seconds, batched=batched)
                        runs[kind].append(result)
                socat_rate = median(r.rate for r in runs["socat"])
                direct_rate = median(r.rate for r in runs["direct"])
                for kind in paths:
                    rate = median(r.rate for r in runs[kind])
                    lost = sum(r.lost for r in runs[kind])
                    relay = kind != "direct"
                    vs_socat = f"{rate / socat_rate:.2f}x" if relay else ""
                    vs_direct = f"{rate / direct_rate:.2f}x" if relay and direct_rate else ""
                    cpu = median(r.relay_us_per_datagram for r in runs[kind])
                    shown_cpu = f"{cpu:.2f}" if relay else ""
                    print(
                        f"{mode:<10} {size:>5}B {kind:<16} {rate:>12,.0f} "
                        f"{lost:>6} {vs_socat:>9} {vs_direct:>10} {shown_cpu:>15}",
                        flush=True,
                    )
                    if kind == "flowtap":
                        verdicts.append(Verdict(mode, size, rate, lost, socat_rate, direct_rate))
    finally:
        stop_processes([echo])
    print()
    print(verdict_text(verdicts))
    return 0


@dataclass
class Verdict:
    """flowtap's row against the target: 1.5x socat's rate, capped at the direct path's."""

    mode: str
    size: int
    rate: float
    lost: int
    socat_rate: float
    direct_rate: float

    @property
    def capped(self) -> bool:
        """Whether even the direct path stays under 1.5x socat, so the target is its rate."""
        return self.direct_rate < 1.5 * self.socat_rate

    @property
    def met(self) -> bool:
        return self.lost == 0 and self.rate >= min(1.5 * self.socat_rate, self.direct_rate)

    def explained(self) -> str:
        direct, socat = self.direct_rate, self.socat_rate
        strict = "met too" if self.rate >= 1.5 * socat else "not"
        return (
            f"  {self.mode} {self.size}B: the direct path is {direct / socat:.2f}x socat, so the "
            f"target is its rate; flowtap is {self.rate / direct:.2f}x direct "
            f"({self.rate / socat:.2f}x socat: 1.5x {strict})"
        )


def verdict_text(verdicts: list[Verdict]) -> str:
    """The verdict line, then a line for each row whose target is the direct path's rate."""
    missed = [f"{v.mode} {v.size}B" for v in verdicts if not v.met]
    lines = [
        "target (>= 1.5x socat, or the direct path's rate where that is lower; 0 loss): "
        + ("met" if not missed else "missed: " + ", ".join(missed))
    ]
    lines += [v.explained() for v in verdicts if v.capped]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
