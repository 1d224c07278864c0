"""TUI benchmark: does attaching the terminal UI slow the relay, how fast do rows appear, and
how much memory do 100,000 flows take? And how fast does the detail pane show, scroll and
follow one flow of 100,000 chunks?

Run: `python benchmarks/tui.py [--seconds S] [--flows N] [--chunks N]`. Everything is on
loopback. `--detail-only` runs the detail pane phase alone (no relay, no load); it uses only
what the app has had all along, so it also measures an older checkout of the code:
`git archive REV | tar -x -C /tmp/before` then
`PYTHONPATH=/tmp/before/.mypy-tree python benchmarks/tui.py --detail-only`.

The relay runs in this process, as in `flowtap run` (headless: the flow log only) or as in
`flowtap tui` (the flow log's place taken by the app's `EventQueue`, with the app driven
headless by `run_test`). A separate load process opens new flows at a fixed rate through the
relay to an echo server while it downloads bulk data through it; both phases get the same
load, so the throughput ratio is the cost of the UI. Figures are noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

from flowtap.inspector.log import FlowLog
from flowtap.inspector.tui.app import FlowtapApp
from flowtap.inspector.tui.store import FlowFeed, FlowStore
from flowtap.inspector.tui.widgets.flow_table import FlowTable
from flowtap.proxy.events import Bus, EventQueue, Observer
from flowtap.proxy.flow import Address, Direction, Flow, FlowData, FlowOpened, FlowState, Transport
from flowtap.proxy.listener import ListenerSpec
from flowtap.proxy.relay import Relay, raise_fd_limit

HERE = Path(__file__).resolve().parent
MiB = 1024 * 1024
BULK_CHUNK = 128 * MiB


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


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


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
    """Runs in a child process so the load does not share the relay's interpreter lock."""
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
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    results.put((out[0], out[1], out[2], time.perf_counter() - started))


def run_load(
    relay: Relay, rate: float, count: int, seconds: float, *, bulk: bool = True
) -> tuple[Any, Any]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    flow_port = relay.listeners[1].address.port
    bulk_port = relay.listeners[0].address.port
    proc = context.Process(
        target=load_process, args=(flow_port, bulk_port, rate, count, seconds, bulk, results)
    )
    proc.start()
    return proc, results


def finish_load(proc: Any, results: Any) -> Load:
    flows, errors, bulk_bytes, seconds = results.get(timeout=300)
    proc.join(30)
    return Load(flows, errors, bulk_bytes, seconds)


def make_relay(bulk: int, echo: int, observers: list[Observer]) -> Relay:
    specs = [
        ListenerSpec(Address("127.0.0.1", 0), Address("127.0.0.1", bulk)),
        ListenerSpec(Address("127.0.0.1", 0), Address("127.0.0.1", echo)),
    ]
    relay = Relay(specs, Bus(observers))
    relay.start()
    return relay


# -- phases ----------------------------------------------------------------------------------


def headless(bulk: int, echo: int, rate: float, seconds: float) -> Load:
    relay = make_relay(bulk, echo, [FlowLog(io.StringIO())])
    try:
        proc, results = run_load(relay, rate, int(rate * seconds * 2), seconds)
        return finish_load(proc, results)
    finally:
        relay.stop(1.0)
        relay.bus.close()


@dataclass
class TuiResult:
    load: Load
    lag_ms: list[float]
    rows: int
    many_load: Load | None = None
    many_rows: int = 0
    rss_mib: float = 0.0
    page_ms: float = 0.0


