"""TUI benchmark: what attaching `flowtap tui` to a running relay costs the relay, how soon a
new flow's row is on the terminal, and how much memory the attached TUI takes for N flows;
then, in this process, how fast the detail pane shows, scrolls and follows one flow of
100,000 chunks.

Run: `python benchmarks/tui.py [--rounds R] [--seconds S] [--rate R] [--flows N] [--chunks N]`
(it needs tmux). Everything is on loopback and every loop is bounded in count and time.
Figures are noisy on a shared machine: the phases alternate round after round, and every
ratio is against the headless phase of the same run.

The relay and the TUI run as shipped, each a process of its own. Headless phase: a `flowtap
run` process (its flow log to a file, its control socket next to it) in front of a bulk peer
and an echo peer. TUI phase: the same, with `flowtap tui --attach CONTROL` running in a
160x45 tmux terminal (benchmarks/latency.py's helpers), as it starts: following no flow. A
load process opens new flows at a fixed rate through the relay to the echo peer while it
downloads bulk data through it; both phases get the same load, so the ratios are what the
attached TUI costs the relay. The CPU the relay process, the TUI process and tmux (the
terminal that draws the TUI) spend while the load runs comes from /proc/PID/stat (in % of
one core: each has several threads), and how busy all the machine's cores were from
/proc/stat: where the load, the peers and the relay already fill them, what the TUI and its
terminal use is taken from the others.

Rows: while the TUI phase's load runs, once a second, a probe flow from 127.0.0.2 opens to
the echo listener and waits until its row is on the terminal (`tmux capture-pane` every
20 ms), the time from its connect to its row: the relay's batches to viewers, the TUI's own,
its drawing and tmux. The TUI holds the filter `src host 127.0.0.2` meanwhile, so that the
probe's row is on screen among thousands (it still takes every flow in; its header counts
them). The probing runs in the TUI phase only: its tmux calls are a small part of that
phase's load on the machine.

Many flows: after the last TUI phase, the load opens N flows as fast as it can (no bulk, the
filter cleared). Once the TUI's header counts every flow the relay's log has, it gives the
RSS of the TUI process and of the relay process (and theirs just after attaching), and the
time from a page-up key to the screen changing with those rows (through tmux, so a few ms of
it are tmux's).

Detail pane (`--detail-only` runs it alone): the app's own cost, with no relay and no
control socket. The app runs in this process, driven by Textual's `run_test` and fed through
an `EventQueue`, and the figures are CPU time of its UI thread: that work is the same in the
TUI process whatever feeds it, attached or reading a capture. It uses only what the app has
had all along, so it also measures an older checkout of the code:
`git archive REV | tar -x -C /tmp/before` then
`PYTHONPATH=/tmp/before/.mypy-tree python benchmarks/tui.py --detail-only`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import Relay, TuiPane, relay_running, tui_attached
from processes import cpu_ticks, rss_kib, stop_processes

from flowtap.inspector.tui.app import FlowtapApp
from flowtap.inspector.tui.store import FlowStore
from flowtap.proxy.events import EventQueue
from flowtap.proxy.flow import Address, Direction, Flow, FlowData, FlowOpened, FlowState, Transport

HERE = Path(__file__).resolve().parent
MiB = 1024 * 1024
BULK_CHUNK = 128 * MiB
PROBE_HOST = "127.0.0.2"
ROW_TIMEOUT_S = 10.0
MANY_FLOWS_S = 600.0  # the many-flows load's bound
PAGE_KEYS = 20
TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass
class Load:
    """What the load process achieved in one phase."""

    flows: int
    flow_errors: int
    bulk_bytes: int
    seconds: float

    @property
    def bulk_mib_s(self) -> float:
        return self.bulk_bytes / MiB / self.seconds

    @property
    def flows_s(self) -> float:
        return self.flows / self.seconds


def start_peers() -> tuple[subprocess.Popen[str], int, int]:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "peers.py")], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    ports = {}
    for _ in range(2):
        name, port = proc.stdout.readline().split()
        ports[name] = int(port)
    return proc, ports["bulk"], ports["echo"]


# -- the load process ------------------------------------------------------------------------


def _flows(port: int, rate: float, count: int, deadline: float, out: list[int]) -> None:
    """Open `count` flows at `rate` a second (0: as fast as possible) until `deadline`."""
    started = time.perf_counter()
    for n in range(count):
        now = time.perf_counter()
        if now > deadline:
            return
        if rate:
            due = started + n / rate
            if due > now:
                time.sleep(due - now)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"GET /item/%d HTTP/1.1\r\nHost: bench\r\n\r\n" % n)
                sock.recv(4096)
            out[0] += 1
        except OSError:
            out[1] += 1


def _bulk(port: int, deadline: float, out: list[int]) -> None:
    buf = bytearray(262144)
    while time.perf_counter() < deadline:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"D%d\n" % BULK_CHUNK)
            while time.perf_counter() < deadline and (n := sock.recv_into(buf)):
                out[2] += n


def load_process(
    flow_port: int,
    bulk_port: int,
    rate: float,
    count: int,
    seconds: float,
    bulk: bool,
    results: Any,
) -> None:
    """Runs in a child process so that the load shares no interpreter with this one; puts
    "started" on `results`, then its figures."""
    threads_n = 4
    out = [0, 0, 0]
    deadline = time.perf_counter() + seconds
    per_thread_rate = rate / threads_n
    workers = [
        threading.Thread(
            target=_flows, args=(flow_port, per_thread_rate, count // threads_n, deadline, out)
        )
        for _ in range(threads_n)
    ]
    if bulk:
        workers.append(threading.Thread(target=_bulk, args=(bulk_port, deadline, out)))
    results.put("started")
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    results.put((out[0], out[1], out[2], time.perf_counter() - started))


class LoadRun:
    """The load process of one phase, through `relay` (its listeners: bulk peer, echo peer)."""

    def __init__(
        self, relay: Relay, rate: float, count: int, seconds: float, *, bulk: bool = True
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self._results: Any = context.Queue()
        bulk_port, flow_port = relay.ports
        self._proc = context.Process(
            target=load_process,
            args=(flow_port, bulk_port, rate, count, seconds, bulk, self._results),
        )
        self._proc.start()
        # Spawning imports this module anew: the phase starts when the load does.
        if self._results.get(timeout=60) != "started":
            raise RuntimeError("the load process did not start")

    def is_running(self) -> bool:
        return self._proc.is_alive()

    def finish(self) -> Load:
        """The load's figures, once it is done."""
        flows, errors, bulk_bytes, seconds = self._results.get(timeout=MANY_FLOWS_S + 60)
        self._proc.join(30)
        return Load(flows, errors, bulk_bytes, seconds)


