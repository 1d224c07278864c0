"""TCP reassembly and UDP conversations, tested on segments without sockets or files."""

from __future__ import annotations

import socket

from flowtap.inspector.pcapfile.reader import Segment
from flowtap.inspector.pcapfile.reassembly import CaptureEvent, FlowGap, Reassembler
from flowtap.proxy.flow import (
    CloseReason,
    Direction,
    Flow,
    FlowClosed,
    FlowData,
    FlowOpened,
    FlowState,
)

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
CLIENT = socket.inet_aton("10.0.0.1")
SERVER = socket.inet_aton("10.0.0.2")
C_ISN = 1000
S_ISN = 5000


def seg(
    from_client: bool,
    seq: int,
    flags: int,
    payload: bytes = b"",
    *,
    ack: int = 0,
    length: int | None = None,
    t: float = 1.0,
    udp: bool = False,
    ports: tuple[int, int] = (40000, 80),
) -> Segment:
    src, dst = (CLIENT, SERVER) if from_client else (SERVER, CLIENT)
    sport, dport = ports if from_client else ports[::-1]
    return Segment(
        t, udp, src, sport, dst, dport, seq % (1 << 32), ack % (1 << 32), flags,
        memoryview(payload), len(payload) if length is None else length, None,
    )  # fmt: skip


def run(segments: list[Segment], **options: int) -> list[CaptureEvent]:
    reassembler = Reassembler(**options)  # type: ignore[arg-type]
    events: list[CaptureEvent] = []
    for segment in segments:
        events += reassembler.feed(segment)
    return events + reassembler.finish()


def handshake(c_isn: int = C_ISN, s_isn: int = S_ISN) -> list[Segment]:
    return [
        seg(True, c_isn, SYN),
        seg(False, s_isn, SYN | ACK, ack=c_isn + 1),
        seg(True, c_isn + 1, ACK, ack=s_isn + 1),
    ]


def stream(events: list[CaptureEvent], direction: Direction) -> list[bytes | int]:
    """Data as bytes and gaps as their sizes, in order, adjacent data joined."""
    out: list[bytes | int] = []
    for event in events:
        if isinstance(event, FlowData) and event.direction is direction:
            if out and isinstance(out[-1], bytes):
                out[-1] += event.data
            else:
                out.append(event.data)
        elif isinstance(event, FlowGap) and event.direction is direction:
            out.append(event.size_bytes)
    return out


def closed(events: list[CaptureEvent]) -> list[FlowClosed]:
    return [e for e in events if isinstance(e, FlowClosed)]


def test_in_order_flow_with_fins_closes_as_client_closed() -> None:
    c, s = C_ISN + 1, S_ISN + 1
    events = run(
        [
            *handshake(),
            seg(True, c, PSH | ACK, b"GET / HTTP/1.0\r\n\r\n", ack=s),
            seg(False, s, PSH | ACK, b"HTTP/1.0 200 OK\r\n\r\nhi", ack=c + 18),
            seg(True, c + 18, FIN | ACK, ack=s + 21),
            seg(False, s + 21, FIN | ACK, ack=c + 19),
            seg(True, c + 19, ACK, ack=s + 22),
        ]
    )
    assert isinstance(events[0], FlowOpened)
    assert str(events[0].flow.client) == "10.0.0.1:40000"
    assert stream(events, Direction.UP) == [b"GET / HTTP/1.0\r\n\r\n"]
    assert stream(events, Direction.DOWN) == [b"HTTP/1.0 200 OK\r\n\r\nhi"]
    (end,) = closed(events)
    assert end.flow.reason is CloseReason.CLIENT_CLOSED
    assert (end.flow.bytes_up, end.flow.bytes_down) == (18, 21)
    assert events[-1] is end


