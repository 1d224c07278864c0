"""Observers that see only the flows a filter picks as they open (`flowtap run --filter`).

The relay still relays every flow: the filter decides, from what is known when a flow opens
(its transport, endpoints and id), which flows an observer such as the flow log or the
capture hears of, before their first byte.
"""

from __future__ import annotations

import socket

from flowtap.proxy.errors import FlowtapError
from flowtap.proxy.events import Chunk, ChunkSink, Observer, WireObserver
from flowtap.proxy.flow import Direction, FlowData, FlowEvent, FlowOpened, FlowUpdated, FlowWire

from .flow_filter import FlowFacts, FlowFilter, Stage


def check_decidable_at_open(flow_filter: FlowFilter, option: str) -> None:
    """Refuse, in one line naming them, the terms a flow does not know when it opens."""
    late = flow_filter.terms_after(Stage.OPEN)
    if late:
        names = ", ".join(late)
        raise FlowtapError(
            f"{option} {flow_filter.text!r}: {names} {'is' if len(late) == 1 else 'are'} not "
            "known when a flow opens, and run decides then (before its first byte is "
            "captured); pick flows by tcp, udp, port, host, net or id, and filter the "
            "capture later with flowtap show --filter"
        )


class FilteredObserver:
    """Passes `inner` the events of the flows `flow_filter` picks when they open (a flow it
    cannot decide then is not picked: see `check_decidable_at_open`)."""

    def __init__(self, inner: Observer, flow_filter: FlowFilter) -> None:
        self._inner = inner
        self._filter = flow_filter
        # Each flow is handled by one relay thread: distinct ids need no lock.
        self._picked: set[int] = set()

    @property
    def wants_data(self) -> bool:
        return self._inner.wants_data

    @property
    def wants_wire(self) -> bool:
        return isinstance(self._inner, WireObserver) and self._inner.wants_wire

    def handle_wire(self, event: FlowWire) -> None:
        if event.flow_id in self._picked and isinstance(self._inner, WireObserver):
            self._inner.handle_wire(event)

    def handle(self, event: FlowEvent) -> bool | None:
        if isinstance(event, FlowData):
            if event.flow_id in self._picked:
                return self._inner.handle(event)
            return False  # not picked: never wanted
        if isinstance(event, FlowOpened):
            flow = event.flow
            if self._filter.decide(FlowFacts.of(flow), Stage.OPEN) is not True:
                return None
            self._picked.add(flow.id)
            return self._inner.handle(event)
        if event.flow.id not in self._picked:
            return None
        if not isinstance(event, FlowUpdated):
            self._picked.discard(event.flow.id)  # closed: its last event
        return self._inner.handle(event)

    def close(self) -> None:
        self._inner.close()


class FilteredSink(FilteredObserver):
    """A `FilteredObserver` around a `ChunkSink` (the capture): the flows it does not pick
    are received into fresh memory, so the sink never sees their bytes."""

    def __init__(self, inner: Observer, sink: ChunkSink, flow_filter: FlowFilter) -> None:
        super().__init__(inner, flow_filter)
        self._sink = sink

    def receive(self, flow_id: int, direction: Direction, sock: socket.socket, size: int) -> Chunk:
        if flow_id in self._picked:
            return self._sink.receive(flow_id, direction, sock, size)
        data = sock.recv(size)
        return Chunk(len(data), [memoryview(data)], None, size)

    def record(
        self, flow_id: int, direction: Direction, timestamp_ns: int, data: memoryview
    ) -> None:
        if flow_id in self._picked:
            self._sink.record(flow_id, direction, timestamp_ns, data)


def filtered(observer: Observer, flow_filter: FlowFilter | None) -> Observer:
    """`observer`, hearing only of the flows `flow_filter` picks (all of them with None)."""
    if flow_filter is None:
        return observer
    if isinstance(observer, ChunkSink):
        return FilteredSink(observer, observer, flow_filter)
    return FilteredObserver(observer, flow_filter)
