"""One filter language, three ways in: `show --filter --json`, `replay --filter --dry-run` and
the TUI's `/` box select the same flows of the same captures (ours, one flowtap writes here,
and tcpdump and dumpcap ones of real peers on loopback)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from capture_checks import assert_tshark_clean, capture_loopback

from conftest import (
    _EchoHandler,
    _ThreadingServer,
    free_port,
    start_flowtap,
    start_udp_echo,
    wait_for,
    wait_port,
)
from flowtap.inspector.cli import main
from flowtap.inspector.tui.app import FlowtapApp
from flowtap.inspector.tui.widgets.flow_table import FlowTable

SAMPLES = Path(__file__).resolve().parent.parent / "captures" / "samples"
BIG = bytes(range(256)) * 4800  # 1.2 MB: a flow past `bytes > 1M`

# {http}, {redis}, {echo}, {udp}: the server ports of the capture at hand (0: it has none).
EXPRESSIONS = [
    "tcp",
    "udp",
    "not tcp",
    "ip and not ip6",
    "port {redis}",
    "tcp port {redis}",
    "dst port {http}",
    "src port {http}",
    "port {http} or port {redis}",
    "udp port {udp}",
    "portrange 1-1023",
    "src portrange 1024-65535",
    "host 127.0.0.1",
    "src host 127.0.0.1 and dst host 127.0.0.1",
    "net 127.0.0.0/8",
    "not net 10.0.0.0/8",
    "tcp.port == {redis}",
    "tcp.dstport != {http}",
    "udp.port == {udp}",
    "ip.addr == 127.0.0.1",
    "state closed",
    "state reset",
    "state open",
    "reason client-closed",
    "reason server-closed",
    "reason != client-closed",
    "proto http",
    "proto redis",
    "proto dns",
    "not proto http",
    "bytes > 1M",
    "up > 100",
    "down >= 1K",
    "bytes < 100",
    "duration < 10s",
    "id 1",
    "id >= 2",
    'contains "GET /"',
    "down contains OK",
    "up contains PING",
    'contains "404"',
    "matches /GET \\/[a-z]*/",
    "down matches /\\+(PONG|OK)/",
    "up matches /^\\*[0-9]/",
    "matches /\\x00\\x01\\x02\\x03/",
    "get",
    '"not found"',
    "(tcp port {redis} or proto http) and not state reset",
    "! udp && bytes > 10",
    "tcp and (contains PING or contains GET) or udp",
    "up contains PING and state closed",
    'down contains "\\x07example"',
    "not (port {http} or port {redis}) and tcp",
]


@dataclass(frozen=True)
class Capture:
    path: Path
    ports: dict[str, int]

    def expression(self, template: str) -> str:
        return template.format(**self.ports)


# -- the captures --------------------------------------------------------------------------


@dataclass
class Peers:
    http: int
    redis: int
    echo: int
    udp: int


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    """python's http.server, redis-server, a TCP echo and a UDP echo, all on loopback."""
    root = tmp_path_factory.mktemp("www")
    (root / "index.html").write_bytes(b"<html>hello</html>\n")
    http = free_port()
    redis = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "http.server", str(http), "--bind", "127.0.0.1"],
            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            ["redis-server", "--port", str(redis), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ),
    ]  # fmt: skip
    echo = _ThreadingServer(("127.0.0.1", 0), _EchoHandler)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    udp = start_udp_echo()
    try:
        wait_port(http)
        wait_port(redis)
        yield Peers(http, redis, echo.server_address[1], udp.port)
    finally:
        echo.shutdown()
        echo.server_close()
        udp.stop()
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def _web(port: int) -> None:
    for page in ("index.html", "missing"):
        subprocess.run(
            ["curl", "-s", "--http1.1", "-o", "/dev/null", f"http://127.0.0.1:{port}/{page}"],
            check=True, timeout=30,
        )  # fmt: skip


def _redis(port: int) -> None:
    for command in (["PING"], ["SET", "greeting", "hello"]):
        subprocess.run(
            ["redis-cli", "-p", str(port), *command], check=True, timeout=30, capture_output=True
        )


def _dns_query(port: int) -> None:
    """A DNS query for example.test (A) to the UDP echo, which sends it back."""
    name = b"".join(bytes([len(p)]) + p for p in b"example.test".split(b".")) + b"\0"
    query = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.sendto(query, ("127.0.0.1", port))
        assert sock.recv(2048) == query