def test_out_of_order_segments_are_put_in_place() -> None:
    c = C_ISN + 1
    events = run(
        [
            *handshake(),
            seg(True, c + 10, PSH | ACK, b"KLMNOPQRST"),
            seg(True, c + 20, PSH | ACK, b"UVWXYZ"),
            seg(True, c, ACK, b"ABCDEFGHIJ"),
        ]
    )
    assert stream(events, Direction.UP) == [b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"]


def test_retransmissions_and_overlaps_appear_once() -> None:
    c = C_ISN + 1
    events = run(
        [
            *handshake(),
            seg(True, c, ACK, b"0123456789"),
            seg(True, c, ACK, b"0123456789"),  # retransmitted whole
            seg(True, c + 5, ACK, b"56789abcde"),  # overlaps the end
            seg(True, c + 12, ACK, b"cdefgh"),  # overlaps, beyond the position
            seg(True, c + 3, ACK, b"XXXX"),  # old bytes with different content: first wins
        ]
    )
    assert stream(events, Direction.UP) == [b"0123456789abcdefgh"]


def test_missing_bytes_are_a_gap_when_the_receiver_acknowledges_them() -> None:
    c, s = C_ISN + 1, S_ISN + 1
    events = run(
        [
            *handshake(),
            seg(True, c, ACK, b"first"),
            seg(True, c + 105, ACK, b"after"),  # 100 bytes never captured
            seg(False, s, ACK, ack=c + 110),
            seg(True, c + 110, ACK, b"more"),
        ]
    )
    assert stream(events, Direction.UP) == [b"first", 100, b"aftermore"]
    gap = next(e for e in events if isinstance(e, FlowGap))
    assert gap.flow_id == 1 and gap.direction is Direction.UP


def test_hole_left_at_the_end_of_the_flow_is_a_gap_never_glued() -> None:
    c = C_ISN + 1
    events = run([*handshake(), seg(True, c, ACK, b"abc"), seg(True, c + 13, ACK, b"xyz")])
    assert stream(events, Direction.UP) == [b"abc", 10, b"xyz"]
    (end,) = closed(events)
    assert end.flow.reason is None and end.flow.state is FlowState.OPEN
    assert end.flow.bytes_up == 6


def test_too_much_waiting_behind_a_hole_declares_the_gap() -> None:
    c = C_ISN + 1
    segments = [*handshake(), seg(True, c, ACK, b"a")]
    segments += [seg(True, c + 2 + 100 * i, ACK, b"x" * 100) for i in range(30)]
    events = run(segments, max_buffered_bytes=1000)
    data_before_end = [e for e in events[:-1] if isinstance(e, FlowGap)]
    assert data_before_end, "the gap is declared while the flow is still going"
    assert stream(events, Direction.UP) == [b"a", 1, b"x" * 3000]


def test_capture_starting_mid_stream_makes_the_first_sender_the_client() -> None:
    events = run(
        [
            seg(False, 77_000, PSH | ACK, b"+PONG\r\n", ack=123),
            seg(True, 123, PSH | ACK, b"PING\r\n", ack=77_007),
            seg(False, 77_007, PSH | ACK, b"+PONG\r\n", ack=129),
        ]
    )
    opened = events[0]
    assert isinstance(opened, FlowOpened)
    assert opened.flow.client.host == "10.0.0.2"  # the first sender
    assert stream(events, Direction.UP) == [b"+PONG\r\n+PONG\r\n"]
    assert stream(events, Direction.DOWN) == [b"PING\r\n"]


def test_syn_ack_first_still_finds_the_client() -> None:
    events = run(
        [
            seg(False, S_ISN, SYN | ACK, ack=C_ISN + 1),
            seg(True, C_ISN + 1, ACK | PSH, b"hi", ack=S_ISN + 1),
        ]
    )
    assert isinstance(events[0], FlowOpened) and events[0].flow.client.host == "10.0.0.1"
    assert stream(events, Direction.UP) == [b"hi"]


def test_sequence_numbers_wrap_around() -> None:
    isn = (1 << 32) - 4
    events = run(
        [
            *handshake(c_isn=isn),
            seg(True, isn + 1, ACK, b"abcdef"),
            seg(True, isn + 7, ACK, b"ghij"),
        ]
    )
    assert stream(events, Direction.UP) == [b"abcdefghij"]


def test_snapped_packet_reports_its_missing_tail_as_a_gap() -> None:
    c = C_ISN + 1
    events = run(
        [*handshake(), seg(True, c, ACK, b"head", length=1000), seg(True, c + 1000, ACK, b"z")]
    )
    assert stream(events, Direction.UP) == [b"head", 996, b"z"]


def test_reset_by_server_closes_the_flow_and_later_packets_are_ignored() -> None:
    c, s = C_ISN + 1, S_ISN + 1
    events = run(
        [
            *handshake(),
            seg(True, c, ACK, b"hello", ack=s),
            seg(False, s, RST | ACK, ack=c + 5),
            seg(True, c + 5, ACK, b"late"),
        ]
    )
    (end,) = closed(events)
    assert end.flow.reason is CloseReason.SERVER_RESET
    assert stream(events, Direction.UP) == [b"hello"]
    assert sum(isinstance(e, FlowOpened) for e in events) == 1


def test_server_fin_first_is_server_closed_and_half_close_stays_open() -> None:
    c, s = C_ISN + 1, S_ISN + 1
    events = run(
        [
            *handshake(),
            seg(False, s, FIN | ACK, ack=c),
            seg(True, c, PSH | ACK, b"still talking", ack=s + 1),
            seg(True, c + 13, FIN | ACK, ack=s + 1),
        ]
    )
    (end,) = closed(events)
    assert end.flow.reason is CloseReason.SERVER_CLOSED
    assert stream(events, Direction.UP) == [b"still talking"]
    half = run([*handshake(), seg(True, c, FIN | ACK, ack=s)])
    (end,) = closed(half)
    assert end.flow.reason is None and end.flow.state is FlowState.HALF_CLOSED


def test_flow_ids_follow_first_packets_and_reused_ports_start_a_new_flow() -> None:
    c, s = C_ISN + 1, S_ISN + 1
    other = seg(True, 1, PSH | ACK, b"x", ports=(40001, 80))
    events = run(
        [
            *handshake(),
            other,
            seg(True, c, PSH | ACK, b"one", ack=s),
            seg(True, c + 3, FIN | ACK, ack=s),
            seg(False, s, FIN | ACK, ack=c + 4),
            seg(True, c + 4, ACK, ack=s + 1),
            *handshake(c_isn=90_000, s_isn=10),
            seg(True, 90_001, PSH | ACK, b"two", ack=11),
        ]
    )
    opened = [e.flow for e in events if isinstance(e, FlowOpened)]
    assert [f.id for f in opened] == [1, 2, 3]
    assert [f.client.port for f in opened] == [40000, 40001, 40000]
    data = {(e.flow_id, e.data) for e in events if isinstance(e, FlowData)}
    assert data == {(2, b"x"), (1, b"one"), (3, b"two")}


def test_udp_conversation_keeps_datagrams_whole_in_both_directions() -> None:
    events = run(
        [
            seg(True, 0, 0, b"query", udp=True, ports=(5353, 53)),
            seg(False, 0, 0, b"answer", udp=True, ports=(5353, 53), t=2.0),
            seg(True, 0, 0, b"", udp=True, ports=(5353, 53), t=3.0),
        ]
    )
    opened = events[0]
    assert isinstance(opened, FlowOpened) and opened.flow.transport == "udp"
    data = [(e.direction, e.data) for e in events if isinstance(e, FlowData)]
    assert data == [(Direction.UP, b"query"), (Direction.DOWN, b"answer"), (Direction.UP, b"")]
    (end,) = closed(events)
    assert end.flow.ended_at == 3.0 and end.flow.bytes_down == 6


def test_data_for_limits_payload_copies_but_not_accounting() -> None:
    c = C_ISN + 1
    reassembler = Reassembler(data_for=lambda flow: False)
    events: list[CaptureEvent] = []
    for segment in [*handshake(), seg(True, c, ACK, b"abc"), seg(True, c + 5, ACK, b"z")]:
        events += reassembler.feed(segment)
    events += reassembler.finish()
    assert not any(isinstance(e, FlowData) for e in events)
    (end,) = closed(events)
    assert end.flow.bytes_up == 4
    assert [e.size_bytes for e in events if isinstance(e, FlowGap)] == [2]


def test_a_data_sink_gets_views_instead_of_events_until_it_wants_no_more() -> None:
    c = C_ISN + 1
    seen: list[tuple[int, Direction, bytes]] = []

    def sink(flow: Flow, direction: Direction, data: memoryview) -> bool:
        seen.append((flow.id, direction, bytes(data)))
        return len(seen) < 2

    reassembler = Reassembler(on_data=sink)
    events: list[CaptureEvent] = []
    for segment in handshake():
        events += reassembler.feed(segment)
    events += reassembler.feed(seg(True, c, ACK, b"abc"))
    events += reassembler.feed(seg(False, S_ISN + 1, ACK, b"xy"))
    events += reassembler.feed(seg(True, c + 3, ACK, b"def"))
    events += reassembler.finish()
    assert seen == [(1, Direction.UP, b"abc"), (1, Direction.DOWN, b"xy")]
    assert not any(isinstance(e, FlowData) for e in events)
    (end,) = closed(events)
    assert (end.flow.bytes_up, end.flow.bytes_down) == (6, 2)


def test_bytes_waiting_behind_holes_are_bounded_across_flows() -> None:
    reassembler = Reassembler(max_buffered_bytes=10_000, max_total_buffered_bytes=5_000)
    events: list[CaptureEvent] = []
    for port in range(40000, 40010):  # ten flows, each with a hole and 1000 bytes behind it
        events += reassembler.feed(seg(True, 1, ACK, b"a", ports=(port, 80)))
        events += reassembler.feed(seg(True, 3, ACK, b"x" * 1000, ports=(port, 80)))
    gaps_before_the_end = [e for e in events if isinstance(e, FlowGap)]
    assert gaps_before_the_end, "holes are declared while the capture goes on"
    assert all(e.size_bytes == 1 for e in gaps_before_the_end)
    events += reassembler.finish()
    for flow_id in range(1, 11):
        data = b"".join(e.data for e in events if isinstance(e, FlowData) and e.flow_id == flow_id)
        assert data == b"a" + b"x" * 1000
