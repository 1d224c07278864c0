"""Latency benchmark: one flow of 1-byte round trips, direct, through socat, through flowtap
(capture off and `--pcap`), and with the TUI attached to the relay in a real terminal (tmux).

Run on demand:  python benchmarks/latency.py [--seconds 30] [--rounds 10] [--no-tui]
Each path gets one flow doing 1-byte round trips (TCP_NODELAY) for SECONDS in all, reported
per window of 1,000 round trips (p50, p99). The paths take turns, SECONDS/ROUNDS each, round
after round, each on its own flow kept open: on a small shared machine, drift in the
background then hits every path alike. Bulk MB/s is measured headless and with the TUI
attached, in alternating rounds too. The TUI is `flowtap tui --attach` in tmux, following
new flows, so it selects the benchmark's flow when it opens and shows it in the detail pane.
Also printed: the CPU time a relayed chunk costs the relay (headless, and with the TUI
attached) and the TUI following it, over those paths' turns.
Prints a table and the verdict against issue #15's targets, every ratio against a baseline
measured in the same run.
Everything runs on loopback; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from processes import cpu_ticks, stop_processes
from relay import MiB, bulk_down, flowtap_command, start_socat

HERE = Path(__file__).resolve().parent
_tmux_sessions = iter(range(1_000))


@dataclass
class Windows:
    """Round-trip times of one path, in windows of a fixed number of round trips (us)."""

    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)

    @property
    def median_p50(self) -> float:
        return statistics.median(self.p50)

    @property
    def median_p99(self) -> float:
        return statistics.median(self.p99)


class RoundTrips:
    """One flow of 1-byte round trips through `port`, measured a turn at a time."""

    def __init__(self, port: int) -> None:
        self.windows = Windows()
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.sendall(b"P")  # the bulk peer's ping-pong job

    def turn(self, seconds: float, window: int) -> None:
        """Round trips for `seconds` (whole windows, at least one)."""
        sock = self._sock
        clock = time.perf_counter_ns
        deadline = time.monotonic() + seconds
        first = True
        while first or time.monotonic() < deadline:
            first = False
            samples = []
            for _ in range(window):
                started = clock()
                sock.sendall(b"x")
                if sock.recv(1) != b"x":
                    raise RuntimeError("a round trip lost its byte")
                samples.append((clock() - started) / 1000)
            samples.sort()
            self.windows.p50.append(samples[len(samples) // 2])
            self.windows.p99.append(samples[int(len(samples) * 0.99)])

    def close(self) -> None:
        self._sock.close()


@dataclass
class Relay:
    """A `flowtap run` process: its listening ports (in the order of its `--listen`s) and
    control socket."""

    proc: subprocess.Popen[bytes]
    ports: list[int]
    control: str

    @property
    def port(self) -> int:
        """The first listener's port."""
        return self.ports[0]

    def cpu_ticks(self) -> int:
        """The process's user + system CPU time so far, in clock ticks."""
        return cpu_ticks(self.proc.pid)

    def stop(self) -> None:
        stop_processes([self.proc], 15)


