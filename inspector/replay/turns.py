"""Recorded flows as turns: who said what, in which order and when, ready to replay or serve.

Pure functions over flow events, no I/O. A turn is the data one side sent before the other
side sent anything; the turn boundaries, not the chunk boundaries, carry the protocol's
request/response structure (TCP chunk boundaries are an artefact of `recv`).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from flowtap.inspector.flow_filter import FlowFacts, FlowFilter, summary_of
from flowtap.inspector.summary import HEAD_BYTES
from flowtap.proxy.errors import FlowtapError
from flowtap.proxy.flow import (
    CloseReason,
    Direction,
    Flow,
    FlowClosed,
    FlowData,
    FlowOpened,
    Transport,
)

log = logging.getLogger(__name__)


@runtime_checkable
class GapEvent(Protocol):
    """Bytes of a flow that the capture lacks (the capture reader's `FlowGap`)."""

    @property
    def flow_id(self) -> int: ...

    @property
    def direction(self) -> Direction: ...

    @property
    def timestamp(self) -> float: ...

    @property
    def size_bytes(self) -> int: ...


RecordedEvent = FlowOpened | FlowData | FlowClosed | GapEvent


@dataclass(frozen=True, slots=True)
class Chunk:
    """Bytes seen at one moment (for UDP: one datagram)."""

    timestamp: float
    data: bytes


@dataclass(frozen=True, slots=True)
class Turn:
    """Consecutive data of one flow in one direction, before the other side said anything."""

    direction: Direction
    chunks: tuple[Chunk, ...]

    @property
    def data(self) -> bytes:
        return b"".join(chunk.data for chunk in self.chunks)

    @property
    def size_bytes(self) -> int:
        return sum(len(chunk.data) for chunk in self.chunks)

    @property
    def started_at(self) -> float:
        return self.chunks[0].timestamp

    @property
    def ended_at(self) -> float:
        return self.chunks[-1].timestamp


class Ending(enum.StrEnum):
    """How a recorded flow ended, as far as replay cares: who closed or reset first."""

    CLIENT_CLOSE = "client-close"
    SERVER_CLOSE = "server-close"
    CLIENT_RESET = "client-reset"
    SERVER_RESET = "server-reset"
    UNKNOWN = "unknown"

    @classmethod
    def from_reason(cls, reason: CloseReason | None) -> Ending:
        return _ENDINGS.get(reason, cls.UNKNOWN) if reason is not None else cls.UNKNOWN


_ENDINGS = {
    CloseReason.CLIENT_CLOSED: Ending.CLIENT_CLOSE,
    CloseReason.SERVER_CLOSED: Ending.SERVER_CLOSE,
    CloseReason.CLIENT_RESET: Ending.CLIENT_RESET,
    CloseReason.SERVER_RESET: Ending.SERVER_RESET,
}


@dataclass(frozen=True, slots=True)
class Gap:
    """Where the capture lacks bytes of a flow; the script stops before it."""

    direction: Direction
    offset_s: float
    size_bytes: int
    turns_before: int

    def describe(self, flow_id: int) -> str:
        way = "client to server" if self.direction is Direction.UP else "server to client"
        return (
            f"flow {flow_id}: the capture lacks {self.size_bytes} bytes {way} at "
            f"{self.offset_s:.3f} s, so it stops after {self.turns_before} turns "
            "(capture again with a full snap length, e.g. dumpcap -s 0, or leave the flow "
            "out with --flow)"
        )


@dataclass(frozen=True, slots=True)
class Script:
    """One recorded flow as turns: what a replay sends and expects, in order."""

    flow: Flow
    turns: tuple[Turn, ...]
    ending: Ending
    gap: Gap | None = None

    @property
    def id(self) -> int:
        return self.flow.id

    @property
    def transport(self) -> Transport:
        return self.flow.transport

    def data(self, direction: Direction) -> bytes:
        """Everything `direction` carried, concatenated."""
        return b"".join(turn.data for turn in self.turns if turn.direction is direction)

    def size_bytes(self, direction: Direction) -> int:
        return sum(turn.size_bytes for turn in self.turns if turn.direction is direction)

    def turn_count(self, direction: Direction) -> int:
        return sum(1 for turn in self.turns if turn.direction is direction)

    def first_turn(self, direction: Direction) -> Turn | None:
        for turn in self.turns:
            if turn.direction is direction:
                return turn
        return None


@dataclass(slots=True)
class _Builder:
    flow: Flow
    turns: list[Turn] = field(default_factory=list)
    direction: Direction | None = None
    chunks: list[Chunk] = field(default_factory=list)
    gap: Gap | None = None

    def add(self, event: FlowData) -> None:
        if self.gap is not None or not event.data:
            return
        if event.direction is not self.direction:
            self._flush()
            self.direction = event.direction
        self.chunks.append(Chunk(event.timestamp, event.data))

    def add_gap(self, event: GapEvent) -> None:
        if self.gap is not None:
            return
        self._flush()
        self.gap = Gap(
            direction=event.direction,
            offset_s=max(0.0, event.timestamp - self.flow.started_at),
            size_bytes=event.size_bytes,
            turns_before=len(self.turns),
        )

    def _flush(self) -> None:
        if self.chunks:
            assert self.direction is not None
            self.turns.append(Turn(self.direction, tuple(self.chunks)))
            self.chunks = []

    def finish(self, closed: Flow | None) -> Script:
        self._flush()
        flow = closed or self.flow
        return Script(
            flow=flow,
            turns=tuple(self.turns),
            ending=Ending.from_reason(flow.reason),
            gap=self.gap,
        )


def scripts_from_events(events: Iterable[RecordedEvent]) -> list[Script]:
    """Group a stream of flow events into one script per flow, in the order flows opened."""
    building: dict[int, _Builder] = {}
    order: list[int] = []
    done: dict[int, Script] = {}
    for event in events:
        if isinstance(event, FlowData):
            builder = building.get(event.flow_id)
            if builder is not None:
                builder.add(event)
            else:
                log.debug("data for unknown flow %d ignored", event.flow_id)
        elif isinstance(event, FlowOpened):
            building[event.flow.id] = _Builder(event.flow)
            order.append(event.flow.id)
        elif isinstance(event, FlowClosed):
            builder = building.pop(event.flow.id, None)
            if builder is not None:
                done[event.flow.id] = builder.finish(event.flow)
        elif isinstance(event, GapEvent):
            builder = building.get(event.flow_id)
            if builder is not None:
                builder.add_gap(event)
    for flow_id, builder in building.items():
        done[flow_id] = builder.finish(None)
    return [done[flow_id] for flow_id in order]


def script_facts(script: Script) -> FlowFacts:
    """What the filter language reads of a recorded flow (its summary from its first bytes)."""
    head = {d: script.data(d)[:HEAD_BYTES] for d in (Direction.UP, Direction.DOWN)}
    return FlowFacts.of(
        script.flow, summary_of(head[Direction.UP], head[Direction.DOWN], script.flow)
    )


def script_chunks(script: Script) -> Iterator[tuple[Direction, bytes]]:
    """A recorded flow's payload in order, as the filter language streams it."""
    for turn in script.turns:
        for chunk in turn.chunks:
            yield turn.direction, chunk.data


def select_by_filter(scripts: Iterable[Script], flow_filter: FlowFilter) -> list[Script]:
    """The scripts whose flows pass `flow_filter`."""
    return [s for s in scripts if flow_filter.matches(script_facts(s), script_chunks(s))]


def select_scripts(
    scripts: Sequence[Script],
    *,
    flow_ids: Sequence[int] = (),
    flow_filter: FlowFilter | None = None,
    source: str = "the capture",
) -> list[Script]:
    """The scripts to play: those named by id (in the order given) and passing the filter."""
    playable = [s for s in scripts if s.transport in (Transport.TCP, Transport.UDP)]
    if not playable:
        raise FlowtapError(
            f"{source} has no TCP or UDP flows to play: check it with flowtap show, "
            "or capture the traffic again"
        )
    if flow_ids:
        by_id = {s.id: s for s in playable}
        missing = [flow_id for flow_id in flow_ids if flow_id not in by_id]
        if missing:
            known = ", ".join(str(s.id) for s in playable[:10])
            more = ", ..." if len(playable) > 10 else ""
            raise FlowtapError(
                f"no flow {missing[0]} in {source} (its flows are {known}{more}): "
                "pick one that flowtap show lists"
            )
        chosen = [by_id[flow_id] for flow_id in dict.fromkeys(flow_ids)]
    else:
        chosen = list(playable)
    if flow_filter is not None:
        chosen = select_by_filter(chosen, flow_filter)
        if not chosen:
            raise FlowtapError(
                f"no flow in {source} matches the --filter: loosen it, or list the flows "
                "with flowtap show"
            )
    return chosen


def load_scripts(
    path: str,
    *,
    flow_ids: Sequence[int] = (),
    warn: Callable[[str], None] | None = None,
) -> list[Script]:
    """Read a capture file into scripts (only the named flows' data, when given).

    A capture damaged part-way gives the flows read before the damage, with a warning;
    one that cannot be read at all raises FlowtapError, as `flowtap show` says it.
    """
    from flowtap.inspector.pcapfile.reader import CaptureReader, DamagedCaptureError
    from flowtap.inspector.pcapfile.reassembly import readable_events

    def on_damage(exc: DamagedCaptureError) -> None:
        if warn is None:
            raise exc
        warn(f"{exc}; playing the flows read before that")

    with CaptureReader(path) as reader:
        events: list[RecordedEvent] = list(
            readable_events(reader, set(flow_ids) if flow_ids else None, on_damage=on_damage)
        )
    return scripts_from_events(events)
