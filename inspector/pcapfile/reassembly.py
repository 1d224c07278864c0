"""Flows from packets: TCP reassembly and UDP conversations, as a stream of flow events.

`read_capture(path)` is the public entry: it streams any pcap/pcapng file and yields the
same events the relay emits (`FlowOpened`, `FlowData`, `FlowClosed` from
`flowtap.proxy.flow`) plus `FlowGap` where the capture misses bytes, so the TUI, `show`
and replay consume a capture exactly as they consume a live relay.

Contract of the event stream:

- Flow ids are 1, 2, 3... in order of each flow's first packet. Every flow gets one
  `FlowOpened`, then `FlowData`/`FlowGap` events, then one `FlowClosed`.
- `Direction.UP` is client to server. The client is the side that sent the SYN (or got the
  SYN-ACK); without a handshake in the capture, the first sender.
- Each direction's `FlowData` and `FlowGap` sizes add up to its stream in order:
  out-of-order segments are put in place, retransmitted and overlapping bytes appear once
  (first copy wins), and bytes the capture never saw are a `FlowGap`, never glued over.
  A gap is declared when the receiver has acknowledged bytes the capture lacks and a later
  segment does not bring them, when more than `max_buffered_bytes` wait behind a hole (or
  `max_total_buffered_bytes` behind all holes of all flows), or when the flow ends. Memory
  is bounded by these limits plus a small record per flow, whatever the capture's size.
- `FlowClosed.flow.reason` is how the flow ended in the capture: `client-reset` /
  `server-reset` for a RST, `client-closed` / `server-closed` for whoever sent FIN first;
  captures written by flowtap name the exact reason (and error) in a packet comment. A flow
  still open when the capture ends closes with reason None and state open or half-closed.
- Unix-socket flows captured by flowtap (placeholder IP addresses) get their real
  `unix:PATH` addresses back from the pcapng comment.
"""

from __future__ import annotations

import heapq
import os
from collections import OrderedDict
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass, replace

from flowtap.proxy.errors import FlowtapError
from flowtap.proxy.flow import (
    Address,
    CloseReason,
    Direction,
    Flow,
    FlowClosed,
    FlowData,
    FlowOpened,
    FlowState,
    Requested,
    TlsFacts,
    Transport,
)

from .reader import (
    SUPPORTED_LINKTYPES,
    CaptureReader,
    DamagedCaptureError,
    Segment,
    address_text,
    parse_flow_comment,
    unsupported_message,
)


@dataclass(frozen=True, slots=True)
class FlowGap:
    """`size_bytes` bytes of one direction that the capture does not hold, at this point."""

    flow_id: int
    direction: Direction
    timestamp: float
    size_bytes: int


CaptureEvent = FlowOpened | FlowData | FlowGap | FlowClosed
DataSink = Callable[[Flow, Direction, memoryview], bool]
"""Takes a flow's next bytes as a view, valid only during the call (a consumer that searches
them needs no copy); False: no more of that flow's bytes are wanted."""

_FIN = 0x01
_SYN = 0x02
_RST = 0x04
_ACK = 0x10
_MOD = 1 << 32
_HALF = 1 << 31
_CLOSED_REMEMBERED = 65536


class _Stream:
    """One direction of a TCP flow: where the next byte belongs and what waits behind holes."""

    __slots__ = (
        "acked",
        "delivered",
        "fin_offset",
        "finished",
        "gap_bytes",
        "isn",
        "offset",
        "pending",
        "pending_bytes",
    )

    def __init__(self) -> None:
        self.isn: int | None = None  # the sequence number of stream position 0
        self.offset = 0  # the next position to place: bytes delivered plus gaps
        # Segments beyond a hole: (position, arrival number, length, timestamp, payload).
        self.pending: list[tuple[int, int, int, float, memoryview]] = []
        self.pending_bytes = 0
        self.fin_offset: int | None = None
        self.acked = 0  # how far the receiver has acknowledged
        self.finished = False
        self.delivered = 0
        self.gap_bytes = 0

    def offset_of(self, seq: int) -> int:
        """The stream position of sequence number `seq` (within 2 GiB of the position)."""
        assert self.isn is not None
        delta = (seq - self.isn - self.offset) % _MOD
        if delta >= _HALF:
            delta -= _MOD
        return self.offset + delta


