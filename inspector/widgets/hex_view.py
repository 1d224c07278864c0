"""The hex view: offset, hex bytes and ASCII, sixteen bytes a line, coloured by direction."""

from __future__ import annotations

from collections.abc import Iterable

from rich.text import Text
from textual.widgets import Static

from flowtap.proxy.flow import Direction

from ..store import Chunk

_PRINTABLE = bytes(b if 32 <= b < 127 else ord(".") for b in range(256))


def hex_lines(data: bytes, *, start_offset: int = 0, width: int = 16) -> list[str]:
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


def hex_text(chunks: Iterable[Chunk]) -> Text:
    """The hex dump of a flow's chunks; each direction counts its own offsets."""
    text = Text(no_wrap=True)
    offsets = {Direction.UP: 0, Direction.DOWN: 0}
    for chunk in chunks:
        is_up = chunk.direction is Direction.UP
        style = "bold cyan" if is_up else "bold magenta"
        label = "client → server" if is_up else "server → client"
        text.append(f"{label}  {len(chunk.data)} B\n", style=style)
        body = "\n".join(hex_lines(chunk.data, start_offset=offsets[chunk.direction]))
        text.append(body + "\n", style="cyan" if is_up else "magenta")
        offsets[chunk.direction] += len(chunk.data)
    return text


class HexView(Static):
    """Shows a flow's kept bytes as a hex dump."""

    def show(self, chunks: Iterable[Chunk]) -> None:
        self.update(hex_text(chunks))
