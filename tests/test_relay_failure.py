"""A relay thread never dies silently: an unexpected exception closes its flows with reason
error, is logged once, and stops `flowtap run` with a non-zero exit; deadlines far away (even
past what the platform's time_t holds) do not kill it."""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from conftest import FlowtapProcess, Recorder, json_events, wait_for
from flowtap.inspector.pcapfile.pcapng import PcapNgFile
from flowtap.proxy.errors import FlowtapError
from flowtap.proxy.events import Bus, LosslessObserver
from flowtap.proxy.flow import (
    Address,
    CloseReason,
    FlowClosed,
    FlowData,
    FlowEvent,
    Transport,
)
from flowtap.proxy.listener import ListenerSpec
from flowtap.proxy.relay import Relay, RelayConfig


class _FailsOnFirstData:
    """An observer with a bug: it raises on the first data event it is given."""

    wants_data = True

    def handle(self, event: FlowEvent) -> None:
        if isinstance(event, FlowData):
            raise ZeroDivisionError("a bug in an observer")

    def close(self) -> None:
        pass


def _specs(echo_port: int, udp_address: str) -> list[ListenerSpec]:
    return [
        ListenerSpec(Address.parse("127.0.0.1:0"), Address.parse(f"127.0.0.1:{echo_port}")),
        ListenerSpec(
            Address.parse("127.0.0.1:0"), Address.parse(udp_address), transport=Transport.UDP
        ),
    ]


def test_a_failing_worker_closes_its_flows_with_error_and_reports_once(
    echo_server: tuple[str, int], udp_echo: Any, caplog: pytest.LogCaptureFixture
) -> None:
    udp = udp_echo()
    recorder = Recorder()
    failures: list[BaseException] = []
    reported = threading.Event()

    def on_failure(exc: BaseException) -> None:
        failures.append(exc)
        reported.set()

    # The recorder wants data, so the faulty observer is not the only one (no receive sink).
    bus = Bus([recorder, _FailsOnFirstData()])
    relay = Relay(_specs(echo_server[1], udp.address), bus, RelayConfig(), on_failure=on_failure)
    tcp_port = relay.listeners[0].address.port
    udp_port = relay.listeners[1].address.port
    relay.start()
    clients: list[socket.socket] = []
    try:
        with caplog.at_level(logging.WARNING, logger="flowtap.proxy.relay"):
            # Two TCP flows open on the worker; no data has moved yet.
            for count in (1, 2):
                clients.append(socket.create_connection(("127.0.0.1", tcp_port), timeout=5))
                wait_for(lambda n=count: relay.open_flows == n, 5, f"TCP flow {count} to open")
            # A UDP session opens, and its datagram is the first data event.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as datagrams:
                datagrams.sendto(b"the first data event", ("127.0.0.1", udp_port))
                assert reported.wait(10), "the relay did not report the failure"
        assert isinstance(failures[0], ZeroDivisionError) and len(failures) == 1
        assert relay.failure is failures[0]
        # The TCP clients are told: their connections are reset.
        for client in clients:
            client.settimeout(5)
            with pytest.raises(ConnectionResetError):
                client.recv(100)
        wait_for(lambda: len(recorder.closed()) == 3, 5, "a closed event per flow")
        assert relay.open_flows == 0
    finally:
        for client in clients:
            client.close()
        relay.stop(1.0)
        bus.close()
    closed = recorder.closed()
    assert len({event.flow.id for event in closed}) == 3
    assert {event.flow.transport for event in closed} == {Transport.TCP, Transport.UDP}
    for event in closed:
        assert event.flow.reason is CloseReason.ERROR
        assert event.flow.error is not None
        assert (
            "the relay thread failed: ZeroDivisionError: a bug in an observer" in event.flow.error
        )
    failure_logs = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failure_logs) == 1
    assert failure_logs[0].getMessage() == (
        "relay thread flowtap-relay-0 failed: ZeroDivisionError: a bug in an observer"
    )
    assert failure_logs[0].exc_info is None  # the traceback only under -v


@pytest.mark.parametrize("timeout_s", [1e10, math.inf])
def test_deadlines_past_time_t_do_not_kill_the_relay(
    echo_server: tuple[str, int], udp_echo: Any, timeout_s: float
) -> None:
    """The relay sleeps at most an hour at a time, so no timeout overflows its poller."""
    udp = udp_echo()
    recorder = Recorder()
    config = RelayConfig(
        connect_timeout_s=timeout_s, idle_timeout_s=timeout_s, udp_idle_timeout_s=timeout_s
    )
    bus = Bus([recorder])
    relay = Relay(_specs(echo_server[1], udp.address), bus, config)
    relay.start()
    try:
        for _ in range(2):  # a second flow is still served after the first one's deadlines
            port = relay.listeners[0].address.port
            with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                client.sendall(b"ping")
                assert client.recv(16) == b"ping"
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.settimeout(5)
                client.sendto(b"hello", ("127.0.0.1", relay.listeners[1].address.port))
                assert client.recv(16) == b"hello"
        assert relay.failure is None
    finally:
        relay.stop(math.inf if timeout_s == math.inf else 1e10)
        bus.close()
    reasons = sorted(str(e.flow.reason) for e in recorder.closed() if isinstance(e, FlowClosed))
    assert reasons == ["client-closed", "client-closed", "shutdown", "shutdown"]


