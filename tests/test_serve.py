"""`serve` answers real clients (redis-cli, curl) with recorded server sides."""

from __future__ import annotations

import hashlib
import http.server
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from conftest import Recording, UdpUpperServer, record_udp_exchange, wait_for
from flowtap.inspector.replay.serve import ServedReport, ServeOptions, Server
from flowtap.inspector.replay.turns import Script, scripts_from_events
from flowtap.proxy.errors import FlowtapError
from flowtap.proxy.flow import Address

Record = Callable[[int], Recording]


class _Running:
    """A `Server` on its own thread, with the reports it made."""

    def __init__(self, scripts: list[Script], **kwargs: object) -> None:
        self.reports: list[ServedReport] = []
        options = ServeOptions(listen=Address("127.0.0.1", 0), **kwargs)  # type: ignore[arg-type]
        self.server = Server(scripts, options, on_report=self.reports.append)
        self.port = self.server.address.port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(5)


@pytest.fixture
def serving() -> Iterator[Callable[..., _Running]]:
    running: list[_Running] = []

    def start(scripts: list[Script], **kwargs: object) -> _Running:
        server = _Running(scripts, **kwargs)
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()


def _redis_cli(port: int, *command: str) -> str:
    result = subprocess.run(
        ["redis-cli", "-p", str(port), *command],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return result.stdout


def test_serve_answers_redis_cli_like_the_recorded_server(
    record_through_relay: Record, start_redis: Callable[[], int], serving: Callable[..., _Running]
) -> None:
    recording = record_through_relay(start_redis())
    commands = [("SET", "fruit", "apple"), ("GET", "fruit"), ("INCR", "hits"), ("KEYS", "*")]
    answers = [_redis_cli(recording.port, *command) for command in commands]
    scripts = scripts_from_events(recording.wait_closed(len(commands)))  # type: ignore[arg-type]

    server = serving(scripts, turn_timeout_s=0.3)
    # Asked in another order, each command still gets its own recorded answer.
    for index in (3, 1, 0, 2):
        assert _redis_cli(server.port, *commands[index]) == answers[index]
    wait_for(lambda: len(server.reports) == 4, 5, "four served reports")
    assert [r.status for r in server.reports] == ["ok"] * 4
    assert [r.flow_id for r in server.reports] == [scripts[i].id for i in (3, 1, 0, 2)]


def test_serve_gives_curl_the_recorded_download(
    record_through_relay: Record, tmp_path: Path, serving: Callable[..., _Running]
) -> None:
    body = bytes(range(256)) * 4000
    (tmp_path / "blob.bin").write_bytes(body)
    origin = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0),
        partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path)),
    )
    threading.Thread(target=origin.serve_forever, args=(0.05,), daemon=True).start()
    try:
        recording = record_through_relay(origin.server_address[1])
        first = subprocess.run(
            ["curl", "-sS", f"http://127.0.0.1:{recording.port}/blob.bin"],
            capture_output=True,
            timeout=20,
            check=True,
        ).stdout
        scripts = scripts_from_events(recording.wait_closed(1))  # type: ignore[arg-type]
    finally:
        origin.shutdown()
        origin.server_close()
    assert first == body
    (tmp_path / "blob.bin").unlink()  # the origin is gone; only the recording can answer

    server = serving(scripts, turn_timeout_s=0.3)
    served = subprocess.run(
        ["curl", "-sS", f"http://127.0.0.1:{server.port}/blob.bin"],
        capture_output=True,
        timeout=20,
        check=True,
    ).stdout
    assert hashlib.sha256(served).hexdigest() == hashlib.sha256(body).hexdigest()
    wait_for(lambda: len(server.reports) == 1, 5, "the served report")
    report = server.reports[0]
    assert report.flow_id == scripts[0].id
    # curl's Host header names the new port, so the client bytes differ there.
    assert report.status == "mismatch" and report.difference is not None
    assert "Host: 127.0.0.1:" in report.difference.received or report.difference.offset > 0


def test_mismatch_closes_the_connection_when_asked(
    record_through_relay: Record, start_redis: Callable[[], int], serving: Callable[..., _Running]
) -> None:
    recording = record_through_relay(start_redis())
    with socket.create_connection(("127.0.0.1", recording.port)) as sock:
        sock.sendall(b"PING\r\n")
        assert sock.recv(100) == b"+PONG\r\n"
        sock.sendall(b"ECHO hello\r\n")
        assert sock.recv(100) == b"$5\r\nhello\r\n"
    scripts = scripts_from_events(recording.wait_closed(1))  # type: ignore[arg-type]

    server = serving(scripts, turn_timeout_s=0.3, on_mismatch="close")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(5)
        sock.sendall(b"PING\r\n")
        assert sock.recv(100) == b"+PONG\r\n"
        sock.sendall(b"ECHO world\r\n")
        assert sock.recv(100) == b""  # closed instead of the recorded answer
    wait_for(lambda: len(server.reports) == 1, 5, "the served report")
    report = server.reports[0]
    assert report.status == "mismatch" and report.difference is not None
    assert report.difference.offset == len(b"PING\r\nECHO ")
    assert "hello" in report.difference.expected and "world" in report.difference.received


def test_serve_rejects_a_capture_without_tcp_flows() -> None:
    with pytest.raises(FlowtapError, match="has none"):
        Server([], ServeOptions(listen=Address("127.0.0.1", 0)), on_report=print)


def test_serve_answers_udp_datagrams_from_the_recording(
    udp_upper_server: UdpUpperServer, serving: Callable[..., _Running]
) -> None:
    events = record_udp_exchange(udp_upper_server.port, [b"alpha", b"beta"])
    scripts = scripts_from_events(events)  # type: ignore[arg-type]
    server = serving(scripts, turn_timeout_s=0.3)
    assert server.server.listeners[0][0] == "udp"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        client.connect(("127.0.0.1", server.port))
        for data in (b"alpha", b"beta"):
            client.send(data)
            assert client.recv(100) == data.upper()
    wait_for(lambda: len(server.reports) == 1, 5, "the served report")
    assert server.reports[0].status == "ok"
    assert server.reports[0].turns_sent == 2