def _echo(port: int, payload: bytes, *, reset: bool = False) -> None:
    """Send `payload` to the echo and read it back; then half-close, or reset with `reset`."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        received = bytearray()
        while len(received) < len(payload):
            chunk = sock.recv(65536)
            assert chunk
            received += chunk
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass


@pytest.fixture(scope="module")
def captures(peers: Peers, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Capture]:
    folder = tmp_path_factory.mktemp("captures")
    made = {
        "http sample": Capture(SAMPLES / "http.pcapng", {"http": 18080}),
        "redis sample": Capture(SAMPLES / "redis.pcapng", {"redis": 16379}),
    }
    # flowtap's own capture, of everything relayed through it
    path = folder / "flowtap.pcapng"
    relay = start_flowtap(
        "run", "--pcap", str(path),
        "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{peers.http}",
        "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{peers.redis}",
        "--listen", "udp:127.0.0.1:0", "--upstream", f"127.0.0.1:{peers.udp}",
        "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{peers.echo}",
        listeners=4,
    )  # fmt: skip
    try:
        http, redis, udp, echo = (int(row[1].rsplit(":", 1)[1]) for row in relay.listeners)
        _web(http)
        _redis(redis)
        _dns_query(udp)
        _echo(echo, BIG)
        _echo(echo, b"bye\r\n", reset=True)
        wait_for(lambda: sum(" closed " in line for line in relay.lines) >= 6, 15, "6 closed")
    finally:
        assert relay.stop() == 0
    made["flowtap"] = Capture(path, {"http": peers.http, "redis": peers.redis,
                                     "udp": peers.udp, "echo": peers.echo})  # fmt: skip
    # tcpdump on lo: curl and redis-cli talking to the servers directly
    path = folder / "tcpdump.pcap"
    with capture_loopback("tcpdump", path, f"tcp port {peers.http} or tcp port {peers.redis}"):
        _web(peers.http)
        _redis(peers.redis)
    made["tcpdump"] = Capture(path, {"http": peers.http, "redis": peers.redis})
    # dumpcap on lo: the UDP query and echo exchanges, one of them reset
    path = folder / "dumpcap.pcapng"
    with capture_loopback("dumpcap", path, f"udp port {peers.udp} or tcp port {peers.echo}"):
        _dns_query(peers.udp)
        _echo(peers.echo, b"*1\r\n$4\r\nPING\r\n")
        _echo(peers.echo, b"GET /echo HTTP/1.1\r\n\r\n", reset=True)
    made["dumpcap"] = Capture(path, {"udp": peers.udp, "echo": peers.echo})
    for capture in made.values():
        for peer in ("http", "redis", "echo", "udp"):
            capture.ports.setdefault(peer, 0)
        if capture.path.parent == folder:
            # the echoed DNS query is plain data to tshark, not a retransmitted query
            assert_tshark_clean(
                capture.path,
                allowed_warnings=("Connection reset (RST)",),
                data_port=capture.ports["udp"] or None,
            )
    return made


# -- the three ways in ---------------------------------------------------------------------


def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(args))
    return status, out.getvalue(), err.getvalue()


def shown(capture: Capture, expression: str) -> list[int]:
    status, out, err = _cli("show", str(capture.path), "--json", "--filter", expression)
    assert status == 0 and not err, err
    return [json.loads(line)["flow"] for line in out.splitlines()]


def replayed(capture: Capture, expression: str) -> list[int]:
    status, out, err = _cli(
        "replay", str(capture.path), "--to", "127.0.0.1:9", "--dry-run", "--json",
        "--filter", expression,
    )  # fmt: skip
    if status == 2 and "no flow in" in err and "matches the --filter" in err:
        return []
    assert status == 0, err
    return sorted(json.loads(line)["flow"] for line in out.splitlines())


def in_tui(capture: Capture, expressions: list[str]) -> dict[str, list[int]]:
    app = FlowtapApp(capture=capture.path)
    picked: dict[str, list[int]] = {}

    async def scenario() -> None:
        async with app.run_test(size=(160, 48)) as pilot:
            table = app.query_one(FlowTable)
            deadline = time.monotonic() + 30
            while app.loading or any(r.summary_stale for r in app.store.records.values()):
                assert time.monotonic() < deadline, "the capture and its summaries to load"
                await pilot.pause(0.02)
            box = app.query_one("#filter")
            for expression in expressions:
                box.value = expression  # type: ignore[attr-defined]
                while table.flow_filter is None or table.flow_filter.text != expression:
                    assert time.monotonic() < deadline + 60, f"the filter {expression!r}"
                    await pilot.pause(0.01)
                picked[expression] = sorted(table.ids)

    asyncio.run(scenario())
    return picked


@pytest.mark.parametrize("name", ["http sample", "redis sample", "flowtap", "tcpdump", "dumpcap"])
def test_show_replay_and_tui_select_the_same_flows(captures: dict[str, Capture], name: str) -> None:
    capture = captures[name]
    expressions = [capture.expression(template) for template in EXPRESSIONS]
    tui = in_tui(capture, expressions)
    differing = []
    for expression in expressions:
        by_show = shown(capture, expression)
        by_replay = replayed(capture, expression)
        if not by_show == by_replay == tui[expression]:
            differing.append((expression, by_show, by_replay, tui[expression]))
    assert not differing


def test_the_expressions_tell_flows_apart(captures: dict[str, Capture]) -> None:
    """Each expression picks some flows but not all in at least one capture: none is vacuous."""
    vacuous = []
    for template in EXPRESSIONS:
        telling = False
        for capture in captures.values():
            total = len(shown(capture, "id >= 1"))
            picked = len(shown(capture, capture.expression(template)))
            telling = telling or 0 < picked < total
        if not telling:
            vacuous.append(template)
    assert len(EXPRESSIONS) - len(vacuous) >= 30, vacuous
