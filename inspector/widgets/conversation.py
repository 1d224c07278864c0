"""The conversation view: client and server chunks in two colours with relative timestamps."""

from __future__ import annotations

from collections.abc import Iterable

from rich.text import Text
from textual.widgets import Static

from flowtap.proxy.flow import Direction

from ..store import Chunk
from ..summary import escape_bytes


def conversation_text(chunks: Iterable[Chunk], started_at: float) -> Text:
    """The chunks as text: a header line per chunk, printable bytes as is, others escaped."""
    text = Text(no_wrap=False)
    for chunk in chunks:
        is_up = chunk.direction is Direction.UP
        arrow = "client →" if is_up else "← server"
        text.append(
            f"+{chunk.timestamp - started_at:.3f}s {arrow} {len(chunk.data)} B\n",
            style="bold cyan" if is_up else "bold magenta",
        )
        body = escape_bytes(chunk.data, keep_newlines=True)
        if not body.endswith("\n"):
            body += "\n"
        text.append(body, style="cyan" if is_up else "magenta")
    return text


class Conversation(Static):
    """Shows a flow's kept bytes as a conversation."""

    def show(self, chunks: Iterable[Chunk], started_at: float) -> None:
        self.update(conversation_text(chunks, started_at))
