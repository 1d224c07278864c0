"""The relay's event contract, observed in-process: opened, data, exactly one closed."""

from __future__ import annotations

import dataclasses
import socket
import struct
import threading
from collections import defaultdict
from collections.abc import Iterator

import pytest

from conftest import Recorder, free_port, wait_for
from flowtap.proxy.events import Bus, LosslessObserver
from flowtap.proxy.flow import (
    Address,
    CloseReason,
    Direction,
    Flow,
    FlowClosed,
    FlowData,
    FlowEvent,
    FlowOpened,
    FlowState,
    Requested,
    TlsFacts,
    Transport,
)
from flowtap.proxy.listener import ListenerSpec
from flowtap.proxy.relay import Relay, RelayConfig


@pytest.fixture
def relay_to(echo_server: tuple[str, int]) -> Iterator[tuple[Relay, Recorder]]:
    recorder = Recorder()
    spec = ListenerSpec(Address.parse("127.0.0.1:0"), Address.parse(f"127.0.0.1:{echo_server[1]}"))
    relay = Relay([spec], Bus([recorder]), RelayConfig(workers=2))
    relay.start()
    yield relay, recorder
    relay.stop(1.0)
    relay.bus.close()


def test_every_flow_is_opened_then_data_then_closed_once(relay_to: tuple[Relay, Recorder]) -> None:
    relay, recorder = relay_to
    port = relay.listeners[0].address.port
    sent: dict[int, bytes] = {}
    for i in range(60):
        sock = socket.create_connection(("127.0.0.1", port))
        payload = f"flow {i} ".encode() * (i + 1)
        sock.sendall(payload)
        sent[sock.getsockname()[1]] = payload
        assert sock.recv(len(payload), socket.MSG_WAITALL) == payload
        if i % 3 == 0:  # some end with a reset instead of a FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    wait_for(lambda: len(recorder.closed()) == 60, 10, "60 closed events")
    by_flow: dict[int, list[FlowEvent]] = defaultdict(list)
    for event in recorder.events:
        flow_id = event.flow_id if isinstance(event, FlowData) else event.flow.id
        by_flow[flow_id].append(event)
    assert len(by_flow) == 60
    for events in by_flow.values():
        opened, *middle, closed = events
        assert isinstance(opened, FlowOpened) and isinstance(closed, FlowClosed)
        assert all(isinstance(e, FlowData) for e in middle)
        up = b"".join(
            e.data for e in middle if isinstance(e, FlowData) and e.direction is Direction.UP
        )
        down = b"".join(
            e.data for e in middle if isinstance(e, FlowData) and e.direction is Direction.DOWN
        )
        assert up == sent[opened.flow.client.port]
        assert down == up
        assert closed.flow.bytes_up == len(up) and closed.flow.bytes_down == len(down)
        assert closed.flow.reason in (CloseReason.CLIENT_CLOSED, CloseReason.CLIENT_RESET)
        assert closed.flow.ended_at is not None and closed.flow.ended_at >= opened.flow.started_at
    ids = sorted(by_flow)
    assert ids == list(range(ids[0], ids[0] + 60))


def test_refused_flow_still_opens_and_closes(echo_server: tuple[str, int]) -> None:
    recorder = Recorder()
    spec = ListenerSpec(Address.parse("127.0.0.1:0"), Address.parse(f"127.0.0.1:{free_port()}"))
    relay = Relay([spec], Bus([recorder]))
    relay.start()
    try:
        with socket.create_connection(("127.0.0.1", relay.listeners[0].address.port)) as sock:
            sock.settimeout(5)
            with pytest.raises(ConnectionResetError):
                sock.recv(1)
        wait_for(lambda: len(recorder.closed()) == 1, 10, "the closed event")
    finally:
        relay.stop(1.0)
        relay.bus.close()
    opened, closed = recorder.events
    assert isinstance(opened, FlowOpened) and isinstance(closed, FlowClosed)
    assert closed.flow.reason is CloseReason.UPSTREAM_REFUSED


def test_kill_resets_both_sides(relay_to: tuple[Relay, Recorder]) -> None:
    relay, recorder = relay_to
    sock = socket.create_connection(("127.0.0.1", relay.listeners[0].address.port))
    sock.sendall(b"x")
    assert sock.recv(1) == b"x"
    # The recorder consumes on its own thread: wait until it has seen the flow open.
    wait_for(lambda: any(isinstance(e, FlowOpened) for e in list(recorder.events)), 10, "the open")
    flow_id = next(e.flow.id for e in recorder.events if isinstance(e, FlowOpened))
    relay.kill(flow_id)
    sock.settimeout(5)
    with pytest.raises(ConnectionResetError):
        sock.recv(1)
    wait_for(lambda: len(recorder.closed()) == 1, 10, "the closed event")
    assert recorder.closed()[0].flow.reason is CloseReason.KILLED
    sock.close()