class _Conversation:
    __slots__ = (
        "closed",
        "error",
        "first_fin_from_client",
        "flow",
        "is_udp",
        "last_timestamp",
        "packets",
        "reason",
        "streams",
        "tls",
        "wants_data",
    )

    def __init__(self, flow: Flow, wants_data: bool) -> None:
        self.flow = flow
        self.is_udp = flow.transport is Transport.UDP
        self.streams = (_Stream(), _Stream())  # up, down
        self.closed = False
        self.first_fin_from_client: bool | None = None
        self.last_timestamp = flow.started_at
        self.packets = 0
        self.reason: CloseReason | None = None
        self.error: str | None = None
        self.tls: TlsFacts | None = None
        self.wants_data = wants_data


_Key = tuple[bool, bytes, int, bytes, int]


class Reassembler:
    """Turns segments (in capture order) into flow events; `feed` then `finish`."""

    def __init__(
        self,
        *,
        data_for: Callable[[Flow], bool] | None = None,
        on_data: DataSink | None = None,
        max_buffered_bytes: int = 8 << 20,
        max_total_buffered_bytes: int = 64 << 20,
    ) -> None:
        self._data_for = data_for
        self._on_data = on_data
        self._max_buffered = max_buffered_bytes
        self._max_total_buffered = max_total_buffered_bytes
        self._buffered_total = 0
        self._flows: dict[_Key, tuple[_Conversation, bool]] = {}
        self._closed: OrderedDict[_Key, None] = OrderedDict()
        self._next_id = 1
        self._arrivals = 0
        self._out: list[CaptureEvent] = []
        self.packets_ignored = 0

    # -- flows ----------------------------------------------------------------------------------

    def _open(self, segment: Segment, from_sender_is_client: bool) -> _Conversation:
        src = Address(address_text(segment.src), segment.src_port)
        dst = Address(address_text(segment.dst), segment.dst_port)
        client, server = (src, dst) if from_sender_is_client else (dst, src)
        listener = server
        requested: Requested | None = None
        info = parse_flow_comment(segment.comment)
        if info is not None:
            client = _address(info.get("client"), client)
            server = _address(info.get("server"), server)
            listener = _address(info.get("listener"), server)
            asked, user = info.get("requested"), info.get("user")
            if isinstance(asked, str):
                requested = Requested.from_text(asked, user if isinstance(user, str) else None)
        flow = Flow(
            id=self._next_id,
            transport=Transport.UDP if segment.is_udp else Transport.TCP,
            client=client,
            server=server,
            listener=listener,
            started_at=segment.timestamp,
            state=FlowState.OPEN,
            requested=requested,
        )
        self._next_id += 1
        conversation = _Conversation(flow, self._data_for is None or self._data_for(flow))
        key = (segment.is_udp, segment.src, segment.src_port, segment.dst, segment.dst_port)
        back = (segment.is_udp, segment.dst, segment.dst_port, segment.src, segment.src_port)
        self._flows[key] = (conversation, from_sender_is_client)
        self._flows[back] = (conversation, not from_sender_is_client)
        self._closed.pop(key, None)
        self._closed.pop(back, None)
        self._out.append(FlowOpened(flow))
        return conversation

    def _close(self, conversation: _Conversation, timestamp: float) -> None:
        conversation.closed = True
        for direction in (Direction.UP, Direction.DOWN):
            self._drain_all(conversation, direction, timestamp)
        up, down = conversation.streams
        flow = conversation.flow
        reason = conversation.reason
        if reason is None and not conversation.is_udp and up.finished and down.finished:
            reason = (
                CloseReason.CLIENT_CLOSED
                if conversation.first_fin_from_client
                else CloseReason.SERVER_CLOSED
            )
        if reason is not None:
            closed = flow.closed(
                ended_at=conversation.last_timestamp,
                bytes_up=up.delivered,
                bytes_down=down.delivered,
                reason=reason,
                error=conversation.error,
                tls=conversation.tls,
            )
        else:
            half = up.fin_offset is not None or down.fin_offset is not None
            closed = replace(
                flow,
                ended_at=conversation.last_timestamp,
                bytes_up=up.delivered,
                bytes_down=down.delivered,
                state=FlowState.HALF_CLOSED if half else FlowState.OPEN,
                error=conversation.error,
                tls=conversation.tls,
            )
        self._out.append(FlowClosed(closed))

    def _forget(self, segment: Segment) -> None:
        key = (segment.is_udp, segment.src, segment.src_port, segment.dst, segment.dst_port)
        back = (segment.is_udp, segment.dst, segment.dst_port, segment.src, segment.src_port)
        self._flows.pop(key, None)
        self._flows.pop(back, None)
        closed = self._closed
        closed[key] = None
        closed[back] = None
        while len(closed) > _CLOSED_REMEMBERED:
            closed.popitem(last=False)

    # -- packets --------------------------------------------------------------------------------

    def feed(self, segment: Segment) -> list[CaptureEvent]:
        """The events that `segment` (the next packet of the capture) completes."""
        out: list[CaptureEvent] = []
        self._out = out
        key = (segment.is_udp, segment.src, segment.src_port, segment.dst, segment.dst_port)
        found = self._flows.get(key)
        if segment.is_udp:
            if found is None:
                conversation = self._open(segment, True)
                from_client = True
            else:
                conversation, from_client = found
            self._udp(conversation, from_client, segment)
            return out
        flags = segment.flags
        if found is None:
            if key in self._closed and not (flags & _SYN and not flags & _ACK):
                self.packets_ignored += 1  # the tail of a flow that already ended
                return out
            # The SYN's sender is the client; a SYN-ACK's receiver; otherwise the first sender.
            is_client = not (flags & _SYN and flags & _ACK)
            conversation = self._open(segment, is_client)
            from_client = is_client
        else:
            conversation, from_client = found
            if flags & _SYN and not flags & _ACK and conversation.streams[0].delivered:
                # A new connection reusing the addresses of one that never closed.
                self._close(conversation, conversation.last_timestamp)
                self._forget(segment)
                conversation = self._open(segment, True)
                from_client = True
        self._tcp(conversation, from_client, segment)
        return out

    def _udp(self, conversation: _Conversation, from_client: bool, segment: Segment) -> None:
        conversation.packets += 1
        conversation.last_timestamp = segment.timestamp
        direction = Direction.UP if from_client else Direction.DOWN
        stream = conversation.streams[0 if from_client else 1]
        payload = segment.payload
        stream.delivered += len(payload)
        if conversation.wants_data:
            self._data(conversation, direction, segment.timestamp, payload)
        missing = segment.length - len(payload)
        if missing > 0:
            stream.gap_bytes += missing
            self._out.append(FlowGap(conversation.flow.id, direction, segment.timestamp, missing))

    def _tcp(self, conversation: _Conversation, from_client: bool, segment: Segment) -> None:
        conversation.packets += 1
        timestamp = segment.timestamp
        if timestamp > conversation.last_timestamp:
            conversation.last_timestamp = timestamp
        flags = segment.flags
        direction = Direction.UP if from_client else Direction.DOWN
        stream, peer = conversation.streams if from_client else conversation.streams[::-1]
        if segment.comment is not None:
            self._closing_comment(conversation, segment.comment)
        if flags & _RST:
            if conversation.reason is None:
                conversation.reason = (
                    CloseReason.CLIENT_RESET if from_client else CloseReason.SERVER_RESET
                )
            self._close(conversation, timestamp)
            self._forget(segment)
            return
        seq = segment.seq
        if flags & _SYN:
            if stream.isn is None or (not stream.offset and not stream.pending):
                stream.isn = (seq + 1) % _MOD
            seq = (seq + 1) % _MOD
        if flags & _ACK and peer.isn is not None and not peer.finished:
            delta = (segment.ack - peer.isn - peer.offset) % _MOD  # inline offset_of
            if delta < _HALF:
                acked = peer.offset + delta
                if peer.fin_offset is not None and acked > peer.fin_offset:
                    acked = peer.fin_offset
                if acked > peer.acked:
                    peer.acked = acked
        length = segment.length
        if stream.isn is None:
            if not length and not flags & _FIN:
                return
            stream.isn = seq  # the capture starts in the middle of this stream
        if length and not stream.finished:
            self._segment(conversation, stream, direction, seq, segment, timestamp)
        if flags & _FIN and not stream.finished:
            if conversation.first_fin_from_client is None:
                conversation.first_fin_from_client = from_client
            fin_offset = stream.offset_of((seq + length) % _MOD)
            if stream.fin_offset is None or fin_offset < stream.fin_offset:
                stream.fin_offset = max(fin_offset, stream.offset)
            self._check_finished(conversation, stream)
        if stream.acked > stream.offset and (length or flags & _FIN) and not stream.finished:
            # The receiver acknowledged bytes before this segment that the capture still
            # lacks: they were sent and will not appear (a capture may reorder, so the hole
            # is only declared once a later segment of this direction fails to fill it).
            self._advance(conversation, stream, direction, stream.acked, timestamp)
        if stream.finished and peer.finished:
            self._close(conversation, timestamp)
            self._forget(segment)

    def _closing_comment(self, conversation: _Conversation, comment: str) -> None:
        """Take the exact close reason from a flowtap capture's packet comment."""
        info = parse_flow_comment(comment)
        if info is None or "reason" not in info:
            return
        reason = info.get("reason")
        if isinstance(reason, str) and reason in CloseReason._value2member_map_:
            conversation.reason = CloseReason(reason)
        error = info.get("error")
        conversation.error = error if isinstance(error, str) else None
        tls = info.get("tls")
        if isinstance(tls, dict):
            try:
                conversation.tls = TlsFacts.from_dict(tls)
            except (TypeError, ValueError):
                conversation.tls = None  # a damaged comment: the flow is still read, without it

    def _segment(
        self,
        conversation: _Conversation,
        stream: _Stream,
        direction: Direction,
        seq: int,
        segment: Segment,
        timestamp: float,
    ) -> None:
        start = stream.offset_of(seq)
        length = segment.length
        end = start + length
        if end <= stream.offset:
            return  # a retransmission of bytes already placed
        if stream.fin_offset is not None and end > stream.fin_offset:
            end = stream.fin_offset
            length = end - start
            if length <= 0:
                return
        if start <= stream.offset:
            self._deliver(
                conversation, stream, direction, start, length, segment.payload, timestamp
            )
            self._drain(conversation, stream, direction)
        else:
            self._arrivals += 1
            heapq.heappush(
                stream.pending, (start, self._arrivals, length, timestamp, segment.payload)
            )
            stream.pending_bytes += length
            self._buffered_total += length
            if stream.pending_bytes > self._max_buffered:
                self._advance(conversation, stream, direction, stream.pending[0][0], timestamp)
            if self._buffered_total > self._max_total_buffered:
                self._relieve(timestamp)
        self._check_finished(conversation, stream)

    def _deliver(
        self,
        conversation: _Conversation,
        stream: _Stream,
        direction: Direction,
        start: int,
        length: int,
        payload: memoryview,
        timestamp: float,
    ) -> None:
        """Place bytes [start, start+length) that begin at or before the stream position."""
        skip = stream.offset - start
        end = start + length
        captured_end = start + len(payload)
        if captured_end > stream.offset:
            piece = payload[skip : min(len(payload), length)]
            size = len(piece)
            stream.delivered += size
            stream.offset += size
            if conversation.wants_data:
                self._data(conversation, direction, timestamp, piece)
        if end > stream.offset:
            # The capture cut this packet short (snap length): the rest is missing.
            self._gap(conversation, stream, direction, end - stream.offset, timestamp)

    def _data(
        self, conversation: _Conversation, direction: Direction, timestamp: float, data: memoryview
    ) -> None:
        on_data = self._on_data
        if on_data is None:
            self._out.append(FlowData(conversation.flow.id, direction, timestamp, bytes(data)))
        elif not on_data(conversation.flow, direction, data):
            conversation.wants_data = False

    def _gap(
        self,
        conversation: _Conversation,
        stream: _Stream,
        direction: Direction,
        size: int,
        timestamp: float,
    ) -> None:
        stream.offset += size
        stream.gap_bytes += size
        self._out.append(FlowGap(conversation.flow.id, direction, timestamp, size))

    def _drain(self, conversation: _Conversation, stream: _Stream, direction: Direction) -> None:
        """Place waiting segments that the stream position has reached."""
        pending = stream.pending
        while pending and pending[0][0] <= stream.offset:
            start, _, length, timestamp, payload = heapq.heappop(pending)
            stream.pending_bytes -= length
            self._buffered_total -= length
            if start + length > stream.offset:
                self._deliver(conversation, stream, direction, start, length, payload, timestamp)

    def _relieve(self, timestamp: float) -> None:
        """Too many bytes wait behind holes across all flows: declare the biggest holes gaps."""
        waiting = []
        seen: set[int] = set()
        for conversation, from_client in self._flows.values():
            if from_client and id(conversation) not in seen:
                seen.add(id(conversation))
                for stream, direction in zip(conversation.streams, _DIRECTIONS, strict=True):
                    if stream.pending:
                        waiting.append((stream.pending_bytes, conversation, stream, direction))
        waiting.sort(key=lambda item: item[0], reverse=True)
        for _, conversation, stream, direction in waiting:
            if self._buffered_total <= self._max_total_buffered // 2:
                break
            self._advance(conversation, stream, direction, stream.pending[0][0], timestamp)

    def _advance(
        self,
        conversation: _Conversation,
        stream: _Stream,
        direction: Direction,
        target: int,
        timestamp: float,
    ) -> None:
        """Move the stream position to `target`, declaring gaps over what never arrived."""
        while stream.offset < target:
            self._drain(conversation, stream, direction)
            if stream.offset >= target:
                break
            hole_end = target
            if stream.pending and stream.pending[0][0] < hole_end:
                hole_end = stream.pending[0][0]
            self._gap(conversation, stream, direction, hole_end - stream.offset, timestamp)
        self._drain(conversation, stream, direction)
        self._check_finished(conversation, stream)

    def _drain_all(
        self, conversation: _Conversation, direction: Direction, timestamp: float
    ) -> None:
        stream = conversation.streams[0 if direction is Direction.UP else 1]
        if stream.isn is None:
            return
        target = stream.offset
        for start, _, length, _, _ in stream.pending:
            target = max(target, start + length)
        if stream.fin_offset is not None:
            target = max(target, stream.fin_offset)
        if target > stream.offset:
            self._advance(conversation, stream, direction, target, timestamp)

    def _check_finished(self, conversation: _Conversation, stream: _Stream) -> None:
        if stream.fin_offset is not None and stream.offset >= stream.fin_offset:
            stream.finished = True

    def finish(self) -> list[CaptureEvent]:
        """Close every flow still open at the end of the capture, in flow-id order."""
        out: list[CaptureEvent] = []
        self._out = out
        open_flows = {id(c): c for c, _ in self._flows.values() if not c.closed}
        for conversation in sorted(open_flows.values(), key=lambda c: c.flow.id):
            self._close(conversation, conversation.last_timestamp)
        self._flows.clear()
        return out


