"""The flow store behind the TUI: an index of flows in memory, their payload bytes on disk.

The store is owned by one thread (the UI's). It keeps one small record per flow and, for the
detail view, the bytes of each direction up to a per-flow cap; those bytes go to a
`PayloadSpill`, which holds a fixed budget in memory and writes the rest to a temporary
file, so a long session does not grow the process.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from itertools import accumulate, compress

from flowtap.inspector.pcapfile.reassembly import FlowGap
from flowtap.inspector.summary import (
    EMPTY,
    H2_PREFACE,
    HEAD_BYTES,
    Http2Summary,
    Summary,
    summarize,
)
from flowtap.proxy.control_protocol import DataNotShown, DataRun
from flowtap.proxy.events import EventQueue
from flowtap.proxy.flow import (
    Direction,
    Flow,
    FlowClosed,
    FlowData,
    FlowEvent,
    FlowOpened,
    FlowState,
    FlowUpdated,
    Transport,
)

MiB = 1024 * 1024
KEPT_BYTES_PER_DIRECTION = 1 * MiB
"""How many bytes of each direction of a flow the store keeps for the detail view and saving."""


class FlowFeed:
    """The display's observer: an `EventQueue` that wants each flow direction's data only up
    to `max_data_bytes_per_direction`, so the relay stops copying bulk transfers for it."""

    def __init__(
        self,
        *,
        max_data_bytes_per_direction: int = KEPT_BYTES_PER_DIRECTION,
        max_data_events: int = 10_000,
    ) -> None:
        self._queue = EventQueue(max_data_events=max_data_events)
        self._cap = max_data_bytes_per_direction
        # Each flow is handled by one relay thread; distinct keys need no lock.
        self._seen: dict[tuple[int, Direction], int] = {}

    @property
    def wants_data(self) -> bool:
        return True

    @property
    def dropped_data_events(self) -> int:
        return self._queue.dropped_data_events

    def handle(self, event: FlowEvent) -> bool | None:
        if isinstance(event, FlowData):
            key = (event.flow_id, event.direction)
            seen = self._seen.get(key, 0) + len(event.data)
            self._seen[key] = seen
            self._queue.handle(event)
            return seen < self._cap
        if isinstance(event, FlowClosed):
            self._seen.pop((event.flow.id, Direction.UP), None)
            self._seen.pop((event.flow.id, Direction.DOWN), None)
        self._queue.handle(event)
        return None

    def drain(self, limit: int = 100_000) -> list[FlowEvent]:
        """Take up to `limit` waiting events, oldest first."""
        return self._queue.drain(limit)

    def close(self) -> None:
        self._queue.close()


class PayloadSpill:
    """Append-only byte storage: the first `memory_budget_bytes` in memory, the rest on disk.

    Thread-safe, so that a save can read while the UI thread appends.
    """

    def __init__(
        self, *, memory_budget_bytes: int = 32 * MiB, directory: str | None = None
    ) -> None:
        self._budget = memory_budget_bytes
        self._memory = bytearray()
        self._directory = directory
        self._fd: int | None = None
        self._disk_size = 0
        self._pending = bytearray()
        self._lock = threading.Lock()

    @property
    def size_bytes(self) -> int:
        return len(self._memory) + self._disk_size + len(self._pending)

    @property
    def memory_bytes(self) -> int:
        return len(self._memory) + len(self._pending)

    def append(self, data: bytes) -> int:
        """Store `data`; return the offset to read it back with."""
        with self._lock:
            return self._append(data)

    def _append(self, data: bytes) -> int:
        offset = self.size_bytes
        if (
            not self._disk_size
            and not self._pending
            and len(self._memory) + len(data) <= self._budget
        ):
            self._memory += data
            return offset
        self._pending += data
        if len(self._pending) >= 256 * 1024:
            self._flush()
        return offset

    def _flush(self) -> None:
        if not self._pending:
            return
        if self._fd is None:
            handle, path = tempfile.mkstemp(prefix="flowtap-spill-", dir=self._directory)
            os.unlink(path)  # the file lives as long as the descriptor
            self._fd = handle
        os.pwrite(self._fd, self._pending, self._disk_size)
        self._disk_size += len(self._pending)
        self._pending.clear()

    def read(self, offset: int, length: int) -> bytes:
        """The `length` bytes stored at `offset`."""
        with self._lock:
            return self._read(offset, length)

    def read_many(self, spans: Iterable[tuple[int, int]]) -> list[bytes]:
        """The bytes stored at each `(offset, length)`, read under one lock."""
        with self._lock:
            return [self._read(offset, length) for offset, length in spans]

    def _read(self, offset: int, length: int) -> bytes:
        in_memory = len(self._memory)
        if offset + length <= in_memory:
            return bytes(self._memory[offset : offset + length])
        self._flush()
        assert self._fd is not None
        return os.pread(self._fd, length, offset - in_memory)

    def clear(self) -> None:
        with self._lock:
            self._drop(go_on=True)

    def close(self) -> None:
        with self._lock:
            self._drop(go_on=False)

    def _drop(self, *, go_on: bool) -> None:
        """Drop every byte held; the file on disk is emptied to go on, or closed."""
        self._memory = bytearray()
        self._pending.clear()
        if self._fd is not None:
            if go_on:
                os.ftruncate(self._fd, 0)
            else:
                os.close(self._fd)
                self._fd = None
        if go_on:
            self._disk_size = 0


@dataclass(frozen=True, slots=True)
class Chunk:
    """Bytes one side sent, as kept by the store."""

    direction: Direction
    timestamp: float
    data: bytes


CHUNK_UP = 1
"""A `ChunkIndex` flag: the client sent it (else the server)."""
CHUNK_GAP = 2
"""A `ChunkIndex` flag: bytes here that the capture does not hold (length: how many)."""
CHUNK_NOT_SHOWN = 4
"""A `ChunkIndex` flag: bytes about here that the relay did not send this viewer."""
CHUNK_MISSING = CHUNK_GAP | CHUNK_NOT_SHOWN


_UP_FLAGS = bytes([CHUNK_UP, 0]) + bytes(254)
"""A `DataRun`'s directions (0 up, 1 down) translated into `ChunkIndex` flags."""


