"""The filter box: an input that narrows the flow table, shown on `/`, hidden on escape."""

from __future__ import annotations

from typing import ClassVar

from textual import on
from textual.binding import Binding, BindingType
from textual.widgets import Input

from ..messages import FilterChanged, FilterClosed


class FilterBox(Input):
    """Posts `FilterChanged` as the user types; escape hides it and gives focus back."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "close", "Close filter")]
    DEFAULT_CSS = """
    FilterBox { display: none; height: 3; }
    FilterBox.-shown { display: block; }
    FilterBox.-invalid { border: tall $error; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(
            placeholder='filter: tcp port 6379, host 10.0.0.1, bytes > 1M, contains "GET /", words',
            id=id,
        )

    def mark_invalid(self, problem: str | None) -> None:
        """Show why the expression does not parse under the box (None: it does)."""
        self.set_class(problem is not None, "-invalid")
        self.tooltip = problem
        self.border_subtitle = problem

    def open(self) -> None:
        self.add_class("-shown")
        self.focus()

    def action_close(self) -> None:
        if not self.value:
            self.remove_class("-shown")
        self.post_message(FilterClosed())

    @on(Input.Changed)
    def _changed(self, event: Input.Changed) -> None:
        event.stop()
        self.post_message(FilterChanged(event.value))

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.post_message(FilterChanged(event.value, submitted=True))
        self.action_close()