_DIRECTIONS = (Direction.UP, Direction.DOWN)


def _address(value: object, fallback: Address) -> Address:
    if not isinstance(value, str):
        return fallback
    try:
        return Address.parse(value)
    except FlowtapError:
        if value.startswith("unix:"):
            return Address(host="", path=value[5:])
        return fallback


def read_capture(
    path: str | os.PathLike[str], *, flow_ids: Container[int] | None = None
) -> Iterator[CaptureEvent]:
    """Stream the flow events of the capture at `path` (see the module docstring).

    With `flow_ids`, `FlowData` is built only for those flows (the others are still
    reassembled, counted and opened/closed). Raises CaptureError before any event if the
    file cannot be read, or DamagedCaptureError after every flow has closed when the file is
    cut short or damaged part-way.
    """
    with CaptureReader(path) as reader:
        yield from capture_events(reader, flow_ids)


def capture_events(
    reader: CaptureReader,
    flow_ids: Container[int] | None = None,
    *,
    data_for: Callable[[Flow], bool] | None = None,
    on_data: DataSink | None = None,
) -> Iterator[CaptureEvent]:
    """`read_capture` over an open reader, whose counters then say what was read and skipped.

    `data_for`, called once as each flow opens, says whether to read its bytes (instead of
    `flow_ids`). They come as `FlowData` events, or, with `on_data`, as views passed to it
    (no copy, no event) until it returns False for that flow.
    """
    if data_for is None and flow_ids is not None:
        data_for = _ids_in(flow_ids)
    reassembler = Reassembler(data_for=data_for, on_data=on_data)
    feed = reassembler.feed
    try:
        for segment in reader.segments():
            events = feed(segment)
            if events:
                yield from events
    except Exception:
        # Close the flows read so far, then say why the capture stopped.
        yield from reassembler.finish()
        raise
    yield from reassembler.finish()