def start_relay(upstream: int, log_path: Path, *extra: str) -> Relay:
    """`flowtap run` in front of `upstream` (and the listeners in `extra`), once it prints its
    control line, which comes after every listening line.

    Its control socket is next to the log, not in the per-user folder, where every `flowtap
    tui --attach` of this user (tests, say) probes each relay's socket: the idle figure
    counts what the relay does on its own, with its TUI attached.
    """
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [*flowtap_command(), "run", "--listen", "127.0.0.1:0",
             "--upstream", f"127.0.0.1:{upstream}",
             "--control", str(log_path.with_suffix(".sock")), *extra],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        text = log_path.read_text()
        ports = re.findall(r"^listening tcp 127\.0\.0\.1:(\d+) ->", text, re.M)
        control = re.search(r"^control unix:(\S+)$", text, re.M)
        if ports and control:
            return Relay(proc, [int(port) for port in ports], control.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    proc.kill()
    raise RuntimeError(f"flowtap run did not start: {log_path.read_text()}")


def _tmux(server: str, *args: str) -> str:
    return subprocess.run(
        ["tmux", "-L", server, *args], capture_output=True, text=True, check=True, timeout=10
    ).stdout


@dataclass
class TuiPane:
    """A `flowtap tui --attach` in the one pane of its own tmux server, `server`."""

    server: str

    def screen(self) -> str:
        """What the terminal shows now."""
        return _tmux(self.server, "capture-pane", "-p", "-t", "tui")

    def wait_screen(self, pattern: str, timeout_s: float = 20.0) -> str:
        """The screen once `pattern` is on it; RuntimeError when `timeout_s` passes first."""
        deadline = time.monotonic() + timeout_s
        while not re.search(pattern, screen := self.screen()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the TUI never showed {pattern!r}:\n{screen}")
            time.sleep(0.05)
        return screen

    def press(self, *keys: str, literal: bool = False) -> None:
        """Type `keys` (tmux key names, or text as it is with `literal`)."""
        _tmux(self.server, "send-keys", "-t", "tui", *(["-l"] if literal else []), *keys)

    def pid(self) -> int:
        """The TUI's process id."""
        pid = int(_tmux(self.server, "display-message", "-p", "-t", "tui", "#{pane_pid}"))
        # tmux starts the command through the shell, which execs a lone command.
        if b"tui" not in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
            raise RuntimeError(f"the tmux pane runs pid {pid}, which is not flowtap tui")
        return pid

    def terminal_pid(self) -> int:
        """The tmux server's process id: the terminal that draws what the TUI writes."""
        return int(_tmux(self.server, "display-message", "-p", "#{pid}"))

    def flow_shown(self) -> None:
        """Wait until the TUI shows a flow's row."""
        self.wait_screen(r"127\.0\.0\.1:\d+ +127\.0\.0\.1:\d+")


@contextmanager
def tui_attached(relay: Relay, *, follow: bool = True) -> Iterator[TuiPane]:
    """`flowtap tui --attach` to `relay` in a 160x45 tmux terminal, once it is up; `follow`
    turns on following new flows, so that the next flow that opens gets selected."""
    command = " ".join([*flowtap_command(), "tui", "--attach", relay.control])
    server = f"flowtap-latency-{os.getpid()}-{next(_tmux_sessions)}"
    _tmux(server, "new-session", "-d", "-s", "tui", "-x", "160", "-y", "45", command)
    pane = TuiPane(server)
    try:
        pane.wait_screen(r"Follow")  # the footer: the app is up and attached
        if follow:
            pane.press("f")
            pane.wait_screen(r"Follow new flows: on")
        yield pane
    finally:
        with suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            _tmux(server, "kill-server")


def idle_ticks(relay: Relay, log_path: Path, seconds: float = 5.0) -> int:
    """CPU ticks the relay process spends over `seconds` with no traffic, counted from when
    its log says the last flow that moved has closed (a client has its last byte a moment
    before the relay has closed the flow)."""
    deadline = time.monotonic() + 30
    while True:
        text = log_path.read_text()
        opened = re.findall(r"^#(\d+) opened ", text, re.M)
        closed = set(re.findall(r"^#(\d+) closed ", text, re.M))
        # Open: the benchmark's own round-trip flow, which is quiet now.
        if len([flow for flow in opened if flow not in closed]) <= 1:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the relay's flows never closed:\n{text[-2000:]}")
        time.sleep(0.05)
    before = relay.cpu_ticks()
    time.sleep(seconds)
    return relay.cpu_ticks() - before


@contextmanager
def relay_running(upstream: int, log_path: Path, *extra: str) -> Iterator[Relay]:
    relay = start_relay(upstream, log_path, *extra)
    try:
        yield relay
    finally:
        relay.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=30.0, help="round trips per path (s)")
    parser.add_argument("--rounds", type=int, default=10, help="turns each path takes")
    parser.add_argument("--window", type=int, default=1000, help="round trips per window")
    parser.add_argument("--bulk-mib", type=int, default=1024, help="bulk download size (MiB)")
    parser.add_argument("--bulk-rounds", type=int, default=5, help="bulk runs per path")
    parser.add_argument("--no-tui", action="store_true", help="skip the rows with a TUI")
    args = parser.parse_args()
    with_tui = not args.no_tui and shutil.which("tmux") is not None
    if not args.no_tui and not with_tui:
        print("note: tmux is not installed: no TUI rows", file=sys.stderr)

    workdir = Path(tempfile.mkdtemp(prefix="flowtap-latency-"))
    peers = subprocess.Popen(
        [sys.executable, str(HERE / "peers.py")], stdout=subprocess.PIPE, text=True
    )
    assert peers.stdout is not None
    ports = dict(peers.stdout.readline().split() for _ in range(2))
    bulk = int(ports["bulk"])
    size = args.bulk_mib * MiB
    rows: dict[str, Windows] = {}
    figures: dict[str, float] = {}
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)
        stack.callback(peers.wait)
        stack.callback(peers.terminate)
        flows: dict[str, RoundTrips] = {}

        def flow(name: str, port: int) -> RoundTrips:
            flows[name] = stack.enter_context(closing(RoundTrips(port)))
            return flows[name]

        flow("direct", bulk)
        socat = start_socat(bulk, bulk)
        stack.callback(socat.stop)
        flow("socat", socat.bulk_port)
        headless = stack.enter_context(relay_running(bulk, workdir / "run.log"))
        flow("flowtap run", headless.port)
        # CPU per relayed chunk of the processes that a path's turns keep busy, by label.
        meters: dict[str, list[tuple[str, int]]] = {
            "flowtap run": [("relay, headless", headless.proc.pid)]
        }
        capturing = stack.enter_context(
            relay_running(bulk, workdir / "pcap.log", "--pcap", str(workdir / "rt.pcapng"))
        )
        flow("run --pcap", capturing.port)
        watched = None
        if with_tui:
            watched = stack.enter_context(relay_running(bulk, workdir / "tui.log"))
            pane = stack.enter_context(tui_attached(watched))
            flow("tui attached", watched.port)
            pane.flow_shown()
            meters["tui attached"] = [
                ("relay, TUI attached", watched.proc.pid),
                ("TUI, following the flow", pane.pid()),
            ]
            both = stack.enter_context(
                relay_running(bulk, workdir / "both.log", "--pcap", str(workdir / "t.pcapng"))
            )
            pane = stack.enter_context(tui_attached(both))
            flow("tui + --pcap", both.port)
            pane.flow_shown()
        busy: dict[str, int] = {}  # CPU ticks
        chunks: dict[str, int] = {}
        for number in range(args.rounds):
            for name, trips in flows.items():
                before = [(label, pid, cpu_ticks(pid)) for label, pid in meters.get(name, [])]
                windows = len(trips.windows.p50)
                trips.turn(args.seconds / args.rounds, args.window)
                for label, pid, used in before:
                    busy[label] = busy.get(label, 0) + cpu_ticks(pid) - used
                    moved = 2 * args.window * (len(trips.windows.p50) - windows)
                    chunks[label] = chunks.get(label, 0) + moved
            print(f"round {number + 1} of {args.rounds} done", file=sys.stderr)
        rows = {name: trips.windows for name, trips in flows.items()}
        bulk_rates: dict[str, list[float]] = {}
        for _ in range(args.bulk_rounds):
            bulk_rates.setdefault("bulk headless MB/s", []).append(bulk_down(headless.port, size))
            if watched is not None:
                # The TUI follows new flows: it selects each download as it opens.
                bulk_rates.setdefault("bulk TUI attached MB/s", []).append(
                    bulk_down(watched.port, size)
                )
        figures = {name: statistics.median(rates) for name, rates in bulk_rates.items()}
        if watched is not None:
            figures["relay CPU ticks, 5 s idle, TUI attached"] = idle_ticks(
                watched, workdir / "tui.log"
            )

    print(f"\n1-byte round trips (TCP_NODELAY), one flow per path for {args.seconds:g} s, in "
          f"windows of {args.window}; us")  # fmt: skip
    print(f"{'path':<16}{'windows':>8}{'p50 med':>9}{'p50 max':>9}{'p99 med':>9}{'p99 max':>9}")
    for name, row in rows.items():
        print(
            f"{name:<16}{len(row.p50):>8}{row.median_p50:>9.1f}{max(row.p50):>9.1f}"
            f"{row.median_p99:>9.1f}{max(row.p99):>9.1f}"
        )
    print()
    for name, value in figures.items():
        print(f"{name:<44}{value:>10.1f}")
    tick_s = 1 / os.sysconf("SC_CLK_TCK")
    for label, used in busy.items():
        print(f"CPU us per chunk relayed, {label:<25}{used * tick_s * 1e6 / chunks[label]:>9.2f}")

    base_row = rows["flowtap run"]
    checks = [
        (
            f"--pcap p50 <= 1.15x capture off ({rows['run --pcap'].median_p50:.1f} vs "
            f"{base_row.median_p50:.1f} us: "
            f"{rows['run --pcap'].median_p50 / base_row.median_p50:.2f}x)",
            rows["run --pcap"].median_p50 <= 1.15 * base_row.median_p50,
        )
    ]
    for name in ("tui attached", "tui + --pcap"):
        if name not in rows:
            continue
        base = rows["run --pcap"] if "pcap" in name else base_row
        row = rows[name]
        checks.append(
            (
                f"{name}: every window p50 <= 1.2x headless (worst {max(row.p50):.1f} vs "
                f"{base.median_p50:.1f} us)",
                max(row.p50) <= 1.2 * base.median_p50,
            )
        )
        checks.append(
            (
                f"{name}: every window p99 <= 2x headless (worst {max(row.p99):.1f} vs "
                f"{base.median_p99:.1f} us)",
                max(row.p99) <= 2 * base.median_p99,
            )
        )
    if "bulk TUI attached MB/s" in figures:
        ratio = figures["bulk TUI attached MB/s"] / figures["bulk headless MB/s"]
        checks.append(
            (f"bulk with the TUI attached >= 0.95x headless ({ratio:.2f}x)", ratio >= 0.95)
        )
        idle = figures["relay CPU ticks, 5 s idle, TUI attached"]
        checks.append((f"relay idle with a TUI attached: 0 CPU ticks in 5 s ({idle:g})", idle == 0))
    print()
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    # What bounds the every-window checks: the spread of the paths with no TUI, same run.
    for name in ("flowtap run", "run --pcap"):
        row = rows[name]
        print(
            f"note: {name}'s own worst window is {max(row.p50) / row.median_p50:.2f}x its "
            f"median p50 and {max(row.p99) / row.median_p99:.2f}x its median p99"
        )


if __name__ == "__main__":
    main()
