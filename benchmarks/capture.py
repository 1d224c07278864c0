"""Capture benchmark: relay bulk MB/s with capture off, pcap and pcapng, against socat; losslessness
and RSS while capturing 1 GiB; `flowtap show` listing a ~1 GiB capture against tshark.

Run on demand:  python benchmarks/capture.py [--quick] [--keep DIR]
Prints a table of figures and ratios measured in the same run, and the issue's targets.
Everything runs on loopback; every loop is bounded in count and time. Figures are noisy on a
shared machine: throughputs are medians of alternating runs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import BLOCK, pattern_digest
from processes import wait_port
from relay import (
    MiB,
    Target,
    bulk_down,
    bulk_up,
    flowtap_command,
    start_socat,
)

HERE = Path(__file__).resolve().parent


def upload_digest(size_bytes: int) -> str:
    """The sha256 of the client side of an upload: the job byte `U`, then the pattern."""
    digest = hashlib.sha256(b"U")
    full, rest = divmod(size_bytes, len(BLOCK))
    for _ in range(full):
        digest.update(BLOCK)
    digest.update(BLOCK[:rest])
    return digest.hexdigest()


def write_small_packets(path: Path, flows: int, rounds: int) -> Path:
    """A capture of `flows` redis-like ping-pong flows of `rounds` exchanges each."""
    from flowtap.inspector.pcapfile.writer import CaptureWriter, open_packet_file
    from flowtap.proxy.flow import (
        Address,
        CloseReason,
        Direction,
        Flow,
        FlowClosed,
        FlowData,
        FlowOpened,
        Transport,
    )

    out = open_packet_file(path)
    writer = CaptureWriter(out)
    now = time.time()
    opened = []
    for flow_id in range(1, flows + 1):
        flow = Flow(
            id=flow_id,
            transport=Transport.TCP,
            client=Address("127.0.0.1", 10000 + flow_id),
            server=Address("127.0.0.1", 6379),
            listener=Address("127.0.0.1", 6380),
            started_at=now,
        )
        writer.write(FlowOpened(flow))
        opened.append(flow)
    for _ in range(rounds):
        for flow in opened:
            now += 1e-5
            writer.write(FlowData(flow.id, Direction.UP, now, b"*1\r\n$4\r\nPING\r\n"))
            writer.write(FlowData(flow.id, Direction.DOWN, now, b"+PONG\r\n"))
    for flow in opened:
        closed = flow.closed(
            ended_at=now, bytes_up=0, bytes_down=0, reason=CloseReason.CLIENT_CLOSED
        )
        writer.write(FlowClosed(closed))
    out.close()
    return path


def start_peers() -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "peers.py")], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    bulk = int(line.split()[1])
    wait_port(bulk)
    return proc, bulk


def start_flowtap(bulk: int, workdir: Path, *capture: str) -> Target:
    """flowtap relaying to the bulk peer, with the given capture options."""
    log_path = workdir / f"flowtap-{len(list(workdir.glob('flowtap-*.log')))}.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [*flowtap_command(), "run", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{bulk}",
         *capture],
        stdout=log, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        found = re.search(r"^listening tcp 127\.0\.0\.1:(\d+) ->", log_path.read_text(), re.M)
        if found:
            return Target("flowtap", int(found.group(1)), 0, [proc])
        time.sleep(0.01)
    proc.kill()
    raise RuntimeError("flowtap did not print its listening line")


def throughput(
    make: dict[str, Callable[[], Target]], size: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Median bulk down and up MB/s per target, the targets taking turns each round."""
    samples: dict[str, dict[str, list[float]]] = {n: {"down": [], "up": []} for n in make}
    for _ in range(rounds):
        for name, start in make.items():
            target = start()
            try:
                samples[name]["down"].append(bulk_down(target.bulk_port, size))
                samples[name]["up"].append(bulk_up(target.bulk_port, size))
            finally:
                target.stop()
    return {
        name: {kind: statistics.median(values) for kind, values in kinds.items()}
        for name, kinds in samples.items()
    }


