"""`replay` against real servers, from flows recorded live through an in-process relay."""

from __future__ import annotations

import http.server
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis

from conftest import (
    EventRecorder,
    Recording,
    UdpUpperServer,
    free_port,
    record_udp_exchange,
    wait_for,
)
from flowtap.inspector.replay.compare import compile_patterns
from flowtap.inspector.replay.replay import ReplayOptions, Status, Summary, replay
from flowtap.inspector.replay.turns import Ending, Script, scripts_from_events
from flowtap.proxy.events import Bus
from flowtap.proxy.flow import Address, Direction

Record = Callable[[int], Recording]


def _options(port: int, **kwargs: Any) -> ReplayOptions:
    kwargs.setdefault("speed", None)
    kwargs.setdefault("turn_timeout_s", 0.5)
    return ReplayOptions(target=Address("127.0.0.1", port), **kwargs)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def _serve(handler: type[socketserver.BaseRequestHandler]) -> Iterator[int]:
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


class _LineHandler(socketserver.StreamRequestHandler):
    """Answers each line with `transform(line)`; resets the connection on a line `boom`."""

    transform: Callable[[bytes], bytes] = staticmethod(lambda line: b"you said " + line)
    seen_resets: list[str] = []  # noqa: RUF012

    def handle(self) -> None:
        try:
            for line in self.rfile:
                if line.strip() == b"boom":
                    self.request.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
                    self.request.close()
                    return
                self.wfile.write(self.transform(line))
                self.wfile.flush()
        except ConnectionResetError:
            self.seen_resets.append("reset")


@pytest.fixture
def line_server() -> Iterator[int]:
    yield from _serve(_LineHandler)


class _ShoutHandler(_LineHandler):
    transform = staticmethod(lambda line: b"YOU SAID " + line.upper())


@pytest.fixture
def shout_server() -> Iterator[int]:
    yield from _serve(_ShoutHandler)


def _talk(port: int, lines: list[bytes], *, pause_s: float = 0.0) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        reader = sock.makefile("rb")
        for line in lines:
            if pause_s:
                time.sleep(pause_s)  # the think time the replay must reproduce
            sock.sendall(line)
            if line.strip() != b"boom":
                reader.readline()
        sock.shutdown(socket.SHUT_WR)
        try:
            while sock.recv(4096):
                pass
        except ConnectionResetError:
            pass


def _record(record: Record, port: int, sessions: list[list[bytes]], **kwargs: Any) -> list[Script]:
    recording = record(port)
    for lines in sessions:
        _talk(recording.port, lines, **kwargs)
    return scripts_from_events(recording.wait_closed(len(sessions)))  # type: ignore[arg-type]


def test_redis_session_replays_into_a_fresh_server(
    record_through_relay: Record, start_redis: Callable[[], int]
) -> None:
    recorded_on = start_redis()
    recording = record_through_relay(recorded_on)
    client = redis.Redis(port=recording.port)
    client.set("greeting", "hello")
    client.incrby("counter", 5)
    client.rpush("queue", "a", "b", "c")
    assert client.get("greeting") == b"hello"
    client.close()
    scripts = scripts_from_events(recording.wait_closed(1))  # type: ignore[arg-type]
    assert scripts[0].turn_count(Direction.UP) >= 4

    fresh = start_redis()
    client_id = compile_patterns([r"\$2\r\nid\r\n:\d+"])  # in the answer to HELLO
    reports = replay(scripts, _options(fresh, ignore=client_id))
    assert [r.status for r in reports] == [Status.OK]
    assert reports[0].turns_sent == reports[0].turns_total
    replayed = redis.Redis(port=fresh)
    assert replayed.get("greeting") == b"hello"
    assert replayed.get("counter") == b"5"
    assert replayed.lrange("queue", 0, -1) == [b"a", b"b", b"c"]
    replayed.close()


