"""The detail pane: one flow's facts, protocol summary, and its bytes as text or hex."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from flowtap.inspector.log import human_bytes
from flowtap.proxy.flow import TlsFacts

from ..store import FlowRecord, FlowStore
from .chunk_view import ChunkView
from .conversation import Conversation
from .hex_view import HexView


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
    if flow.tls is not None:
        lines += tls_lines(flow.tls)
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


def tls_lines(tls: TlsFacts) -> list[str]:
    """The facts of a flow's TLS: what was negotiated, the upstream's certificate, how it was
    checked (or that it was not: `--upstream-insecure`)."""
    if tls.mode == "not-tls":
        return [f"tls: not TLS ({tls.note})" if tls.note else "tls: not TLS"]
    head = [f"tls {tls.mode}"]
    for label, value in (
        ("sni", tls.sni),
        ("alpn", tls.alpn),
        ("", tls.version),
        ("", tls.cipher),
        ("", tls.client_leg()),
    ):
        if value:
            head.append(f"{label} {value}" if label else value)
    if tls.mode == "intercept" and not tls.sni:
        head.append("(no sni)")
    lines = ["  ".join(head)]
    if tls.mode == "passthrough" and tls.offered_alpn:
        lines.append(f"client offered alpn: {', '.join(tls.offered_alpn)}")
    if tls.upstream_subject:
        cert = f"upstream certificate: {tls.upstream_subject}"
        if tls.upstream_issuer:
            cert += f", issued by {tls.upstream_issuer}"
        if tls.upstream_not_after:
            cert += f", expires {tls.upstream_not_after}"
        lines.append(cert)
    if tls.verification:
        lines.append(f"upstream verification: {tls.verification}")
    if tls.note:
        lines.append(f"tls note: {tls.note}")
    return lines


class FlowDetail(Vertical):
    """Shows the selected flow: facts and summary above, conversation or hex dump below."""

    DEFAULT_CSS = """
    FlowDetail { height: 1fr; border-top: solid $primary; }
    FlowDetail > #facts { height: auto; max-height: 12; padding: 0 1; color: $text; }
    FlowDetail HexView { display: none; }
    FlowDetail.-hex HexView { display: block; }
    FlowDetail.-hex Conversation { display: none; }
    """

    def __init__(
        self, store: FlowStore, *, id: str | None = None, follow_live: bool = True
    ) -> None:
        super().__init__(id=id)
        self.store = store
        self.follow_live = follow_live
        """Whether a live flow opens at its tail, following (flows read from a capture look
        live until the whole file is read, yet open at their start)."""
        self.flow_id: int | None = None
        self.show_hex = False
        # Built here so that a selection arriving before mounting has somewhere to go.
        self.facts = Static("No flow selected.", id="facts")
        self._facts_shown = ""
        self.conversation = Conversation(store, id="conversation")
        self.hex_view = HexView(store, id="hex")

    def compose(self) -> ComposeResult:
        yield self.facts
        yield self.conversation
        yield self.hex_view

    @property
    def payload(self) -> ChunkView:
        """The view on screen: the conversation or the hex dump."""
        return self.hex_view if self.show_hex else self.conversation

    def show_flow(self, flow_id: int | None) -> None:
        """Show `flow_id` (None: nothing): another flow from scratch, following its tail
        while it is live; the flow already shown by drawing only the chunks that arrived."""
        record = self.store.get(flow_id) if flow_id is not None else None
        payload = self.payload
        if record is None:
            self.flow_id = None
            self.facts.update("No flow selected.")
            self._facts_shown = ""
            payload.show(None, follow=False)
            return
        text = facts_text(record)
        if text != self._facts_shown:
            # A live flow's counts change its facts a few times a second: the screen is laid
            # out again (a pass over every widget) only if that may change their height.
            width = self.facts.content_region.width
            lines = (*text.split("\n"), *self._facts_shown.split("\n"))
            same_height = text.count("\n") == self._facts_shown.count("\n") and all(
                len(line) <= width for line in lines
            )
            self.facts.update(Text(text), layout=not same_height)
            self._facts_shown = text
        if flow_id == self.flow_id and payload.record is record:
            payload.sync()
            return
        self.flow_id = flow_id
        payload.show(record, follow=self.follow_live and _is_live(record))

    def toggle_hex(self) -> None:
        """Switch between the conversation and the hex dump, at the same chunk."""
        shown = self.payload
        self.show_hex = not self.show_hex
        self.set_class(self.show_hex, "-hex")
        payload = self.payload
        top = shown.chunk_at(round(shown.scroll_y))
        payload.show(shown.record, follow=shown.following, top_chunk=top)
        shown.show(None, follow=False)  # the hidden view holds no index
        if shown.has_focus:
            payload.focus()


def _is_live(record: FlowRecord) -> bool:
    return not record.is_closed and not record.past_capture_end