def machine_ticks() -> tuple[int, int]:
    """Clock ticks all cores have spent busy, and in all, since boot (/proc/stat)."""
    user, nice, system, idle, iowait, *rest = map(int, Path("/proc/stat").read_text().split()[1:9])
    busy = user + nice + system + sum(rest)
    return busy, busy + idle + iowait


class CpuClock:
    """The CPU time processes spend from now on, in % of one core's wall time, and how busy
    the machine's cores are meanwhile."""

    def __init__(self, *pids: int) -> None:
        self._pids = pids
        self._ticks = [cpu_ticks(pid) for pid in pids]
        self._machine = machine_ticks()
        self._started = time.monotonic()

    def percent(self) -> list[float]:
        """Each process's share since the clock started, in the order of its pids."""
        elapsed_s = time.monotonic() - self._started
        return [
            (cpu_ticks(pid) - before) / TICKS_PER_S / elapsed_s * 100
            for pid, before in zip(self._pids, self._ticks, strict=True)
        ]

    def machine_busy(self) -> float:
        """How busy all cores were since the clock started, in % of all of them."""
        busy, total = machine_ticks()
        return (busy - self._machine[0]) / max(1, total - self._machine[1]) * 100


# -- the relay processes and the TUI ---------------------------------------------------------


@contextmanager
def relay_for(bulk: int, echo: int, log_path: Path) -> Iterator[Relay]:
    """`flowtap run` with one listener in front of each peer (ports: bulk, echo)."""
    with relay_running(
        bulk, log_path, "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{echo}"
    ) as relay:
        yield relay