def _taking(head: bytes | None) -> bool:
    """Whether a direction's head is still being taken for its summary."""
    return head is not None and len(head) < HEAD_BYTES


class ChunkIndex:
    """Where a flow's kept chunks are: flags (direction, or missing bytes), time, spill
    offset and length of each, in flat arrays (about 21 bytes a chunk, where a tuple per
    chunk took about 170). Missing bytes are an entry with no payload, so that the views can
    say where they were.

    Append-only, so a reader on another thread that takes `len()` first sees a consistent
    prefix.
    """

    __slots__ = ("flags", "lengths", "offsets", "timestamps")

    def __init__(self) -> None:
        self.flags = bytearray()
        self.timestamps = array("d")
        self.offsets = array("q")
        self.lengths = array("L")

    def __len__(self) -> int:
        return len(self.lengths)

    def append(self, is_up: bool, timestamp: float, offset: int, length: int) -> None:
        # Lengths last: `len()` counts a chunk only once all its fields are there.
        self.flags.append(CHUNK_UP if is_up else 0)
        self.timestamps.append(timestamp)
        self.offsets.append(offset)
        self.lengths.append(length)

    def append_missing(self, flags: int, timestamp: float, size_bytes: int) -> None:
        """Note `size_bytes` missing bytes, added to the last entry if it notes the same."""
        last = len(self) - 1
        if last >= 0 and self.flags[last] == flags:
            self.lengths[last] += size_bytes
            return
        self.flags.append(flags)
        self.timestamps.append(timestamp)
        self.offsets.append(-1)
        self.lengths.append(size_bytes)


