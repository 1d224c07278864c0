"""The flowtap terminal UI: live flows from a relay, or flows loaded from a capture file.

Live events wait in an event source (a `ControlClient` reading a relay's control socket, or
an in-process `FlowFeed`), which the app drains in batches on a timer (at most 20 times a
second) into its `FlowStore`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.notifications import SeverityLevel
from textual.screen import Screen
from textual.widgets import Footer, ProgressBar, Static

from flowtap.inspector.flow_filter import parse_filter
from flowtap.inspector.log import human_bytes
from flowtap.inspector.pcapfile.reader import CaptureError, CaptureReader
from flowtap.inspector.pcapfile.reassembly import Reassembler
from flowtap.inspector.pcapfile.writer import CaptureWriter, open_packet_file
from flowtap.proxy.errors import FlowtapError
from flowtap.proxy.flow import Direction, FlowClosed, FlowData, FlowEvent

from .messages import FilterChanged, FilterClosed, FlowSelected, LoadFinished, LoadProgress
from .store import FlowStore
from .viewer import RelayGone
from .widgets.filter_box import FilterBox
from .widgets.flow_detail import FlowDetail
from .widgets.flow_table import COLUMNS, FlowTable
from .widgets.path_prompt import PathPrompt
from .widgets.stats import StatsBar


class EventSource(Protocol):
    """Where live flow events wait for the app (a `ControlClient`, a `FlowFeed`)."""

    def drain(self, limit: int = 100_000) -> Sequence[object]: ...


@runtime_checkable
class WakingEventSource(EventSource, Protocol):
    """An event source that calls `on_events` (from any thread) once it has queued events:
    the app can then sleep while nothing comes."""

    on_events: Callable[[], object] | None


class RelayHandle(Protocol):
    """What the app asks of the relay it shows: a `ControlClient`, or a `Relay` in-process."""

    def kill(self, flow_id: int) -> object:
        """Reset both sides of a live flow."""
        ...

    def byte_counts(self, flow_id: int) -> tuple[int, int] | None:
        """Bytes a live flow has moved so far (up, down), if known."""
        ...


TICK_S = 0.05
"""How often the app drains events into the store: 20 times a second."""
SLEEP_AFTER_S = 1.0
"""With nothing coming from a source that wakes it for this long, the app stops draining on
every tick: it draws once a second (durations and rates move on) until events come."""
FRAME_S = 0.25
"""How often what the events changed is drawn: the table's rows, the selected flow, the
stats. One frame for all of them: each frame costs a pass of the screen's compositor, and
drawing each on its own schedule made 10 frames a second of a busy flow."""
MIN_WIDTH = 60
MIN_HEIGHT = 15
_EVENTS_PER_TICK = 50_000


def stream_capture(path: Path, batch_size: int = 2000) -> Iterator[tuple[list[object], int]]:
    """The flow events of the capture at `path` in batches, each with the file offset reached.

    Like `read_capture`, a damaged file yields every flow it holds (all closed) before the
    CaptureError is raised.
    """
    with CaptureReader(path) as reader:
        reassembler = Reassembler()
        batch: list[object] = []
        try:
            for segment in reader.segments():
                batch += reassembler.feed(segment)
                if len(batch) >= batch_size:
                    yield batch, reader.offset
                    batch = []
        except CaptureError:
            yield [*batch, *reassembler.finish()], reader.offset
            raise
        yield [*batch, *reassembler.finish()], reader.offset


class FlowtapApp(App[None]):
    """Flows in a table, the selected one in detail; live from `events` or loaded from a file."""

    TITLE = "flowtap"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("slash", "filter", "Filter"),
        Binding("f", "follow", "Follow"),
        Binding("h", "toggle_hex", "Hex"),
        Binding("s", "sort_next", "Sort"),
        Binding("S", "sort_reverse", "Reverse sort", show=False),
        Binding("w", "save(False)", "Save flow"),
        Binding("W", "save(True)", "Save all"),
        Binding("e", "export('up')", "Export ↑"),
        Binding("E", "export('down')", "Export ↓", show=False),
        Binding("k", "kill", "Kill"),
        Binding("c", "clear_closed", "Clear closed"),
    ]
    CSS = """
    Screen { layout: vertical; }
    #main { height: 1fr; }
    #flows { height: 1fr; }
    #detail { height: 1fr; }
    #too-small { display: none; width: 100%; height: 100%; content-align: center middle; }
    Screen.-too-small #main { display: none; }
    Screen.-too-small #too-small { display: block; }
    #loading { display: none; height: 3; padding: 0 1; }
    #loading.-shown { display: block; }
    """

    def __init__(
        self,
        *,
        events: EventSource | None = None,
        relay: RelayHandle | None = None,
        capture: Path | None = None,
        source: str = "",
        store: FlowStore | None = None,
        export_dir: Path = Path("captures"),
        select_flow: int | None = None,
    ) -> None:
        super().__init__()
        self.events = events
        self.relay = relay
        self.capture = capture
        self.source = source or (str(capture) if capture else "live")
        self.store = store or FlowStore()
        self.export_dir = export_dir
        self._select_flow = select_flow
        self.loading = capture is not None
        self._loaded: queue.Queue[list[object]] = queue.Queue(maxsize=8)
        self._stop_loading = threading.Event()
        self._next_frame = 0.0
        # When the last events came from a source that wakes the app (None: it never sleeps).
        self._last_event: float | None = None
        self._asleep = False
        self._last_counts = 0.0
        # What the events changed since the last frame, for the next one to draw.
        self._added: list[int] = []
        self._changed: set[int] = set()
        self._new_bytes = 0
        self.relay_gone: str | None = None
        """Why the relay this app was attached to went away, once it has."""

    # -- layout ----------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        # Kept as attributes: a modal screen on top must not hide them from the timer.
        self.table = FlowTable(self.store, id="flows")
        self.detail = FlowDetail(self.store, id="detail", follow_live=self.capture is None)
        self.stats = StatsBar(self.source, id="stats")
        self.filter_box = FilterBox(id="filter")
        yield self.stats
        self.loading_box = Vertical(id="loading")
        self.progress = ProgressBar(total=100, show_eta=False, id="progress")
        self.too_small = Static("", id="too-small")
        with self.loading_box:
            yield Static(f"Loading {self.capture} …", id="loading-text", markup=False)
            yield self.progress
        with Vertical(id="main"):
            yield self.filter_box
            yield self.table
            yield self.detail
        yield self.too_small
        yield Footer()

    def on_mount(self) -> None:
        self.table.focus()
        self._check_size()
        self._ticker = self.set_interval(TICK_S, self._tick)
        self._sleeper = self.set_interval(1.0, self._tick, pause=True)
        if isinstance(self.events, WakingEventSource):
            self._last_event = time.monotonic()
            self.events.on_events = functools.partial(self._wake_from, asyncio.get_running_loop())
        if self.capture is not None:
            self.loading_box.add_class("-shown")
            self._load(self.capture)

    def on_resize(self) -> None:
        self._check_size()

    def _check_size(self) -> None:
        width, height = self.size
        too_small = width < MIN_WIDTH or height < MIN_HEIGHT
        self.screen.set_class(too_small, "-too-small")
        if too_small:
            self.too_small.update(
                f"The terminal is too small ({width}x{height}): flowtap needs at least "
                f"{MIN_WIDTH}x{MIN_HEIGHT}. Enlarge the window, or press q to quit."
            )

    # -- events in ------------------------------------------------------------------------

    def _take_events(self) -> list[object]:
        taken: list[object] = []
        if self.events is not None:
            taken.extend(self.events.drain(_EVENTS_PER_TICK))
        while len(taken) < _EVENTS_PER_TICK:
            try:
                taken.extend(self._loaded.get_nowait())
            except queue.Empty:
                break
        return taken

    def _tick(self, *, draw_now: bool = False) -> None:
        """Drain waiting events into the store; draw what changed once a frame is due (or
        at once with `draw_now`)."""
        now = time.monotonic()
        last = self._last_event
        if last is not None and not self._asleep and now - last >= SLEEP_AFTER_S:
            # Asleep before the drain: events queued after it see the flag and wake the app.
            self._asleep = True
            self._ticker.pause()
            self._sleeper.resume()
        taken = self._take_events()
        if taken and isinstance(gone := taken[-1], RelayGone):  # the source's last event
            taken.pop()
            self._relay_gone(gone)
        if taken:
            changes = self.store.apply(taken)
            self._added += changes.added
            self._changed |= changes.changed
            self._new_bytes += changes.bytes_up + changes.bytes_down
            self._last_event = now
            self._wake()
        if draw_now or now >= self._next_frame:
            self._next_frame = now + FRAME_S
            self._draw_frame(now)

    def _wake_from(self, loop: asyncio.AbstractEventLoop) -> None:
        """Have the app's loop wake it if it sleeps (called on the event source's thread,
        once a read of the feed; an app awake drains on its next tick anyway)."""
        if self._asleep:
            with contextlib.suppress(RuntimeError):  # the loop has closed: the app stopped
                loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        """Drain on every tick again (events came)."""
        if self._asleep:
            self._asleep = False
            self._sleeper.pause()
            self._ticker.resume()

    def _draw_frame(self, now: float) -> None:
        table = self.table
        store = self.store
        changed = self._changed
        changed.update(store.refresh_summaries())
        if self._added:
            table.add_flows(self._added)
        new_bytes = self._new_bytes
        if self.relay is not None and store.capped and now - self._last_counts >= 0.5:
            # The feed stops sending a flow's data past the keep cap; ask the relay instead.
            self._last_counts = now
            for flow_id in list(store.capped):
                counts = self.relay.byte_counts(flow_id)
                if counts is not None:
                    new_bytes += store.set_live_counts(flow_id, *counts)
                    changed.add(flow_id)
        if changed:
            table.update_flows(changed)
        self._added = []
        self._changed = set()
        self._new_bytes = 0
        table.tick()
        self.stats.count(
            open_flows=store.open_count,
            total_flows=len(store),
            new_bytes=new_bytes,
        )
        detail = self.detail
        if detail.flow_id is not None and detail.flow_id in changed:
            detail.show_flow(detail.flow_id)

    def _relay_gone(self, gone: RelayGone) -> None:
        self.relay_gone = gone.text
        self.relay = None
        self.stats.query_one("#stats-source", Static).update(f"{self.source} (gone)")
        self.tell(
            f"{gone.text}. The flows received so far stay browsable; q quits.",
            title="Relay gone",
            severity="error",
            timeout=30,
        )

    # -- offline loading ------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="load")
    def _load(self, path: Path) -> None:
        error: str | None = None
        try:
            total = path.stat().st_size
            for batch, offset in stream_capture(path):
                if not self._hand_over(batch):
                    return
                self.post_message(LoadProgress(offset, total))
        except FlowtapError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"cannot read {path}: {exc.strerror or exc}"
        self.post_message(LoadFinished(error))

    def _hand_over(self, batch: list[object]) -> bool:
        """Queue a batch for the UI thread, waiting while it catches up; False if stopping."""
        while not self._stop_loading.is_set():
            try:
                self._loaded.put(batch, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    @on(LoadProgress)
    def _load_progress(self, message: LoadProgress) -> None:
        bar = self.progress
        bar.update(total=max(1, message.total_bytes), progress=message.done_bytes)

    @on(LoadFinished)
    def _load_finished(self, message: LoadFinished) -> None:
        self.loading = False
        self.loading_box.remove_class("-shown")
        self._tick(draw_now=True)  # the last batch, so that the selection below finds its flow
        ended = self.store.mark_capture_end()
        if ended:
            self.table.update_flows(ended)
            if self.detail.flow_id in ended:
                self.detail.show_flow(self.detail.flow_id)
        if message.error:
            self.tell(message.error, title="Cannot load the capture", severity="error")
        else:
            self.tell(f"Loaded {self.capture}", timeout=3)
        if self._select_flow is not None and not self.table.select_flow(self._select_flow):
            self.tell(f"The capture has no flow #{self._select_flow}.", severity="warning")

    def on_unmount(self) -> None:
        self._stop_loading.set()
        if isinstance(self.events, WakingEventSource):
            self.events.on_events = None

    # -- selection and filter -------------------------------------------------------------

    @on(FlowSelected)
    def _flow_selected(self, message: FlowSelected) -> None:
        self.detail.show_flow(message.flow_id)

    @on(FilterChanged)
    def _filter_changed(self, message: FilterChanged) -> None:
        table = self.table
        box = self.filter_box
        text = message.text.strip()
        try:
            flow_filter = parse_filter(text) if text else None
        except FlowtapError as exc:
            box.mark_invalid(str(exc))
            if message.submitted:
                self.tell(str(exc), title="Filter not applied", severity="warning")
            return
        box.mark_invalid(None)
        if flow_filter != table.flow_filter:
            table.set_filter(flow_filter)

    @on(FilterClosed)
    def _filter_closed(self) -> None:
        self.table.focus()

    # -- actions ---------------------------------------------------------------------------

    def tell(
        self,
        message: str,
        *,
        title: str = "",
        severity: SeverityLevel = "information",
        timeout: float = 4.0,
    ) -> None:
        """A notification shown as plain text (paths and regexes are not markup)."""
        self.notify(message, title=title, severity=severity, timeout=timeout, markup=False)

    def action_filter(self) -> None:
        self.filter_box.open()

    def action_follow(self) -> None:
        table = self.table
        table.follow = not table.follow
        if table.follow:
            table.action_jump(-1)
            table.follow = True
        self.tell(f"Follow new flows: {'on' if table.follow else 'off'}", timeout=2)

    def action_toggle_hex(self) -> None:
        self.detail.toggle_hex()

    def action_sort_next(self) -> None:
        table = self.table
        keys = [c.key for c in COLUMNS]
        table.sort_by(keys[(keys.index(table.sort_column) + 1) % len(keys)], reverse=False)

    def action_sort_reverse(self) -> None:
        table = self.table
        table.sort_by(table.sort_column, reverse=not table.sort_reverse)

    def action_sort(self, column: str) -> None:
        self.table.sort_by(column)

    def _selected(self) -> int | None:
        flow_id = self.table.selected_id
        if flow_id is None:
            self.tell("No flow selected.", severity="warning", timeout=3)
        return flow_id

    def action_kill(self) -> None:
        flow_id = self._selected()
        if flow_id is None:
            return
        record = self.store.get(flow_id)
        if self.relay_gone is not None:
            self.tell(f"Cannot kill: {self.relay_gone}.", severity="warning")
        elif self.relay is None:
            self.tell("Flows loaded from a capture cannot be killed.", severity="warning")
        elif record is None or record.is_closed:
            self.tell(f"Flow #{flow_id} has already ended.", severity="warning", timeout=3)
        else:
            self.relay.kill(flow_id)
            self.tell(f"Killed flow #{flow_id}: both sides reset.", timeout=3)

    def action_clear_closed(self) -> None:
        gone = self.store.clear_closed()
        self.table.remove_flows(gone)
        self.tell(f"Cleared {len(gone)} closed flow(s).", timeout=2)

    def action_export(self, direction: str) -> None:
        flow_id = self._selected()
        if flow_id is None:
            return
        side = Direction(direction)
        who = "client" if side is Direction.UP else "server"
        suggestion = str(self.export_dir / f"flow-{flow_id}-{who}.bin")

        def chosen(path: str | None) -> None:
            if path:
                self.export_raw(flow_id, side, Path(path))

        self.push_screen(
            PathPrompt(f"Export the bytes the {who} sent in flow #{flow_id} to:", suggestion),
            chosen,
        )

    def export_raw(self, flow_id: int, direction: Direction, path: Path) -> bool:
        """Write the kept bytes one side of a flow sent to `path`; notify, never raise."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            data = self.store.raw_bytes(flow_id, direction)
            path.write_bytes(data)
        except OSError as exc:
            self.tell(
                f"Cannot write {path}: {exc.strerror or exc}. Pick another path.",
                title="Export failed",
                severity="error",
            )
            return False
        self.tell(f"Wrote {len(data)} bytes to {path}", timeout=4)
        return True

    def action_save(self, every_flow: bool) -> None:
        if every_flow:
            flow_ids = list(self.table.ids)
            if not flow_ids:
                self.tell("No flows to save.", severity="warning", timeout=3)
                return
            stamp = time.strftime("%Y%m%d-%H%M%S")
            suggestion = self.export_dir / f"flows-{stamp}.pcapng"
            question = f"Save the {len(flow_ids)} flow(s) in the table (.pcap or .pcapng) to:"
        else:
            selected = self._selected()
            if selected is None:
                return
            flow_ids = [selected]
            suggestion = self.export_dir / f"flow-{selected}.pcapng"
            question = f"Save flow #{selected} (.pcap or .pcapng) to:"

        def chosen(path: str | None) -> None:
            if path:
                # Off the UI thread: saving many flows takes a while.
                self.run_worker(
                    functools.partial(self.save_flows, Path(path), flow_ids),
                    thread=True,
                    group="save",
                )

        self.push_screen(PathPrompt(question, str(suggestion)), chosen)

    def save_flows(self, path: Path, flow_ids: list[int]) -> bool:
        """Write the kept packets of `flow_ids` as a capture at `path`; notify, never raise.

        Safe to run on a worker thread: it only reads the store.
        """
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            out = open_packet_file(path)
        except FlowtapError as exc:
            self.tell(str(exc), title="Not saved", severity="error")
            return False
        except OSError as exc:
            self.tell(
                f"Cannot write {path}: {exc.strerror or exc}. Pick another path.",
                title="Not saved",
                severity="error",
            )
            return False
        try:
            writer = CaptureWriter(out)
            streams = [self.store.events(flow_id) for flow_id in flow_ids]
            for event in heapq.merge(*streams, key=_event_time):
                writer.write(event)
        except OSError as exc:
            self.tell(f"Writing {path} failed: {exc.strerror or exc}", severity="error")
            return False
        finally:
            out.close()
        truncated = sum(r.truncated_bytes for i in flow_ids if (r := self.store.get(i)) is not None)
        note = (
            f" ({human_bytes(truncated)} beyond the display cap not included)" if truncated else ""
        )
        self.tell(f"Saved {len(flow_ids)} flow(s) to {path}{note}", timeout=4)
        return True

    # -- command palette ------------------------------------------------------------------

    def get_system_commands(self, screen: Screen[object]) -> Iterator[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Filter flows", "Narrow the table (/)", self.action_filter)
        yield SystemCommand("Follow new flows", "Toggle following (f)", self.action_follow)
        yield SystemCommand("Toggle hex view", "Text or hex (h)", self.action_toggle_hex)
        yield SystemCommand(
            "Kill flow", "Reset both sides of the selected flow (k)", self.action_kill
        )
        yield SystemCommand(
            "Clear closed flows", "Forget ended flows (c)", self.action_clear_closed
        )
        yield SystemCommand(
            "Save flow", "The selected flow as pcap/pcapng (w)", lambda: self.action_save(False)
        )
        yield SystemCommand(
            "Save all flows",
            "Every flow in the table as pcap/pcapng (W)",
            lambda: self.action_save(True),
        )
        yield SystemCommand(
            "Export client bytes", "Raw bytes the client sent (e)", lambda: self.action_export("up")
        )
        yield SystemCommand(
            "Export server bytes",
            "Raw bytes the server sent (E)",
            lambda: self.action_export("down"),
        )
        for column in COLUMNS:
            yield SystemCommand(
                f"Sort by {column.key}",
                f"Order the flow table by {column.key} (again: reverse)",
                functools.partial(self.action_sort, column.key),
            )


def _event_time(event: FlowEvent) -> float:
    if isinstance(event, FlowData):
        return event.timestamp
    flow = event.flow
    if isinstance(event, FlowClosed) and flow.ended_at is not None:
        return flow.ended_at
    return flow.started_at


def browse_capture(file: str, *, select_flow: int | None = None) -> int:
    """`flowtap tui FILE` and `flowtap show FILE --tui`: the capture's flows in the TUI."""
    path = Path(file)
    if not path.is_file():
        raise FlowtapError(f"{path} is not a file: give the path of a pcap or pcapng capture")
    FlowtapApp(capture=path, select_flow=select_flow).run()
    return 0
