"""Sizing the scroll views of the TUI without laying the screen out again."""

from __future__ import annotations

from textual.geometry import Size
from textual.scroll_view import ScrollView


def set_virtual_size(view: ScrollView, size: Size) -> None:
    """Give `view` (whose scrollbar gutter CSS reserves) a new virtual size by updating its
    scrollbars alone, as Textual does for a resize without layout.

    Assigning `virtual_size` lays the whole screen out, then draws the scrollbars a frame
    later; with the gutter reserved, a new size changes no widget's place.
    """
    if size != view.virtual_size:
        view.set_reactive(ScrollView.virtual_size, size)
        view._scroll_update(size)
