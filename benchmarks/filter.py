"""Filter benchmark: `flowtap show --filter` on the capture `capture.py` makes (SIZE MiB each way
through flowtap with --pcap, 2 GiB in all by default), against the plain listing of it.

Run on demand:  python benchmarks/filter.py [--size-mib N] [--rounds N] [--keep DIR]
Targets: a payload `contains` costs at most 1.5x the plain listing's time, a header-only
expression at most 1.1x. The commands take turns each round; times are medians of the
rounds, of the whole command (start-up included). The verdict is on CPU time (user +
system): on a shared machine the wall clock of one command varies by 3x from run to run,
its CPU time by a few percent; the wall clock is shown beside it. The
payload target is judged on a needle that is absent, so the filter reads every byte; a
needle found in the first packets of each flow is shown too (it stops reading at once).
Exit status 1 when a target is missed.
Everything runs on loopback; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from capture import start_flowtap, start_peers
from relay import MiB, bulk_down, bulk_up, flowtap_command

HEADER_ONLY = "tcp port {port} and not host 10.0.0.1 and portrange 1024-65535"
PAYLOAD = 'contains "flowtap-needle-absent"'
PAYLOAD_EARLY = 'contains "\\x00\\x01\\x02\\x03"'  # in the first bytes of either flow


def make_capture(workdir: Path, size_bytes: int) -> tuple[Path, int]:
    """SIZE bytes down then SIZE up through flowtap --pcap; the capture and the server port.

    A capture of the same size made before in `workdir` (noted in big.made) is reused.
    """
    capture = workdir / "big.pcapng"
    made = workdir / "big.made"
    if capture.exists() and made.exists():
        size_text, port_text = made.read_text().split()
        if int(size_text) == size_bytes:
            return capture, int(port_text)
    made.unlink(missing_ok=True)
    peers, bulk = start_peers()
    try:
        target = start_flowtap(bulk, workdir, "--pcap", str(capture))
        try:
            bulk_down(target.bulk_port, size_bytes)
            bulk_up(target.bulk_port, size_bytes)
        finally:
            target.stop()
    finally:
        peers.terminate()
        peers.wait(10)
    made.write_text(f"{size_bytes} {bulk}\n")
    return capture, bulk


def timed(command: list[str]) -> tuple[float, float, str]:
    """Run `command` (at most 10 minutes); return its wall-clock and CPU seconds and stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}: {result.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu, result.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--size-mib", type=int, default=1024, help="MiB each way (default 1024: a 2 GiB capture)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--keep", type=Path, help="make (or reuse) the capture in this folder")
    args = parser.parse_args()
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="flowtap-filter-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        made = time.perf_counter()
        capture, port = make_capture(workdir, args.size_mib * MiB)
        made_s = time.perf_counter() - made
        show = [*flowtap_command(), "show", str(capture)]
        commands = {
            "plain listing": show,
            "header-only": [*show, "--filter", HEADER_ONLY.format(port=port)],
            "payload contains": [*show, "--filter", PAYLOAD],
            "payload, found early": [*show, "--filter", PAYLOAD_EARLY],
        }
        timed(show)  # the page cache holds the file from now on, for every command alike
        walls: dict[str, list[float]] = {name: [] for name in commands}
        cpus: dict[str, list[float]] = {name: [] for name in commands}
        outputs: dict[str, str] = {}
        for _ in range(args.rounds):
            for name, command in commands.items():
                wall, cpu, outputs[name] = timed(command)
                walls[name].append(wall)
                cpus[name].append(cpu)
        size_mib = capture.stat().st_size / MiB
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    plain = statistics.median(walls["plain listing"])
    plain_cpu = statistics.median(cpus["plain listing"])
    print(
        f"flowtap show on a {size_mib:.0f} MiB capture ({args.size_mib} MiB each way through "
        f"flowtap, made or found in {made_s:.1f}s), median of {args.rounds} rounds:"
    )
    print(f"  {'':<21}{'wall s':>8}{'(range)':>14}{'x plain':>9}{'CPU s':>8}{'x plain':>9}")
    ratios = {}
    for name in commands:
        wall = statistics.median(walls[name])
        cpu = statistics.median(cpus[name])
        ratios[name] = cpu / plain_cpu
        spread = f"{min(walls[name]):.2f}-{max(walls[name]):.2f}"
        print(
            f"  {name:<21}{wall:8.2f}{spread:>14}{wall / plain:9.2f}{cpu:8.2f}{ratios[name]:9.2f}"
        )
    print(f"  header-only:          --filter '{HEADER_ONLY.format(port=port)}'")
    print(f"  payload contains:     --filter '{PAYLOAD}' (absent: every byte is read)")
    print(f"  payload, found early: --filter '{PAYLOAD_EARLY}'")
    checks = [
        ("header-only filter <= 1.1x the plain listing (CPU)", ratios["header-only"] <= 1.1),
        ("payload contains <= 1.5x the plain listing (CPU)", ratios["payload contains"] <= 1.5),
        ("header-only lists both flows", "2 flows" in outputs["header-only"].splitlines()[0]),
        ("payload contains lists none", "0 of 2 flows" in outputs["payload contains"]),
        ("found early lists both flows", "2 flows" in outputs["payload, found early"]),
    ]
    for label, ok in checks:
        print(f"  [{'met' if ok else 'MISSED'}] {label}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