def set_filter(pane: TuiPane, expression: str) -> None:
    """Type `expression` into the TUI's filter box (empty: clear the filter)."""
    pane.press("/")
    pane.wait_screen(r"Close filter")  # the box has the keys
    pane.press("C-u")
    if expression:
        pane.press(expression, literal=True)
    pane.press("Enter")
    pane.wait_screen(r"q Quit")  # the table has the keys again


def row_lag_ms(pane: TuiPane, port: int) -> float | None:
    """Open a flow from PROBE_HOST to `port` and return the ms until its row is on the
    terminal (None: not within ROW_TIMEOUT_S)."""
    with socket.socket() as sock:
        sock.bind((PROBE_HOST, 0))
        row = re.compile(rf"{re.escape(PROBE_HOST)}:{sock.getsockname()[1]} ")
        started = time.perf_counter()
        sock.connect(("127.0.0.1", port))
        while time.perf_counter() - started < ROW_TIMEOUT_S:
            if row.search(pane.screen()):
                return (time.perf_counter() - started) * 1000
            time.sleep(0.02)
    return None


def probe_rows(pane: TuiPane, port: int, load: LoadRun, seconds: float) -> tuple[list[float], int]:
    """Probe rows once a second while `load` runs (`seconds` long); the lags seen, probes sent."""
    lags: list[float] = []
    sent = 0
    deadline = time.monotonic() + seconds + ROW_TIMEOUT_S
    while load.is_running() and time.monotonic() < deadline:
        due = time.monotonic() + 1.0
        sent += 1
        if (lag := row_lag_ms(pane, port)) is not None:
            lags.append(lag)
        time.sleep(max(0.0, due - time.monotonic()))
    return lags, sent


def flows_logged(log_path: Path, timeout_s: float = 60.0) -> int:
    """How many flows the relay's log has opened, once it has closed them all (or at
    `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = log_path.read_text()
        opened = len(re.findall(r"^#\d+ opened ", text, re.M))
        if opened == len(re.findall(r"^#\d+ closed ", text, re.M)) or (time.monotonic() > deadline):
            return opened
        time.sleep(0.5)


def tui_total(pane: TuiPane, expected: int, timeout_s: float = 120.0) -> int:
    """The flows the TUI's header counts, once `expected` (or at `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        match = re.search(r"open \d+  total (\d+)", pane.screen())
        total = int(match.group(1)) if match else 0
        if total >= expected or time.monotonic() > deadline:
            return total
        time.sleep(0.2)


def page_up_ms(pane: TuiPane) -> list[float]:
    """From the last row, press page-up PAGE_KEYS times; the ms from each key until the table or
    the detail pane under it changes (the stats line above them moves on its own)."""

    def below_stats() -> list[str]:
        return pane.screen().splitlines()[1:]

    def changed_from(before: list[str], timeout_s: float = 5.0) -> bool:
        started = time.perf_counter()
        while time.perf_counter() - started < timeout_s:
            if below_stats() != before:
                return True
            time.sleep(0.005)
        return False

    before = below_stats()
    pane.press("End")
    changed_from(before)
    samples = []
    for _ in range(PAGE_KEYS):
        before = below_stats()
        started = time.perf_counter()
        pane.press("PPage")
        if changed_from(before):
            samples.append((time.perf_counter() - started) * 1000)
    return samples


# -- phases ----------------------------------------------------------------------------------


@dataclass
class Phase:
    """One phase's load, and the CPU its processes spent while the load ran (% of one core)."""

    load: Load
    machine_busy: float  # % of all cores, whoever used them
    relay_cpu: float
    tui_cpu: float = math.nan
    terminal_cpu: float = math.nan  # tmux, which draws the TUI and answers the probes
    row_lag_ms: list[float] = field(default_factory=list)
    probes: int = 0


@dataclass
class ManyFlows:
    """The attached TUI after the load opened `load.flows` flows as fast as it could."""

    load: Load
    relay_flows: int
    tui_flows: int
    relay_rss_mib: tuple[float, float]  # just after attaching, after the flows
    tui_rss_mib: tuple[float, float]
    page_ms: list[float]


