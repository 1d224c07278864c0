"""The stats bar: open and total flows, throughput, and a sparkline of the last minute."""

from __future__ import annotations

import collections
import time

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Sparkline, Static

from flowtap.inspector.log import human_bytes

HISTORY_S = 60


class StatsBar(Horizontal):
    """Counts flows and bytes; a sample every `SAMPLE_INTERVAL_S` feeds the sparkline."""

    SAMPLE_INTERVAL_S = 1.0
    LABEL_INTERVAL_S = 0.5

    DEFAULT_CSS = """
    StatsBar { height: 1; background: $panel; }
    StatsBar > #stats-source { width: auto; max-width: 75%; padding: 0 1; }
    StatsBar > #stats-text { width: 42; padding: 0 1; }
    StatsBar > Sparkline { width: 1fr; min-width: 10; margin: 0 1; }
    """

    def __init__(self, source: str, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.source = source
        self.open_flows = 0
        self.total_flows = 0
        self.rate_bps = 0.0
        self._bytes_since_sample = 0
        self._last_sample = time.monotonic()
        self._last_label = 0.0
        self._shown_text = ""
        self._history: collections.deque[float] = collections.deque(
            [0.0] * HISTORY_S, maxlen=HISTORY_S
        )

    def compose(self) -> ComposeResult:
        self._label = Static(self._text(), id="stats-text")
        self._sparkline = Sparkline(list(self._history), id="sparkline")
        yield Static(self.source, id="stats-source", markup=False)
        yield self._label
        yield self._sparkline

    def _text(self) -> str:
        return (
            f"open {self.open_flows}  total {self.total_flows}  {human_bytes(int(self.rate_bps))}/s"
        )

    def count(self, *, open_flows: int, total_flows: int, new_bytes: int) -> None:
        """Record the current flow counts and bytes moved since the last call."""
        self.open_flows = open_flows
        self.total_flows = total_flows
        self._bytes_since_sample += new_bytes
        now = time.monotonic()
        if now - self._last_sample >= self.SAMPLE_INTERVAL_S:
            self.rate_bps = self._bytes_since_sample / (now - self._last_sample)
            self._history.append(self.rate_bps)
            self._bytes_since_sample = 0
            self._last_sample = now
            self._sparkline.data = list(self._history)
        if now - self._last_label >= self.LABEL_INTERVAL_S:
            # Each new text costs the screen a layout pass: a few times a second is plenty.
            self._last_label = now
            text = self._text()
            if text != self._shown_text:
                self._shown_text = text
                self._label.update(text, layout=False)  # a fixed width: no layout pass
