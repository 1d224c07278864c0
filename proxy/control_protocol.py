"""The control socket's wire format: frames of JSON messages and raw data, no I/O.

Every frame is a 5-byte header (payload length, big-endian u32; kind, u8) and its payload.
A `JSON` frame holds one UTF-8 JSON object: the server's `hello`, a client's request
(`{"id": N, "cmd": ...}`), the reply to it (`{"type": "reply", "id": N, "ok": ...}`) or a
pushed event (`{"type": "opened" | "updated" | "closed" | "not-shown" | "counts" | "bye", ...}`). A
`DATA` frame carries one `FlowData`: flow id (u64), direction (u8, 0 up, 1 down), time
(f64 Unix seconds), then the bytes as they crossed the relay, so payloads are never
re-encoded. The server speaks first with its `hello` and `version`; a later version adds
commands and event types, which clients ignore when they do not know them.
"""

from __future__ import annotations

import json
import struct
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

VERSION = 1
"""The protocol version a server announces in its hello; a client refuses another major one."""

HEADER = struct.Struct("!IB")
DATA_HEADER = struct.Struct("!IBQBd")
"""A data frame's header and the fixed part of its payload, packed at once."""
DATA_FIXED = DATA_HEADER.size - HEADER.size

KIND_JSON = 1
KIND_DATA = 2

MAX_FRAME_BYTES = 16 * 1024 * 1024
"""A frame announcing more is a protocol error: the peer is not a flowtap control client."""

_DIRECTIONS = (Direction.UP, Direction.DOWN)


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


def encode_data(event: FlowData) -> bytes:
    """One data frame: `DATA_HEADER`, then the event's bytes as they are."""
    header = DATA_HEADER.pack(
        DATA_FIXED + len(event.data),
        KIND_DATA,
        event.flow_id,
        event.direction is Direction.DOWN,
        event.timestamp,
    )
    return header + event.data


def decode_data(payload: bytes | memoryview) -> FlowData:
    """The `FlowData` a data frame's payload carries."""
    if len(payload) < DATA_FIXED:
        raise ProtocolError("data frame too short")
    flow_id, direction, timestamp = struct.unpack_from("!QBd", payload)
    if direction > 1:
        raise ProtocolError(f"data frame with direction {direction}")
    return FlowData(flow_id, _DIRECTIONS[direction], timestamp, bytes(payload[DATA_FIXED:]))


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
