"""Turns, the player state machine, response comparison and flow matching, without sockets."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import pytest

from flowtap.inspector.flow_filter import parse_filter
from flowtap.inspector.replay.compare import compare, compile_patterns, mask, text_diff
from flowtap.inspector.replay.playback import Close, HalfClose, Player, Reset, Send
from flowtap.inspector.replay.serve import FlowMatcher, recorded_alpn
from flowtap.inspector.replay.turns import (
    Ending,
    Script,
    scripts_from_events,
    select_scripts,
)
from flowtap.proxy.errors import FlowtapError
from flowtap.proxy.flow import (
    Address,
    CloseReason,
    Direction,
    Flow,
    FlowClosed,
    FlowData,
    FlowOpened,
    TlsFacts,
    Transport,
)

UP = Direction.UP
DOWN = Direction.DOWN


@dataclass(frozen=True)
class Gap:
    """The shape of the capture reader's gap event."""

    flow_id: int
    direction: Direction
    timestamp: float
    size_bytes: int


def _flow(flow_id: int, transport: Transport = Transport.TCP, port: int = 6379) -> Flow:
    return Flow(
        id=flow_id,
        transport=transport,
        client=Address("127.0.0.1", 40000 + flow_id),
        server=Address("127.0.0.1", port),
        listener=Address("127.0.0.1", port),
        started_at=100.0,
    )


def _events(
    flow_id: int,
    steps: list[tuple[Direction, float, bytes]],
    reason: CloseReason | None = CloseReason.CLIENT_CLOSED,
    transport: Transport = Transport.TCP,
) -> list[object]:
    flow = _flow(flow_id, transport)
    out: list[object] = [FlowOpened(flow)]
    out += [FlowData(flow_id, d, 100.0 + t, data) for d, t, data in steps]
    if reason is not None:
        out.append(
            FlowClosed(
                flow.closed(ended_at=200.0, bytes_up=0, bytes_down=0, reason=reason),
            )
        )
    return out


def _script(steps: list[tuple[Direction, float, bytes]], **kwargs: object) -> Script:
    return scripts_from_events(_events(1, steps, **kwargs))[0]  # type: ignore[arg-type]


def test_consecutive_chunks_in_one_direction_form_one_turn() -> None:
    script = _script(
        [(UP, 0.1, b"GET "), (UP, 0.1, b"/\r\n"), (DOWN, 0.2, b"200"), (DOWN, 0.3, b" OK")]
    )
    assert [(t.direction, t.data) for t in script.turns] == [(UP, b"GET /\r\n"), (DOWN, b"200 OK")]
    assert script.turns[1].started_at == pytest.approx(100.2)
    assert script.turns[1].ended_at == pytest.approx(100.3)
    assert script.ending is Ending.CLIENT_CLOSE


def test_interleaved_flows_are_kept_apart_in_opening_order() -> None:
    a = _events(2, [(UP, 0.1, b"a1"), (DOWN, 0.2, b"A1")])
    b = _events(1, [(UP, 0.1, b"b1")], reason=CloseReason.SERVER_RESET)
    mixed = [a[0], b[0], a[1], b[1], a[2], b[2], a[3]]
    scripts = scripts_from_events(mixed)  # type: ignore[arg-type]
    assert [s.id for s in scripts] == [2, 1]
    assert scripts[0].data(UP) == b"a1"
    assert scripts[1].ending is Ending.SERVER_RESET


def test_flow_still_open_at_end_of_capture_has_unknown_ending() -> None:
    script = _script([(UP, 0.1, b"x")], reason=None)
    assert script.ending is Ending.UNKNOWN


def test_gap_stops_the_script_and_describes_the_fix() -> None:
    events = _events(1, [(UP, 0.1, b"q1"), (DOWN, 0.2, b"r1"), (UP, 0.5, b"q3")])
    events.insert(3, Gap(1, UP, 100.4, 1448))
    script = scripts_from_events(events)[0]  # type: ignore[arg-type]
    assert [t.data for t in script.turns] == [b"q1", b"r1"]
    assert script.gap is not None and script.gap.size_bytes == 1448
    message = script.gap.describe(1)
    assert "1448 bytes client to server" in message and "dumpcap -s 0" in message
    assert "\n" not in message


def test_select_rejects_unknown_flow_and_empty_capture_in_one_line() -> None:
    scripts = scripts_from_events(_events(1, [(UP, 0.1, b"x")]) + _events(2, []))  # type: ignore[arg-type]
    assert [s.id for s in select_scripts(scripts, flow_ids=[2, 1])] == [2, 1]
    with pytest.raises(FlowtapError, match=r"no flow 9 in the capture .*flows are 1, 2"):
        select_scripts(scripts, flow_ids=[9])
    with pytest.raises(FlowtapError, match="no TCP or UDP flows"):
        select_scripts([])


