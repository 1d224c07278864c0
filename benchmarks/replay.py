"""Replay throughput: 2,000 recorded short request/response flows against a local redis.

In one run: record the flows through an in-process relay into a pcapng and read it back,
then send the same client bytes with a plain Python client (sequential blocking sockets,
and 50 threads) and with `replay --asap --concurrency 50`; the replies do not depend on
state (SET, ECHO, PING), so every replayed flow must compare clean. Prints flows/s,
turns/s, RSS and the ratio to the faster plain client (target >= 0.5x). Figures are
noisy: other work shares this machine's CPUs.

    python benchmarks/replay.py [--flows 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from flowtap.inspector.pcapfile.capture import CaptureObserver
from flowtap.inspector.replay.replay import ReplayOptions, Status, replay
from flowtap.inspector.replay.turns import Script, load_scripts
from flowtap.proxy.events import Bus
from flowtap.proxy.flow import Address, Direction
from flowtap.proxy.listener import ListenerSpec
from flowtap.proxy.relay import Relay

sys.path.insert(0, str(Path(__file__).resolve().parent))
from processes import free_port


def _rss_mib(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _start_redis(directory: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", directory],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, port
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _command(*words: bytes) -> bytes:
    out = b"*%d\r\n" % len(words)
    for word in words:
        out += b"$%d\r\n%s\r\n" % (len(word), word)
    return out


def record(port: int, flows: int, pcap: Path) -> None:
    """Drive `flows` short redis exchanges through a capturing relay into `pcap`."""
    capture = CaptureObserver(pcap)
    spec = ListenerSpec(listen=Address("127.0.0.1", 0), upstream=Address("127.0.0.1", port))
    relay = Relay([spec], Bus([capture]))
    relay.start()
    relay_port = relay.listeners[0].address.port
    for index in range(flows):
        request = [
            _command(b"SET", b"key:%d" % (index % 100), b"value-%d" % index),
            _command(b"ECHO", b"message-%d" % index),
            _command(b"PING"),
        ][index % 3]
        with socket.create_connection(("127.0.0.1", relay_port)) as sock:
            sock.sendall(request)
            sock.recv(4096)
    deadline = time.monotonic() + 30
    while relay.open_flows and time.monotonic() < deadline:
        time.sleep(0.01)
    relay.stop(2.0)
    relay.bus.close()


def _plain_flow(port: int, script: Script) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        received = 0
        need = 0
        for turn in script.turns:
            if turn.direction is Direction.DOWN:
                need += turn.size_bytes
                continue
            while received < need:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += len(chunk)
            sock.sendall(turn.data)
        while received < script.size_bytes(Direction.DOWN):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += len(chunk)


def plain_sequential(port: int, scripts: Sequence[Script]) -> float:
    started = time.perf_counter()
    for script in scripts:
        _plain_flow(port, script)
    return time.perf_counter() - started


def plain_threads(port: int, scripts: Sequence[Script], workers: int = 50) -> float:
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda s: _plain_flow(port, s), scripts))
    return time.perf_counter() - started


def flowtap_replay(port: int, scripts: Sequence[Script], concurrency: int = 50) -> float:
    started = time.perf_counter()
    reports = replay(
        scripts,
        ReplayOptions(target=Address("127.0.0.1", port), speed=None, concurrency=concurrency),
    )
    duration = time.perf_counter() - started
    bad = [r for r in reports if r.status != Status.OK]
    if bad:
        raise SystemExit(f"replay had {len(bad)} unclean flows, e.g. {bad[0].line()}")
    return duration


def _best(rounds: int, run: Callable[[], float]) -> tuple[float, float]:
    times = [run() for _ in range(rounds)]
    return min(times), statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed: run tests/setup-debian.sh")
    with tempfile.TemporaryDirectory() as directory:
        recorded_on, record_port = _start_redis(directory + "/")
        replayed_on = None
        try:
            pcap = Path(directory) / "recorded.pcapng"
            record(record_port, args.flows, pcap)
            loading = time.perf_counter()
            scripts = load_scripts(str(pcap))
            load_s = time.perf_counter() - loading
            turns = sum(s.turn_count(Direction.UP) for s in scripts)
            os.mkdir(directory + "/b")
            replayed_on, port = _start_redis(directory + "/b")
            rss_before = _rss_mib()
            seq_best, seq_median = _best(args.rounds, lambda: plain_sequential(port, scripts))
            thr_best, thr_median = _best(args.rounds, lambda: plain_threads(port, scripts))
            rss_plain = _rss_mib()
            rep_best, rep_median = _best(
                args.rounds, lambda: flowtap_replay(port, scripts, args.concurrency)
            )
            rss_after = _rss_mib()
        finally:
            for proc in (recorded_on, replayed_on):
                if proc is not None:
                    proc.terminate()
                    proc.wait(10)
    flows = len(scripts)
    baseline = max(flows / seq_median, flows / thr_median)
    rows = [
        ("plain client, sequential", seq_best, seq_median),
        ("plain client, 50 threads", thr_best, thr_median),
        (f"flowtap replay --asap --concurrency {args.concurrency}", rep_best, rep_median),
    ]
    print(
        f"{flows} recorded flows, {turns} client turns, redis-server on loopback; "
        f"capture read into scripts in {load_s:.2f}s"
    )
    print(f"{'client':<44} {'flows/s':>9} {'turns/s':>9} {'best flows/s':>13} {'ratio':>6}")
    for name, best, median in rows:
        rate = flows / median
        print(
            f"{name:<44} {rate:>9.0f} {turns / median:>9.0f} {flows / best:>13.0f} "
            f"{rate / baseline:>6.2f}"
        )
    print(
        f"RSS: {rss_before:.1f} MiB with the scripts loaded, {rss_plain:.1f} MiB after the plain "
        f"clients, {rss_after:.1f} MiB after replay (peak {_rss_mib('VmHWM'):.1f} MiB)"
    )
    ratio = (flows / rep_median) / baseline
    verdict = "meets" if ratio >= 0.5 else "misses"
    print(
        f"replay is {ratio:.2f}x the faster plain client (median of {args.rounds}): "
        f"{verdict} the 0.5x target"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
