"""The hex view: offset, hex bytes and ASCII, sixteen bytes a line, coloured by direction."""

from __future__ import annotations

from array import array
from collections.abc import Iterable

from rich.style import Style

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

_PRINTABLE = bytes(b if 32 <= b < 127 else ord(".") for b in range(256))
ROW_BYTES = 16
ROW_WIDTH = 78
"""The width of a full `hex_lines` row."""


def hex_lines(data: bytes, *, start_offset: int = 0, width: int = ROW_BYTES) -> list[str]:
    """`data` as `hexdump -C`-style lines: offset, hex bytes in two groups, ASCII."""
    lines = []
    half = width // 2
    for pos in range(0, len(data), width):
        row = data[pos : pos + width]
        left = row[:half].hex(" ")
        right = row[half:].hex(" ")
        hex_part = f"{left:<{half * 3 - 1}}  {right:<{half * 3 - 1}}"
        lines.append(
            f"{start_offset + pos:08x}  {hex_part}  |{row.translate(_PRINTABLE).decode()}|"
        )
    return lines


class HexView(ChunkView):
    """Shows a flow's kept bytes as a hex dump: a header line per chunk, then its rows; each
    direction counts its own offsets."""

    def __init__(self, store: FlowStore, *, id: str | None = None) -> None:
        super().__init__(store, id=id)
        self._offsets = array("q")
        self._sent = [0, 0]

    def _reset_index(self) -> None:
        super()._reset_index()
        self._offsets = array("q")
        self._sent = [0, 0]

    def _content_width(self) -> int:
        return ROW_WIDTH

    def _line_counts(self, record: FlowRecord, first: int, last: int) -> Iterable[int]:
        chunks = record.chunks
        lengths = chunks.lengths[first:last]
        offsets, sent = self._offsets, self._sent
        flags = chunks.flags[first:last]
        for flag, length in zip(flags, lengths, strict=True):
            # Missing bytes move the offset on too: offsets stay positions in the stream.
            side = flag & CHUNK_UP
            offsets.append(sent[side])
            sent[side] += length
        return [
            1 if flag & CHUNK_MISSING else 1 + (length + ROW_BYTES - 1) // ROW_BYTES
            for flag, length in zip(flags, lengths, strict=True)
        ]

    def _chunk_line(self, record: FlowRecord, i: int, k: int) -> tuple[str, Style]:
        chunks = record.chunks
        flags = chunks.flags[i]
        is_up = bool(flags & CHUNK_UP)
        if flags & CHUNK_MISSING:
            return missing_line(flags, chunks.lengths[i]), MISSING
        if k == 0:
            label = "client → server" if is_up else "server → client"
            return f"{label}  {chunks.lengths[i]} B", UP_HEADER if is_up else DOWN_HEADER
        start = (k - 1) * ROW_BYTES
        row = self.store.chunk_bytes(record, i, start, ROW_BYTES)
        line = hex_lines(row, start_offset=self._offsets[i] + start)
        return line[0] if line else "", UP_BODY if is_up else DOWN_BODY
