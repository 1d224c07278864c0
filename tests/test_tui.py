"""The terminal UI driven by Textual's pilot, attached to a real relay process carrying real
traffic."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from capture_checks import assert_tshark_clean, follow_tcp
from textual.pilot import Pilot

from conftest import exchange, start_flowtap
from flowtap.inspector.pcapfile.capture import CaptureObserver
from flowtap.inspector.tui import app as app_module
from flowtap.inspector.tui.app import FlowtapApp
from flowtap.inspector.tui.viewer import ControlClient
from flowtap.inspector.tui.widgets.chunk_view import ChunkView
from flowtap.inspector.tui.widgets.conversation import Conversation
from flowtap.inspector.tui.widgets.flow_detail import FlowDetail
from flowtap.inspector.tui.widgets.flow_table import FlowTable
from flowtap.inspector.tui.widgets.hex_view import HexView
from flowtap.proxy.events import Bus, EventQueue
from flowtap.proxy.flow import Address, Direction
from flowtap.proxy.listener import ListenerSpec
from flowtap.proxy.relay import Relay

SIZE = (160, 48)


class LiveRelay:
    """A `flowtap run` process on loopback in front of the echo server; apps attach to it
    through its control socket, as `flowtap tui` does."""

    def __init__(self, upstream: tuple[str, int], control: Path) -> None:
        self.process = start_flowtap(
            "run",
            "--quiet",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            f"{upstream[0]}:{upstream[1]}",
            "--control",
            str(control),
        )
        self.process.wait_line("^control unix:")
        self.control = control
        self.port = self.process.port
        self.upstream_port = upstream[1]
        self.clients: list[ControlClient] = []

    def app(self, **kwargs: object) -> FlowtapApp:
        client = ControlClient(str(self.control))
        client.subscribe()
        self.clients.append(client)
        return FlowtapApp(events=client, relay=client, source="test", **kwargs)  # type: ignore[arg-type]

    def exchange(self, payload: bytes) -> bytes:
        """Send `payload` through the relay, half-close, and return what came back."""
        return exchange(self.port, payload)

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        self.process.stop()


@pytest.fixture
def live(echo_server: tuple[str, int], tmp_path: Path) -> Iterator[LiveRelay]:
    relay = LiveRelay(echo_server, tmp_path / "control.sock")
    yield relay
    relay.stop()


async def until(
    pilot: Pilot[None], predicate: Callable[[], bool], what: str, timeout_s: float = 10.0
) -> None:
    """Let the app run until `predicate()` holds, failing after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await pilot.pause(0.02)


def run(app: FlowtapApp, scenario: Callable[[Pilot[None]], Awaitable[None]]) -> None:
    async def main() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await scenario(pilot)

    asyncio.run(main())


def screen_text(view: ChunkView) -> str:
    """The lines a payload view draws on screen now."""
    height = view.scrollable_content_region.height
    return "\n".join(view.render_line(y).text.rstrip() for y in range(height))


def closed_rows(app: FlowtapApp) -> int:
    return sum(1 for i in app.query_one(FlowTable).ids if app.store.records[i].is_closed)


def test_a_relayed_flow_appears_in_the_table_with_its_summary(live: LiveRelay) -> None:
    app = live.app()

    async def scenario(pilot: Pilot[None]) -> None:
        request = b"GET /hello HTTP/1.1\r\nHost: demo.test\r\n\r\n"
        assert await asyncio.to_thread(live.exchange, request) == request
        await until(pilot, lambda: closed_rows(app) == 1, "the flow to close")
        await until(
            pilot,
            lambda: app.store.records[app.query_one(FlowTable).ids[0]].summary.protocol == "http",
            "the summary",
        )
        table = app.query_one(FlowTable)
        record = app.store.records[table.ids[0]]
        assert (record.bytes_up, record.bytes_down) == (len(request), len(request))
        row = table.row_text(record)
        assert f"127.0.0.1:{live.upstream_port}" in row
        assert "GET /hello (demo.test)" in row
        assert "client-closed" in row or "server-closed" in row

    run(app, scenario)