def rss_mib(pid: int) -> float:
    return rss_kib(pid) / 1024


def headless(bulk: int, echo: int, log_path: Path, rate: float, seconds: float) -> Phase:
    with relay_for(bulk, echo, log_path) as relay:
        load = LoadRun(relay, rate, int(rate * seconds * 2), seconds)
        clock = CpuClock(relay.proc.pid)
        done = load.finish()
        (relay_cpu,) = clock.percent()
        return Phase(done, clock.machine_busy(), relay_cpu)


def with_tui(
    bulk: int, echo: int, log_path: Path, rate: float, seconds: float, many: int
) -> tuple[Phase, ManyFlows | None]:
    with relay_for(bulk, echo, log_path) as relay, tui_attached(relay, follow=False) as pane:
        tui_pid = pane.pid()
        set_filter(pane, f"src host {PROBE_HOST}")
        rss_attached = rss_mib(relay.proc.pid), rss_mib(tui_pid)
        load = LoadRun(relay, rate, int(rate * seconds * 2), seconds)
        clock = CpuClock(relay.proc.pid, tui_pid, pane.terminal_pid())
        lags, probes = probe_rows(pane, relay.ports[1], load, seconds)
        done = load.finish()
        relay_cpu, tui_cpu, terminal_cpu = clock.percent()
        phase = Phase(done, clock.machine_busy(), relay_cpu, tui_cpu, terminal_cpu, lags, probes)
        if not many:
            return phase, None
        set_filter(pane, "")
        many_load = LoadRun(relay, 0, many, MANY_FLOWS_S, bulk=False).finish()
        relay_flows = flows_logged(log_path)
        tui_flows = tui_total(pane, relay_flows)
        rss_after = rss_mib(relay.proc.pid), rss_mib(tui_pid)
        return phase, ManyFlows(
            many_load,
            relay_flows,
            tui_flows,
            (rss_attached[0], rss_after[0]),
            (rss_attached[1], rss_after[1]),
            page_up_ms(pane),
        )


# -- the detail pane on one big flow ---------------------------------------------------------


@dataclass
class DetailResult:
    """UI-thread CPU milliseconds for the detail pane's work on one flow of `chunks` chunks."""

    chunks: int
    show_ms: float
    page_ms: float
    line_ms: float
    follow_ms: float
    small_follow_ms: float
    resize_ms: float
    store_mib: float


def _line_chunks(flow_id: int, first: int, count: int) -> list[FlowData]:
    """Chunks of a chatty flow: client and server take turns with one short line each."""
    return [
        FlowData(
            flow_id,
            Direction.UP if i % 2 == 0 else Direction.DOWN,
            1_767_225_600.0 + i / 1000,
            b"line %06d\n" % i,
        )
        for i in range(first, first + count)
    ]


def _live_flow(flow_id: int) -> Flow:
    return Flow(
        id=flow_id,
        transport=Transport.TCP,
        client=Address("127.0.0.1", 50000 + flow_id),
        server=Address("127.0.0.1", 6379),
        listener=Address("127.0.0.1", 40000),
        started_at=1_767_225_600.0,
        state=FlowState.OPEN,
    )


def store_growth_mib(chunks: int) -> float:
    """What the store allocates for `chunks` chunks of one flow (its index and their bytes)."""
    import tracemalloc

    store = FlowStore()
    store.apply([FlowOpened(_live_flow(1))])
    events = _line_chunks(1, 0, chunks)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        store.apply(events)
        return (tracemalloc.get_traced_memory()[0] - before) / MiB
    finally:
        tracemalloc.stop()
        store.close()


