"""The base of the payload views: a flow's kept chunks as lines, drawn only where on screen.

A view keeps an index of where each chunk's lines start (eight bytes a chunk) and computes
line N from the stored chunk when it is drawn, so a flow of 100,000 chunks neither holds
its rendered text nor rebuilds it when a chunk arrives: `sync` indexes the new chunks only.
Like Textual's `Log` and toolong's `LogLines`, it is a `ScrollView` on the Line API.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Iterable
from itertools import accumulate
from typing import ClassVar

from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding, BindingType
from textual.cache import LRUCache
from textual.geometry import Offset, Size
from textual.scroll_view import ScrollView
from textual.selection import Selection
from textual.strip import Strip

from ..store import CHUNK_NOT_SHOWN, CHUNK_UP, FlowRecord, FlowStore
from .scrolling import set_virtual_size

UP_HEADER = Style.parse("bold cyan")
DOWN_HEADER = Style.parse("bold magenta")
UP_BODY = Style.parse("cyan")
DOWN_BODY = Style.parse("magenta")
MISSING = Style.parse("bold yellow")


def missing_line(flags: int, size_bytes: int) -> str:
    """The line that stands for bytes missing from a flow (`ChunkIndex` flags say why)."""
    who = "client" if flags & CHUNK_UP else "server"
    if flags & CHUNK_NOT_SHOWN:
        return f"!! {size_bytes} B the {who} sent not shown here (this viewer fell behind)"
    return f"!! {who}: gap of {size_bytes} B (not in the capture)"


class ChunkView(ScrollView, can_focus=True):
    """One flow's kept chunks as lines; follows the tail while scrolled to the bottom."""

    DEFAULT_CSS = """
    ChunkView { height: 1fr; padding: 0 1; scrollbar-gutter: stable; }
    """
    # A pager's keys are the scroll container's (its scroll actions, below, move at once);
    # these say what home and end mean here.
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("home", "scroll_home", "Top", show=False),
        Binding("end", "scroll_end", "Bottom (follow)", show=False),
    ]

    def __init__(self, store: FlowStore, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.store = store
        self.record: FlowRecord | None = None
        self.following = False
        """Whether new lines scroll into view: true while the view is at its bottom."""
        self._starts = array("q")
        self._line_count = 0
        self._top_chunk = 0
        self._placed = False
        self._base_style: Style | None = None
        self._strips: LRUCache[int, Strip] = LRUCache(1024)

    # -- what subclasses draw -------------------------------------------------------------

    def _line_counts(self, record: FlowRecord, first: int, last: int) -> Iterable[int]:
        """How many lines each of chunks `first` to `last` (excluded) takes, header included."""
        raise NotImplementedError

    def _chunk_line(self, record: FlowRecord, i: int, k: int) -> tuple[str, Style]:
        """Line `k` of chunk `i` and its style."""
        raise NotImplementedError

    def _content_width(self) -> int:
        """The widest line, for the horizontal scrollbar."""
        return self.scrollable_content_region.width

    def _can_index(self) -> bool:
        """Whether the line layout is known yet (a wrapping view waits for its width)."""
        return True

    def _reset_index(self) -> None:
        self._starts = array("q")
        self._line_count = 0
        self._strips.clear()

    # -- the index ------------------------------------------------------------------------

    @property
    def line_count(self) -> int:
        return self._line_count

    @property
    def chunk_count(self) -> int:
        """How many of the flow's chunks the view has indexed."""
        return len(self._starts)

    def show(self, record: FlowRecord | None, *, follow: bool, top_chunk: int = 0) -> None:
        """Show `record` from scratch: at its tail and following, or from chunk `top_chunk`."""
        self.record = record
        self._reset_index()
        self.following = follow
        self._top_chunk = top_chunk
        self.sync()
        self._place()

    def _place(self) -> None:
        """Scroll to where `show` asked, once the view has a size to scroll in."""
        self._placed = self._can_index() and self.scrollable_content_region.height > 0
        if not self._placed:
            return  # `on_resize` places it
        if self.following:
            self.scroll_end(animate=False, immediate=True, x_axis=False, force=True)
        else:
            top_chunk = self._top_chunk
            top = self._starts[top_chunk] if 0 < top_chunk < len(self._starts) else 0
            self.scroll_to(0, top, animate=False, immediate=True, force=True)
        self.refresh()

    def sync(self) -> int:
        """Index the chunks that arrived since the last call and draw them if in view;
        return how many there were."""
        record = self.record
        if record is None or not self._can_index():
            return 0
        starts = self._starts
        first = len(starts)
        count = len(record.chunks)
        if count == first:
            return 0
        old_total = self._line_count
        starts.extend(accumulate(self._line_counts(record, first, count), initial=old_total))
        total = starts.pop()  # where the next chunk will start
        self._line_count = total
        set_virtual_size(self, Size(self._content_width(), total))
        if self.following and not self.is_vertical_scrollbar_grabbed:
            self.scroll_end(animate=False, immediate=True, x_axis=False, force=True)
        else:
            self.refresh_lines(old_total, total - old_total)
        return count - first

    def reindex(self) -> None:
        """Rebuild the index (the line layout changed), keeping the chunk at the top in view."""
        record = self.record
        if record is None:
            return
        top = self.chunk_at(round(self.scroll_y)) if self._starts else self._top_chunk
        self.show(record, follow=self.following, top_chunk=top)

    def first_line(self, chunk: int) -> int:
        """The line chunk `chunk` starts on (its header)."""
        return self._starts[chunk]

    def chunk_at(self, line: int) -> int:
        """The index of the chunk that line `line` belongs to."""
        return max(0, bisect_right(self._starts, line) - 1)

    # -- drawing --------------------------------------------------------------------------

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._strips.clear()
        self._base_style = None

    @property
    def _base(self) -> Style:
        # Textual computes `rich_style` from the styles of every ancestor: once a style change.
        if self._base_style is None:
            self._base_style = self.rich_style
        return self._base_style

    def line_text(self, line: int) -> str:
        """The text of line `line` of the view (empty past the end)."""
        record = self.record
        if record is None or not 0 <= line < self._line_count:
            return ""
        i = self.chunk_at(line)
        return self._chunk_line(record, i, line - self._starts[i])[0]

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        line = scroll_y + y
        width = self.scrollable_content_region.width
        base = self._base
        record = self.record
        if record is None or line >= self._line_count:
            return Strip.blank(width, base)
        selection = self.text_selection
        span = None if selection is None else selection.get_span(line)
        strip = None if span is not None else self._strips.get(line)
        if strip is None:
            i = self.chunk_at(line)
            text, style = self._chunk_line(record, i, line - self._starts[i])
            if span is None:
                strip = self._strips[line] = Strip([Segment(text, base + style)], len(text))
            else:
                start, end = span
                end = len(text) if end < 0 else min(end, len(text))
                start = min(start, end)
                selected = base + style + self.screen.get_component_rich_style("screen--selection")
                segments = [
                    Segment(text[:start], base + style),
                    Segment(text[start:end], selected),
                    Segment(text[end:], base + style),
                ]
                strip = Strip([s for s in segments if s.text], len(text))
        # Offsets tell Textual which character the pointer is on, for selecting with it.
        return strip.crop_extend(scroll_x, scroll_x + width, base).apply_offsets(scroll_x, line)

    def get_selection(self, selection: Selection) -> tuple[str, str] | None:
        """The selected text, built from the selected lines only."""
        if not self._line_count:
            return None
        first = 0 if selection.start is None else selection.start.y
        last = self._line_count - 1
        if selection.end is not None:
            last = min(last, selection.end.y)
        text = "\n".join(self.line_text(line) for line in range(first, last + 1))
        shift = Offset(0, first)
        shifted = Selection(
            None if selection.start is None else selection.start - shift,
            None if selection.end is None else selection.end - shift,
        )
        return shifted.extract(text), "\n"

    def selection_updated(self, selection: Selection | None) -> None:
        self.refresh()

    # -- following ------------------------------------------------------------------------
    # The view scrolls itself with `force`: right after the index grows, Textual has not yet
    # laid out the scrollbar that would otherwise allow it.

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        self.following = new_value >= self.max_scroll_y

    def on_resize(self, event: events.Resize) -> None:
        if not self._placed:
            self._place()
        elif self.following:
            self.scroll_end(animate=False, immediate=True, x_axis=False, force=True)

    # The container's scroll actions without animation, so that reaching the end is known at
    # once.

    def action_scroll_up(self) -> None:
        self._scroll_lines(-1)

    def action_scroll_down(self) -> None:
        self._scroll_lines(1)

    def action_page_up(self) -> None:
        self._scroll_lines(-self.scrollable_content_region.height)

    def action_page_down(self) -> None:
        self._scroll_lines(self.scrollable_content_region.height)

    def _scroll_lines(self, lines: int) -> None:
        self.scroll_to(y=self.scroll_y + lines, animate=False, immediate=True)

    def action_scroll_home(self) -> None:
        self.scroll_to(0, 0, animate=False, immediate=True)

    def action_scroll_end(self) -> None:
        self.following = True
        self.scroll_end(animate=False, immediate=True, x_axis=False, force=True)