class FlowRecord:
    """What the store knows of one flow; mutated only by its `FlowStore`."""

    __slots__ = (
        "bytes_down",
        "bytes_up",
        "chunks",
        "flow",
        "gaps",
        "h2",
        "head_down",
        "head_up",
        "kept_down",
        "kept_up",
        "not_shown",
        "past_capture_end",
        "summary",
        "summary_stale",
    )

    def __init__(self, flow: Flow) -> None:
        self.flow = flow
        self.bytes_up = flow.bytes_up
        self.bytes_down = flow.bytes_down
        self.chunks = ChunkIndex()
        self.kept_up = 0
        self.kept_down = 0
        self.head_up: bytes | None = b""
        self.head_down: bytes | None = b""
        self.summary: Summary = EMPTY
        self.summary_stale = False
        # An HTTP/2 connection's summary follows every byte the store gets, not the heads.
        self.h2: Http2Summary | None = None
        self.gaps = 0
        # Bytes the relay did not send this viewer because it fell behind.
        self.not_shown = 0
        # Read from a capture that ended while the flow was open: its state is the last
        # one the packets told, not a live one.
        self.past_capture_end = False

    @property
    def id(self) -> int:
        return self.flow.id

    @property
    def is_closed(self) -> bool:
        return self.flow.state is FlowState.CLOSED

    @property
    def state_text(self) -> str:
        flow = self.flow
        if flow.state is FlowState.CLOSED and flow.reason is not None:
            return str(flow.reason)
        if self.past_capture_end and flow.state is not FlowState.CLOSED:
            # A UDP session ends without a packet, so a capture cannot tell its end.
            return "no end (udp)" if flow.transport is Transport.UDP else f"{flow.state} at end"
        return str(flow.state)

    @property
    def truncated_bytes(self) -> int:
        """Bytes the flow carried that the store did not keep."""
        return max(0, self.bytes_up - self.kept_up) + max(0, self.bytes_down - self.kept_down)


@dataclass
class StoreChanges:
    """What one `FlowStore.apply` changed: new flows, and flows whose row must be redrawn."""

    added: list[int] = field(default_factory=list)
    changed: set[int] = field(default_factory=set)
    bytes_up: int = 0
    bytes_down: int = 0