def test_select_filters_scripts_by_endpoints_and_payload() -> None:
    scripts = scripts_from_events(
        _events(1, [(UP, 0.1, b"GET /a HTTP/1.1\r\n\r\n"), (DOWN, 0.2, b"HTTP/1.1 200 OK\r\n")])
        + _events(2, [(UP, 0.1, b"PING\r\n"), (DOWN, 0.2, b"+PONG\r\n")])  # type: ignore[arg-type]
    )

    def picked(text: str) -> list[int]:
        flow_filter = parse_filter(text)
        assert flow_filter is not None
        return [s.id for s in select_scripts(scripts, flow_filter=flow_filter)]

    assert picked("tcp and host 127.0.0.1") == [1, 2]
    assert picked('up contains "GET /"') == [1]
    assert picked("down contains PONG or id 1") == [1, 2]
    assert picked("proto http") == [1]
    with pytest.raises(FlowtapError, match="no flow in the capture matches the --filter"):
        picked("udp")


def test_player_sends_next_turn_once_the_server_answered_as_many_bytes() -> None:
    script = _script([(UP, 0.0, b"q1"), (DOWN, 0.1, b"r1r1"), (UP, 0.2, b"q2"), (DOWN, 0.3, b"r2")])
    player = Player(script, UP, speed=None, turn_timeout_s=1.0)
    assert player.start(0.0) == [Send(b"q1")]
    assert player.on_data(3, 0.01) == []
    assert player.on_data(1, 0.02) == [Send(b"q2")]
    assert player.on_data(2, 0.03) == [Close()]
    assert player.is_done and player.turns_sent == 2 and player.waits_timed_out == 0


def test_player_half_closes_when_the_answer_comes_after_the_client_finished() -> None:
    script = _script([(UP, 0.0, b"upload"), (DOWN, 0.5, b"6 bytes")])
    player = Player(script, UP, speed=None, turn_timeout_s=0.2)
    assert player.start(0.0) == [Send(b"upload")]
    assert player.on_timer(0.2) == [HalfClose()]
    assert player.on_data(7, 0.3) == []
    assert player.on_peer_closed(0.3) == [Close()]


def test_player_moves_on_after_a_quiet_turn_timeout() -> None:
    script = _script([(UP, 0.0, b"q1"), (DOWN, 0.1, b"long answer"), (UP, 0.2, b"q2")])
    player = Player(script, UP, speed=None, turn_timeout_s=0.5)
    player.start(0.0)
    assert player.on_data(4, 0.1) == []
    assert player.next_deadline == pytest.approx(0.6)
    assert player.on_timer(0.59) == []
    assert player.on_timer(0.6) == [Send(b"q2")]
    assert player.waits_timed_out == 1


def test_player_keeps_recorded_pauses_scaled_by_speed() -> None:
    script = _script([(UP, 1.0, b"q1"), (DOWN, 1.1, b"r1"), (UP, 3.1, b"q2")])
    player = Player(script, UP, speed=2.0, turn_timeout_s=5.0)
    assert player.start(0.0) == []
    assert player.next_deadline == pytest.approx(0.5)
    assert player.on_timer(0.5) == [Send(b"q1")]
    assert player.on_data(2, 0.6) == []
    assert player.next_deadline == pytest.approx(1.6)
    assert player.on_timer(1.6) == [Send(b"q2"), Close()]


def test_player_sends_each_udp_datagram_separately() -> None:
    script = _script(
        [(UP, 0.0, b"d1"), (UP, 0.0, b"d2"), (DOWN, 0.1, b"a1")],
        reason=None,
        transport=Transport.UDP,
    )
    player = Player(script, UP, speed=None, turn_timeout_s=1.0)
    assert player.start(0.0) == [Send(b"d1"), Send(b"d2")]
    assert player.on_data(2, 0.1) == [Close()]


def test_player_resets_where_the_client_reset_and_waits_when_server_closes() -> None:
    reset = _script([(UP, 0.0, b"q"), (DOWN, 0.1, b"r")], reason=CloseReason.CLIENT_RESET)
    player = Player(reset, UP, speed=None)
    player.start(0.0)
    assert player.on_data(1, 0.1) == [Reset()]
    server_closes = _script([(UP, 0.0, b"q"), (DOWN, 0.1, b"r")], reason=CloseReason.SERVER_CLOSED)
    player = Player(server_closes, UP, speed=None, turn_timeout_s=1.0)
    player.start(0.0)
    assert player.on_data(1, 0.1) == []
    assert player.on_peer_closed(0.2) == [Close()]