# The real program, with a bug planted in its flow log: the log's `handle` (which runs on the
# relay thread) raises on the second flow's opened event.
_PLANTED_BUG = textwrap.dedent(
    """
    import sys
    from flowtap.inspector import cli, log
    from flowtap.proxy.flow import FlowOpened

    handle = log.FlowLog.handle

    def faulty(self, event):
        if isinstance(event, FlowOpened) and event.flow.id == 2:
            raise RuntimeError("planted bug")
        handle(self, event)

    log.FlowLog.handle = faulty
    sys.exit(cli.main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize("verbose", [False, True])
def test_flowtap_run_exits_non_zero_when_a_relay_thread_fails(
    echo_server: tuple[str, int], verbose: bool
) -> None:
    args = ["-v"] if verbose else []
    args += [
        "run",
        "--json",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        f"127.0.0.1:{echo_server[1]}",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-c", _PLANTED_BUG, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    process = FlowtapProcess(proc)
    try:
        wait_for(lambda: process.listeners or proc.poll() is not None, 15, "flowtap to listen")
        port = int(process.listeners[0][1].rsplit(":", 1)[1])
        first = socket.create_connection(("127.0.0.1", port), timeout=5)
        first.sendall(b"ping")
        assert first.recv(16) == b"ping"
        second = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        second.settimeout(5)
        # Flow 2 may be accepted and reset before connect() has looked at the socket.
        with contextlib.suppress(ConnectionResetError):
            second.connect(("127.0.0.1", port))
        assert proc.wait(15) == 1
        process._reader.join(5)
        stderr = process.read_stderr()
        first.close()
        second.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    closed = json_events(process, "closed")
    assert sorted(event["flow"] for event in closed) == [1, 2]
    assert {event["reason"] for event in closed} == {"error"}
    errors = [line for line in stderr.splitlines() if line.startswith("flowtap: error: ")]
    assert errors == [
        "flowtap: error: stopped: a relay thread failed (see the log line above; -v adds its "
        "traceback)"
    ]
    logged = [line for line in stderr.splitlines() if "relay thread flowtap-relay-0 failed" in line]
    assert logged == [
        "flowtap: ERROR: relay thread flowtap-relay-0 failed: RuntimeError: planted bug"
    ]
    assert ("Traceback" in stderr) is verbose


def test_a_failing_capture_io_thread_never_leaves_the_relay_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The capture's I/O thread with a bug stops the capture like a write error does: whoever
    adds packets gets a FlowtapError instead of waiting forever for a written buffer."""
    capture = PcapNgFile(tmp_path / "capture.pcapng")

    def broken(job: object) -> None:
        raise RuntimeError("a bug in the writer")

    monkeypatch.setattr(capture, "_write", broken)
    errors: list[FlowtapError] = []
    done = threading.Event()

    def fill() -> None:
        try:
            for _ in range(64):  # 64 MiB: many times the staging buffers
                capture.write_packet(0, b"h" * 40, b"x" * (1 << 20))
            capture.flush()
        except FlowtapError as exc:
            errors.append(exc)
        finally:
            done.set()

    with caplog.at_level(logging.WARNING, logger="flowtap.inspector.pcapfile.staging"):
        threading.Thread(target=fill, daemon=True).start()
        assert done.wait(20), "the writer waits forever for the failed I/O thread"
        with pytest.raises(FlowtapError):
            capture.close()
    assert errors and "RuntimeError: a bug in the writer" in str(errors[0])
    logged = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert logged == [
        f"the I/O thread of capture file {tmp_path / 'capture.pcapng'} failed: "
        "RuntimeError: a bug in the writer"
    ]


def test_a_failing_lossless_consumer_is_logged_once_and_never_stalls_the_relay(
    echo_server: tuple[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    """A consumer thread that raises stops consuming (its error kept, one line logged) but
    goes on draining its bounded queue, so the relay it would hold back moves every byte."""
    batches: list[int] = []

    def consume(batch: list[FlowEvent]) -> None:
        batches.append(len(batch))
        raise ValueError("a bug in a consumer")

    observer = LosslessObserver(consume, max_pending=2, name="flowtap-test-consumer")
    spec = ListenerSpec(Address.parse("127.0.0.1:0"), Address.parse(f"127.0.0.1:{echo_server[1]}"))
    bus = Bus([observer])
    relay = Relay([spec], bus, RelayConfig())
    relay.start()
    payload = bytes(range(256)) * 4096  # 1 MiB: hundreds of data events through a queue of 2
    try:
        with (
            caplog.at_level(logging.WARNING, logger="flowtap.proxy.events"),
            socket.create_connection(("127.0.0.1", relay.listeners[0].address.port)) as client,
        ):
            client.settimeout(10)
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            echoed = bytearray()
            while chunk := client.recv(65536):
                echoed += chunk
        assert bytes(echoed) == payload
    finally:
        relay.stop(1.0)
        bus.close()
    assert batches == [batches[0]]  # consumed once, then only drained
    assert isinstance(observer.error, ValueError)
    logged = [r for r in caplog.records if "failed" in r.getMessage()]
    assert [r.getMessage() for r in logged] == [
        "observer thread flowtap-test-consumer failed: ValueError: a bug in a consumer"
    ]
    assert logged[0].exc_info is None
