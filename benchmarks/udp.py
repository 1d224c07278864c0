"""UDP relay benchmark: datagram rates direct, through socat and through flowtap, loss counted.

    python benchmarks/udp.py [--seconds 3]

Modes, each for 64 B and 1,400 B datagrams, one client, every peer a process of its own:
- `ping-pong`: one datagram in flight, echoed back (latency bound).
- `rr-window`: request/response with a window of datagrams in flight, echoed back.
- `one-way`: datagrams to a sink that acknowledges its count straight to the client (not
  through the relay), so the client keeps a bounded window in flight: a rate the path sustains.
Loss is what was sent and never arrived (for one-way, counted by the sink). socat runs as
`socat UDP-LISTEN:P,fork,reuseaddr UDP:127.0.0.1:Q`; flowtap as `flowtap run --udp`.
`relay us/dgram` is the relay's CPU time (user + system, all its processes) per datagram it
relayed: steadier than rates, which depend on how the shared CPUs are divided between the
client, the peer and the relay. Target: flowtap at >= 1.5x socat's rate with 0 loss.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

HOST = "127.0.0.1"
SIZES = (64, 1400)
RR_WINDOW = 16
ONE_WAY_WINDOW = 64
ACK_EVERY = 32
MODES = ("ping-pong", "rr-window", "one-way")
PATHS = ("direct", "socat", "flowtap")
LISTENING = re.compile(r"^listening udp \S+:(\d+) -> ")


# -- peers (run as `udp.py --peer echo|sink`) ---------------------------------------------------


def run_echo() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((HOST, 0))
    print(sock.getsockname()[1], flush=True)
    buf = bytearray(65_536)
    view = memoryview(buf)
    recvfrom_into = sock.recvfrom_into
    sendto = sock.sendto
    while True:
        n, addr = recvfrom_into(buf)
        sendto(view[:n], addr)


def run_sink(ack_port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((HOST, 0))
    sock.settimeout(0.05)
    ack = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ack.connect((HOST, ack_port))
    print(sock.getsockname()[1], flush=True)
    buf = bytearray(65_536)
    recv_into = sock.recv_into
    count = 0
    acked = 0
    while True:
        try:
            recv_into(buf)
        except TimeoutError:
            if count != acked:
                acked = count
                ack.send(count.to_bytes(8, "big"))
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


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
    """Where a client sends for `kind` (direct, socat, flowtap) towards upstream_port."""
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
        stop(proc)  # type: ignore[arg-type]


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


def request_response(port: int, size: int, window: int, seconds: float) -> Result:
    """Echoed datagrams with `window` in flight; a reply missing for 0.2 s counts as lost."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.connect((HOST, port))
    sock.settimeout(0.2)
    payload = os.urandom(size)
    buf = bytearray(65_536)
    send, recv_into = sock.send, sock.recv_into
    sent = received = lost = 0
    started = time.monotonic()
    end = started + seconds
    for _ in range(window):
        send(payload)
        sent += 1
    while True:
        try:
            n = recv_into(buf)
        except TimeoutError:
            lost += sent - received - lost
            if time.monotonic() >= end:
                break
            for _ in range(window):
                send(payload)
                sent += 1
            continue
        assert n == size
        received += 1
        if received % 256 == 0 and time.monotonic() >= end:
            break
        send(payload)
        sent += 1
    elapsed = time.monotonic() - started
    # Drain what is still in flight: it is not lost, only late for the clock.
    in_flight = sent - received - lost
    while in_flight > 0:
        try:
            recv_into(buf)
        except TimeoutError:
            lost += in_flight
            break
        in_flight -= 1
    sock.close()
    return Result(received, lost, elapsed, hops=2)


