"""The flow table: a virtual list of flows that renders only the rows on screen.

Textual's DataTable keeps a renderable per cell and costs ~0.3 ms a row to add, too slow for
a thousand new flows a second; this table keeps only a list of flow ids in display order
and formats a row from the store when it is drawn, so 100,000 flows scroll smoothly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from rich.cells import set_cell_size
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip

from flowtap.inspector.flow_filter import FlowFacts, FlowFilter
from flowtap.inspector.log import human_bytes
from flowtap.proxy.flow import Flow

from ..messages import FlowSelected, SortChanged
from ..store import FlowRecord, FlowStore
from .scrolling import set_virtual_size


def _duration(record: FlowRecord) -> str:
    flow = record.flow
    end = flow.ended_at if flow.ended_at is not None else time.time()
    return f"{max(0.0, end - flow.started_at):.3f}s"


def _duration_key(record: FlowRecord) -> float:
    flow = record.flow
    end = flow.ended_at if flow.ended_at is not None else time.time()
    return end - flow.started_at


def _clock(timestamp: float) -> str:
    return (
        time.strftime("%H:%M:%S", time.localtime(timestamp)) + f".{int(timestamp % 1 * 1000):03d}"
    )


LOCK = "🔒"
"""The mark before the server of a flow whose TLS flowtap intercepted (its bytes are plaintext)."""


def _server(flow: Flow) -> str:
    """What a proxy client asked for (a name is what people know a server by), else the
    server's address."""
    if flow.requested is not None and flow.requested.host != flow.server.host:
        return flow.requested.label
    return str(flow.server)


def _server_cell(flow: Flow) -> str:
    """The server column: `_server`, after a lock when flowtap decrypted the flow."""
    if flow.tls is not None and flow.tls.mode == "intercept":
        return f"{LOCK}{_server(flow)}"
    return _server(flow)


@dataclass(frozen=True)
class Column:
    """One column: its title, width in cells, how to show a flow and how to sort by it."""

    key: str
    title: str
    width: int
    text: Callable[[FlowRecord], str]
    sort_key: Callable[[FlowRecord], Any]
    right: bool = False


COLUMNS: tuple[Column, ...] = (
    Column("id", "#", 6, lambda r: str(r.id), lambda r: r.id, right=True),
    Column("start", "start", 12, lambda r: _clock(r.flow.started_at), lambda r: r.flow.started_at),
    Column("client", "client", 21, lambda r: str(r.flow.client), lambda r: str(r.flow.client)),
    Column("server", "server", 21, lambda r: _server_cell(r.flow), lambda r: _server(r.flow)),
    Column("transport", "tp", 3, lambda r: str(r.flow.transport), lambda r: str(r.flow.transport)),
    Column("state", "state", 16, lambda r: r.state_text, lambda r: r.state_text),
    Column("up", "↑ bytes", 9, lambda r: human_bytes(r.bytes_up), lambda r: r.bytes_up, True),
    Column("down", "↓ bytes", 9, lambda r: human_bytes(r.bytes_down), lambda r: r.bytes_down, True),
    Column("duration", "duration", 9, _duration, _duration_key, right=True),
    Column("protocol", "proto", 6, lambda r: r.summary.protocol, lambda r: r.summary.protocol),
    Column("summary", "summary", 0, lambda r: r.summary.headline, lambda r: r.summary.headline),
)
COLUMN_KEYS = tuple(c.key for c in COLUMNS)
_FIXED_WIDTH = sum(c.width + 1 for c in COLUMNS)
_MIN_SUMMARY = 24
_STATE_CLASS = {
    "connecting": "open",
    "open": "open",
    "half-closed": "open",
    "client-reset": "reset",
    "server-reset": "reset",
    "killed": "reset",
    "upstream-refused": "reset",
    "upstream-timeout": "reset",
    "error": "reset",
    "handshake-error": "reset",
    "handshake-timeout": "reset",
    "denied": "reset",
    "unresolvable": "reset",
}


