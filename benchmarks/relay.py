"""Relay benchmark: the same workloads direct, through socat, and through flowtap (capture off).

Run on demand:  python benchmarks/relay.py [--quick]
Prints a table of figures and the flowtap/socat ratios against the issue's targets.
Everything runs on loopback; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import BLOCK, pattern_digest
from processes import free_port, rss_kib, stop_processes, wait_port

HERE = Path(__file__).resolve().parent
MiB = 1 << 20


@dataclass
class Target:
    """A way to reach the peers: direct, through socat, or through flowtap."""

    name: str
    bulk_port: int
    echo_port: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def pids(self) -> list[int]:
        """The relay's processes, forked children included."""
        roots = [p.pid for p in self.procs]
        found = list(roots)
        for pid in roots:
            out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
            found += [int(x) for x in out.stdout.split()]
        return found

    def rss_kib(self) -> int:
        return sum(rss_kib(pid) for pid in self.pids())

    def stop(self) -> None:
        stop_processes(self.procs)


def start_socat(bulk: int, echo: int, buffer_bytes: int = 262144) -> Target:
    """socat in front of each peer, reading and writing `buffer_bytes` at a time (its own
    default is 8192)."""
    procs = []
    ports = []
    for upstream in (bulk, echo):
        port = free_port()
        procs.append(
            subprocess.Popen(
                [
                    "socat",
                    "-b",
                    str(buffer_bytes),
                    f"TCP-LISTEN:{port},fork,reuseaddr,bind=127.0.0.1,backlog=4096",
                    f"TCP:127.0.0.1:{upstream}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        ports.append(port)
    for port in ports:
        wait_port(port)
    return Target("socat", ports[0], ports[1], procs)


def flowtap_command() -> list[str]:
    exe = shutil.which("flowtap", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "flowtap.inspector.cli"]


def start_flowtap(
    bulk: int, echo: int, log_path: Path, listen_ports: tuple[int, int] = (0, 0)
) -> tuple[Target, float]:
    """Start flowtap (sharing its ports, see --reuse-port); return it and its start-up seconds."""
    log = log_path.open("w")
    started = time.perf_counter()
    command = [
        *flowtap_command(), "run", "--reuse-port",
        "--listen", f"127.0.0.1:{listen_ports[0]}", "--upstream", f"127.0.0.1:{bulk}",
        "--listen", f"127.0.0.1:{listen_ports[1]}", "--upstream", f"127.0.0.1:{echo}",
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.DEVNULL)
    ports: list[int] = []
    deadline = time.monotonic() + 15
    while len(ports) < 2 and time.monotonic() < deadline:
        text = log_path.read_text()
        ports = [int(p) for p in re.findall(r"^listening tcp 127\.0\.0\.1:(\d+) ->", text, re.M)]
        if len(ports) < 2:
            time.sleep(0.001)
    elapsed = time.perf_counter() - started
    if len(ports) < 2:
        raise RuntimeError("flowtap did not print its listening lines")
    return Target("flowtap", ports[0], ports[1], [proc]), elapsed


# -- workloads -------------------------------------------------------------------------------


def bulk_up(port: int, size: int) -> float:
    """Upload `size` bytes; return MB/s once the server confirmed the sha256."""
    expected = pattern_digest(size)
    view = memoryview(BLOCK)
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"U")
        left = size
        while left:
            step = min(left, len(BLOCK))
            sock.sendall(view[:step])
            left -= step
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(100):
            answer += chunk
    elapsed = time.perf_counter() - started
    if answer.decode() != expected:
        raise RuntimeError("upload checksum mismatch")
    return size / MiB / elapsed


def bulk_down(port: int, size: int) -> float:
    """Download `size` bytes; return MB/s after checking the sha256."""
    expected = pattern_digest(size)
    digest = hashlib.sha256()
    buf = bytearray(262144)
    view = memoryview(buf)
    got = 0
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"D%d\n" % size)
        while n := sock.recv_into(buf):
            digest.update(view[:n])
            got += n
    elapsed = time.perf_counter() - started
    if got != size or digest.hexdigest() != expected:
        raise RuntimeError("download checksum mismatch")
    return size / MiB / elapsed


def parallel_down(port: int, streams: int, size: int) -> float:
    """`streams` downloads at once; return the aggregate MB/s."""
    errors: list[BaseException] = []

    def one() -> None:
        try:
            bulk_down(port, size)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(streams)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return streams * size / MiB / elapsed


def ping_pong(port: int, rounds: int) -> tuple[float, float]:
    """1-byte round trips; return p50 and p99 in microseconds."""
    samples = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"P")
        clock = time.perf_counter_ns
        for _ in range(rounds):
            started = clock()
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                raise RuntimeError("ping-pong lost a byte")
            samples.append((clock() - started) / 1000)
    samples.sort()
    return samples[len(samples) // 2], samples[int(len(samples) * 0.99)]


def connection_rate(port: int, seconds: float, limit: int, threads: int = 4) -> float:
    """New connections per second: connect, echo one byte, close; bounded by time and count."""
    count = [0] * threads
    deadline = time.perf_counter() + seconds
    per_thread = limit // threads

    def loop(index: int) -> None:
        for _ in range(per_thread):
            if time.perf_counter() > deadline:
                return
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(b"c")
                if sock.recv(1) != b"c":
                    raise RuntimeError("connection lost its byte")
            count[index] += 1

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(count) / (time.perf_counter() - started)


def idle_rss_per_connection(target: Target, connections: int) -> float:
    """Hold `connections` open flows; return the relay's RSS growth per flow in KiB."""
    time.sleep(0.5)
    before = target.rss_kib()
    socks = []
    try:
        for _ in range(connections):
            sock = socket.create_connection(("127.0.0.1", target.echo_port), timeout=30)
            socks.append(sock)
        for sock in socks:
            sock.sendall(b"i")
        for sock in socks:
            if sock.recv(1) != b"i":
                raise RuntimeError("idle connection lost its byte")
        time.sleep(0.5)
        after = target.rss_kib()
    finally:
        for sock in socks:
            sock.close()
    return (after - before) / connections


def median_start_ms(runs: int, bulk: int, echo: int, workdir: Path) -> float:
    samples = []
    for i in range(runs):
        target, elapsed = start_flowtap(bulk, echo, workdir / f"start{i}.log")
        samples.append(elapsed * 1000)
        target.stop()
    return statistics.median(samples)


# -- the run -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--size-mib", type=int, default=256, help="bulk size each way")
    parser.add_argument("--idle", type=int, default=10_000, help="idle flows held by flowtap")
    args = parser.parse_args()
    size = (32 if args.quick else args.size_mib) * MiB
    idle = 1000 if args.quick else args.idle
    rounds = 2000 if args.quick else 20_000
    bulk_rounds = 1 if args.quick else 5
    # New connections take turns with the bulk rounds too: a single 3 s sample per path
    # varied by up to 20% from one run to the next here.
    conn_seconds = 3.0 if args.quick else 2.0
    processes = 1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * idle + 1024  # flowtap holds two sockets a flow
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        per_process = (hard - 1024) // 2
        processes = -(-idle // per_process)
        print(
            f"note: the open-files hard limit here is {hard} and cannot be raised (no "
            f"CAP_SYS_RESOURCE): one flowtap holds at most {per_process} flows, so "
            f"{processes} flowtap processes share the port (--reuse-port) for {idle} idle flows",
            file=sys.stderr,
        )

    workdir = Path(tempfile.mkdtemp(prefix="flowtap-bench-"))
    peers = subprocess.Popen(
        [sys.executable, str(HERE / "peers.py")], stdout=subprocess.PIPE, text=True
    )
    assert peers.stdout is not None
    ports = dict(peers.stdout.readline().split() for _ in range(2))
    bulk, echo = int(ports["bulk"]), int(ports["echo"])

    results: dict[str, dict[str, float]] = {}
    start_ms = median_start_ms(5, bulk, echo, workdir)
    starters: dict[str, Callable[[], Target]] = {
        "direct": lambda: Target("direct", bulk, echo),
        "socat": lambda: start_socat(bulk, echo),
        "flowtap": lambda: start_flowtap(bulk, echo, workdir / "flowtap.log")[0],
    }
    targets = {name: start() for name, start in starters.items()}
    try:
        # Throughput and new connections alternate between the paths, round after round, and
        # keep each one's median: on a small shared machine, drift in the background hits all
        # paths alike.
        samples: dict[str, dict[str, list[float]]] = {name: {} for name in targets}
        for _ in range(bulk_rounds):
            for name, target in targets.items():
                row_samples = samples[name]
                row_samples.setdefault("bulk up MB/s", []).append(bulk_up(target.bulk_port, size))
                row_samples.setdefault("bulk down MB/s", []).append(
                    bulk_down(target.bulk_port, size)
                )
                row_samples.setdefault("8 streams MB/s", []).append(
                    parallel_down(target.bulk_port, 8, size // 4)
                )
                row_samples.setdefault("conn/s", []).append(
                    connection_rate(target.echo_port, conn_seconds, 20_000)
                )
        for name, target in targets.items():
            row = {metric: statistics.median(values) for metric, values in samples[name].items()}
            p50, p99 = ping_pong(target.bulk_port, rounds)
            row["ping-pong p50 us"] = p50
            row["ping-pong p99 us"] = p99
            if name != "direct":
                held = idle if name == "flowtap" else min(idle, 1000)
                if name == "flowtap":
                    for i in range(1, processes):  # the sharers of the port, see the note
                        sharer, _ = start_flowtap(
                            bulk, echo, workdir / f"sharer{i}.log",
                            (target.bulk_port, target.echo_port),
                        )  # fmt: skip
                        target.procs += sharer.procs
                row["flowtap processes"] = processes if name == "flowtap" else 1
                row["RSS KiB/idle conn"] = idle_rss_per_connection(target, held)
                row["idle conns held"] = held
            results[name] = row
            print(f"{name}: done", file=sys.stderr)
    finally:
        for target in targets.values():
            target.stop()
        peers.terminate()
        peers.wait()

    metrics = list(results["flowtap"])
    print(
        f"\nbulk {size // MiB} MiB each way and conn/s {conn_seconds:g} s (median of "
        f"{bulk_rounds} alternating rounds), {rounds} ping-pong rounds"
    )
    print(f"{'metric':<22}" + "".join(f"{n:>12}" for n in results) + f"{'flowtap/socat':>15}")
    for metric in metrics:
        cells = "".join(
            f"{results[n][metric]:>12.1f}" if metric in results[n] else f"{'-':>12}"
            for n in results
        )
        ratio = results["flowtap"][metric] / results["socat"][metric]
        print(f"{metric:<22}{cells}{ratio:>14.2f}x")
    print(f"{'start to listening ms':<22}{'':>24}{start_ms:>12.1f}")

    f, s = results["flowtap"], results["socat"]
    checks = [
        ("bulk up >= 1.0x socat", f["bulk up MB/s"] >= s["bulk up MB/s"]),
        ("bulk down >= 1.0x socat", f["bulk down MB/s"] >= s["bulk down MB/s"]),
        ("ping-pong p50 <= 1.1x socat", f["ping-pong p50 us"] <= 1.1 * s["ping-pong p50 us"]),
        ("conn/s >= 2x socat", f["conn/s"] >= 2 * s["conn/s"]),
        (f"{int(f['idle conns held'])} idle conns <= 16 KiB each", f["RSS KiB/idle conn"] <= 16),
        ("start to listening <= 300 ms", start_ms <= 300),
    ]
    print()
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")


if __name__ == "__main__":
    main()
