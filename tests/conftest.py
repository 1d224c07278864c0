"""Shared fixtures: real servers on loopback and a running `flowtap` process."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from flowtap.proxy.events import LosslessObserver
from flowtap.proxy.flow import Direction, FlowClosed, FlowData, FlowEvent, FlowOpened

LISTENING = re.compile(r"^listening (tcp|udp|socks5|http|transparent) (\S+) -> (\S+)$")


SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104


def send_segmented(sock: socket.socket, payloads: list[bytes], target: Any) -> None:
    """Send `payloads` in one call with UDP_SEGMENT: all but the last the same size."""
    segment = struct.pack("=H", len(payloads[0]))
    sock.sendmsg([b"".join(payloads)], [(SOL_UDP, UDP_SEGMENT, segment)], 0, target)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate, timeout_s: float = 10.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    """Wait until `predicate()` is true, failing the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def exchange(port: int, payload: bytes) -> bytes:
    """Send `payload` to 127.0.0.1:`port`, half-close, and return all that came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while chunk := sock.recv(1 << 20):
            received += chunk
    return bytes(received)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """The next `size` bytes `sock` receives; fails the test if it ends before them."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"the stream ended after {data!r}"
        data += chunk
    return data


def wait_port(port: int, host: str = "127.0.0.1", timeout_s: float = 10.0) -> None:
    def is_open() -> bool:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return True
        except OSError:
            return False

    wait_for(is_open, timeout_s, f"{host}:{port} to accept")


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        try:
            while True:
                data = sock.recv(262144)
                if not data:
                    sock.shutdown(socket.SHUT_WR)
                    return
                sock.sendall(data)
        except OSError:
            return


class _ThreadingServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 2048


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    """A TCP echo server on 127.0.0.1 that half-closes after the client does."""
    server = _ThreadingServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address  # type: ignore[misc]
    server.shutdown()
    server.server_close()


@dataclass
class FlowtapProcess:
    """A running `flowtap` subprocess with its stdout collected line by line."""

    proc: subprocess.Popen[str]
    listeners: list[tuple[str, str, str]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    stderr: str = ""

    def __post_init__(self) -> None:
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            match = LISTENING.match(line)
            if match:
                self.listeners.append(match.groups())
            self.lines.append(line)

    @property
    def port(self) -> int:
        return int(self.listeners[0][1].rsplit(":", 1)[1])

    def wait_line(self, pattern: str, timeout_s: float = 10.0) -> str:
        regex = re.compile(pattern)
        found: list[str] = []

        def seen() -> bool:
            found[:] = [line for line in list(self.lines) if regex.search(line)]
            return bool(found) or self.proc.poll() is not None

        wait_for(seen, timeout_s, f"a line matching {pattern!r}")
        if not found:
            raise AssertionError(f"flowtap exited {self.proc.returncode}: {self.read_stderr()}")
        return found[0]

    def read_stderr(self) -> str:
        if self.proc.poll() is not None and self.proc.stderr is not None:
            self.stderr += self.proc.stderr.read()
        return self.stderr

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout_s)
        self._reader.join(5)
        self.read_stderr()
        return code


def json_events(process: FlowtapProcess, event: str) -> list[dict[str, Any]]:
    """The `--json` records of `process` whose `event` is `event` (opened, closed), so far."""
    return [
        record
        for line in list(process.lines)
        if line.startswith("{") and (record := json.loads(line))["event"] == event
    ]


def flowtap_command() -> list[str]:
    exe = shutil.which("flowtap", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "flowtap.inspector.cli"]


def process_state(pid: int) -> str | None:
    """The one-letter state of `pid` in /proc (R, S, T stopped, Z ended but not yet reaped),
    or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def read_listening_lines(proc: subprocess.Popen[str], count: int) -> list[str]:
    """The first `count` `listening` lines of a flowtap started with text pipes (exits the
    script with flowtap's stderr if it ends first)."""
    assert proc.stdout is not None
    listening: list[str] = []
    while len(listening) < count:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"flowtap exited: {proc.stderr.read() if proc.stderr else ''}")
        if line.startswith("listening "):
            listening.append(line.rstrip("\n"))
    return listening


def listening_port(line: str) -> int:
    """The port of a `listening PROTO HOST:PORT -> ...` line."""
    return int(line.split()[2].rsplit(":", 1)[1])


