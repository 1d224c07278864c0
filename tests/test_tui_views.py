"""The detail pane's conversation and hex views on big flows: only what is on screen is drawn,
new chunks are indexed as they come, the tail is followed while the view is at its bottom,
and the selected flow redraws at a bounded rate."""

from __future__ import annotations

import asyncio
import functools
import itertools
import random
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from capture_checks import assert_tshark_clean
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tui import screen_text, until
from textual.pilot import Pilot
from textual.screen import Screen
from textual.selection import Selection
from textual.widgets import Static

from flowtap.inspector.log import human_bytes
from flowtap.inspector.pcapfile.reassembly import FlowGap
from flowtap.inspector.pcapfile.writer import CaptureWriter, open_packet_file
from flowtap.inspector.summary import escape_bytes
from flowtap.inspector.tui import app as app_module
from flowtap.inspector.tui.app import FlowtapApp
from flowtap.inspector.tui.store import CHUNK_NOT_SHOWN, CHUNK_UP
from flowtap.inspector.tui.widgets.chunk_view import ChunkView, missing_line
from flowtap.inspector.tui.widgets.conversation import (
    Conversation,
    body_line_count,
    body_lines,
    header_line,
)
from flowtap.inspector.tui.widgets.flow_table import FlowTable
from flowtap.inspector.tui.widgets.hex_view import HexView
from flowtap.proxy.control_protocol import HEADER, DataNotShown, decode_data, encode_data
from flowtap.proxy.events import EventQueue
from flowtap.proxy.flow import (
    Address,
    CloseReason,
    Direction,
    Flow,
    FlowClosed,
    FlowData,
    FlowEvent,
    FlowOpened,
    FlowState,
    Transport,
)

SIZE = (160, 48)
T0 = 1_767_225_600.0
BIG = 100_000


def opened(flow_id: int) -> Flow:
    return Flow(
        id=flow_id,
        transport=Transport.TCP,
        client=Address("127.0.0.1", 50000 + flow_id),
        server=Address("127.0.0.1", 6379),
        listener=Address("127.0.0.1", 40000),
        started_at=T0,
        state=FlowState.OPEN,
    )


def line_chunk(flow_id: int, i: int) -> FlowData:
    """Chunk `i` of a line flow: the client and server take turns, half a second apart."""
    direction = Direction.UP if i % 2 == 0 else Direction.DOWN
    return FlowData(flow_id, direction, T0 + 0.5 * (i + 1), b"line %06d\n" % i)


def conversation_line(n: int) -> str:
    """Line `n` of a line flow's conversation, as a reader would write it out."""
    i, body = divmod(n, 2)
    if body:
        return f"line {i:06d}\\n"
    who = "client →" if i % 2 == 0 else "← server"
    return f"+{0.5 * (i + 1):.3f}s {who} 12 B"


def closed(flow: Flow, up: int, down: int) -> FlowClosed:
    return FlowClosed(
        flow.closed(
            ended_at=T0 + 1e6, bytes_up=up, bytes_down=down, reason=CloseReason.CLIENT_CLOSED
        )
    )


def app_with(events: list[FlowEvent]) -> tuple[FlowtapApp, EventQueue]:
    queue = EventQueue(max_data_events=10 * BIG)
    for event in events:
        queue.handle(event)
    return FlowtapApp(events=queue, source="test"), queue


def run(app: FlowtapApp, scenario: Callable[[Pilot[None]], Awaitable[None]]) -> None:
    async def main() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await scenario(pilot)

    asyncio.run(main())


def shown_lines(view: ChunkView) -> list[str]:
    return screen_text(view).split("\n")


def expected_lines(view: ChunkView) -> list[str]:
    """The conversation lines that belong on screen at the view's scroll position."""
    top = round(view.scroll_y)
    height = view.scrollable_content_region.height
    return [conversation_line(n) if n < view.line_count else "" for n in range(top, top + height)]