def test_an_attached_app_sleeps_while_nothing_comes_and_wakes_when_a_flow_does(
    live: LiveRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Draining the feed 20 times a second cost an idle TUI 7 ms of CPU a second: with
    nothing coming it draws once a second, and the feed wakes it when a flow comes."""
    ticks: list[float] = []
    tick = FlowtapApp._tick

    def counted(app: FlowtapApp, **kwargs: bool) -> None:
        ticks.append(time.monotonic())
        tick(app, **kwargs)

    monkeypatch.setattr(FlowtapApp, "_tick", counted)
    app = live.app()

    async def scenario(pilot: Pilot[None]) -> None:
        await pilot.pause(app_module.SLEEP_AFTER_S + 1.0)
        started = time.monotonic()
        await pilot.pause(2.0)
        assert len([at for at in ticks if at >= started]) <= 3
        # Right after a once-a-second tick: without a wake-up the flow would wait a second.
        count = len(ticks)
        await until(pilot, lambda: len(ticks) > count, "a once-a-second tick")
        sent = time.monotonic()
        assert await asyncio.to_thread(live.exchange, b"wake up\r\n") == b"wake up\r\n"
        await until(pilot, lambda: len(app.store) == 1, "the flow")
        assert time.monotonic() - sent < 0.5
        await until(pilot, lambda: closed_rows(app) == 1, "its row")
        await pilot.pause(app_module.SLEEP_AFTER_S + 0.5)  # asleep again as it stops
        late.append(live.clients[-1].on_events)

    late: list[Callable[[], object] | None] = []
    run(app, scenario)
    assert live.clients[-1].on_events is None
    wake = late[0]
    assert wake is not None
    wake()  # the viewer's thread may still call it once the app's loop has closed


def test_selecting_a_flow_shows_its_conversation_and_hex(live: LiveRelay) -> None:
    app = live.app()

    async def scenario(pilot: Pilot[None]) -> None:
        await asyncio.to_thread(live.exchange, b"first flow\r\n")
        await asyncio.to_thread(live.exchange, b"second flow says hello\r\n")
        await until(pilot, lambda: closed_rows(app) == 2, "two flows")
        table = app.query_one(FlowTable)
        await pilot.press("down")
        await pilot.pause()
        detail = app.query_one(FlowDetail)
        assert detail.flow_id == table.ids[1]
        await until(
            pilot,
            lambda: "second flow says hello\\r\\n" in screen_text(app.query_one(Conversation)),
            "the conversation",
        )
        await pilot.press("h")
        await until(pilot, lambda: app.query_one(HexView).display, "the hex view")
        hex_dump = screen_text(app.query_one(HexView))
        assert "73 65 63 6f 6e 64 20 66" in hex_dump  # "second f"
        assert "|second flow says|" in hex_dump
        await pilot.press("h")
        await pilot.pause()
        assert not app.query_one(HexView).display

    run(app, scenario)


def test_the_filter_narrows_the_table_by_content_and_port(live: LiveRelay) -> None:
    app = live.app()

    async def scenario(pilot: Pilot[None]) -> None:
        for text in (b"alpha\r\n", b"needle in a haystack\r\n", b"gamma\r\n"):
            await asyncio.to_thread(live.exchange, text)
        await until(pilot, lambda: closed_rows(app) == 3, "three flows")
        table = app.query_one(FlowTable)
        await pilot.press("slash")
        await pilot.press(*"contains needle")
        await until(pilot, lambda: len(table.ids) == 1, "the filter to apply")
        assert app.store.raw_bytes(table.ids[0], Direction.UP) == b"needle in a haystack\r\n"
        await pilot.press("escape")
        assert app.focused is table
        app.query_one("#filter").value = f"port {live.upstream_port}"  # type: ignore[attr-defined]
        await until(pilot, lambda: len(table.ids) == 3, "the port filter")
        await pilot.press("slash", "ctrl+u", *"matches /[unclosed/")
        await pilot.pause()
        assert not app._notifications  # no nagging while typing, only a red border
        assert app.query_one("#filter").has_class("-invalid")
        await pilot.press("enter")
        await until(pilot, lambda: bool(app._notifications), "a notification")
        message = list(app._notifications)[-1].message
        assert message.startswith("column 9: expected a valid regex")
        # the same text under the box, and the last expression that parsed ("matche", a bare
        # word) stays in place
        assert app.query_one("#filter").border_subtitle == message
        assert table.flow_filter is not None and table.flow_filter.text == "matche"

    run(app, scenario)


def test_sorting_by_a_column_orders_rows_and_reverses(live: LiveRelay) -> None:
    app = live.app()

    async def scenario(pilot: Pilot[None]) -> None:
        sizes = [300, 100, 200]
        for size in sizes:
            await asyncio.to_thread(live.exchange, b"x" * size)
        await until(pilot, lambda: closed_rows(app) == 3, "three flows")
        table = app.query_one(FlowTable)
        app.action_sort("up")
        await pilot.pause()
        assert [app.store.records[i].bytes_up for i in table.ids] == [100, 200, 300]
        await pilot.press("S")
        await pilot.pause()
        assert [app.store.records[i].bytes_up for i in table.ids] == [300, 200, 100]
        assert "↑ bytes ▼" in table.header_text()
        await pilot.press("s")  # the next column, ascending
        await pilot.pause()
        assert table.sort_column == "down" and not table.sort_reverse
        await pilot.click(FlowTable, offset=(2, 0))  # the header of the id column
        await pilot.pause()
        assert table.sort_column == "id"
        assert table.ids == sorted(table.ids)

    run(app, scenario)


def test_kill_resets_both_sides_of_a_live_flow(live: LiveRelay) -> None:
    app = live.app()

    async def scenario(pilot: Pilot[None]) -> None:
        client = socket.create_connection(("127.0.0.1", live.port), timeout=10)
        try:
            client.sendall(b"stay a while\r\n")
            assert client.recv(100) == b"stay a while\r\n"
            table = app.query_one(FlowTable)
            await until(pilot, lambda: len(table.ids) == 1, "the live flow")
            assert table.row_text(app.store.records[table.ids[0]]).split()[5] == "open"
            await pilot.press("k")
            await until(pilot, lambda: closed_rows(app) == 1, "the flow to close")
            assert app.store.records[table.ids[0]].state_text == "killed"

            def client_sees_reset() -> bool:
                try:
                    return client.recv(100) == b""
                except ConnectionResetError:
                    return True

            assert await asyncio.to_thread(client_sees_reset)
            await pilot.press("k")  # killing it again only tells the user
            await pilot.pause()
            assert "already ended" in list(app._notifications)[-1].message
        finally:
            client.close()

    run(app, scenario)


def test_export_writes_one_directions_bytes_and_a_bad_path_notifies(
    live: LiveRelay, tmp_path: Path
) -> None:
    app = live.app(export_dir=tmp_path)

    async def scenario(pilot: Pilot[None]) -> None:
        payload = bytes(range(256)) * 40
        await asyncio.to_thread(live.exchange, payload)
        await until(pilot, lambda: closed_rows(app) == 1, "the flow")
        await pilot.press("e")
        await pilot.pause()
        await pilot.press("enter")  # accept the suggested path
        target = tmp_path / f"flow-{app.query_one(FlowTable).ids[0]}-client.bin"
        await until(pilot, target.exists, "the export")
        assert target.read_bytes() == payload
        blocked = tmp_path / "a-file"
        blocked.write_bytes(b"")
        flow_id = app.query_one(FlowTable).ids[0]
        assert not app.export_raw(flow_id, Direction.DOWN, blocked / "x.bin")
        await pilot.pause()
        assert "Cannot write" in list(app._notifications)[-1].message

    run(app, scenario)


def test_clear_closed_keeps_live_flows(live: LiveRelay) -> None:
    app = live.app()

    async def scenario(pilot: Pilot[None]) -> None:
        await asyncio.to_thread(live.exchange, b"done\r\n")
        client = socket.create_connection(("127.0.0.1", live.port), timeout=10)
        try:
            table = app.query_one(FlowTable)
            await until(pilot, lambda: len(table.ids) == 2 and closed_rows(app) == 1, "flows")
            await pilot.press("c")
            await pilot.pause()
            assert len(table.ids) == 1
            assert not app.store.records[table.ids[0]].is_closed
        finally:
            client.close()

    run(app, scenario)


def test_follow_keeps_the_cursor_on_the_newest_flow(live: LiveRelay) -> None:
    app = live.app()

    async def scenario(pilot: Pilot[None]) -> None:
        table = app.query_one(FlowTable)
        await pilot.press("f")
        for n in range(3):
            await asyncio.to_thread(live.exchange, b"flow %d\r\n" % n)
        await until(pilot, lambda: len(table.ids) == 3, "three flows")
        assert table.selected_id == table.ids[-1]

    run(app, scenario)


def test_a_terminal_too_small_gets_a_message() -> None:
    app = FlowtapApp(events=EventQueue(), source="test")

    async def main() -> None:
        async with app.run_test(size=(50, 10)) as pilot:
            await pilot.pause()
            assert app.screen.has_class("-too-small")
            assert "too small (50x10)" in str(app.query_one("#too-small").render())
            assert not app.query_one("#main").display or app.screen.has_class("-too-small")

    asyncio.run(main())


def test_saving_flows_writes_captures_that_tshark_reassembles(
    live: LiveRelay, tmp_path: Path
) -> None:
    app = live.app(export_dir=tmp_path)
    first = b"GET /one HTTP/1.1\r\nHost: a.test\r\n\r\n" + bytes(range(256)) * 300
    second = b"second flow payload\r\n" * 50

    def saved(text: str) -> bool:
        return any(n.message.startswith(text) for n in app._notifications)

    async def scenario(pilot: Pilot[None]) -> None:
        for payload in (first, second):
            await asyncio.to_thread(live.exchange, payload)
        await until(pilot, lambda: closed_rows(app) == 2, "two flows")
        table = app.query_one(FlowTable)
        await pilot.press("w")  # the selected (first) flow, to the suggested .pcapng
        await pilot.pause()
        await pilot.press("enter")
        await until(pilot, lambda: saved("Saved 1 flow(s)"), "the saved flow")
        await pilot.press("W")
        await pilot.pause()
        await pilot.press("ctrl+u", *str(tmp_path / "all.pcap"), "enter")
        await until(pilot, lambda: saved("Saved 2 flow(s)"), "all flows saved")
        assert not app.save_flows(tmp_path / "flows.txt", table.ids)
        await pilot.pause()
        assert "name the file .pcap or .pcapng" in list(app._notifications)[-1].message

    run(app, scenario)
    assert follow_tcp(tmp_path / f"flow-{min(app.store.records)}.pcapng", 0) == (first, first)
    assert_tshark_clean(tmp_path / f"flow-{min(app.store.records)}.pcapng")
    assert follow_tcp(tmp_path / "all.pcap", 0) == (first, first)
    assert follow_tcp(tmp_path / "all.pcap", 1) == (second, second)
    assert_tshark_clean(tmp_path / "all.pcap")


def _record_capture(upstream: tuple[str, int], path: Path, payloads: list[bytes]) -> None:
    """Relay `payloads` (one flow each) with flowtap's capture observer writing `path`."""
    capture = CaptureObserver(path)
    events = EventQueue()
    bus = Bus([capture, events])
    relay = Relay([ListenerSpec(Address("127.0.0.1", 0), Address(*upstream))], bus)
    relay.start()
    port = relay.listeners[0].address.port
    try:
        for payload in payloads:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(65536):
                    pass
    finally:
        relay.stop(2.0)
        bus.close()


def test_a_capture_loads_offline_with_its_flows_and_payloads(
    echo_server: tuple[str, int], tmp_path: Path
) -> None:
    path = tmp_path / "recorded.pcapng"
    payloads = [b"GET /a HTTP/1.1\r\nHost: offline.test\r\n\r\n", b"x" * 100_000, b"PING\r\n"]
    _record_capture(echo_server, path, payloads)
    app = FlowtapApp(capture=path)

    async def scenario(pilot: Pilot[None]) -> None:
        table = app.query_one(FlowTable)
        await until(pilot, lambda: not app.loading, "the capture to load")
        await until(pilot, lambda: len(table.ids) == 3, "three flows")
        assert not app.query_one("#loading").display
        assert [app.store.raw_bytes(i, Direction.UP) for i in table.ids] == payloads
        assert [app.store.raw_bytes(i, Direction.DOWN) for i in table.ids] == payloads
        await until(
            pilot,
            lambda: app.store.records[table.ids[0]].summary.headline.startswith("GET /a"),
            "the summary",
        )
        assert "Loaded" in list(app._notifications)[-1].message
        await pilot.press("k")  # nothing to kill offline: a notification, not a crash
        await pilot.pause()
        assert "cannot be killed" in list(app._notifications)[-1].message

    run(app, scenario)


def test_a_damaged_capture_shows_what_it_holds_and_a_notification(
    echo_server: tuple[str, int], tmp_path: Path
) -> None:
    path = tmp_path / "whole.pcap"
    _record_capture(echo_server, path, [b"first\r\n", b"second\r\n"])
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(path.read_bytes()[:-30])
    garbage = tmp_path / "garbage.pcap"
    garbage.write_bytes(b"this is not a capture at all\n" * 10)

    app = FlowtapApp(capture=cut)

    async def cut_short(pilot: Pilot[None]) -> None:
        await until(pilot, lambda: not app.loading, "the capture to load")
        await pilot.pause(0.2)
        assert len(app.query_one(FlowTable).ids) == 2
        notes = [n.message for n in app._notifications]
        assert any("cut short" in n or "damaged" in n or "truncated" in n for n in notes), notes

    run(app, cut_short)

    bad = FlowtapApp(capture=garbage)

    async def not_a_capture(pilot: Pilot[None]) -> None:
        await until(pilot, lambda: not bad.loading, "the load to fail")
        await pilot.pause(0.2)
        assert len(bad.query_one(FlowTable).ids) == 0
        assert "is not a pcap or pcapng capture" in list(bad._notifications)[-1].message

    run(bad, not_a_capture)


def test_the_command_palette_offers_the_flow_actions(live: LiveRelay) -> None:
    app = live.app()

    async def scenario(pilot: Pilot[None]) -> None:
        for size in (300, 100):
            await asyncio.to_thread(live.exchange, b"p" * size)
        await until(pilot, lambda: closed_rows(app) == 2, "two flows")
        await pilot.press("ctrl+p")
        await until(pilot, lambda: type(app.screen).__name__ == "CommandPalette", "the palette")
        await pilot.press(*"sort by up")
        await pilot.pause(0.3)
        await pilot.press("enter")
        table = app.query_one(FlowTable)
        await until(pilot, lambda: table.sort_column == "up", "the sort from the palette")
        assert [app.store.records[i].bytes_up for i in table.ids] == [100, 300]

    run(app, scenario)


def test_a_live_bulk_flow_past_the_keep_cap_still_counts_its_bytes(live: LiveRelay) -> None:
    app = live.app()
    size = 3 * 1024 * 1024  # three times what the store keeps of a direction

    async def scenario(pilot: Pilot[None]) -> None:
        client = socket.create_connection(("127.0.0.1", live.port), timeout=10)

        def send_and_read_back() -> None:
            client.sendall(b"b" * size)
            got = 0
            while got < size:
                got += len(client.recv(262144))

        try:
            await asyncio.to_thread(send_and_read_back)
            table = app.query_one(FlowTable)
            await until(pilot, lambda: len(table.ids) == 1, "the flow")
            record = app.store.records[table.ids[0]]
            await until(
                pilot,
                lambda: (record.bytes_up, record.bytes_down) == (size, size),
                "the live byte counts from the relay",
            )
            assert not record.is_closed
            assert record.kept_up == record.kept_down == 1024 * 1024
            assert "3.0MiB" in table.row_text(record)
        finally:
            client.close()

    run(app, scenario)


def test_flows_a_capture_ends_before_say_so_rather_than_open(tmp_path: Path) -> None:
    """A capture cut while a TCP flow was open, and a UDP session (which never sends an end)."""
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.utils import wrpcap

    client, server = "127.0.0.1", "127.0.0.2"
    tcp = [
        IP(src=client, dst=server) / TCP(sport=40000, dport=6379, flags="S", seq=100),
        IP(src=server, dst=client) / TCP(sport=6379, dport=40000, flags="SA", seq=500, ack=101),
        IP(src=client, dst=server) / TCP(sport=40000, dport=6379, flags="A", seq=101, ack=501),
        IP(src=client, dst=server)
        / TCP(sport=40000, dport=6379, flags="PA", seq=101, ack=501)
        / b"PING\r\n",
    ]
    udp = [
        IP(src=client, dst=server) / UDP(sport=40001, dport=53) / b"query",
        IP(src=server, dst=client) / UDP(sport=53, dport=40001) / b"answer",
    ]
    path = tmp_path / "cut.pcap"
    wrpcap(str(path), tcp + udp)
    assert_tshark_clean(path, data_port=53)  # the UDP payloads are not DNS messages
    app = FlowtapApp(capture=path)

    async def scenario(pilot: Pilot[None]) -> None:
        table = app.query_one(FlowTable)
        await until(pilot, lambda: not app.loading, "the capture to load")
        await until(pilot, lambda: len(table.ids) == 2, "two flows")
        states = {str(r.flow.transport): r.state_text for r in app.store.records.values()}
        assert states == {"tcp": "open at end", "udp": "no end (udp)"}
        for flow_id in table.ids:
            record = app.store.records[flow_id]
            assert record.state_text in table.row_text(record)

    run(app, scenario)