def interrupt_after_closed(
    proc: subprocess.Popen[str], closed: int, timeout_s: float = 10.0
) -> tuple[list[str], str]:
    """Read a `--json` flowtap's lines until `closed` closed events (or `timeout_s`), then
    SIGINT it; return every stdout line and its stderr."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while sum('"closed"' in line for line in lines) < closed and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
    proc.send_signal(signal.SIGINT)
    rest, stderr = proc.communicate(timeout=30)
    return lines + rest.splitlines(), stderr


def start_flowtap(
    *args: str,
    listeners: int = 1,
    timeout_s: float = 15.0,
    preexec_fn: Callable[[], None] | None = None,
) -> FlowtapProcess:
    """Start `flowtap ARGS` and wait for its `listening` lines; `preexec_fn` runs in the child
    before flowtap starts (to set a resource limit, say)."""
    proc = subprocess.Popen(
        [*flowtap_command(), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec_fn,
    )
    process = FlowtapProcess(proc)
    wait_for(
        lambda: len(process.listeners) >= listeners or proc.poll() is not None,
        timeout_s,
        "flowtap to listen",
    )
    if proc.poll() is not None:
        raise AssertionError(f"flowtap exited {proc.returncode}: {process.read_stderr()}")
    return process


@pytest.fixture
def flowtap() -> Iterator[type[FlowtapProcess]]:
    """Start flowtap processes with `flowtap(*args)`; all are stopped at teardown."""
    started: list[FlowtapProcess] = []

    def start(*args: str, listeners: int = 1) -> FlowtapProcess:
        process = start_flowtap(*args, listeners=listeners)
        started.append(process)
        return process

    yield start  # type: ignore[misc]
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[int]:
    """A throwaway redis-server on a free loopback port (with a unix socket in tmp_path)."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run the README's test command")
    port = free_port()
    sock_path = tmp_path / "redis.sock"
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1 ::1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--unixsocket",
            str(sock_path),
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@dataclass
class UdpEchoServer:
    """A UDP echo server process (tests/udp_echo.py) that counts what it received."""

    proc: subprocess.Popen[str]
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def stop(self) -> tuple[int, int]:
        """Stop the server; return the datagrams and bytes it received."""
        if self.proc.poll() is None:
            self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        match = re.search(r"datagrams=(\d+) bytes=(\d+)", out)
        assert match, f"udp echo server said {out!r}"
        return int(match.group(1)), int(match.group(2))


def start_udp_echo(host: str = "127.0.0.1", port: int = 0) -> UdpEchoServer:
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("udp_echo.py")), host, str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the server prints its port once bound, or exits
    if not line.startswith("port "):
        proc.kill()
        raise AssertionError(f"udp echo server did not start on {host}:{port}: {line!r}")
    return UdpEchoServer(proc, host, int(line.split()[1]))


@pytest.fixture
def udp_echo() -> Iterator[type[UdpEchoServer]]:
    """Start UDP echo servers with `udp_echo(host="127.0.0.1", port=0)`; stopped at teardown."""
    started: list[UdpEchoServer] = []

    def start(host: str = "127.0.0.1", port: int = 0) -> UdpEchoServer:
        server = start_udp_echo(host, port)
        started.append(server)
        return server

    yield start  # type: ignore[misc]
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


def _free_tcp_and_udp_port() -> int:
    """A loopback port that is free for both TCP and UDP right now."""
    for _ in range(50):
        port = free_port(socket.SOCK_DGRAM)
        with socket.socket() as tcp:
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise AssertionError("no port free for both TCP and UDP")


