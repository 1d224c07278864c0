"""Messages the TUI's widgets and loaders send each other."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message


@dataclass
class FlowSelected(Message):
    """The cursor of the flow table rests on `flow_id` (None when the table is empty)."""

    flow_id: int | None

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, FlowSelected)


@dataclass
class FilterChanged(Message):
    """The user typed a filter expression (empty: every flow); `submitted` on enter."""

    text: str
    submitted: bool = False

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, FilterChanged)


class FilterClosed(Message):
    """The user left the filter box; focus goes back to the flow table."""


@dataclass
class SortChanged(Message):
    """The flow table is now sorted by `column`, descending when `reverse`."""

    column: str
    reverse: bool


@dataclass
class LoadProgress(Message):
    """Loading a capture file has read `done_bytes` of `total_bytes`."""

    done_bytes: int
    total_bytes: int

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, LoadProgress)


@dataclass
class LoadFinished(Message):
    """Loading a capture file ended, with the error message if it failed."""

    error: str | None = None