def one_way(port: int, ack_sock: socket.socket, size: int, seconds: float) -> Result:
    """Datagrams to the sink with at most ONE_WAY_WINDOW not yet acknowledged."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((HOST, port))
    payload = os.urandom(size)
    buf = bytearray(16)
    send, recv_into = sock.send, ack_sock.recv_into
    ack_sock.settimeout(0.5)
    sent = acked = base = 0  # base: acknowledgements counted from here after a stall
    started = time.monotonic()
    end = started + seconds
    last = started
    while True:
        while sent - (base + acked) < ONE_WAY_WINDOW:
            send(payload)
            sent += 1
        try:
            recv_into(buf)
        except TimeoutError:
            base = sent - acked  # give up on what is in flight; counted as loss below
            if time.monotonic() >= end:
                break
            continue
        acked = int.from_bytes(buf[:8], "big")
        last = time.monotonic()
        if last >= end:
            break
    # Collect the final count: the sink acknowledges a quiet socket within 50 ms.
    while True:
        try:
            recv_into(buf)
        except TimeoutError:
            break
        acked = int.from_bytes(buf[:8], "big")
    sock.close()
    return Result(acked, sent - acked, last - started, hops=1)


def measure(mode: str, kind: str, size: int, echo_port: int, seconds: float) -> Result:
    if mode != "one-way":
        with path_to(kind, echo_port) as path:
            window = 1 if mode == "ping-pong" else RR_WINDOW
            before = path.cpu_seconds()
            result = request_response(path.port, size, window, seconds)
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
                result = one_way(path.port, ack_sock, size, seconds)
                result.relay_cpu_s = path.cpu_seconds() - before
                return result
        finally:
            stop(sink)


# -- the run ---------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement (default 3)")
    parser.add_argument(
        "--mode", action="append", choices=MODES, help="only this mode (repeatable)"
    )
    parser.add_argument(
        "--path",
        action="append",
        choices=PATHS,
        help="only this path (repeatable; socat is always measured as the baseline)",
    )
    parser.add_argument("--size", action="append", type=int, help="only this datagram size")
    parser.add_argument("--peer", choices=["echo", "sink"], help=argparse.SUPPRESS)
    parser.add_argument("peer_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer == "echo":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        run_echo()
        return 0
    if args.peer == "sink":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        run_sink(int(args.peer_args[0]))
        return 0
    if shutil.which("socat") is None:
        print("socat is not installed: run tests/setup-debian.sh", file=sys.stderr)
        return 2
    print(f"UDP relay benchmark, {args.seconds:g} s per row, {os.cpu_count()} CPUs (shared)\n")
    print(
        f"{'mode':<10} {'size':>6} {'path':<8} {'datagrams/s':>12} {'loss':>6} "
        f"{'vs socat':>9} {'relay us/dgram':>15}"
    )
    modes = args.mode or MODES
    paths = [p for p in PATHS if p == "socat" or not args.path or p in args.path]
    echo, echo_port = start_peer("echo")
    verdicts = []
    try:
        for mode in modes:
            for size in args.size or SIZES:
                rates: dict[str, float] = {}
                for kind in paths:
                    result = measure(mode, kind, size, echo_port, args.seconds)
                    rates[kind] = result.rate
                    ratio = f"{result.rate / rates['socat']:.2f}x" if "socat" in rates else ""
                    cpu = f"{result.relay_us_per_datagram:.2f}" if kind != "direct" else ""
                    print(
                        f"{mode:<10} {size:>5}B {kind:<8} {result.rate:>12,.0f} "
                        f"{result.lost:>6} {ratio:>9} {cpu:>15}",
                        flush=True,
                    )
                    if kind == "flowtap":
                        ok = result.rate >= 1.5 * rates["socat"] and result.lost == 0
                        verdicts.append((mode, size, ok))
    finally:
        stop(echo)
    missed = [f"{mode} {size}B" for mode, size, ok in verdicts if not ok]
    print()
    print(
        "target (>= 1.5x socat, 0 loss): "
        + ("met" if not missed else "missed: " + ", ".join(missed))
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