def test_changed_responses_are_reported_with_offset_and_diff(
    record_through_relay: Record, line_server: int, shout_server: int
) -> None:
    scripts = _record(record_through_relay, line_server, [[b"one\n", b"two\n"]])
    clean = replay(scripts, _options(line_server))
    assert [r.status for r in clean] == [Status.OK]
    assert Summary.of(clean, 0.0).exit_code(check=True) == 0

    reports = replay(scripts, _options(shout_server, want_diff=True))
    report = reports[0]
    assert report.status == Status.DIFFERS
    assert report.difference is not None and report.difference.offset == 0
    assert report.difference.expected.startswith("you said one")
    assert report.difference.received.startswith("YOU SAID ONE")
    assert report.diff is not None and "-you said two" in report.diff
    assert "+YOU SAID TWO" in report.diff
    summary = Summary.of(reports, 0.0)
    assert summary.exit_code(check=False) == 0
    assert summary.exit_code(check=True) == 1


def test_ignore_masks_fields_that_legitimately_change(
    record_through_relay: Record, line_server: int, shout_server: int
) -> None:
    scripts = _record(record_through_relay, line_server, [[b"one\n"]])
    patterns = compile_patterns([r"(?i)you said [a-z]+"])
    reports = replay(scripts, _options(shout_server, ignore=patterns))
    assert reports[0].status == Status.OK


def test_refused_target_fails_every_flow_and_exits_non_zero(
    record_through_relay: Record, line_server: int
) -> None:
    scripts = _record(record_through_relay, line_server, [[b"a\n"], [b"b\n"]])
    closed = free_port()
    reports = replay(scripts, _options(closed))
    assert [r.status for r in reports] == [Status.FAILED, Status.FAILED]
    assert all("refused" in (r.error or "") for r in reports)
    assert Summary.of(reports, 0.0).exit_code(check=False) == 1


def test_reset_by_target_fails_that_flow_and_the_rest_go_on(
    record_through_relay: Record, echo_server: tuple[str, int], line_server: int
) -> None:
    # Recorded against an echo server, replayed against one that resets on `boom`.
    recording = record_through_relay(echo_server[1])
    for lines in ([b"fine\n"], [b"boom\n", b"after\n"], [b"also fine\n"]):
        with socket.create_connection(("127.0.0.1", recording.port)) as sock:
            for line in lines:
                sock.sendall(line)
                got = b""
                while len(got) < len(line):
                    got += sock.recv(100)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(100):
                pass
    scripts = scripts_from_events(recording.wait_closed(3))  # type: ignore[arg-type]
    _LineHandler.transform = staticmethod(lambda line: line)
    try:
        reports = replay(scripts, _options(line_server, concurrency=1))
    finally:
        _LineHandler.transform = staticmethod(lambda line: b"you said " + line)
    assert [r.status for r in reports] == [Status.OK, Status.FAILED, Status.OK]
    assert "reset" in (reports[1].error or "")
    assert Summary.of(reports, 0.0).exit_code(check=False) == 1


class _UntilEofHandler(socketserver.BaseRequestHandler):
    """Reads until the client half-closes, then answers with the byte count."""

    def handle(self) -> None:
        size = 0
        while chunk := self.request.recv(65536):
            size += len(chunk)
        self.request.sendall(b"%d bytes\n" % size)


def test_half_close_happens_where_recorded(record_through_relay: Record) -> None:
    for port in _serve(_UntilEofHandler):
        recording = record_through_relay(port)
        with socket.create_connection(("127.0.0.1", recording.port)) as sock:
            sock.sendall(b"x" * 5000)
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := sock.recv(100):
                answer += chunk
        assert answer == b"5000 bytes\n"
        scripts = scripts_from_events(recording.wait_closed(1))  # type: ignore[arg-type]
        assert scripts[0].ending is Ending.CLIENT_CLOSE
        reports = replay(scripts, _options(port, turn_timeout_s=0.2))
        assert reports[0].status == Status.OK
        assert reports[0].server_bytes_received == len(b"5000 bytes\n")


class _ResetWatcher(socketserver.BaseRequestHandler):
    outcomes: list[str] = []  # noqa: RUF012

    def handle(self) -> None:
        try:
            while chunk := self.request.recv(100):
                self.request.sendall(chunk)
            self.outcomes.append("fin")
        except ConnectionResetError:
            self.outcomes.append("reset")


