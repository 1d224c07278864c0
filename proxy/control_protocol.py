"""The control socket's wire format: frames of JSON messages and raw data, no I/O.

Every frame is a 5-byte header (payload length, big-endian u32; kind, u8) and its payload.
A `JSON` frame holds one UTF-8 JSON object: the server's `hello`, a client's request
(`{"id": N, "cmd": ...}`), the reply to it (`{"type": "reply", "id": N, "ok": ...}`) or a
pushed event (`{"type": "opened" | "updated" | "closed" | "not-shown" | "counts" | "bye", ...}`). A
`DATA` frame carries a run of `FlowData` in columns (a `DataRun`): their count (u32), then
each one's flow id (u64s), time (f64s, Unix seconds), length (u32s) and direction (u8s,
0 up, 1 down), then their bytes one after another as they crossed the relay, so payloads
are never re-encoded. The columns are in the machine's own byte order (a unix socket's two
ends share the machine), so that either end packs or unpacks a column in one call, not a
call per chunk. The server speaks first with its `hello` and `version`; a later version adds
commands and event types, which clients ignore when they do not know them.
"""

from __future__ import annotations

import json
import struct
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import FlowtapError
from .flow import (
    Address,
    CloseReason,
    Direction,
    Flow,
    FlowData,
    FlowState,
    Requested,
    TlsFacts,
    Transport,
)

VERSION = 2
"""The protocol version a server announces in its hello; a client refuses another major one."""

HEADER = struct.Struct("!IB")
_RUN_COUNT = struct.Struct("=I")
_RUN_BYTES_PER_CHUNK = 8 + 8 + 4 + 1
"""A run's column bytes per chunk: flow id, time, length, direction."""

KIND_JSON = 1
KIND_DATA = 2

MAX_FRAME_BYTES = 16 * 1024 * 1024
"""A frame announcing more is a protocol error: the peer is not a flowtap control client."""

_DIRECTIONS = (Direction.UP, Direction.DOWN)
_DOWN_BY_LENGTH = bytes.maketrans(bytes((len(Direction.UP), len(Direction.DOWN))), b"\x00\x01")
"""Maps a direction's length ("up" 2, "down" 4) to its column byte: `len` runs in C, where an
Enum's own hashing and comparisons run in Python (a third of a frame's encoding time)."""


class ProtocolError(Exception):
    """The peer sent bytes that are not control frames."""


@dataclass(frozen=True, slots=True)
class DataNotShown:
    """`size_bytes` of one direction of a flow were not sent to this viewer: it fell behind."""

    flow_id: int
    direction: Direction
    size_bytes: int


@dataclass(frozen=True, slots=True)
class LiveCounts:
    """Bytes a live flow has moved so far, for a viewer that no longer receives its data."""

    flow_id: int
    bytes_up: int
    bytes_down: int


def encode_json(message: dict[str, Any]) -> bytes:
    """One JSON frame."""
    body = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(len(body), KIND_JSON) + body


class DataRun:
    """Consecutive data events as one data frame carries them, in columns: a viewer keeps
    them so, and folds a run of one flow into its store with a call per column rather
    than one per chunk. `payload` holds every chunk's bytes, one after another."""

    __slots__ = ("downs", "flow_ids", "lengths", "payload", "timestamps")

    def __init__(
        self,
        flow_ids: array[int],
        timestamps: array[float],
        lengths: array[int],
        downs: bytes,
        payload: bytes,
    ) -> None:
        self.flow_ids = flow_ids
        self.timestamps = timestamps
        self.lengths = lengths
        self.downs = downs
        """Each chunk's direction: 1 down (server to client), 0 up."""
        self.payload = payload

    def __len__(self) -> int:
        return len(self.lengths)

    def flow_id(self) -> int | None:
        """The one flow every chunk of the run belongs to, or None if there are several."""
        ids = self.flow_ids
        first = ids[0] if ids else None
        return first if first is not None and ids.count(first) == len(ids) else None

    def events(self) -> Iterator[FlowData]:
        """The run as one `FlowData` per chunk, in order."""
        payload = self.payload
        start = 0
        for flow_id, timestamp, length, down in zip(
            self.flow_ids, self.timestamps, self.lengths, self.downs, strict=True
        ):
            yield FlowData(flow_id, _DIRECTIONS[down], timestamp, payload[start : start + length])
            start += length


def encode_data(events: Sequence[FlowData]) -> bytes:
    """One data frame carrying `events` (at least one) as a `DataRun`."""
    return frame_data(events)[0]


def frame_data(events: Sequence[FlowData]) -> tuple[bytes, int]:
    """One data frame carrying `events` (at least one) as a `DataRun`, and the bytes of data
    it carries."""
    flow_ids, directions, timestamps, datas = zip(*events, strict=True)
    payload = b"".join(datas)
    body = b"".join(
        (
            _RUN_COUNT.pack(len(events)),
            array("Q", flow_ids).tobytes(),
            array("d", timestamps).tobytes(),
            array("I", map(len, datas)).tobytes(),
            bytes(map(len, directions)).translate(_DOWN_BY_LENGTH),
        )
    )
    return HEADER.pack(len(body) + len(payload), KIND_DATA) + body + payload, len(payload)