def test_address_parsing() -> None:
    assert Address.parse("8080") == Address("127.0.0.1", 8080)
    assert Address.parse("[::1]:53") == Address("::1", 53)
    assert str(Address.parse("[::1]:53")) == "[::1]:53"
    assert Address.parse("unix:/tmp/x.sock").path == "/tmp/x.sock"
    assert str(Address.parse("localhost:1")) == "localhost:1"


def _flow_with_every_field_set() -> Flow:
    return Flow(
        7,
        Transport.TCP,
        Address("127.0.0.1", 40000),
        Address("::1", 443),
        Address("127.0.0.1", 1080),
        1000.0,
        ended_at=1001.5,
        bytes_up=3,
        bytes_down=4,
        state=FlowState.OPEN,
        reason=CloseReason.SERVER_CLOSED,
        error="an error",
        tls=TlsFacts("intercept", sni="example.test"),
        requested=Requested("example.test", 443, "user"),
    )


# Another value for each field of a flow; a field missing here fails the test below.
_OTHER_VALUES: dict[str, object] = {
    "id": 8,
    "transport": Transport.UDP,
    "client": Address("127.0.0.2", 40001),
    "server": Address("10.0.0.1", 80),
    "listener": Address("", path="/tmp/x.sock"),
    "started_at": 2000.0,
    "ended_at": None,
    "bytes_up": 30,
    "bytes_down": 40,
    "state": FlowState.CLOSED,
    "reason": None,
    "error": None,
    "tls": None,
    "requested": Requested("other.test", 80),
}


def test_flow_changed_makes_what_dataclasses_replace_makes_for_every_field() -> None:
    flow = _flow_with_every_field_set()
    assert set(_OTHER_VALUES) == {field.name for field in dataclasses.fields(Flow)}
    assert flow.changed() == flow
    for name, value in _OTHER_VALUES.items():
        changed = flow.changed(**{name: value})  # type: ignore[arg-type]
        assert changed == dataclasses.replace(flow, **{name: value}), name
        assert getattr(changed, name) == value
    assert flow.changed(**_OTHER_VALUES) == dataclasses.replace(flow, **_OTHER_VALUES)  # type: ignore[arg-type]


def test_opening_flow_is_what_the_constructor_makes_with_the_defaults() -> None:
    flow = _flow_with_every_field_set()
    begun = (flow.id, flow.transport, flow.client, flow.server, flow.listener, flow.started_at)
    assert Flow.opening(*begun) == Flow(*begun)
    assert Flow.opening(*begun, flow.requested) == Flow(*begun, requested=flow.requested)


def test_closed_flow_keeps_what_it_was_and_takes_its_end() -> None:
    flow = _flow_with_every_field_set().changed(tls=None)
    ended = flow.closed(
        ended_at=1002.0, bytes_up=10, bytes_down=20, reason=CloseReason.CLIENT_RESET, error="reset"
    )
    assert ended == dataclasses.replace(
        flow,
        ended_at=1002.0,
        bytes_up=10,
        bytes_down=20,
        state=FlowState.CLOSED,
        reason=CloseReason.CLIENT_RESET,
        error="reset",
    )
    facts = TlsFacts("passthrough")
    assert (
        flow.closed(ended_at=1.0, bytes_up=0, bytes_down=0, reason=CloseReason.ERROR, tls=facts).tls
        == facts
    )
    assert flow.with_tls(facts) == dataclasses.replace(flow, tls=facts)


def test_slow_lossless_observer_slows_relay_but_loses_nothing(
    echo_server: tuple[str, int],
) -> None:
    recorder = Recorder()
    original = recorder._take

    def slow_take(batch: list[FlowEvent]) -> None:
        threading.Event().wait(0.002)  # a consumer slower than the relay
        original(batch)

    recorder._observer = LosslessObserver(slow_take, max_pending=4)
    spec = ListenerSpec(Address.parse("0"), Address.parse(f"127.0.0.1:{echo_server[1]}"))
    relay = Relay([spec], Bus([recorder]))
    relay.start()
    payload = bytes(range(256)) * 16384  # 4 MiB
    try:
        with socket.create_connection(("127.0.0.1", relay.listeners[0].address.port)) as sock:
            sender = threading.Thread(target=sock.sendall, args=(payload,))
            sender.start()
            echoed = sock.recv(len(payload), socket.MSG_WAITALL)
            sender.join()
        assert echoed == payload
        wait_for(lambda: len(recorder.closed()) == 1, 30, "the closed event")
    finally:
        relay.stop(1.0)
        relay.bus.close()
    data = [e for e in recorder.events if isinstance(e, FlowData)]
    assert b"".join(e.data for e in data if e.direction is Direction.UP) == payload
    assert b"".join(e.data for e in data if e.direction is Direction.DOWN) == payload