def sample_rss(target: Target, stop: threading.Event, peak: list[int]) -> None:
    while not stop.wait(0.05):
        peak[0] = max(peak[0], target.rss_kib())


def tshark_follow_sha256(path: Path, stream: int, node: int) -> str:
    """sha256 of what tshark's Follow TCP Stream shows for one node, streamed line by line."""
    proc = subprocess.Popen(
        ["tshark", "-r", str(path), "-q", "-z", f"follow,tcp,raw,{stream}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    digest = hashlib.sha256()
    started = False
    for line in proc.stdout:
        if not started:
            started = line.startswith("Node 1:")
            continue
        if line.startswith("="):
            break
        is_second = line.startswith("\t")
        if is_second == (node == 1):
            digest.update(bytes.fromhex(line.strip()))
    proc.wait(600)
    return digest.hexdigest()


def flowtap_raw_sha256(path: Path, flow: int, side: str) -> str:
    proc = subprocess.Popen(
        [*flowtap_command(), "show", str(path), "--flow", str(flow), "--raw", side],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    digest = hashlib.sha256()
    while chunk := proc.stdout.read(1 << 20):
        digest.update(chunk)
    proc.wait(600)
    return digest.hexdigest()


def timed_peak_rss(command: list[str]) -> tuple[float, int, str]:
    """Run `command`; return (seconds, peak RSS in KiB, stdout)."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{command[0]} exited {proc.returncode}")
    return elapsed, usage.ru_maxrss, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, one round")
    parser.add_argument("--keep", type=Path, help="keep the big captures in this folder")
    args = parser.parse_args()
    size = (64 if args.quick else 256) * MiB
    rounds = 1 if args.quick else 7
    big = (128 if args.quick else 1024) * MiB
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="flowtap-capture-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    shm = (
        Path(tempfile.mkdtemp(prefix="flowtap-", dir="/dev/shm"))
        if Path("/dev/shm").is_dir()
        else None
    )
    peers, bulk = start_peers()
    try:
        make: dict[str, Callable[[], Target]] = {
            "socat -b 262144": lambda: start_socat(bulk, bulk),
            # socat as users run it, with its default buffer; the target is against -b 262144.
            "socat -b 8192": lambda: start_socat(bulk, bulk, buffer_bytes=8192),
            "capture off": lambda: start_flowtap(bulk, workdir),
            "pcap": lambda: start_flowtap(bulk, workdir, "--pcap", str(workdir / "t.pcap")),
            "pcapng": lambda: start_flowtap(bulk, workdir, "--pcap", str(workdir / "t.pcapng")),
        }
        if shm is not None:
            # The same capture into memory: the writer's own cost, without the file system's.
            make["pcapng (tmpfs)"] = lambda: start_flowtap(
                bulk, workdir, "--pcap", str(shm / "t.pcapng")
            )
        rates = throughput(make, size, rounds)

        # Lossless and bounded: 1 GiB each way through flowtap, RSS sampled all along.
        capture = workdir / "big.pcapng"
        target = start_flowtap(bulk, workdir, "--pcap", str(capture))
        idle_rss = target.rss_kib()
        peak = [idle_rss]
        stop = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(target, stop, peak))
        sampler.start()
        try:
            big_down = bulk_down(target.bulk_port, big)
            big_up = bulk_up(target.bulk_port, big)
        finally:
            stop.set()
            sampler.join()
            target.stop()
        rss_growth_mib = (peak[0] - idle_rss) / 1024
        checks = {
            "tshark down": tshark_follow_sha256(capture, 0, 1),
            "tshark up": tshark_follow_sha256(capture, 1, 0),
            "flowtap down": flowtap_raw_sha256(capture, 1, "server"),
            "flowtap up": flowtap_raw_sha256(capture, 2, "client"),
        }
        sent_down = pattern_digest(big)
        sent_up = upload_digest(big)
        # The flow list of the same capture, flowtap show against tshark's conversation table.
        show_s, show_kib, show_out = timed_peak_rss([*flowtap_command(), "show", str(capture)])
        tshark_s, tshark_kib, tshark_out = timed_peak_rss(
            ["tshark", "-q", "-z", "conv,tcp", "-r", str(capture)]
        )
        capture_mib = capture.stat().st_size / MiB
        # Many small packets stress per-packet work rather than bytes.
        small = write_small_packets(workdir / "small.pcapng", 1000, 200)
        small_show_s, small_show_kib, _ = timed_peak_rss([*flowtap_command(), "show", str(small)])
        small_tshark_s, small_tshark_kib, _ = timed_peak_rss(
            ["tshark", "-q", "-z", "conv,tcp", "-r", str(small)]
        )
    finally:
        peers.terminate()
        peers.wait(10)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        if shm is not None:
            shutil.rmtree(shm, ignore_errors=True)

    print(f"bulk transfers of {size // MiB} MiB, median of {rounds} rounds (MB/s = MiB/s)")
    print(f"{'':<18}{'down MB/s':>11}{'up MB/s':>11}{'vs off':>9}{'vs socat':>10}")
    off = rates["capture off"]
    socat = rates["socat -b 262144"]
    for name, rate in rates.items():
        mean = (rate["down"] + rate["up"]) / 2
        print(
            f"{name:<18}{rate['down']:>11.0f}{rate['up']:>11.0f}"
            f"{mean / ((off['down'] + off['up']) / 2):>9.2f}"
            f"{mean / ((socat['down'] + socat['up']) / 2):>10.2f}"
        )
    print()
    print(f"{big // MiB} MiB each way with --pcap {capture.name} ({capture_mib:.0f} MiB captured):")
    print(f"  down {big_down:.0f} MB/s, up {big_up:.0f} MB/s, RSS growth {rss_growth_mib:.1f} MiB")
    for name, digest in checks.items():
        expected = sent_down if name.endswith("down") else sent_up
        print(f"  sha256 {name:<13} {'matches' if digest == expected else 'DIFFERS'}")
    print()
    print(f"listing the flows of the {capture_mib:.0f} MiB capture:")
    print(f"  flowtap show  {show_s:6.2f} s  peak RSS {show_kib / 1024:6.1f} MiB")
    print(f"  tshark conv   {tshark_s:6.2f} s  peak RSS {tshark_kib / 1024:6.1f} MiB")
    print(f"  ratio         {show_s / tshark_s:6.2f}x")
    print("listing 1000 flows of 400 small segments and their ACKs (806k packets):")
    print(f"  flowtap show  {small_show_s:6.2f} s  peak RSS {small_show_kib / 1024:6.1f} MiB")
    print(f"  tshark conv   {small_tshark_s:6.2f} s  peak RSS {small_tshark_kib / 1024:6.1f} MiB")
    print(f"  ratio         {small_show_s / small_tshark_s:6.2f}x")
    assert "2 flows" in show_out and "<->" in tshark_out
    print()
    worst = min(
        (rates[f]["down"] + rates[f]["up"]) / (off["down"] + off["up"]) for f in ("pcap", "pcapng")
    )
    beats_socat = min(
        (rates[f]["down"] + rates[f]["up"]) / (socat["down"] + socat["up"])
        for f in ("pcap", "pcapng")
    )
    targets = [
        ("capture costs <= 20% of capture-off", worst >= 0.8),
        ("capture >= 1.0x socat -b 262144", beats_socat >= 1.0),
        ("RSS growth capturing 1 GiB <= 64 MiB", rss_growth_mib <= 64),
        (
            "sha256 of every direction matches",
            all(d == (sent_down if n.endswith("down") else sent_up) for n, d in checks.items()),
        ),
        ("show <= 1.0x tshark's time (1 GiB capture)", show_s <= tshark_s),
        ("show peak RSS <= 200 MiB (1 GiB capture)", show_kib <= 200 * 1024),
        ("show <= 1.0x tshark's time (small packets)", small_show_s <= small_tshark_s),
    ]
    for label, ok in targets:
        print(f"  [{'met' if ok else 'MISSED'}] {label}")


if __name__ == "__main__":
    main()