def with_tui(bulk: int, echo: int, rate: float, seconds: float, many: int) -> TuiResult:
    # Start it while stderr is real: under run_test, Textual swaps in one with no descriptor.
    resource_tracker.ensure_running()
    events = FlowFeed()
    relay = make_relay(bulk, echo, [events])
    app = FlowtapApp(events=events, relay=relay, source="benchmark")
    result: TuiResult | None = None

    async def drive() -> None:
        nonlocal result
        async with app.run_test(size=(160, 48), headless=True) as pilot:
            app.lag_samples = []
            proc, results = run_load(relay, rate, int(rate * seconds * 2), seconds)
            while proc.is_alive():
                await pilot.pause(0.1)
            load = finish_load(proc, results)
            table = app.query_one(FlowTable)
            deadline = time.monotonic() + 10
            while len(table.ids) < load.flows and time.monotonic() < deadline:
                await pilot.pause(0.1)
            lag_ms = [s * 1000 for s in app.lag_samples]
            result = TuiResult(load, lag_ms, len(table.ids))
            if many:
                app.lag_samples = None
                proc, results = run_load(relay, 0, many - len(table.ids), 600, bulk=False)
                while proc.is_alive():
                    await pilot.pause(0.2)
                result.many_load = finish_load(proc, results)
                deadline = time.monotonic() + 30
                while len(app.store) < many and time.monotonic() < deadline:
                    await pilot.pause(0.2)
                await pilot.pause(0.5)
                result.many_rows = len(table.ids)
                result.rss_mib = rss_mib()
                await pilot.press("end")
                # CPU time of this (the UI) thread: the pilot's own waits are not the app's.
                started = time.thread_time()
                for _ in range(20):
                    await pilot.press("pageup")
                result.page_ms = (time.thread_time() - started) / 20 * 1000

    try:
        asyncio.run(drive())
    finally:
        relay.stop(1.0)
        relay.bus.close()
    assert result is not None
    return result


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
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


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
    raise_fd_limit()
    peers, bulk, echo = start_peers()
    bases: list[Load] = []
    tuis: list[TuiResult] = []
    try:
        rss_start = rss_mib()
        # Alternate the phases so that other load on a shared machine hits both alike.
        for round_ in range(args.rounds):
            bases.append(headless(bulk, echo, args.rate, args.seconds))
            last = round_ == args.rounds - 1
            tuis.append(with_tui(bulk, echo, args.rate, args.seconds, args.flows if last else 0))
    finally:
        peers.terminate()
        peers.wait(10)
    ratios = [t.load.bulk_mib_s / b.bulk_mib_s for b, t in zip(bases, tuis, strict=True)]
    base_mib_s = statistics.median(b.bulk_mib_s for b in bases)
    tui_mib_s = statistics.median(t.load.bulk_mib_s for t in tuis)
    lag_ms = [sample for t in tuis for sample in t.lag_ms]
    p50, p99 = percentile(lag_ms, 0.5), percentile(lag_ms, 0.99)
    tui = tuis[-1]
    print(
        f"cores: {os.cpu_count()}  {args.rounds} rounds of {args.seconds:g}s per phase  "
        f"target rate: {args.rate:g} flows/s  (medians over rounds)"
    )
    print(f"{'measure':44} {'headless run':>14} {'with TUI':>14} {'ratio/target':>16}")
    print(
        f"{'bulk download through the relay (MiB/s)':44} {base_mib_s:14.1f} "
        f"{tui_mib_s:14.1f} {statistics.median(ratios):10.2f}x ≥0.9"
    )
    print(
        f"{'  ratio in each round':44} {'':14} {'':14} {' '.join(f'{r:.2f}' for r in ratios):>16}"
    )
    print(
        f"{'new flows completed (/s)':44} "
        f"{statistics.median(b.flows / b.seconds for b in bases):14.0f} "
        f"{statistics.median(t.load.flows / t.load.seconds for t in tuis):14.0f}"
    )
    print(
        f"{'flow errors':44} {sum(b.flow_errors for b in bases):14d} "
        f"{sum(t.load.flow_errors for t in tuis):14d}"
    )
    print(
        f"{'UI lag, flow open to row (ms) p50 / p99':44} {'':14} "
        f"{p50:6.0f} / {p99:5.0f} {'≤250 p99':>16}"
    )
    print(f"{'UI lag samples (rows that appeared)':44} {'':14} {len(lag_ms):14d}")
    if tui.many_load is not None:
        made = tui.many_load.flows / tui.many_load.seconds
        print(f"{'flows opened as fast as possible (/s)':44} {'':14} {made:14.0f}")
        print(f"{'rows in the table':44} {'':14} {tui.many_rows:14d}")
        print(
            f"{'process RSS after those flows (MiB)':44} {rss_start:14.0f} "
            f"{tui.rss_mib:14.0f} {'≤300':>16}"
        )
        print(f"{'page up with those rows (UI CPU ms per key)':44} {'':14} {tui.page_ms:14.1f}")
    print("RSS 'headless' column: this process before any phase.")
    print_detail(detail_pane(args.chunks))


if __name__ == "__main__":
    main()
