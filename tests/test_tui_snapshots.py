"""SVG snapshots of the main screens, fed with fixed flow events so every run draws the same.

Update them after an intended change with `pytest tests/test_tui_snapshots.py --snapshot-update`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from textual.pilot import Pilot

from flowtap.inspector.tui.app import FlowtapApp
from flowtap.inspector.tui.widgets.flow_table import FlowTable
from flowtap.inspector.tui.widgets.stats import StatsBar
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
T0 = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC

CONVERSATIONS: list[tuple[int, list[tuple[Direction, bytes]], CloseReason]] = [
    (
        8080,
        [
            (Direction.UP, b"GET /index.html HTTP/1.1\r\nHost: shop.test\r\nAccept: */*\r\n\r\n"),
            (
                Direction.DOWN,
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 27\r\n\r\n"
                b"<html><p>welcome</p></html>",
            ),
        ],
        CloseReason.CLIENT_CLOSED,
    ),
    (
        6379,
        [
            (Direction.UP, b"*3\r\n$3\r\nSET\r\n$4\r\ncart\r\n$2\r\n42\r\n"),
            (Direction.DOWN, b"+OK\r\n"),
        ],
        CloseReason.CLIENT_CLOSED,
    ),
    (
        2525,
        [
            (Direction.DOWN, b"220 flowtap demo chat ready\r\n"),
            (Direction.UP, b"hello\r\n"),
            (Direction.DOWN, b"250 you said: hello\r\n"),
        ],
        CloseReason.CLIENT_RESET,
    ),
    (9000, [(Direction.UP, bytes(range(0, 256, 3)))], CloseReason.KILLED),
    (8080, [], CloseReason.UPSTREAM_REFUSED),
]


def fixed_events() -> list[FlowEvent]:
    events: list[FlowEvent] = []
    for n, (port, chunks, reason) in enumerate(CONVERSATIONS, start=1):
        start = T0 + n
        flow = Flow(
            id=n,
            transport=Transport.TCP,
            client=Address("127.0.0.1", 50000 + n),
            server=Address("127.0.0.1", port),
            listener=Address("127.0.0.1", 40000 + port % 1000),
            started_at=start,
            state=FlowState.CONNECTING,
        )
        events.append(FlowOpened(flow))
        up = down = 0
        for i, (direction, data) in enumerate(chunks):
            events.append(FlowData(n, direction, start + 0.01 * (i + 1), data))
            if direction is Direction.UP:
                up += len(data)
            else:
                down += len(data)
        error = "connect to 127.0.0.1:8080: Connection refused" if not chunks else None
        events.append(
            FlowClosed(
                flow.closed(
                    ended_at=start + 0.25, bytes_up=up, bytes_down=down, reason=reason, error=error
                )
            )
        )
    return events


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """UTC times and no throughput samples, so nothing on screen depends on when it runs."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    monkeypatch.setattr(StatsBar, "SAMPLE_INTERVAL_S", 1e9)
    yield
    monkeypatch.undo()
    time.tzset()


def fixed_app() -> FlowtapApp:
    events = EventQueue()
    for event in fixed_events():
        events.handle(event)
    return FlowtapApp(events=events, source="snapshot 127.0.0.1:48080 → 127.0.0.1:8080")


def loaded(then: Callable[[Pilot[Any]], Any] | None = None) -> Callable[[Pilot[Any]], Any]:
    async def run_before(pilot: Pilot[Any]) -> None:
        table = pilot.app.query_one(FlowTable)
        deadline = time.monotonic() + 10
        while len(table.ids) < len(CONVERSATIONS) or any(
            r.summary_stale for r in pilot.app.store.records.values()
        ):
            assert time.monotonic() < deadline, "the fixed flows did not load"
            await pilot.pause(0.05)
        await pilot.pause(0.3)  # one more detail refresh
        if then is not None:
            await then(pilot)

    return run_before


def test_main_screen_shows_flows_and_the_selected_conversation(snap_compare: Any) -> None:
    assert snap_compare(fixed_app(), terminal_size=SIZE, run_before=loaded())


def test_hex_view_of_the_selected_flow(snap_compare: Any) -> None:
    async def select_chat_and_hex(pilot: Pilot[Any]) -> None:
        await pilot.press("down", "down", "h")
        await pilot.pause(0.3)

    assert snap_compare(fixed_app(), terminal_size=SIZE, run_before=loaded(select_chat_and_hex))


def test_filtered_and_sorted_table(snap_compare: Any) -> None:
    async def filter_and_sort(pilot: Pilot[Any]) -> None:
        await pilot.press("slash", *"port 8080", "enter")
        pilot.app.action_sort("state")
        await pilot.pause(0.3)

    assert snap_compare(fixed_app(), terminal_size=SIZE, run_before=loaded(filter_and_sort))


def test_too_small_terminal_message(snap_compare: Any) -> None:
    assert snap_compare(fixed_app(), terminal_size=(50, 12))