def test_client_reset_is_replayed_as_a_reset(record_through_relay: Record) -> None:
    for port in _serve(_ResetWatcher):
        recording = record_through_relay(port)
        sock = socket.create_connection(("127.0.0.1", recording.port))
        sock.sendall(b"ping")
        assert sock.recv(100) == b"ping"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
        scripts = scripts_from_events(recording.wait_closed(1))  # type: ignore[arg-type]
        assert scripts[0].ending is Ending.CLIENT_RESET
        wait_for(lambda: len(_ResetWatcher.outcomes) == 1, 5, "the recorded reset")
        assert _ResetWatcher.outcomes == ["reset"]
        _ResetWatcher.outcomes.clear()
        reports = replay(scripts, _options(port))
        assert reports[0].status == Status.OK
        wait_for(lambda: bool(_ResetWatcher.outcomes), 5, "the replayed reset")
        assert _ResetWatcher.outcomes == ["reset"]


def test_speed_scales_the_recorded_pauses(record_through_relay: Record, line_server: int) -> None:
    scripts = _record(record_through_relay, line_server, [[b"a\n", b"b\n", b"c\n"]], pause_s=0.15)
    timed = {}
    for speed in (1.0, 3.0):
        started = time.monotonic()
        reports = replay(scripts, _options(line_server, speed=speed))
        timed[speed] = time.monotonic() - started
        assert reports[0].status == Status.OK
    started = time.monotonic()
    replay(scripts, _options(line_server, speed=None))
    asap = time.monotonic() - started
    ratio = timed[1.0] / timed[3.0]
    assert 2.0 < ratio < 4.5, timed
    assert asap < timed[3.0] / 2


class _CountingHandler(socketserver.StreamRequestHandler):
    active = 0
    peak = 0
    lock = threading.Lock()

    def handle(self) -> None:
        cls = type(self)
        with cls.lock:
            cls.active += 1
            cls.peak = max(cls.peak, cls.active)
        # Counts connections waiting for their one answer, which the replay bounds.
        line = self.rfile.readline()
        time.sleep(0.02)  # keeps connections overlapping so the bound shows
        with cls.lock:
            cls.active -= 1
        self.wfile.write(line)
        self.wfile.flush()


def test_concurrency_bounds_connections_at_once(
    record_through_relay: Record, echo_server: tuple[str, int]
) -> None:
    recording = record_through_relay(echo_server[1])
    for i in range(12):
        with socket.create_connection(("127.0.0.1", recording.port)) as sock:
            sock.sendall(b"line %d\n" % i)
            sock.recv(100)
    scripts = scripts_from_events(recording.wait_closed(12))  # type: ignore[arg-type]
    for port in _serve(_CountingHandler):
        reports = replay(scripts, _options(port, concurrency=4))
        assert [r.status for r in reports] == [Status.OK] * 12
        assert 2 <= _CountingHandler.peak <= 4


def test_replay_emits_flow_events_that_round_trip_to_the_same_scripts(
    record_through_relay: Record, line_server: int
) -> None:
    scripts = _record(record_through_relay, line_server, [[b"one\n", b"two\n"]])
    recorder = EventRecorder()
    replay(scripts, _options(line_server), bus=Bus([recorder]))  # type: ignore[list-item]
    again = scripts_from_events(recorder.events)  # type: ignore[arg-type]
    assert len(again) == 1
    assert [(t.direction, t.data) for t in again[0].turns] == [
        (t.direction, t.data) for t in scripts[0].turns
    ]
    assert again[0].ending is Ending.CLIENT_CLOSE


def test_udp_flows_replay_datagram_by_datagram(udp_upper_server: UdpUpperServer) -> None:
    port = udp_upper_server.port
    scripts = scripts_from_events(record_udp_exchange(port, [b"one", b"two", b"three"]))  # type: ignore[arg-type]
    reports = replay(scripts, _options(port))
    assert reports[0].status == Status.OK, reports[0].line()
    assert reports[0].turns_sent == 3 and reports[0].server_bytes_received == 11
    assert udp_upper_server.seen == [b"one", b"two", b"three"] * 2


def test_udp_target_that_is_not_listening_fails_the_flow(
    udp_upper_server: UdpUpperServer,
) -> None:
    scripts = scripts_from_events(record_udp_exchange(udp_upper_server.port, [b"ping"]))  # type: ignore[arg-type]
    reports = replay(scripts, _options(free_port(socket.SOCK_DGRAM)))
    assert reports[0].status == Status.FAILED
    assert "port unreachable" in (reports[0].error or "")