def test_a_flow_of_100000_chunks_shows_the_right_lines_wherever_it_is_scrolled() -> None:
    small, big = opened(1), opened(2)
    events: list[FlowEvent] = [FlowOpened(small), line_chunk(1, 0), closed(small, 12, 0)]
    events += [FlowOpened(big), *(line_chunk(2, i) for i in range(BIG))]
    events.append(closed(big, 12 * BIG // 2, 12 * BIG // 2))
    app, _ = app_with(events)

    async def scenario(pilot: Pilot[None]) -> None:
        await until(pilot, lambda: len(app.store) == 2 and app.store.open_count == 0, "the flows")
        await pilot.press("down")  # the big flow, closed: shown from its top
        view = app.query_one(Conversation)
        await until(pilot, lambda: view.chunk_count == BIG, "the big flow's index")
        assert view.line_count == 2 * BIG
        height = view.scrollable_content_region.height
        assert height > 10
        assert shown_lines(view) == expected_lines(view)
        assert shown_lines(view)[:2] == ["+0.500s client → 12 B", "line 000000\\n"]
        view.focus()
        await pilot.press("end")
        assert round(view.scroll_y) == 2 * BIG - height
        assert shown_lines(view)[-1] == "line 099999\\n"
        assert shown_lines(view) == expected_lines(view)
        await pilot.press("home", "pagedown", "pagedown")
        assert round(view.scroll_y) == 2 * height
        assert shown_lines(view) == expected_lines(view)
        view.scroll_to(y=123_457, animate=False, immediate=True, force=True)
        await pilot.pause()
        assert round(view.scroll_y) == 123_457
        assert shown_lines(view)[0] == "line 061728\\n"
        assert shown_lines(view) == expected_lines(view)
        await pilot.resize_terminal(140, 40)  # no line is long enough to wrap anew
        await until(pilot, lambda: view.scrollable_content_region.width < 140, "the resize")
        assert view.line_count == 2 * BIG
        assert shown_lines(view) == expected_lines(view)

    run(app, scenario)


def test_following_keeps_the_tail_in_view_and_scrolling_up_keeps_the_position() -> None:
    live = opened(1)
    app, queue = app_with([FlowOpened(live), *(line_chunk(1, i) for i in range(BIG))])

    def send(first: int, count: int) -> None:
        for i in range(first, first + count):
            queue.handle(line_chunk(1, i))

    async def scenario(pilot: Pilot[None]) -> None:
        view = app.query_one(Conversation)
        await until(pilot, lambda: view.chunk_count == BIG, "the live flow's index")
        assert view.following  # a live flow opens at its tail
        assert shown_lines(view)[-1] == conversation_line(2 * BIG - 1)
        send(BIG, 500)
        await until(pilot, lambda: view.chunk_count == BIG + 500, "the new chunks")
        await pilot.pause()
        assert shown_lines(view)[-1] == conversation_line(2 * (BIG + 500) - 1)
        assert shown_lines(view) == expected_lines(view)

        view.focus()
        await pilot.press("pageup")
        assert not view.following
        where, before = round(view.scroll_y), shown_lines(view)
        send(BIG + 500, 500)
        await until(pilot, lambda: view.chunk_count == BIG + 1000, "more chunks")
        await pilot.pause()
        assert (round(view.scroll_y), shown_lines(view)) == (where, before)

        await pilot.press("end")  # back at the bottom: following again
        assert view.following
        send(BIG + 1000, 10)
        await until(pilot, lambda: view.chunk_count == BIG + 1010, "the last chunks")
        await pilot.pause()
        assert shown_lines(view)[-1] == conversation_line(2 * (BIG + 1010) - 1)
        assert shown_lines(view) == expected_lines(view)

    run(app, scenario)


def hexdump(path: Path, offset: int, length: int) -> list[str]:
    """`hexdump -C` (the util-linux tool) of `length` bytes of `path` from `offset`."""
    if not length:
        return []
    out = subprocess.run(
        ["hexdump", "-C", "-v", "-s", str(offset), "-n", str(length), str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return out[:-1]  # the last line is the offset past the end


def test_the_hex_view_matches_hexdump_of_each_direction(tmp_path: Path) -> None:
    rng = random.Random(15)
    flow = opened(1)
    chunks = [
        FlowData(1, rng.choice(list(Direction)), T0 + i, rng.randbytes(rng.randrange(0, 70)))
        for i in range(3000)
    ]
    streams = {d: b"".join(c.data for c in chunks if c.direction is d) for d in Direction}
    paths = {d: tmp_path / f"{d}.bin" for d in Direction}
    for direction, path in paths.items():
        path.write_bytes(streams[direction])
    up, down = len(streams[Direction.UP]), len(streams[Direction.DOWN])
    app, _ = app_with([FlowOpened(flow), *chunks, closed(flow, up, down)])

    def expected(view: HexView) -> list[str]:
        """The hex lines for the chunks on screen, from hexdump of each direction's bytes."""
        top = round(view.scroll_y)
        height = view.scrollable_content_region.height
        lines: list[str] = []
        sent = {d: 0 for d in Direction}
        first_line = 0
        for chunk in chunks:
            size = len(chunk.data)
            rows = -(-size // 16)
            if first_line + 1 + rows > top and first_line < top + height:
                label = "client → server" if chunk.direction is Direction.UP else "server → client"
                dump = hexdump(paths[chunk.direction], sent[chunk.direction], size)
                chunk_lines = [f"{label}  {size} B", *dump]
                lines += chunk_lines[max(0, top - first_line) :]
            first_line += 1 + rows
            sent[chunk.direction] += size
        return [line.rstrip() for line in lines[:height]]

    async def scenario(pilot: Pilot[None]) -> None:
        await until(pilot, lambda: app.store.open_count == 0 and len(app.store) == 1, "the flow")
        await pilot.press("h")
        view = app.query_one(HexView)
        await until(pilot, lambda: view.chunk_count == len(chunks), "the hex index")
        view.focus()
        assert shown_lines(view) == expected(view)
        for position in (1, 4321, view.max_scroll_y // 2, view.max_scroll_y):
            view.scroll_to(y=position, animate=False, immediate=True, force=True)
            await pilot.pause()
            assert round(view.scroll_y) == position
            assert shown_lines(view) == expected(view), position

    run(app, scenario)


async def scrolled_to(pilot: Pilot[None], view: ChunkView, chunks: int, line: int) -> None:
    """Wait until `view` has indexed `chunks` chunks, then scroll it to `line`."""
    await until(pilot, lambda: view.chunk_count == chunks, "the index")
    view.scroll_to(y=line, animate=False, immediate=True, force=True)
    await pilot.pause()


def test_toggling_hex_keeps_the_chunk_at_the_top() -> None:
    app, _ = app_with([FlowOpened(opened(1)), *(line_chunk(1, i) for i in range(1000))])

    async def scenario(pilot: Pilot[None]) -> None:
        conversation = app.query_one(Conversation)
        conversation.focus()
        await scrolled_to(pilot, conversation, 1000, 2 * 321)
        assert not conversation.following
        await pilot.press("h")
        hex_view = app.query_one(HexView)
        await until(pilot, lambda: round(hex_view.scroll_y) > 0, "the hex view placed")
        assert hex_view.has_focus
        assert hex_view.chunk_at(round(hex_view.scroll_y)) == 321
        assert shown_lines(hex_view)[0] == "server → client  12 B"  # chunk 321, a reply
        assert conversation.chunk_count == 0  # the hidden view keeps no index

    run(app, scenario)


class SyncCounter:
    """Counts the payload view refreshes that drew new chunks."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        sync = ChunkView.sync

        def counted(view: ChunkView) -> int:
            added = sync(view)
            self.count += added > 0
            return added

        monkeypatch.setattr(ChunkView, "sync", counted)

    async def after_the_first_chunk(self, pilot: Pilot[None]) -> Conversation:
        """Wait until the conversation shows the first chunk and has settled; count from 0."""
        view = pilot.app.query_one(Conversation)
        await until(pilot, lambda: view.chunk_count == 1, "the first chunk")
        await pilot.pause(0.3)
        self.count = 0
        return view


def test_thousands_of_chunks_between_two_ticks_cause_one_refresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app, queue = app_with([FlowOpened(opened(1)), line_chunk(1, 0)])
    refreshes = SyncCounter(monkeypatch)

    async def scenario(pilot: Pilot[None]) -> None:
        view = await refreshes.after_the_first_chunk(pilot)
        for i in range(1, 20_001):  # no await: the app cannot tick in between
            queue.handle(line_chunk(1, i))
        await until(pilot, lambda: view.chunk_count == 20_001, "the chunks")
        await pilot.pause(0.6)
        assert refreshes.count == 1
        assert shown_lines(view)[-1] == conversation_line(2 * 20_001 - 1)

    run(app, scenario)


def test_a_steady_stream_of_chunks_redraws_at_a_bounded_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app, queue = app_with([FlowOpened(opened(1)), line_chunk(1, 0)])
    refreshes = SyncCounter(monkeypatch)

    async def scenario(pilot: Pilot[None]) -> None:
        view = await refreshes.after_the_first_chunk(pilot)
        started = time.monotonic()
        sent = 1

        def stored_chunks_are(count: int) -> bool:
            return len(app.store.records[1].chunks) == count

        for _ in range(40):  # a batch on (nearly) every tick
            for _ in range(50):
                queue.handle(line_chunk(1, sent))
                sent += 1
            await until(pilot, functools.partial(stored_chunks_are, sent), "the batch")
        await until(pilot, lambda: view.chunk_count == sent, "the last batch drawn")
        elapsed = time.monotonic() - started
        assert refreshes.count <= elapsed / app_module.FRAME_S + 2

    run(app, scenario)


def test_the_rows_of_flows_that_move_on_every_tick_redraw_at_a_bounded_rate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A busy flow's counters change on every tick; repainting the table each time cost
    the TUI the better part of its CPU, so rows redraw a few times a second."""
    app, queue = app_with([FlowOpened(opened(1)), line_chunk(1, 0)])
    redraws: list[float] = []
    refresh = FlowTable.refresh

    def counted(table: FlowTable, *args: Any, **kwargs: Any) -> FlowTable:
        redraws.append(time.monotonic())
        return refresh(table, *args, **kwargs)

    monkeypatch.setattr(FlowTable, "refresh", counted)

    def stored(count: int) -> bool:
        return len(app.store.records[1].chunks) == count

    async def scenario(pilot: Pilot[None]) -> None:
        table = app.query_one(FlowTable)
        await until(pilot, lambda: table.ids == [1], "the row")
        await pilot.pause(0.3)
        started = time.monotonic()
        for sent in range(2, 42):  # a chunk on (nearly) every tick
            queue.handle(line_chunk(1, sent - 1))
            await until(pilot, functools.partial(stored, sent), "the chunk")
        elapsed = time.monotonic() - started
        await until(pilot, lambda: redraws[-1] > started + elapsed, "the last counts drawn")
        moving = [at for at in redraws if started <= at <= started + elapsed]
        assert len(moving) <= elapsed / app_module.FRAME_S + 2

    run(app, scenario)


def test_a_busy_flow_draws_few_frames_and_never_lays_the_screen_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The table's rows, the selected flow and the stats bar change with every chunk of a
    busy flow. They are drawn together, a few frames a second (each on its own schedule
    made twice as many), and the conversation growing lays nothing out (a pass over every
    widget, the costliest thing a frame can do)."""
    app, queue = app_with([FlowOpened(opened(1)), *(line_chunk(1, i) for i in range(100))])
    frames: list[tuple[float, set[str]]] = []
    layouts: list[float] = []
    compositor_refresh = Screen._compositor_refresh
    refresh_layout = Screen._refresh_layout

    def counted(screen: Screen[Any]) -> None:
        frames.append((time.monotonic(), {type(w).__name__ for w in screen._dirty_widgets}))
        compositor_refresh(screen)

    def laid_out(screen: Screen[Any], *args: Any, **kwargs: Any) -> None:
        layouts.append(time.monotonic())
        refresh_layout(screen, *args, **kwargs)

    monkeypatch.setattr(Screen, "_compositor_refresh", counted)
    monkeypatch.setattr(Screen, "_refresh_layout", laid_out)

    async def scenario(pilot: Pilot[None]) -> None:
        view = pilot.app.query_one(Conversation)
        await until(pilot, lambda: view.chunk_count == 100, "the first screenful and more")
        await pilot.pause(0.3)
        started = time.monotonic()
        sent = 100
        while time.monotonic() - started < 2.0:  # a chunk on (nearly) every tick
            queue.handle(line_chunk(1, sent))
            sent += 1
            await pilot.pause(app_module.TICK_S)
        elapsed = time.monotonic() - started
        await until(pilot, lambda: view.chunk_count == sent, "the last chunk drawn")
        # A scrollbar that moved is drawn in a frame of its own, after its view's: cheap.
        drawn = [at for at, dirty in frames if started <= at and dirty - {"ScrollBar"}]
        assert len(drawn) <= elapsed / app_module.FRAME_S + 1
        assert [at for at in layouts if at >= started] == []

    run(app, scenario)


def test_the_cursor_row_shows_whether_the_table_has_focus() -> None:
    """The table keeps the styles it draws rows with; moving the focus changes the cursor's
    colour, so it must not keep the old one."""
    app, _ = app_with([FlowOpened(opened(1)), FlowOpened(opened(2))])

    def background(table: FlowTable, row: int) -> object:
        style = next(iter(table.render_line(1 + row))).style
        assert style is not None
        return style.bgcolor

    def cursor_background(table: FlowTable) -> object:
        return background(table, table.cursor)

    async def scenario(pilot: Pilot[None]) -> None:
        table = app.query_one(FlowTable)
        await until(pilot, lambda: len(table.ids) == 2 and table.cursor >= 0, "the rows")
        focused = cursor_background(table)
        other = background(table, 1 - table.cursor)
        assert focused != other
        app.query_one(Conversation).focus()
        await until(pilot, lambda: not table.has_focus, "the focus gone")
        blurred = cursor_background(table)
        assert blurred not in (focused, other)
        table.focus()
        await until(pilot, lambda: table.has_focus, "the focus back")
        assert cursor_background(table) == focused

    run(app, scenario)


def test_the_facts_keep_their_height_while_counts_move_and_grow_with_new_lines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A live flow's counts change its facts a few times a second without laying the screen
    out again; facts that add lines (bytes not shown) make them taller."""

    def chunk(i: int) -> FlowData:  # 12 binary bytes: a summary of a fixed number of lines
        direction = Direction.UP if i % 2 == 0 else Direction.DOWN
        return FlowData(1, direction, T0 + i, bytes(range(i % 7, 12 + i % 7)))

    app, queue = app_with([FlowOpened(opened(1)), *(chunk(i) for i in range(40))])
    layouts: list[bool] = []
    update = Static.update

    def counted(static: Static, *args: Any, layout: bool = True) -> None:
        if static.id == "facts":
            layouts.append(layout)
        update(static, *args, layout=layout)

    monkeypatch.setattr(Static, "update", counted)

    def counts_shown(facts: Static) -> bool:
        record = app.store.records[1]
        return f"↓ {human_bytes(record.bytes_down)}" in str(facts.render())

    async def scenario(pilot: Pilot[None]) -> None:
        facts = app.query_one("#facts", Static)
        await until(pilot, lambda: 1 in app.store.records and counts_shown(facts), "the facts")
        await pilot.pause(0.3)
        height = facts.size.height
        layouts.clear()
        for sent in range(40, 46):
            queue.handle(chunk(sent))
            await pilot.pause(app_module.FRAME_S + 0.05)
        await until(pilot, lambda: counts_shown(facts), "the last counts")
        assert "↓ 276B" in str(facts.render())  # 23 chunks of 12 bytes each way
        assert layouts and not any(layouts)
        assert facts.size.height == height
        queue.handle(DataNotShown(1, Direction.DOWN, 500))  # type: ignore[arg-type]
        await until(pilot, lambda: "500 bytes not shown" in str(facts.render()), "the line")
        lines = str(facts.render()).count("\n") + 1
        assert lines > height
        await until(pilot, lambda: facts.size.height == lines, "the taller facts")

    run(app, scenario)


def test_missing_bytes_show_where_they_were_in_both_views() -> None:
    flow = opened(1)
    app, _ = app_with(
        [
            FlowOpened(flow),
            FlowData(1, Direction.UP, T0 + 1, b"hello\n"),
            DataNotShown(1, Direction.UP, 500),  # type: ignore[list-item]
            FlowData(1, Direction.UP, T0 + 2, b"world\n"),
            FlowGap(1, Direction.DOWN, T0 + 3, 40),  # type: ignore[list-item]
            FlowData(1, Direction.DOWN, T0 + 4, b"reply\n"),
        ]
    )

    async def scenario(pilot: Pilot[None]) -> None:
        view = app.query_one(Conversation)
        await until(pilot, lambda: view.chunk_count == 5, "the flow")
        await pilot.pause()
        assert shown_lines(view)[:8] == [
            "+1.000s client → 6 B",
            "hello\\n",
            "+1.000s !! 500 B the client sent not shown here (this viewer fell behind)",
            "+2.000s client → 6 B",
            "world\\n",
            "+3.000s !! server: gap of 40 B (not in the capture)",
            "+4.000s ← server 6 B",
            "reply\\n",
        ]
        facts = str(app.query_one("#facts").render())
        assert "500 bytes not shown" in facts and "1 gap(s)" in facts
        await pilot.press("h")
        hex_view = app.query_one(HexView)
        await until(pilot, lambda: hex_view.chunk_count == 5, "the hex view")
        await pilot.pause()
        pad = " " * 33  # six bytes of a sixteen-byte row, as `hexdump -C` pads it
        assert shown_lines(hex_view)[:8] == [
            "client → server  6 B",
            f"00000000  68 65 6c 6c 6f 0a{pad}|hello.|",
            "!! 500 B the client sent not shown here (this viewer fell behind)",
            "client → server  6 B",
            f"000001fa  77 6f 72 6c 64 0a{pad}|world.|",  # 6 + 500 bytes on
            "!! server: gap of 40 B (not in the capture)",
            "server → client  6 B",
            f"00000028  72 65 70 6c 79 0a{pad}|reply.|",  # after the 40 missing
        ]

    run(app, scenario)


def test_a_narrower_terminal_wraps_long_lines_anew_at_the_same_chunk() -> None:
    flow = opened(1)
    long_line = bytes(range(256)) * 2  # 2 KiB of escapes: wraps at any width
    chunks = [FlowData(1, Direction.UP, T0 + i, b"%d:" % i + long_line) for i in range(300)]
    app, _ = app_with([FlowOpened(flow), *chunks, closed(flow, 300 * 515, 0)])

    async def scenario(pilot: Pilot[None]) -> None:
        view = app.query_one(Conversation)
        await until(pilot, lambda: view.chunk_count == 300 and not view.following, "the flow")
        view.scroll_to(y=view.first_line(123), animate=False, immediate=True, force=True)
        await pilot.pause()
        lines_before = view.line_count
        await pilot.resize_terminal(100, 48)
        width = view.scrollable_content_region.width
        await until(pilot, lambda: view.line_count > lines_before, "the lines wrapped anew")
        shown = shown_lines(view)
        assert shown[0] == "+123.000s client → 516 B"
        assert shown[1].startswith("123:\\x00\\x01")
        assert max(map(len, shown)) == width < 150
        body = list(itertools.takewhile(lambda line: not line.startswith("+124"), shown[1:]))
        assert "".join(body) == escape_bytes(b"123:" + long_line)[: sum(map(len, body))]

    run(app, scenario)


def test_text_selected_with_the_pointer_is_the_lines_under_it() -> None:
    app, _ = app_with([FlowOpened(opened(1)), *(line_chunk(1, i) for i in range(1000))])

    async def scenario(pilot: Pilot[None]) -> None:
        view = app.query_one(Conversation)
        await scrolled_to(pilot, view, 1000, 2 * 321 + 1)
        assert shown_lines(view)[:3] == [conversation_line(n) for n in range(643, 646)]
        # From "000321" on the first line shown to "line" two lines down (padding: 1 column).
        await pilot.mouse_down(view, offset=(1 + 5, 0))
        await pilot.hover(view, offset=(1 + 3, 2))
        await pilot.mouse_up(view, offset=(1 + 3, 2))
        await pilot.pause()
        selected = app.screen.get_selected_text()
        assert selected == "000321\\n\n+161.500s client → 12 B\nline"
        assert view.get_selection(Selection(None, None)) is not None

    run(app, scenario)


def test_a_flow_browsed_in_a_capture_opens_at_its_top_though_it_looks_live(
    tmp_path: Path,
) -> None:
    """While a capture loads, its flows look live; the table may select one then (a big
    capture loads over many ticks), but a capture is read from its start, so the view
    opens there rather than following."""
    flow = opened(1)
    path = tmp_path / "cut.pcap"
    out = open_packet_file(path)
    try:
        writer = CaptureWriter(out)
        for event in [FlowOpened(flow), *(line_chunk(1, i) for i in range(200))]:
            writer.write(event)
    finally:
        out.close()
    assert_tshark_clean(path, data_port=6379)
    app = FlowtapApp(capture=path)

    async def scenario(pilot: Pilot[None]) -> None:
        view = app.query_one(Conversation)
        await until(pilot, lambda: not app.loading and view.chunk_count == 200, "the capture")
        record = app.store.records[1]
        assert record.state_text == "open at end"
        record.past_capture_end = False  # as it was before the whole file was read
        app.detail.show_flow(None)
        app.detail.show_flow(1)
        await pilot.pause()
        assert round(view.scroll_y) == 0 and not view.following
        assert view.line_count > 2 * view.size.height
        assert shown_lines(view)[:2] == [conversation_line(0), conversation_line(1)]

    run(app, scenario)


@settings(max_examples=400, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=600),
        st.lists(st.sampled_from([b"a", b"\n", b"\\", b"\t", b"\r", b"\x00", b"\xff"])).map(
            b"".join
        ),
    ),
    width=st.integers(min_value=1, max_value=200),
)
def test_a_chunks_line_count_is_that_of_its_lines_as_drawn(data: bytes, width: int) -> None:
    assert body_line_count(data, width) == len(body_lines(data, width))


class _Handed:
    """An event source that hands over `step` of its events at each drain."""

    def __init__(self, events: list[object], step: int) -> None:
        self._events = events
        self._step = step

    def drain(self, limit: int = 100_000) -> list[object]:
        taken, self._events = self._events[: self._step], self._events[self._step :]
        return taken


def _in_runs(events: list[object], size: int) -> list[object]:
    """`events` with consecutive data in runs of up to `size`, as a relay's control socket
    sends them."""
    out: list[object] = []
    for is_data, group in itertools.groupby(events, lambda e: isinstance(e, FlowData)):
        items = list(group)
        if not is_data:
            out += items
            continue
        for at in range(0, len(items), size):
            frame = encode_data(items[at : at + size])  # type: ignore[arg-type]
            out.append(decode_data(frame[HEADER.size :]))
    return out


def _conversation(events: list[object], flow_id: int, width: int) -> list[str]:
    """A flow's conversation as the view draws it, from its events one by one."""
    lines: list[str] = []
    when = T0
    for event in events:
        if isinstance(event, FlowData) and event.flow_id == flow_id:
            is_up = event.direction is Direction.UP
            when = event.timestamp
            lines.append(header_line(is_up, when, T0, len(event.data)))
            lines += body_lines(event.data, width)
        elif isinstance(event, DataNotShown) and event.flow_id == flow_id:
            flags = CHUNK_NOT_SHOWN | (CHUNK_UP if event.direction is Direction.UP else 0)
            lines.append(f"+{when - T0:.3f}s {missing_line(flags, event.size_bytes)}")
    return lines


def test_a_flow_received_in_runs_shows_each_chunk_as_it_would_alone() -> None:
    """Short chunks without a newline are laid out a run at a time; newlines, long chunks,
    missing bytes and another flow's chunks among them must not shift a line."""
    rng = random.Random(7)
    flow, other = opened(1), opened(2)
    events: list[object] = [FlowOpened(flow), FlowOpened(other)]
    for i in range(6000):
        direction = Direction.UP if i % 2 == 0 else Direction.DOWN
        data = rng.choice([b"x", b"ab", b"\x00\x01", b""])
        if 2000 <= i < 2100:
            data = rng.choice([b"a\nb", b"\n", b"q"])
        if 5000 <= i < 5010:
            data = bytes(range(11, 256))  # no newline, lines wider than the view
        events.append(FlowData(1, direction, T0 + i / 1000, data))
        if i == 3000:
            events.append(DataNotShown(1, Direction.DOWN, 300))
        if 4000 <= i < 4050:
            events.append(FlowData(2, direction, T0 + i / 1000, b"other"))
    # A tick's worth at a time: the view lays out what came since it last did.
    app = FlowtapApp(events=_Handed(_in_runs(events, 100), 1), source="test")  # type: ignore[arg-type]

    async def scenario(pilot: Pilot[None]) -> None:
        view = app.query_one(Conversation)
        await until(pilot, lambda: view.chunk_count == 6001, "the flow's index")
        expected = _conversation(events, 1, view.scrollable_content_region.width)
        assert view.line_count == len(expected)
        height = view.scrollable_content_region.height
        for line in (0, 3990, 4100, 4300, 6050, 8001, 10_020, view.line_count - height):
            view.scroll_to(y=line, animate=False, immediate=True, force=True)
            await pilot.pause()
            assert shown_lines(view) == expected[line : line + height]

    run(app, scenario)
