"""The detail pane: one flow's facts, protocol summary, and its bytes as text or hex."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Static

from ..log import human_bytes
from ..store import FlowRecord, FlowStore
from .conversation import Conversation
from .hex_view import HexView

DISPLAY_LIMIT_BYTES = 64 * 1024
"""How many bytes of a flow the detail pane draws; export the flow to see them all."""


def facts_text(record: FlowRecord) -> str:
    """The detail pane's heading lines for one flow."""
    flow = record.flow
    lines = [
        f"#{flow.id} {flow.transport} {flow.client} → {flow.server}  {record.state_text}  "
        f"↑ {human_bytes(record.bytes_up)}  ↓ {human_bytes(record.bytes_down)}"
        + (f"  {flow.duration_s:.3f}s" if flow.duration_s is not None else "")
    ]
    if flow.error:
        lines.append(f"error: {flow.error}")
    if record.truncated_bytes:
        lines.append(f"{human_bytes(record.truncated_bytes)} not kept for display")
    if record.not_shown:
        lines.append(f"{record.not_shown} bytes not shown (this viewer fell behind the relay)")
    if record.gaps:
        lines.append(f"{record.gaps} gap(s) in the capture")
    summary = record.summary
    if summary.protocol:
        lines.append(f"[{summary.protocol}] {summary.headline}")
        lines += list(summary.details[:12])
        if len(summary.details) > 12:
            lines.append(f"… {len(summary.details) - 12} more")
    return "\n".join(lines)


class FlowDetail(Vertical):
    """Shows the selected flow: facts and summary above, conversation or hex dump below."""

    DEFAULT_CSS = """
    FlowDetail { height: 1fr; border-top: solid $primary; }
    FlowDetail > #facts { height: auto; max-height: 12; padding: 0 1; color: $text; }
    FlowDetail > #payload { height: 1fr; padding: 0 1; }
    FlowDetail HexView { display: none; }
    FlowDetail.-hex HexView { display: block; }
    FlowDetail.-hex Conversation { display: none; }
    """

    def __init__(self, store: FlowStore, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.store = store
        self.flow_id: int | None = None
        self.show_hex = False
        self._drawn: tuple[object, ...] | None = None
        # Built here so that a selection arriving before mounting has somewhere to go.
        self.facts = Static("No flow selected.", id="facts")
        self.payload = VerticalScroll(id="payload")
        self.conversation = Conversation(id="conversation")
        self.hex_view = HexView(id="hex")

    def compose(self) -> ComposeResult:
        yield self.facts
        with self.payload:
            yield self.conversation
            yield self.hex_view

    def show_flow(self, flow_id: int | None) -> None:
        """Show `flow_id` (None: nothing); redraws only what changed since the last call."""
        record = self.store.get(flow_id) if flow_id is not None else None
        facts = self.facts
        if record is None:
            self.flow_id = None
            self._drawn = None
            facts.update("No flow selected.")
            self.conversation.update("")
            self.hex_view.update("")
            return
        if flow_id != self.flow_id:
            self.payload.scroll_home(animate=False)
        self.flow_id = flow_id
        facts.update(Text(facts_text(record)))
        shown = min(record.kept_up + record.kept_down, DISPLAY_LIMIT_BYTES)
        drawn = (flow_id, shown, self.show_hex)
        if drawn == self._drawn:
            return
        self._drawn = drawn
        chunks = list(self.store.chunks(record.id, limit_bytes=DISPLAY_LIMIT_BYTES))
        if self.show_hex:
            self.hex_view.show(chunks)
        else:
            self.conversation.show(chunks, record.flow.started_at)

    def toggle_hex(self) -> None:
        self.show_hex = not self.show_hex
        self.set_class(self.show_hex, "-hex")
        self._drawn = None
        self.show_flow(self.flow_id)