def decode_data(payload: bytes | memoryview) -> DataRun:
    """The `DataRun` a data frame's payload carries; ProtocolError if it is malformed."""
    view = memoryview(payload)
    if len(view) < _RUN_COUNT.size:
        raise ProtocolError("data frame too short")
    (count,) = _RUN_COUNT.unpack_from(view)
    at = _RUN_COUNT.size
    if count == 0 or len(view) - at < count * _RUN_BYTES_PER_CHUNK:
        raise ProtocolError(f"data frame too short for {count} chunks")
    flow_ids = _column("Q", view[at : at + 8 * count])
    at += 8 * count
    timestamps = _column("d", view[at : at + 8 * count])
    at += 8 * count
    lengths = _column("I", view[at : at + 4 * count])
    at += 4 * count
    downs = bytes(view[at : at + count])
    at += count
    if downs.translate(None, b"\x00\x01"):
        raise ProtocolError("data frame with a direction other than 0 (up) or 1 (down)")
    if sum(lengths) != len(view) - at:
        raise ProtocolError("data frame whose chunk lengths do not add up to its bytes")
    return DataRun(flow_ids, timestamps, lengths, downs, bytes(view[at:]))


def _column(typecode: str, data: memoryview) -> array[Any]:
    column = array(typecode)
    column.frombytes(data)  # array(typecode, view) would take the view's bytes one by one
    return column


class FrameReader:
    """Splits a byte stream into frames: feed what `recv` returned, get whole frames back."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes | memoryview) -> list[tuple[int, bytes]]:
        """The (kind, payload) of each frame completed by `data`; ProtocolError if malformed."""
        buffer = self._buffer
        buffer += data
        frames: list[tuple[int, bytes]] = []
        start = 0
        size = HEADER.size
        with memoryview(buffer) as view:  # payloads copied once, out of the buffer
            while len(buffer) - start >= size:
                length, kind = HEADER.unpack_from(buffer, start)
                if length > MAX_FRAME_BYTES or kind not in (KIND_JSON, KIND_DATA):
                    raise ProtocolError(f"bad frame header (kind {kind}, {length} bytes)")
                end = start + size + length
                if end > len(buffer):
                    break
                frames.append((kind, bytes(view[start + size : end])))
                start = end
        del buffer[:start]
        return frames


def decode_json(payload: bytes) -> dict[str, Any]:
    """The object a JSON frame holds; ProtocolError if it is not one."""
    try:
        message = json.loads(payload)
    except ValueError as exc:
        raise ProtocolError(f"bad JSON frame: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a JSON frame must hold an object")
    return message


def address_from_json(text: str) -> Address:
    if text.startswith("unix:"):
        return Address(host="", path=text[5:])
    return Address.parse(text)


def flow_to_json(flow: Flow) -> dict[str, Any]:
    """A flow as a JSON object: the fields of `flowtap run --json` (a contract), less `event`."""
    return {
        "flow": flow.id,
        "transport": str(flow.transport),
        "client": str(flow.client),
        "server": str(flow.server),
        "listener": str(flow.listener),
        "state": str(flow.state),
        "bytes_up": flow.bytes_up,
        "bytes_down": flow.bytes_down,
        "started_at": flow.started_at,
        "ended_at": flow.ended_at,
        "duration_s": flow.duration_s,
        "reason": None if flow.reason is None else str(flow.reason),
        "error": flow.error,
        "tls": None if flow.tls is None else flow.tls.as_dict(),
        "requested": None if flow.requested is None else str(flow.requested),
        "user": None if flow.requested is None else flow.requested.user,
    }


def _requested_from_json(text: object, user: object) -> Requested | None:
    if text is None:
        return None
    requested = Requested.from_text(str(text), None if user is None else str(user))
    if requested is None:
        raise ValueError(f"requested {text!r} is not HOST:PORT")
    return requested


def flow_from_json(data: dict[str, Any]) -> Flow:
    """The flow `flow_to_json` wrote; ProtocolError if a field is missing or malformed."""
    try:
        reason = data.get("reason")
        return Flow(
            id=int(data["flow"]),
            transport=Transport(data["transport"]),
            client=address_from_json(data["client"]),
            server=address_from_json(data["server"]),
            listener=address_from_json(data["listener"]),
            started_at=float(data["started_at"]),
            ended_at=None if data.get("ended_at") is None else float(data["ended_at"]),
            bytes_up=int(data.get("bytes_up", 0)),
            bytes_down=int(data.get("bytes_down", 0)),
            state=FlowState(data.get("state", "open")),
            reason=None if reason is None else CloseReason(reason),
            error=data.get("error"),
            tls=None if data.get("tls") is None else TlsFacts.from_dict(data["tls"]),
            requested=_requested_from_json(data.get("requested"), data.get("user")),
        )
    except (KeyError, TypeError, ValueError, FlowtapError) as exc:
        raise ProtocolError(f"malformed flow: {exc}") from None