def _start_dnsmasq(port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            "dnsmasq",
            "--no-daemon",
            f"--port={port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--pid-file=",
            "--address=/example.test/127.0.0.9",
            "--address=/example.test/::9",
            "--txt-record=txt.example.test,flowtap relays datagrams",
            "--mx-host=example.test,mail.example.test,10",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def dns_server() -> Iterator[int]:
    """dnsmasq on 127.0.0.1:PORT answering only for example.test, never resolving upstream."""
    if shutil.which("dnsmasq") is None or shutil.which("dig") is None:
        pytest.fail("dnsmasq or dig is not installed: run tests/setup-debian.sh")
    for _ in range(3):  # another process may take the port between the check and dnsmasq
        port = _free_tcp_and_udp_port()
        proc = _start_dnsmasq(port)

        def answers(port: int = port, proc: subprocess.Popen[str] = proc) -> bool:
            query = ["dig", "@127.0.0.1", "-p", str(port), "+time=1", "+tries=1", "+short"]
            result = subprocess.run([*query, "example.test"], capture_output=True, text=True)
            return proc.poll() is not None or result.stdout.strip() == "127.0.0.9"

        wait_for(answers, 10, "dnsmasq to answer")
        if proc.poll() is None:
            break
    else:
        assert proc.stderr is not None
        raise AssertionError(f"dnsmasq exited: {proc.stderr.read()}")
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


class EventRecorder:
    """An observer that keeps every flow event, data included, in the order emitted."""

    wants_data = True

    def __init__(self) -> None:
        self.events: list[FlowEvent] = []
        self._lock = threading.Lock()

    def handle(self, event: FlowEvent) -> None:
        with self._lock:
            self.events.append(event)

    def close(self) -> None:
        pass

    def snapshot(self) -> list[FlowEvent]:
        with self._lock:
            return list(self.events)

    def closed(self) -> list[FlowClosed]:
        return [e for e in self.snapshot() if isinstance(e, FlowClosed)]

    def opened(self) -> list[FlowOpened]:
        return [e for e in self.snapshot() if isinstance(e, FlowOpened)]

    def closed_count(self) -> int:
        return len(self.closed())

    def data(self, direction: Direction) -> list[bytes]:
        return [
            e.data for e in self.snapshot() if isinstance(e, FlowData) and e.direction is direction
        ]


@dataclass
class Recording:
    """An in-process relay in front of an upstream, recording every event it emits."""

    port: int
    recorder: EventRecorder

    def wait_closed(self, count: int, timeout_s: float = 10.0) -> list[object]:
        wait_for(lambda: self.recorder.closed_count() >= count, timeout_s, f"{count} flows")
        return list(self.recorder.events)


@pytest.fixture
def record_through_relay() -> Iterator:  # type: ignore[type-arg]
    """`record_through_relay(upstream_port)` starts a recording relay; stopped at teardown."""
    from flowtap.proxy.events import Bus
    from flowtap.proxy.flow import Address
    from flowtap.proxy.listener import ListenerSpec
    from flowtap.proxy.relay import Relay

    relays: list[Relay] = []

    def start(upstream_port: int) -> Recording:
        recorder = EventRecorder()
        spec = ListenerSpec(
            listen=Address("127.0.0.1", 0), upstream=Address("127.0.0.1", upstream_port)
        )
        relay = Relay([spec], Bus([recorder]))  # type: ignore[list-item]
        relay.start()
        relays.append(relay)
        return Recording(port=relay.listeners[0].address.port, recorder=recorder)

    yield start
    for relay in relays:
        relay.stop(1.0)


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """`start_redis()` starts one more throwaway redis-server and returns its port."""
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> int:
        port = free_port()
        directory = tmp_path / f"redis-{port}"
        directory.mkdir()
        procs.append(
            subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(directory),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_port(port)
        return port

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


@dataclass
class UdpUpperServer:
    """A UDP server on 127.0.0.1 that answers each datagram with it in upper case."""

    port: int
    seen: list[bytes]


@pytest.fixture
def udp_upper_server() -> Iterator[UdpUpperServer]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.1)
    server = UdpUpperServer(port=sock.getsockname()[1], seen=[])
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, addr = sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            server.seen.append(data)
            sock.sendto(data.upper(), addr)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server
    stop.set()
    thread.join(5)
    sock.close()


def record_udp_exchange(port: int, datagrams: list[bytes]) -> list[object]:
    """Send `datagrams` to 127.0.0.1:`port` one by one, each awaiting its answer, and return
    the exchange as the flow events a capture of it holds."""
    from flowtap.proxy.flow import (
        Address,
        Direction,
        Flow,
        FlowData,
        FlowOpened,
        Transport,
        next_flow_id,
    )

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        client.connect(("127.0.0.1", port))
        local = client.getsockname()
        flow = Flow(
            id=next_flow_id(),
            transport=Transport.UDP,
            client=Address(local[0], local[1]),
            server=Address("127.0.0.1", port),
            listener=Address("127.0.0.1", port),
            started_at=time.time(),
        )
        events: list[object] = [FlowOpened(flow)]
        for data in datagrams:
            client.send(data)
            events.append(FlowData(flow.id, Direction.UP, time.time(), data))
            answer = client.recv(65536)
            events.append(FlowData(flow.id, Direction.DOWN, time.time(), answer))
    return events


class Recorder:
    """A lossless observer that keeps every event, in order, per flow."""

    def __init__(self) -> None:
        self.events: list[FlowEvent] = []
        self._lock = threading.Lock()
        self._observer = LosslessObserver(self._take, max_pending=8)

    def _take(self, batch: list[FlowEvent]) -> None:
        with self._lock:
            self.events.extend(batch)

    @property
    def wants_data(self) -> bool:
        return True

    def handle(self, event: FlowEvent) -> None:
        self._observer.handle(event)

    def close(self) -> None:
        self._observer.close()

    def closed(self) -> list[FlowClosed]:
        with self._lock:
            return [e for e in self.events if isinstance(e, FlowClosed)]