class _HttpHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def test_http_download_replays_clean_against_same_content(
    record_through_relay: Record, tmp_path: Path
) -> None:
    (tmp_path / "a.txt").write_bytes(b"alpha\n" * 1000)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(_HttpHandler, directory=str(tmp_path))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        recording = record_through_relay(server.server_address[1])
        with socket.create_connection(("127.0.0.1", recording.port)) as sock:
            sock.sendall(b"GET /a.txt HTTP/1.0\r\nHost: x\r\n\r\n")
            while sock.recv(65536):
                pass
        scripts = scripts_from_events(recording.wait_closed(1))  # type: ignore[arg-type]
        volatile = compile_patterns([r"Date: [^\r]*", r"Last-Modified: [^\r]*"])
        reports = replay(scripts, _options(server.server_address[1], ignore=volatile))
        assert reports[0].status == Status.OK, reports[0].line()
        assert reports[0].server_bytes_received == scripts[0].size_bytes(Direction.DOWN)
        (tmp_path / "a.txt").write_bytes(b"alpha\n" * 500 + b"omega\n" + b"alpha\n" * 499)
        reports = replay(scripts, _options(server.server_address[1], ignore=volatile))
        assert reports[0].status == Status.DIFFERS
        body_start = scripts[0].data(Direction.DOWN).index(b"\r\n\r\n") + 4
        assert reports[0].difference is not None
        assert reports[0].difference.offset >= body_start + 500 * 6
    finally:
        server.shutdown()
        server.server_close()


class _BannerHandler(socketserver.StreamRequestHandler):
    """Speaks first, then answers each line, and says goodbye on QUIT."""

    def handle(self) -> None:
        self.wfile.write(b"220 ready\r\n")
        for line in self.rfile:
            if line.strip() == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            self.wfile.write(b"250 " + line)


def test_server_that_speaks_first_is_waited_for(record_through_relay: Record) -> None:
    for port in _serve(_BannerHandler):
        recording = record_through_relay(port)
        with socket.create_connection(("127.0.0.1", recording.port)) as sock:
            reader = sock.makefile("rb")
            assert reader.readline() == b"220 ready\r\n"
            sock.sendall(b"HELO x\r\n")
            assert reader.readline() == b"250 HELO x\r\n"
            sock.sendall(b"QUIT\r\n")
            assert reader.readline() == b"221 bye\r\n"
            reader.close()
        scripts = scripts_from_events(recording.wait_closed(1))  # type: ignore[arg-type]
        assert scripts[0].turns[0].direction is Direction.DOWN
        reports = replay(scripts, _options(port))
        assert reports[0].status == Status.OK, reports[0].line()
        assert reports[0].turns_sent == 2 and reports[0].note is None


def test_large_turns_replay_through_full_socket_buffers(
    record_through_relay: Record, echo_server: tuple[str, int]
) -> None:
    payload = bytes(range(256)) * 16384  # 4 MiB, far more than a socket buffer holds
    recording = record_through_relay(echo_server[1])
    with socket.create_connection(("127.0.0.1", recording.port)) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        got = 0
        while got < len(payload):
            got += len(sock.recv(1 << 20))
        sender.join()
    scripts = scripts_from_events(recording.wait_closed(1))  # type: ignore[arg-type]
    reports = replay(scripts, _options(echo_server[1]))
    assert reports[0].status == Status.OK, reports[0].line()
    assert reports[0].bytes_sent == reports[0].server_bytes_received == len(payload)


def test_replay_reaches_an_ipv6_target(record_through_relay: Record, redis_server: int) -> None:
    recording = record_through_relay(redis_server)
    client = redis.Redis(port=recording.port)
    client.set("family", "six")
    client.close()
    scripts = scripts_from_events(recording.wait_closed(1))  # type: ignore[arg-type]
    redis.Redis(port=redis_server).flushall()
    # redis-py starts with HELLO, whose answer carries the connection's id.
    client_id = compile_patterns([r"\$2\r\nid\r\n:\d+"])
    target = Address("::1", redis_server)
    reports = replay(scripts, ReplayOptions(target=target, speed=None, ignore=client_id))
    assert reports[0].status == Status.OK, reports[0].line()
    assert redis.Redis(host="::1", port=redis_server).get("family") == b"six"