def detail_pane(chunks: int, repeats: int = 20) -> DetailResult:
    """Select a live flow of `chunks` chunks, page and step through it, and append to it
    while it is shown, as the app's tick does; all timed in CPU time of the UI thread."""
    small, big = 1, 2
    follow_chunks = 100  # a tick's worth of a chatty flow
    events = EventQueue(max_data_events=chunks + 5000)
    events.handle(FlowOpened(_live_flow(small)))
    for data in _line_chunks(small, 0, 5000):
        events.handle(data)
    events.handle(FlowOpened(_live_flow(big)))
    for data in _line_chunks(big, 0, chunks):
        events.handle(data)
    app = FlowtapApp(events=events, source="benchmark")
    result: DetailResult | None = None

    async def drive() -> None:
        nonlocal result
        async with app.run_test(size=(160, 48), headless=True) as pilot:
            store = app.store
            deadline = time.monotonic() + 60
            while len(store) < 2 or len(store.records[big].chunks) < chunks:
                assert time.monotonic() < deadline, "the flows did not load"
                await pilot.pause(0.1)
            await pilot.pause(0.5)
            detail = app.detail

            async def refresh(flow_id: int, first: int) -> None:
                store.apply(_line_chunks(flow_id, first, follow_chunks))
                detail.show_flow(flow_id)
                await pilot.pause()

            # The small flow (5,000 chunks, under the old 64 KiB display limit) is selected.
            started = time.thread_time()
            for n in range(repeats):
                await refresh(small, 5000 + n * follow_chunks)
            small_follow_ms = (time.thread_time() - started) / repeats * 1000

            started = time.thread_time()
            detail.show_flow(big)
            await pilot.pause()
            show_ms = (time.thread_time() - started) * 1000
            detail.payload.focus()
            await pilot.press("home")
            started = time.thread_time()
            for _ in range(repeats):
                await pilot.press("pagedown")
            await pilot.pause()
            page_ms = (time.thread_time() - started) / repeats * 1000
            started = time.thread_time()
            for _ in range(repeats):
                await pilot.press("down")
            await pilot.pause()
            line_ms = (time.thread_time() - started) / repeats * 1000
            await pilot.press("end")
            started = time.thread_time()
            for n in range(repeats):
                await refresh(big, chunks + n * follow_chunks)
            follow_ms = (time.thread_time() - started) / repeats * 1000
            started = time.thread_time()
            await pilot.resize_terminal(150, 48)
            await pilot.pause()
            resize_ms = (time.thread_time() - started) * 1000
            result = DetailResult(
                chunks, show_ms, page_ms, line_ms, follow_ms, small_follow_ms, resize_ms, 0.0
            )

    asyncio.run(drive())
    assert result is not None
    result.store_mib = store_growth_mib(chunks)
    return result


def print_detail(result: DetailResult) -> None:
    print(f"detail pane, one live flow of {result.chunks:,} chunks of 12 B (UI CPU ms):")
    print(f"{'  show it (select to first frame)':44} {result.show_ms:14.1f}")
    print(f"{'  page down (per key)':44} {result.page_ms:14.2f}")
    print(f"{'  line down (per key)':44} {result.line_ms:14.2f}")
    print(f"{'  refresh with 100 new chunks, following':44} {result.follow_ms:14.2f}")
    print(f"{'  same, on a flow of 5,000 chunks':44} {result.small_follow_ms:14.2f}")
    print(f"{'  terminal resized to 150 columns':44} {result.resize_ms:14.1f}")
    print(f"{'  store memory for those chunks (MiB)':44} {result.store_mib:14.1f}")


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else math.nan