def _ids_in(flow_ids: Container[int]) -> Callable[[Flow], bool]:
    return lambda flow: flow.id in flow_ids


def readable_events(
    reader: CaptureReader,
    flow_ids: Container[int] | None = None,
    *,
    on_damage: Callable[[DamagedCaptureError], None],
    data_for: Callable[[Flow], bool] | None = None,
    on_data: DataSink | None = None,
) -> Iterator[CaptureEvent]:
    """`capture_events` for the commands (show, replay, serve), which fail the same way.

    A capture with nothing readable raises one FlowtapError: damaged before its first
    packet, or no packet of a link type flowtap decodes (named as `show` names it). Damage
    part-way ends the events, every flow read so far closed, and goes to `on_damage`.
    """
    try:
        yield from capture_events(reader, flow_ids, data_for=data_for, on_data=on_data)
    except DamagedCaptureError as exc:
        if exc.packets_read == 0:
            raise FlowtapError(f"{exc}: nothing could be read; copy or capture it again") from None
        on_damage(exc)
    linktypes = reader.linktypes
    if linktypes and not any(linktype in SUPPORTED_LINKTYPES for linktype in linktypes):
        raise FlowtapError(unsupported_message(reader.path, linktypes.most_common(1)[0][0]))


def load_flow(path: str | os.PathLike[str], flow_id: int) -> list[CaptureEvent]:
    """The events of one flow of a capture, in memory; FlowtapError if there is no such flow."""
    events = [
        event
        for event in read_capture(path, flow_ids=(flow_id,))
        if (event.flow.id if isinstance(event, FlowOpened | FlowClosed) else event.flow_id)
        == flow_id
    ]
    if not events:
        raise FlowtapError(
            f"{os.fspath(path)!r} has no flow {flow_id}: list its flows with flowtap show FILE"
        )
    return events
