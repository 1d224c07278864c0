"""How the capture tests read a pcap back: tshark (expert info, follow, fields) and scapy."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from conftest import flowtap_command, wait_for
from flowtap.proxy.errors import FlowtapError

TSHARK_TIMEOUT_S = 240.0
_SECTION = re.compile(r"^(Errors|Warns|Notes|Chats|Comments) \((\d+)\)")
_ENTRY = re.compile(r"^\s+\d+\s+\S+\s+\S+\s+(.*)$")


def tshark(*args: str, timeout_s: float = TSHARK_TIMEOUT_S) -> str:
    """Run tshark; fail on a non-zero exit or any complaint other than the root-user notice."""
    result = subprocess.run(
        ["tshark", *args], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    complaints = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and not line.startswith("Running as user")
    ]
    assert result.returncode == 0 and not complaints, (
        f"tshark {' '.join(args)} exited {result.returncode}: {result.stderr}"
    )
    return result.stdout


def expert_entries(path: Path, *prefs: str, data_port: int | None = None) -> dict[str, list[str]]:
    """tshark's expert info for `path`: section name (Errors, Warns, ...) to entry summaries.

    With `data_port`, that TCP and UDP port's payload is decoded as plain data: random bytes
    are otherwise now and then claimed by a heuristic dissector (Thrift, say), which warns.
    """
    options = [arg for pref in prefs for arg in ("-o", pref)]
    if data_port is not None:
        options += ["-d", f"tcp.port=={data_port},data", "-d", f"udp.port=={data_port},data"]
    out = tshark("-r", str(path), *options, "-q", "-z", "expert")
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        match = _SECTION.match(line)
        if match:
            current = sections.setdefault(match.group(1), [])
            continue
        row = _ENTRY.match(line)
        if row and current is not None:
            current.append(row.group(1).strip())
    return sections


def assert_tshark_clean(
    path: Path,
    *prefs: str,
    allowed_warnings: tuple[str, ...] = (),
    data_port: int | None = None,
) -> None:
    """tshark reads `path` with no malformed packet, no expert error, and no expert warning
    but those named in `allowed_warnings` (a reset flow warns "Connection reset (RST)");
    scapy reads every packet too. `data_port`: see `expert_entries`."""
    sections = expert_entries(path, *prefs, data_port=data_port)
    assert not sections.get("Errors"), sections
    unexpected = [w for w in sections.get("Warns", []) if w not in allowed_warnings]
    assert not unexpected, sections
    # scapy reads the same packets.
    assert scapy_count(path) == len(
        tshark("-r", str(path), "-T", "fields", "-e", "frame.number").split()
    )


def follow_tcp(path: Path, stream: int) -> tuple[bytes, bytes]:
    """The bytes tshark's Follow TCP Stream shows for `stream`: (first node's, second node's)."""
    out = tshark("-r", str(path), "-q", "-z", f"follow,tcp,raw,{stream}")
    return _parse_follow(out)


def follow_udp(path: Path, stream: int) -> tuple[bytes, bytes]:
    out = tshark("-r", str(path), "-q", "-z", f"follow,udp,raw,{stream}")
    return _parse_follow(out)


def _parse_follow(out: str) -> tuple[bytes, bytes]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Node 1:")) + 1
    first: list[bytes] = []
    second: list[bytes] = []
    for line in lines[start:]:
        if line.startswith("="):
            break
        if line.startswith("\t"):
            second.append(bytes.fromhex(line.strip()))
        elif line:
            first.append(bytes.fromhex(line))
    return b"".join(first), b"".join(second)


def fields(
    path: Path, *names: str, display_filter: str = "", prefs: tuple[str, ...] = ()
) -> list[list[str]]:
    """One row per packet of the given tshark fields (with tshark preferences `prefs`)."""
    args = ["-r", str(path), "-T", "fields", "-E", "separator=|"]
    for pref in prefs:
        args += ["-o", pref]
    if display_filter:
        args += ["-Y", display_filter]
    for name in names:
        args += ["-e", name]
    return [line.split("|") for line in tshark(*args).splitlines() if line]


def scapy_count(path: Path) -> int:
    """How many packets scapy's streaming reader finds in `path` (pcap or pcapng)."""
    from scapy.utils import PcapReader

    with PcapReader(str(path)) as reader:
        return sum(1 for _ in reader)


@contextlib.contextmanager
def capture_loopback(
    tool: str, path: Path, bpf_filter: str, *, interface: str = "lo", link: str | None = None
) -> Iterator[None]:
    """Capture `bpf_filter` traffic on `interface` with tcpdump or dumpcap while the block runs.

    On leaving, waits (with a deadline) until the file holds a closed flow, then stops the tool.
    """
    if tool == "tcpdump":
        command = ["tcpdump", "-i", interface, "-U", "-w", str(path)]
        if link:
            command += ["-y", link]
        command += [bpf_filter]
        ready = "listening on"
    else:
        command = ["dumpcap", "-i", interface, "-f", bpf_filter, "-w", str(path)]
        ready = "File:"
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 20
    while not any(ready in line for line in lines):
        assert time.monotonic() < deadline and proc.poll() is None, f"{tool} did not start: {lines}"
        lines.append(proc.stderr.readline())
    try:
        yield
        wait_for(lambda: _has_closed_flow(path), 20, f"{tool} to write the closed flow")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _has_closed_flow(path: Path) -> bool:
    from flowtap.inspector.pcapfile.reassembly import read_capture
    from flowtap.proxy.flow import FlowClosed

    try:
        return any(
            isinstance(e, FlowClosed) and e.flow.reason is not None for e in read_capture(path)
        )
    except FlowtapError:
        return False


def flowtap_show(*args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[bytes]:
    """Run `flowtap show ARGS` and return its result (stdout as bytes)."""
    return subprocess.run(
        [*flowtap_command(), "show", *args], capture_output=True, timeout=timeout_s, check=False
    )


def scapy_packets(path: Path) -> list[object]:
    """Every packet of `path` as scapy dissects it (pcap or pcapng), in memory."""
    from scapy.utils import rdpcap

    return list(rdpcap(str(path)))