def print_relay_phases(
    args: argparse.Namespace, bases: list[Phase], tuis: list[Phase], many: ManyFlows | None
) -> None:
    def row(name: str, base: str, tui: str, ratio: str = "") -> None:
        print(f"{name:46} {base:>13} {tui:>13} {ratio:>14}")

    def medians(name: str, figure: Callable[[Phase], float]) -> None:
        base = statistics.median(map(figure, bases))
        tui = statistics.median(map(figure, tuis))
        row(name, f"{base:.1f}", f"{tui:.1f}", f"{tui / base:.2f}x")

    print(
        f"cores: {os.cpu_count()}  {args.rounds} rounds of {args.seconds:g} s per phase  "
        f"new flows asked: {args.rate:g}/s  (medians over rounds)"
    )
    row("measure", "headless run", "TUI attached", "TUI/headless")
    medians("bulk download through the relay (MiB/s)", lambda phase: phase.load.bulk_mib_s)
    ratios = [t.load.bulk_mib_s / b.load.bulk_mib_s for b, t in zip(bases, tuis, strict=True)]
    row("  ratio in each round", "", "", " ".join(f"{r:.2f}" for r in ratios))
    medians("new flows completed (/s)", lambda phase: phase.load.flows_s)
    row(
        "flow errors (all rounds)",
        str(sum(b.load.flow_errors for b in bases)),
        str(sum(t.load.flow_errors for t in tuis)),
    )
    medians("relay process CPU (% of one core)", lambda phase: phase.relay_cpu)
    row("TUI process CPU (% of one core)", "", f"{statistics.median(t.tui_cpu for t in tuis):.1f}")
    row(
        "tmux (the TUI's terminal) CPU (% of one core)",
        "",
        f"{statistics.median(t.terminal_cpu for t in tuis):.1f}",
    )
    medians("all cores busy, any process (% of all)", lambda phase: phase.machine_busy)
    lags = [lag for t in tuis for lag in t.row_lag_ms]
    row(
        "flow open to its row on screen (ms) p50 / max",
        "",
        f"{percentile(lags, 0.5):.0f} / {max(lags, default=math.nan):.0f}",
    )
    row("  probes whose row appeared / sent", "", f"{len(lags)} / {sum(t.probes for t in tuis)}")
    if many is None:
        return
    print(f"after the last TUI phase, {args.flows:,} more flows as fast as the load can:")
    row("", "relay", "TUI")
    row("  flows opened (/s)", f"{many.load.flows_s:.0f}", "")
    row("  flow errors", str(many.load.flow_errors), "")
    row(
        "  flows in all: the relay's log / TUI's header",
        str(many.relay_flows),
        str(many.tui_flows),
    )
    row(
        "  RSS just after attaching (MiB)",
        f"{many.relay_rss_mib[0]:.1f}",
        f"{many.tui_rss_mib[0]:.1f}",
    )
    row(
        "  RSS after those flows (MiB)",
        f"{many.relay_rss_mib[1]:.1f}",
        f"{many.tui_rss_mib[1]:.1f}",
    )
    row(
        "  page up: key to screen change (ms) p50 / max",
        "",
        f"{percentile(many.page_ms, 0.5):.0f} / {max(many.page_ms, default=math.nan):.0f}",
    )
    row("  page-up keys that changed the screen", "", f"{len(many.page_ms)} / {PAGE_KEYS}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=3, help="headless/TUI phase pairs")
    parser.add_argument("--rate", type=float, default=1000.0, help="new flows a second")
    parser.add_argument("--flows", type=int, default=100_000, help="flows for the RSS figure")
    parser.add_argument(
        "--chunks", type=int, default=100_000, help="chunks of the detail pane's flow"
    )
    parser.add_argument(
        "--detail-only", action="store_true", help="only the detail pane phase (no relay)"
    )
    args = parser.parse_args()
    if args.detail_only:
        print_detail(detail_pane(args.chunks))
        return
    if shutil.which("tmux") is None:
        sys.exit("tui.py: the TUI phases need tmux (apt-get install tmux); --detail-only does not")
    bases: list[Phase] = []
    tuis: list[Phase] = []
    many: ManyFlows | None = None
    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="flowtap-tui-bench-"))
        stack.callback(shutil.rmtree, workdir, True)
        peers, bulk, echo = start_peers()
        stack.callback(stop_processes, [peers])
        # Alternate the phases so that other load on a shared machine hits both alike.
        for round_ in range(args.rounds):
            bases.append(
                headless(bulk, echo, workdir / f"run{round_}.log", args.rate, args.seconds)
            )
            last = round_ == args.rounds - 1
            phase, found = with_tui(
                bulk, echo, workdir / f"tui{round_}.log", args.rate, args.seconds,
                args.flows if last else 0,
            )  # fmt: skip
            tuis.append(phase)
            many = found or many
            print(f"round {round_ + 1} of {args.rounds} done", file=sys.stderr)
    print_relay_phases(args, bases, tuis, many)
    print_detail(detail_pane(args.chunks))


if __name__ == "__main__":
    main()