class FlowTable(ScrollView, can_focus=True):
    """Flows of a `FlowStore` in a sorted, filtered, scrollable list with a cursor."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "cursor(-1)", "Up", show=False),
        Binding("down", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "jump(0)", "First", show=False),
        Binding("end", "jump(-1)", "Last", show=False),
    ]
    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "flow-table--header",
        "flow-table--cursor",
        "flow-table--open",
        "flow-table--closed",
        "flow-table--reset",
    }
    DEFAULT_CSS = """
    FlowTable {
        height: 1fr;
        scrollbar-gutter: stable;
    }
    FlowTable > .flow-table--header { text-style: bold; background: $panel; }
    FlowTable > .flow-table--cursor { background: $accent 60%; }
    FlowTable:focus > .flow-table--cursor { background: $accent; }
    FlowTable > .flow-table--open { color: $success; }
    FlowTable > .flow-table--closed { color: $text-muted; }
    FlowTable > .flow-table--reset { color: $error; }
    """

    def __init__(self, store: FlowStore, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.store = store
        self.ids: list[int] = []
        self.cursor = -1
        self.sort_column = "id"
        self.sort_reverse = False
        self.follow = False
        self.flow_filter: FlowFilter | None = None
        self._needs_sort = False
        self._last_sort = 0.0
        self._last_redraw = 0.0
        self._rows_stale = False
        self._last_size_sync = 0.0
        self._shown: set[int] | None = None  # the shown ids as a set, kept while filtering
        self._selected: int | None = None
        # Textual works a style out from the styles of every ancestor (a millisecond here):
        # each is kept until the styles change (see `_style`).
        self._styles: dict[str, Style] = {}

    # -- what the table shows ---------------------------------------------------------------

    @property
    def selected_id(self) -> int | None:
        return self.ids[self.cursor] if 0 <= self.cursor < len(self.ids) else None

    def _sorted_by_arrival(self) -> bool:
        return self.sort_column in ("id", "start") and not self.sort_reverse

    def _matches(self, record: FlowRecord) -> bool:
        flow_filter = self.flow_filter
        if flow_filter is None:
            return True
        flow = record.flow
        # A live flow's duration so far, so that `duration > 2s` finds long-lived ones.
        duration = flow.duration_s if flow.ended_at is not None else time.time() - flow.started_at
        facts = FlowFacts(flow, record.bytes_up, record.bytes_down, duration, record.summary)
        chunks = ((c.direction, c.data) for c in self.store.chunks(record.id))
        return flow_filter.matches(facts, chunks)

    def add_flows(self, flow_ids: Iterable[int]) -> None:
        """Show new flows (if they pass the filter), keeping the sort order."""
        records = self.store.records
        added = [i for i in flow_ids if i in records and self._matches(records[i])]
        if not added:
            return
        first_new = len(self.ids)
        self.ids.extend(added)
        if self._shown is not None:
            self._shown.update(added)
        if not self._sorted_by_arrival():
            self._needs_sort = True
            self._rows_changed()
            return
        # Rows appended below the screen need no redraw, only a longer scrollbar.
        self._rows_changed(redraw=self.follow or first_new < self._bottom_index())

    def update_flows(self, flow_ids: Iterable[int]) -> None:
        """Flows changed (bytes, state, summary): refilter them and redraw."""
        flow_ids = set(flow_ids)
        shown = self._shown
        if shown is not None:
            records = self.store.records
            for flow_id in flow_ids:
                record = records.get(flow_id)
                if record is not None and (flow_id in shown) != self._matches(record):
                    self.rebuild()
                    return
        if not self._sorted_by_arrival():
            self._needs_sort = True
        elif not flow_ids.isdisjoint(self._visible_ids()):
            self._rows_stale = True  # `tick` redraws them

    def _top_index(self) -> int:
        return round(self.scroll_y)

    def _bottom_index(self) -> int:
        """One past the last row index the screen can show."""
        return self._top_index() + max(1, self.scrollable_content_region.height - 1)

    def _visible_ids(self) -> list[int]:
        return self.ids[self._top_index() : self._bottom_index()]

    def remove_flows(self, flow_ids: Iterable[int]) -> None:
        gone = set(flow_ids)
        if gone:
            self.ids = [i for i in self.ids if i not in gone]
            if self._shown is not None:
                self._shown -= gone
            self._rows_changed()

    def rebuild(self) -> None:
        """Recompute the shown flows from the store, the filter and the sort order."""
        records = self.store.records
        if self.flow_filter is None:
            self.ids = list(records)
            self._shown = None
        else:
            self.ids = [i for i, r in records.items() if self._matches(r)]
            self._shown = set(self.ids)
        self._needs_sort = not self._sorted_by_arrival()
        self._sort_now()
        self._rows_changed()

    def set_filter(self, flow_filter: FlowFilter | None) -> None:
        self.flow_filter = flow_filter
        self.rebuild()

    def sort_by(self, column: str, reverse: bool | None = None) -> None:
        """Sort by the column named `column`; `reverse` None flips when already sorted by it."""
        if column not in COLUMN_KEYS:
            raise ValueError(f"no column {column!r}")
        if reverse is None:
            reverse = not self.sort_reverse if column == self.sort_column else False
        self.sort_column = column
        self.sort_reverse = reverse
        self._needs_sort = True
        self._sort_now()
        self._rows_changed()
        self.post_message(SortChanged(column, reverse))

    def tick(self) -> None:
        """Draw a frame (the app calls this a few times a second): re-sort rows whose keys
        changed (at most twice a second for large tables), redraw the rows of flows that
        changed, and once a second those of open flows, whose durations move on."""
        now = time.monotonic()
        if self._needs_sort:
            interval = 0.5 if len(self.ids) > 5000 else 0.0
            if now - self._last_sort >= interval:
                self._sort_now()
                self._rows_changed()
        if now - self._last_size_sync >= 0.5:
            self._sync_size(now=now)
        if self._rows_stale:
            self._rows_stale = False
            self._last_redraw = now
            self.refresh()
        elif now - self._last_redraw >= 1.0:
            self._last_redraw = now
            records = self.store.records
            if any(not records[i].is_closed for i in self._visible_ids() if i in records):
                self.refresh()  # open flows' durations move on

    def _sort_now(self) -> None:
        self._last_sort = time.monotonic()
        if not self._needs_sort:
            return
        self._needs_sort = False
        column = next(c for c in COLUMNS if c.key == self.sort_column)
        records = self.store.records
        key = column.sort_key
        self.ids.sort(key=lambda i: key(records[i]), reverse=self.sort_reverse)

    def _sync_size(self, *, now: float | None = None) -> None:
        """Give the scrollbar the row count (callers throttle this to twice a second)."""
        set_virtual_size(self, Size(_FIXED_WIDTH + _MIN_SUMMARY, len(self.ids) + 1))
        self._last_size_sync = time.monotonic() if now is None else now

    def _rows_changed(self, *, redraw: bool = True) -> None:
        count = len(self.ids)
        if redraw or time.monotonic() - self._last_size_sync >= 0.5:
            self._sync_size()
        if self.follow and count:
            self.cursor = count - 1
        elif self._selected is not None:
            if self.selected_id != self._selected:
                try:
                    self.cursor = self.ids.index(self._selected)
                except ValueError:
                    self.cursor = min(self.cursor, count - 1)
        elif count:
            self.cursor = 0
        else:
            self.cursor = -1
        self._cursor_moved()
        if redraw:
            self.refresh()

    # -- cursor ----------------------------------------------------------------------------

    def _cursor_moved(self) -> None:
        if self.cursor >= 0:
            self._scroll_to_cursor()
        selected = self.selected_id
        if selected != self._selected:
            self._selected = selected
            self.post_message(FlowSelected(selected))

    def _scroll_to_cursor(self) -> None:
        if self.cursor + 2 > self.virtual_size.height:
            self._sync_size()  # the scrollbar must know the row before we can scroll to it
        rows_visible = max(1, self.scrollable_content_region.height - 1)
        top = round(self.scroll_y)
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False, immediate=True)
        elif self.cursor >= top + rows_visible:
            self.scroll_to(y=self.cursor - rows_visible + 1, animate=False, immediate=True)

    def move_cursor(self, index: int) -> None:
        if not self.ids:
            return
        self.cursor = max(0, min(len(self.ids) - 1, index))
        self.follow = self.follow and self.cursor == len(self.ids) - 1
        self._cursor_moved()
        self.refresh()

    def select_flow(self, flow_id: int) -> bool:
        """Put the cursor on `flow_id` if it is shown."""
        try:
            index = self.ids.index(flow_id)
        except ValueError:
            return False
        self.move_cursor(index)
        return True

    def action_cursor(self, delta: int) -> None:
        self.move_cursor(self.cursor + delta)

    def action_page(self, direction: int) -> None:
        self.move_cursor(
            self.cursor + direction * max(1, self.scrollable_content_region.height - 2)
        )

    def action_jump(self, index: int) -> None:
        self.move_cursor(index if index >= 0 else len(self.ids) - 1)

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None:
            return
        if offset.y == 0:
            column = self._column_at(offset.x + round(self.scroll_x))
            if column is not None:
                self.sort_by(column)
            return
        self.move_cursor(round(self.scroll_y) + offset.y - 1)

    def _column_at(self, x: int) -> str | None:
        left = 0
        for column in COLUMNS:
            width = column.width or 10_000
            if left <= x < left + width + 1:
                return column.key
            left += width + 1
        return None

    # -- drawing ---------------------------------------------------------------------------

    def _summary_width(self) -> int:
        return max(_MIN_SUMMARY, self.scrollable_content_region.width - _FIXED_WIDTH)

    def _cells(self, texts: list[str]) -> str:
        parts = []
        for column, text in zip(COLUMNS, texts, strict=True):
            width = column.width or self._summary_width()
            if column.right:
                text = text[-width:].rjust(width)
            parts.append(set_cell_size(text, width))
        return " ".join(parts)

    def header_text(self) -> str:
        titles = []
        for column in COLUMNS:
            title = column.title
            if column.key == self.sort_column:
                title += " ▼" if self.sort_reverse else " ▲"
            titles.append(title)
        return self._cells(titles)

    def row_text(self, record: FlowRecord) -> str:
        return self._cells([column.text(record) for column in COLUMNS])

    def _style(self, key: str) -> Style:
        """The table's own style (`key` ""), its header's ("header"), or that of rows in a
        state class ("open", ...), followed by " cursor" for the row with the cursor."""
        style = self._styles.get(key)
        if style is None:
            if key == "header":
                style = self.get_component_rich_style("flow-table--header")
            else:
                style = self.rich_style
                for part in key.split():
                    style += self.get_component_rich_style(f"flow-table--{part}")
            self._styles[key] = style
        return style

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        width = self.scrollable_content_region.width
        if y == 0:
            style = self._style("header")
            text = self.header_text()
        else:
            index = scroll_y + y - 1
            record = self.store.records.get(self.ids[index]) if index < len(self.ids) else None
            if record is None:
                return Strip.blank(width, self._style(""))
            text = self.row_text(record)
            state = _STATE_CLASS.get(record.state_text, "closed")
            style = self._style(f"{state} cursor" if index == self.cursor else state)
        line = set_cell_size(text[scroll_x:], width) if width > 0 else ""
        return Strip([Segment(line, style)], width)

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._styles.clear()
        self.refresh()

    def _on_focus(self, event: events.Focus) -> None:
        super()._on_focus(event)
        self._styles.clear()  # the cursor's colour says whether the table has focus

    def _on_blur(self, event: events.Blur) -> None:
        super()._on_blur(event)
        self._styles.clear()
