"""The conversation view: client and server chunks in two colours with relative timestamps."""

from __future__ import annotations

from collections.abc import Iterable

from rich.style import Style
from textual import events
from textual.cache import LRUCache

from flowtap.inspector.summary import escape_bytes

from ..store import CHUNK_MISSING, CHUNK_UP, FlowRecord, FlowStore
from .chunk_view import (
    DOWN_BODY,
    DOWN_HEADER,
    MISSING,
    UP_BODY,
    UP_HEADER,
    ChunkView,
    missing_line,
)


def header_line(is_up: bool, timestamp: float, started_at: float, size_bytes: int) -> str:
    """The line above a chunk: its time since the flow started, who sent it, its size."""
    arrow = "client →" if is_up else "← server"
    return f"+{timestamp - started_at:.3f}s {arrow} {size_bytes} B"


def body_lines(data: bytes, width: int) -> list[str]:
    """A chunk's bytes as lines at most `width` wide: printable bytes as is, others escaped,
    its own newlines kept as line ends and longer lines cut (an empty chunk is one blank line)."""
    text = escape_bytes(data, keep_newlines=True)
    if text.endswith("\n"):
        text = text[:-1]
    lines: list[str] = []
    for line in text.split("\n"):
        if len(line) <= width:
            lines.append(line)
        else:
            lines += [line[at : at + width] for at in range(0, len(line), width)]
    return lines


def _bytes_escaped_to(characters: int) -> bytes:
    return bytes(b for b in range(256) if b != 10 and len(escape_bytes(bytes([b]))) == characters)


# The bytes `escape_bytes` widens, by how many characters each takes (\t, \xNN); the newline
# ends a line after its own escape.
_WIDENED = tuple(
    (width, _bytes_escaped_to(width)) for width in (2, 3, 4) if _bytes_escaped_to(width)
)
_NEWLINE_WIDTH = len(escape_bytes(b"\n", keep_newlines=True)) - 1


def body_line_count(data: bytes, width: int) -> int:
    """`len(body_lines(data, width))`, counted from the bytes: escaping them all to count the
    lines of a binary chunk would cost the display far more than it shows."""
    if 4 * len(data) <= width:  # an escape is at most four characters (\xNN)
        return data.count(b"\n") + (not data.endswith(b"\n"))
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()  # nothing follows the last newline: no line of its own
    # Each line but the last (or every one, when the data ends with a newline) shows the
    # newline's escape at its end.
    unended = 0 if data.endswith(b"\n") else 1
    count = 0
    for index, line in enumerate(lines):
        characters = len(line)
        for escape_width, widened in _WIDENED:
            characters += (escape_width - 1) * (len(line) - len(line.translate(None, widened)))
        if index < len(lines) - unended:
            characters += _NEWLINE_WIDTH
        count += max(1, -(-characters // width))
    return count


class Conversation(ChunkView):
    """Shows a flow's kept bytes as a conversation: a header line per chunk, then its bytes
    wrapped to the view's width."""

    DEFAULT_CSS = """
    Conversation { overflow-x: hidden; }
    """

    def __init__(self, store: FlowStore, *, id: str | None = None) -> None:
        super().__init__(store, id=id)
        self._wrap_width = 0
        self._widest = 0  # no body line is wider (four characters a byte at most)
        self._bodies: LRUCache[int, list[str]] = LRUCache(64)

    def _reset_index(self) -> None:
        super()._reset_index()
        self._wrap_width = self.scrollable_content_region.width
        self._widest = 0
        self._bodies.clear()

    def _can_index(self) -> bool:
        return self._wrap_width > 0

    def _line_counts(self, record: FlowRecord, first: int, last: int) -> Iterable[int]:
        width = self._wrap_width
        short = self._short_lines(record, first, last)
        if short is not None:
            return short
        datas = self.store.chunk_datas(record, first, last)
        flags = record.chunks.flags[first:last]
        self._widest = max(self._widest, 4 * max(map(len, datas), default=0))
        return [
            1 if flag & CHUNK_MISSING else 1 + body_line_count(data, width)
            for data, flag in zip(datas, flags, strict=True)
        ]

    def _short_lines(self, record: FlowRecord, first: int, last: int) -> list[int] | None:
        """The line counts of chunks `first` to `last` (excluded) when each is a header and
        one body line (short chunks, no newline, none missing), found for them all at once;
        None otherwise."""
        chunks = record.chunks
        lengths = chunks.lengths[first:last]
        longest = max(lengths, default=0)
        if 4 * longest > self._wrap_width:  # an escape is at most four characters (\xNN)
            return None
        offsets = chunks.offsets
        start = offsets[first]
        span = offsets[last - 1] + lengths[-1] - start
        # Kept one after another (no other flow's bytes, nor missing ones, between them).
        if start < 0 or span != sum(lengths) or min(offsets[first:last]) < 0:
            return None
        if b"\n" in self.store.span_bytes(record, start, span):
            return None
        self._widest = max(self._widest, 4 * longest)
        return [2] * (last - first)

    def _chunk_line(self, record: FlowRecord, i: int, k: int) -> tuple[str, Style]:
        chunks = record.chunks
        flags = chunks.flags[i]
        is_up = bool(flags & CHUNK_UP)
        if k == 0:
            size, timestamp = chunks.lengths[i], chunks.timestamps[i]
            if flags & CHUNK_MISSING:
                since = timestamp - record.flow.started_at
                return f"+{since:.3f}s {missing_line(flags, size)}", MISSING
            header = header_line(is_up, timestamp, record.flow.started_at, size)
            return header, UP_HEADER if is_up else DOWN_HEADER
        body = self._bodies.get(i)
        if body is None:
            body = self._bodies[i] = body_lines(self.store.chunk_bytes(record, i), self._wrap_width)
        return body[k - 1] if k <= len(body) else "", UP_BODY if is_up else DOWN_BODY

    def on_resize(self, event: events.Resize) -> None:
        width, wrapped = self.scrollable_content_region.width, self._wrap_width
        if width != wrapped and (not wrapped or min(width, wrapped) < self._widest):
            self.reindex()  # laid out at last, or some line wraps differently
            return
        self._wrap_width = width
        super().on_resize(event)
