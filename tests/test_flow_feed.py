"""The display feed asks the relay for each flow direction's data only up to a cap."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from conftest import EventRecorder as Recorder
from conftest import wait_for
from flowtap.inspector.tui.store import FlowFeed
from flowtap.proxy.events import Bus
from flowtap.proxy.flow import Address, Direction, FlowClosed, FlowData, FlowEvent, FlowOpened
from flowtap.proxy.listener import ListenerSpec
from flowtap.proxy.relay import Relay

CAP = 64 * 1024


@pytest.fixture
def relay_with(echo_server: tuple[str, int]) -> Iterator[object]:
    relays: list[Relay] = []

    def start(*observers: object) -> Relay:
        spec = ListenerSpec(Address("127.0.0.1", 0), Address(*echo_server))
        relay = Relay([spec], Bus(observers))  # type: ignore[arg-type]
        relay.start()
        relays.append(relay)
        return relay

    yield start
    for relay in relays:
        relay.stop(1.0)
        relay.bus.close()


def _drain_all(feed: FlowFeed, until_closed: int, timeout_s: float = 10.0) -> list[FlowEvent]:
    events: list[FlowEvent] = []
    wait_for(
        lambda: (
            bool(events.extend(feed.drain()))
            or sum(isinstance(e, FlowClosed) for e in events) >= until_closed
        ),
        timeout_s,
        "the flows to close",
    )
    return events


def _send_through(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        received = bytearray()
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        while chunk := sock.recv(262144):
            received += chunk
    return bytes(received)


def test_the_relay_stops_copying_data_the_feed_does_not_want(relay_with) -> None:  # type: ignore[no-untyped-def]
    feed = FlowFeed(max_data_bytes_per_direction=CAP)
    relay = relay_with(feed)
    payload = bytes(range(256)) * 16 * 1024  # 4 MiB
    assert _send_through(relay.listeners[0].address.port, payload) == payload
    events = _drain_all(feed, 1)
    up = sum(len(e.data) for e in events if isinstance(e, FlowData) and e.direction is Direction.UP)
    closed = next(e for e in events if isinstance(e, FlowClosed))
    assert CAP <= up < CAP + 256 * 1024  # at most one receive buffer past the cap
    assert closed.flow.bytes_up == closed.flow.bytes_down == len(payload)


def test_another_observer_that_wants_everything_still_gets_everything(relay_with) -> None:  # type: ignore[no-untyped-def]
    feed = FlowFeed(max_data_bytes_per_direction=CAP)
    recorder = Recorder()
    relay = relay_with(feed, recorder)
    payload = b"y" * (1024 * 1024)
    _send_through(relay.listeners[0].address.port, payload)
    wait_for(lambda: any(isinstance(e, FlowClosed) for e in recorder.events), 10, "close")
    up = b"".join(
        e.data for e in recorder.events if isinstance(e, FlowData) and e.direction is Direction.UP
    )
    assert up == payload


def test_byte_counts_of_a_live_flow_come_from_the_relay(relay_with) -> None:  # type: ignore[no-untyped-def]
    feed = FlowFeed(max_data_bytes_per_direction=CAP)
    relay = relay_with(feed)
    with socket.create_connection(("127.0.0.1", relay.listeners[0].address.port)) as sock:
        sock.sendall(b"z" * 200_000)
        got = 0
        while got < 200_000:
            got += len(sock.recv(262144))
        opened = next(e for e in _wait_opened(feed) if isinstance(e, FlowOpened))
        wait_for(lambda: relay.byte_counts(opened.flow.id) == (200_000, 200_000), 5, "counts")
    wait_for(lambda: relay.byte_counts(opened.flow.id) is None, 5, "the flow to end")


def _wait_opened(feed: FlowFeed) -> list[FlowEvent]:
    events: list[FlowEvent] = []
    wait_for(
        lambda: bool(events.extend(feed.drain())) or any(isinstance(e, FlowOpened) for e in events),
        5,
        "the flow to open",
    )
    return events