def test_server_side_player_answers_the_client_turns() -> None:
    script = _script(
        [(UP, 0.0, b"GET"), (DOWN, 0.1, b"200"), (UP, 0.2, b"BYE"), (DOWN, 0.3, b"ok")]
    )
    player = Player(script, DOWN, speed=None)
    assert player.start(0.0) == []
    assert player.on_data(3, 0.0) == [Send(b"200")]
    assert player.on_data(3, 0.1) == [Send(b"ok")]
    assert player.on_peer_closed(0.2) == [Close()]


def test_compare_reports_first_differing_offset_with_both_snippets() -> None:
    difference = compare(b"HTTP/1.1 200 OK\r\nbody-A", b"HTTP/1.1 200 OK\r\nbody-B")
    assert difference is not None
    assert difference.offset == 22
    assert difference.expected.endswith("body-A") and difference.received.endswith("body-B")
    assert compare(b"same", b"same") is None
    short = compare(b"abcdef", b"abc")
    assert short is not None and short.offset == 3


def test_ignore_masks_volatile_fields_but_offsets_stay_in_received_bytes() -> None:
    patterns = compile_patterns([r"Date: [^\r]*", r"id=\d+"])
    expected = b"Date: Mon, 01 Jan\r\nid=7 x=1\r\n"
    received = b"Date: Tuesday, 02 Feb\r\nid=12345 x=2\r\n"
    difference = compare(expected, received, patterns)
    assert difference is not None
    assert received[difference.offset : difference.offset + 3] == b"2\r\n"
    assert compare(expected, received.replace(b"x=2", b"x=1"), patterns) is None
    assert mask(b"id=1 id=22", patterns).data == "… …".encode()
    with pytest.raises(FlowtapError, match="not a regular expression"):
        compile_patterns(["(unclosed"])


def test_text_diff_is_unified_and_skips_binary() -> None:
    diff = text_diff(b"a\nb\nc\n", b"a\nB\nc\n", name="flow 1")
    assert diff is not None
    assert "--- flow 1 (recorded)" in diff and "-b\n" in diff and "+B\n" in diff
    assert text_diff(b"\x00\x01", b"\x00\x02") is None
    masked = text_diff(b"t=1\n", b"t=2\n", [re.compile(rb"\d")])
    assert masked == ""


def test_matcher_picks_the_flow_whose_first_client_turn_matches_best() -> None:
    get = _script([(UP, 0.0, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"), (DOWN, 0.1, b"$1\r\nv\r\n")])
    set_ = scripts_from_events(
        _events(2, [(UP, 0.0, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"), (DOWN, 0.1, b"+OK")])
    )[0]  # type: ignore[arg-type]
    matcher = FlowMatcher([get, set_])
    assert matcher.on_connect() is None
    assert matcher.choose(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n", is_final=False) is set_
    assert matcher.choose(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", is_final=False) is get
    # A partial first turn waits for more, unless the client has gone quiet.
    assert matcher.choose(b"*2\r\n$3\r\nGE", is_final=False) is None
    assert matcher.choose(b"*2\r\n$3\r\nGE", is_final=True) is get


def test_matcher_serves_identical_flows_in_recorded_order() -> None:
    scripts = scripts_from_events(
        _events(1, [(UP, 0, b"GET /"), (DOWN, 0.1, b"one")])
        + _events(2, [(UP, 0, b"GET /"), (DOWN, 0.1, b"two")])  # type: ignore[arg-type]
    )
    matcher = FlowMatcher(scripts)
    assert [matcher.choose(b"GET /", is_final=False).id for _ in range(3)] == [1, 2, 1]  # type: ignore[union-attr]


def test_serve_offers_the_recorded_alpn_protocols_most_frequent_first() -> None:
    def negotiated(flow_id: int, alpn: str | None) -> Script:
        script = scripts_from_events(_events(flow_id, [(UP, 0, b"x"), (DOWN, 0.1, b"y")]))[0]
        tls = TlsFacts("intercept", alpn=alpn)
        return replace(script, flow=replace(script.flow, tls=tls))  # type: ignore[arg-type]

    plain = scripts_from_events(_events(9, [(UP, 0, b"x")]))
    assert recorded_alpn(plain) == ()  # type: ignore[arg-type]
    picked = ["http/1.1", "h2", None, "h2", "spdy/3", "h2", "http/1.1"]
    scripts = [negotiated(number, alpn) for number, alpn in enumerate(picked, start=1)]
    assert recorded_alpn(scripts) == ("h2", "http/1.1", "spdy/3")