class FlowStore:
    """Flows by id in arrival order, with their kept payload; owned by a single thread."""

    def __init__(
        self,
        spill: PayloadSpill | None = None,
        *,
        max_kept_bytes_per_direction: int = KEPT_BYTES_PER_DIRECTION,
    ) -> None:
        self._spill = spill or PayloadSpill()
        self._max_kept = max_kept_bytes_per_direction
        self.records: dict[int, FlowRecord] = {}
        self.open_count = 0
        self._stale: set[int] = set()
        self.capped: set[int] = set()
        """Open flows past the keep cap in a direction: their live byte counts come from
        elsewhere (`set_live_counts`), since the feed stops sending their data."""

    def __len__(self) -> int:
        return len(self.records)

    def get(self, flow_id: int) -> FlowRecord | None:
        return self.records.get(flow_id)

    def apply(self, events: Iterable[FlowEvent | object]) -> StoreChanges:
        """Fold events into the store; unknown event kinds (such as capture gaps) are counted."""
        changes = StoreChanges()
        records = self.records
        for event in events:
            if isinstance(event, DataRun):
                flow_id = event.flow_id()
                record = None if flow_id is None else records.get(flow_id)
                if record is None or not self._add_run(record, event, changes):
                    for data in event.events():
                        self._add_event(data, changes)
            elif isinstance(event, FlowData):
                self._add_event(event, changes)
            elif isinstance(event, FlowOpened):
                flow = event.flow
                if flow.id in records:
                    continue
                records[flow.id] = FlowRecord(flow)
                self.open_count += 1
                changes.added.append(flow.id)
            elif isinstance(event, FlowUpdated):
                record = records.get(event.flow.id)
                if record is None or record.is_closed:
                    continue
                # Its facts (TLS, once the handshake is done); the counts are the store's.
                record.flow = event.flow
                changes.changed.add(record.id)
            elif isinstance(event, FlowClosed):
                flow = event.flow
                record = records.get(flow.id)
                if record is None:
                    # Closed before this store heard of it (a viewer's backlog of recent flows).
                    record = records[flow.id] = FlowRecord(flow)
                    changes.added.append(flow.id)
                    record.summary_stale = True
                    self._stale.add(flow.id)
                    continue
                if record.is_closed:
                    continue
                record.flow = flow
                self.capped.discard(flow.id)
                record.bytes_up = max(record.bytes_up, flow.bytes_up)
                record.bytes_down = max(record.bytes_down, flow.bytes_down)
                self.open_count -= 1
                record.summary_stale = True
                self._stale.add(flow.id)
                changes.changed.add(flow.id)
            elif isinstance(event, DataNotShown):
                record = records.get(event.flow_id)
                if record is not None:
                    record.not_shown += event.size_bytes
                    if event.direction is Direction.UP:
                        record.bytes_up += event.size_bytes
                    else:
                        record.bytes_down += event.size_bytes
                    chunks = record.chunks
                    when = chunks.timestamps[-1] if len(chunks) else record.flow.started_at
                    self._note_missing(record, event.direction, CHUNK_NOT_SHOWN, when, event)
                    changes.changed.add(record.id)
            elif isinstance(event, FlowGap):
                record = records.get(event.flow_id)
                if record is not None:
                    record.gaps += 1
                    self._note_missing(record, event.direction, CHUNK_GAP, event.timestamp, event)
                    changes.changed.add(record.id)
            else:
                flow_id = getattr(event, "flow_id", None)
                record = records.get(flow_id) if isinstance(flow_id, int) else None
                if record is not None:
                    record.gaps += 1
                    changes.changed.add(record.id)
        return changes

    def _add_event(self, event: FlowData, changes: StoreChanges) -> None:
        record = self.records.get(event.flow_id)
        if record is None:
            return
        self._add_data(record, event)
        if event.direction is Direction.UP:
            changes.bytes_up += len(event.data)
        else:
            changes.bytes_down += len(event.data)
        changes.changed.add(record.id)

    def _add_run(self, record: FlowRecord, run: DataRun, changes: StoreChanges) -> bool:
        """Fold in a run of `record`'s chunks with a call per column, as `_add_data` would
        one by one; False, having done nothing, if a chunk needs more than keeping (a head
        still being taken, an HTTP/2 connection followed, the keep cap reached)."""
        if (
            record.h2 is not None
            or record.flow.state is FlowState.CONNECTING
            or _taking(record.head_up)
            or _taking(record.head_down)
        ):
            return False
        down = sum(compress(run.lengths, run.downs))
        up = len(run.payload) - down
        if record.kept_up + up >= self._max_kept or record.kept_down + down >= self._max_kept:
            return False
        offset = self._spill.append(run.payload)  # one blob: its chunks follow each other
        offsets = array("q", accumulate(run.lengths, initial=offset))
        offsets.pop()
        chunks = record.chunks
        chunks.flags += run.downs.translate(_UP_FLAGS)
        chunks.timestamps += run.timestamps
        chunks.offsets += offsets
        chunks.lengths.fromlist(run.lengths.tolist())  # last, as `ChunkIndex.append` does
        record.bytes_up += up
        record.kept_up += up
        record.bytes_down += down
        record.kept_down += down
        changes.bytes_up += up
        changes.bytes_down += down
        changes.changed.add(record.id)
        return True

    def _note_missing(
        self,
        record: FlowRecord,
        direction: Direction,
        kind: int,
        timestamp: float,
        event: DataNotShown | FlowGap,
    ) -> None:
        is_up = direction is Direction.UP
        if record.h2 is not None:
            record.h2.stop()  # its frames cannot be found past a hole
        if (record.kept_up if is_up else record.kept_down) < self._max_kept:
            # Past the keep cap nothing more is shown anyway.
            flags = kind | (CHUNK_UP if is_up else 0)
            record.chunks.append_missing(flags, timestamp, event.size_bytes)

    def _add_data(self, record: FlowRecord, event: FlowData) -> None:
        if record.flow.state is FlowState.CONNECTING:
            # The relay moves bytes only once both sides are connected.
            record.flow = replace(record.flow, state=FlowState.OPEN)
        data = event.data
        is_up = event.direction is Direction.UP
        if is_up:
            record.bytes_up += len(data)
            kept = record.kept_up
            head = record.head_up
        else:
            record.bytes_down += len(data)
            kept = record.kept_down
            head = record.head_down
        h2 = record.h2
        if h2 is not None:
            h2.feed(is_up, data)
            if not record.summary_stale:
                record.summary_stale = True
                self._stale.add(record.id)
        elif head is not None and len(head) < HEAD_BYTES:
            before = head
            head += data[: HEAD_BYTES - len(head)]
            if is_up:
                record.head_up = head
                if len(before) < len(H2_PREFACE) <= len(head):
                    self._follow_h2(record, before + data)
            else:
                record.head_down = head
            if not record.summary_stale:
                record.summary_stale = True
                self._stale.add(record.id)
        room = self._max_kept - kept
        if room <= 0:
            return
        if len(data) >= room:
            data = data[:room]
            if not record.is_closed:
                self.capped.add(record.id)
        offset = self._spill.append(data)
        record.chunks.append(is_up, event.timestamp, offset, len(data))
        if is_up:
            record.kept_up += len(data)
        else:
            record.kept_down += len(data)

    def _follow_h2(self, record: FlowRecord, up: bytes) -> None:
        """Follow the flow as HTTP/2 if the client's first bytes (`up`, all so far) are its
        preface and the server's are all in the head."""
        down = record.head_down
        if up.startswith(H2_PREFACE) and down is not None and len(down) < HEAD_BYTES:
            record.h2 = Http2Summary()
            record.h2.feed(True, up)
            record.h2.feed(False, down)

    def set_live_counts(self, flow_id: int, bytes_up: int, bytes_down: int) -> int:
        """Raise a live flow's byte counts to what the relay reports; return the bytes added."""
        record = self.records.get(flow_id)
        if record is None or record.is_closed:
            return 0
        added = max(0, bytes_up - record.bytes_up) + max(0, bytes_down - record.bytes_down)
        record.bytes_up = max(record.bytes_up, bytes_up)
        record.bytes_down = max(record.bytes_down, bytes_down)
        return added

    def mark_capture_end(self) -> set[int]:
        """The capture these flows were read from has ended: the ids of those still open."""
        ended = set()
        for record in self.records.values():
            if not record.is_closed and not record.past_capture_end:
                record.past_capture_end = True
                ended.add(record.id)
        return ended

    def refresh_summaries(self, limit: int = 2000) -> list[int]:
        """Recompute up to `limit` stale summaries; return the ids whose summary changed."""
        changed: list[int] = []
        stale = self._stale
        while stale and len(changed) < limit:
            record = self.records.get(stale.pop())
            if record is None:
                continue
            record.summary_stale = False
            if record.h2 is not None:
                summary = record.h2.summary()
            else:
                summary = summarize(
                    record.head_up or self._head(record, True),
                    record.head_down or self._head(record, False),
                    transport=str(record.flow.transport),
                    server_port=record.flow.server.port,
                )
            if record.is_closed:
                record.head_up = record.head_down = None  # the spill has them
                record.h2 = None  # nothing more comes: the summary is final
            if summary != record.summary:
                record.summary = summary
                changed.append(record.id)
        return changed

    def _head(self, record: FlowRecord, is_up: bool) -> bytes:
        out = bytearray()
        index = record.chunks
        wanted = CHUNK_UP if is_up else 0
        for i in range(len(index)):
            if index.flags[i] == wanted:
                length = min(index.lengths[i], HEAD_BYTES - len(out))
                out += self._spill.read(index.offsets[i], length)
                if len(out) >= HEAD_BYTES:
                    break
        return bytes(out)

    def chunks(self, flow_id: int) -> Iterator[Chunk]:
        """The kept chunks of a flow in order, read back from the spill."""
        record = self.records.get(flow_id)
        if record is None:
            return
        index = record.chunks
        for i in range(len(index)):
            flags = index.flags[i]
            if flags & CHUNK_MISSING:
                continue
            yield Chunk(
                Direction.UP if flags & CHUNK_UP else Direction.DOWN,
                index.timestamps[i],
                self._spill.read(index.offsets[i], index.lengths[i]),
            )

    def chunk_datas(self, record: FlowRecord, first: int, last: int) -> list[bytes]:
        """The bytes of chunks `first` to `last` (excluded) of `record`; empty for missing
        bytes, and all empty once the store has forgotten the flow."""
        if self.records.get(record.id) is not record:
            return [b""] * (last - first)
        index = record.chunks
        spans = zip(index.offsets[first:last], index.lengths[first:last], strict=True)
        # A missing-bytes entry (offset -1) has no payload.
        return self._spill.read_many((o, n) if o >= 0 else (0, 0) for o, n in spans)

    def span_bytes(self, record: FlowRecord, offset: int, length: int) -> bytes:
        """The `length` bytes kept at spill offset `offset` (chunks of `record` kept one after
        another); empty once the store has forgotten the flow."""
        if self.records.get(record.id) is not record:
            return b""
        return self._spill.read(offset, length)

    def chunk_bytes(self, record: FlowRecord, i: int, start: int = 0, length: int = -1) -> bytes:
        """Bytes `start` to `start + length` (-1: to its end) of chunk `i` of `record`; empty
        once the store has forgotten the flow."""
        index = record.chunks
        if self.records.get(record.id) is not record or index.flags[i] & CHUNK_MISSING:
            return b""
        size = index.lengths[i]
        start = min(start, size)
        end = size if length < 0 else min(size, start + length)
        return self._spill.read(index.offsets[i] + start, end - start)

    def raw_bytes(self, flow_id: int, direction: Direction) -> bytes:
        """All kept bytes one side of a flow sent, in order."""
        return b"".join(c.data for c in self.chunks(flow_id) if c.direction is direction)

    def contains(self, flow_id: int, pattern: re.Pattern[bytes]) -> bool:
        """Whether `pattern` matches within one chunk of the flow's kept payload."""
        return any(pattern.search(c.data) for c in self.chunks(flow_id))

    def events(self, flow_id: int) -> Iterator[FlowEvent]:
        """The flow's events as the store can replay them: opened, kept data, closed if closed."""
        record = self.records.get(flow_id)
        if record is None:
            return
        # A snapshot, so that a save on another thread sees one consistent state of the flow.
        flow = record.flow
        index = record.chunks
        count = len(index)
        yield FlowOpened(flow)
        for i in range(count):
            flags = index.flags[i]
            if flags & CHUNK_MISSING:
                continue
            direction = Direction.UP if flags & CHUNK_UP else Direction.DOWN
            data = self._spill.read(index.offsets[i], index.lengths[i])
            yield FlowData(flow.id, direction, index.timestamps[i], data)
        if flow.state is FlowState.CLOSED:
            yield FlowClosed(flow)

    def clear_closed(self) -> list[int]:
        """Forget closed flows; return their ids. Spilled bytes are reclaimed when none is open."""
        gone = [flow_id for flow_id, record in self.records.items() if record.is_closed]
        for flow_id in gone:
            del self.records[flow_id]
            self._stale.discard(flow_id)
            self.capped.discard(flow_id)
        if not self.records:
            self._spill.clear()
        return gone

    def close(self) -> None:
        self._spill.close()
