"""The capture writer: flow events in, pcap/pcapng out that tshark and scapy read as traffic."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest
from capture_checks import (
    assert_tshark_clean,
    fields,
    follow_tcp,
    follow_udp,
    scapy_count,
)

from flowtap.inspector.pcapfile.reader import CaptureReader
from flowtap.inspector.pcapfile.writer import CaptureWriter, open_packet_file
from flowtap.proxy.errors import FlowtapError
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

T0 = 1_764_000_000.123456


def make_flow(
    flow_id: int,
    client: Address,
    server: Address,
    transport: Transport = Transport.TCP,
    started_at: float = T0,
) -> Flow:
    return Flow(
        id=flow_id,
        transport=transport,
        client=client,
        server=server,
        listener=Address("127.0.0.1", 9000),
        started_at=started_at,
        state=FlowState.OPEN,
    )


def conversation(
    flow: Flow,
    chunks: list[tuple[Direction, bytes]],
    reason: CloseReason = CloseReason.CLIENT_CLOSED,
    error: str | None = None,
) -> list[FlowEvent]:
    events: list[FlowEvent] = [FlowOpened(flow)]
    up = down = 0
    t = flow.started_at
    for direction, data in chunks:
        t += 0.001
        events.append(FlowData(flow.id, direction, t, data))
        if direction is Direction.UP:
            up += len(data)
        else:
            down += len(data)
    closed = flow.closed(
        ended_at=t + 0.001, bytes_up=up, bytes_down=down, reason=reason, error=error
    )
    events.append(FlowClosed(closed))
    return events


def write_capture(path: Path, events: list[FlowEvent], *, checksums: bool = False) -> Path:
    out = open_packet_file(path)
    writer = CaptureWriter(out, checksums=checksums)
    for event in events:
        writer.write(event)
    out.close()
    return path


def sent_bytes(chunks: list[tuple[Direction, bytes]], direction: Direction) -> bytes:
    return b"".join(data for d, data in chunks if d is direction)


@pytest.mark.parametrize("suffix", [".pcap", ".pcapng"])
@pytest.mark.parametrize(
    ("client", "server"),
    [
        (Address("127.0.0.1", 40000), Address("127.0.0.1", 47001)),
        (Address("::1", 40000), Address("::1", 47001)),
    ],
    ids=["ipv4", "ipv6"],
)
def test_tcp_flow_follows_in_tshark_to_exact_bytes(
    tmp_path: Path, suffix: str, client: Address, server: Address
) -> None:
    chunks = [
        (Direction.UP, b"*1\r\n$4\r\nPING\r\n"),
        (Direction.DOWN, b"+PONG\r\n"),
        (Direction.UP, os.urandom(262144)),  # more than one IP packet can hold
        (Direction.DOWN, os.urandom(200_001)),  # odd length
        (Direction.UP, b"\x00" * 70000),
    ]
    flow = make_flow(1, client, server)
    path = write_capture(tmp_path / f"flow{suffix}", conversation(flow, chunks))
    assert_tshark_clean(path)
    up, down = follow_tcp(path, 0)
    assert up == sent_bytes(chunks, Direction.UP)
    assert down == sent_bytes(chunks, Direction.DOWN)
    rows = fields(path, "ip.src", "ipv6.src", "tcp.srcport", "tcp.dstport", "tcp.len")
    first = rows[0]
    assert client.host in first[:2]
    assert first[2:4] == [str(client.port), str(server.port)]
    # Segments fill but never overflow an IP packet (IPv6's limit excludes its own header).
    largest = 65535 - 20 - (0 if client.is_ipv6 else 20)
    assert max(int(row[4]) for row in rows) == largest
    assert scapy_count(path) == len(rows)


@pytest.mark.parametrize("suffix", [".pcap", ".pcapng"])
def test_timestamps_are_the_event_times_in_the_formats_resolution(
    tmp_path: Path, suffix: str
) -> None:
    flow = make_flow(1, Address("127.0.0.1", 40000), Address("127.0.0.1", 80))
    events: list[FlowEvent] = [
        FlowOpened(flow),
        FlowData(1, Direction.UP, 1_764_000_001.000123456, b"GET / HTTP/1.0\r\n\r\n"),
        FlowClosed(
            flow.closed(
                ended_at=1_764_000_002.5,
                bytes_up=18,
                bytes_down=0,
                reason=CloseReason.CLIENT_CLOSED,
            )
        ),
    ]
    path = write_capture(tmp_path / f"t{suffix}", events)
    assert_tshark_clean(path)
    times = [row[0] for row in fields(path, "frame.time_epoch", display_filter="tcp.len > 0")]
    seconds, fraction = times[0].split(".")
    assert seconds == "1764000001"
    # pcap keeps microseconds; pcapng nanoseconds (a float event time is exact to ~0.25 µs).
    if suffix == ".pcap":
        assert fraction == "000123000"
    else:
        assert fraction.startswith("0001235") and not fraction.endswith("000")


def tcp_flags(path: Path) -> list[tuple[str, str]]:
    """(source port, flags) of every packet without payload after the handshake."""
    rows = fields(path, "tcp.srcport", "tcp.flags.str", "tcp.len")
    return [(port, flags.strip("·").strip()) for port, flags, size in rows[3:] if size == "0"]


@pytest.mark.parametrize(
    ("reason", "ending"),
    [
        (CloseReason.CLIENT_CLOSED, ["client FIN", "server FIN", "client ACK"]),
        (CloseReason.SERVER_CLOSED, ["server FIN", "client FIN", "server ACK"]),
        (CloseReason.CLIENT_RESET, ["client RST"]),
        (CloseReason.SERVER_RESET, ["server RST"]),
        (CloseReason.UPSTREAM_REFUSED, ["server RST"]),
        (CloseReason.KILLED, ["server RST", "client RST"]),
        (CloseReason.SHUTDOWN, ["server FIN", "client FIN", "server ACK"]),
    ],
)
def test_flow_ends_with_fin_or_rst_as_it_really_ended(
    tmp_path: Path, reason: CloseReason, ending: list[str]
) -> None:
    flow = make_flow(3, Address("127.0.0.1", 40000), Address("127.0.0.1", 6379))
    chunks = [(Direction.UP, b"hello"), (Direction.DOWN, b"world")]
    path = write_capture(tmp_path / "end.pcapng", conversation(flow, chunks, reason, "boom"))
    assert_tshark_clean(path, allowed_warnings=("Connection reset (RST)",))
    rows = fields(path, "tcp.srcport", "tcp.flags.fin", "tcp.flags.reset", "tcp.flags.ack")
    # After the handshake: data, ack, data, ack, then the ending.
    tail = rows[7:]
    described = []
    for port, fin, rst, _ack in tail:
        side = "client" if port == "40000" else "server"
        kind = "FIN" if fin in ("1", "True") else "RST" if rst in ("1", "True") else "ACK"
        described.append(f"{side} {kind}")
    assert described == ending
    up, down = follow_tcp(path, 0)
    assert (up, down) == (b"hello", b"world")
    comments = fields(path, "frame.comment", display_filter="frame.comment")
    closing = json.loads(comments[-1][0].removeprefix("flowtap "))
    assert closing == {"flow": 3, "reason": str(reason), "error": "boom"}


def test_udp_datagrams_carry_valid_checksums(tmp_path: Path) -> None:
    flow = make_flow(
        1, Address("127.0.0.1", 40001), Address("127.0.0.1", 9999), transport=Transport.UDP
    )
    chunks = [
        (Direction.UP, b"query-one"),
        (Direction.DOWN, b"answer-1"),
        (Direction.UP, b""),
        (Direction.DOWN, os.urandom(65507)),
    ]
    path = write_capture(tmp_path / "udp.pcapng", conversation(flow, chunks))
    prefs = ("udp.check_checksum:TRUE", "ip.check_checksum:TRUE")
    assert_tshark_clean(path, *prefs)
    rows = fields(path, "udp.checksum.status", "ip.checksum.status", "udp.length", prefs=prefs)
    assert [row[0] for row in rows] == ["1"] * 4  # good
    assert [row[1] for row in rows] == ["1"] * 4
    assert [int(row[2]) for row in rows] == [17, 16, 8, 65515]
    up, down = follow_udp(path, 0)
    assert up == b"query-one" and down == sent_bytes(chunks, Direction.DOWN)
    assert scapy_count(path) == 4


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_tcp_checksums_are_correct_when_asked_for(tmp_path: Path, host: str) -> None:
    # Port 47001 has no dissector, so the random payload is not parsed as a protocol.
    flow = make_flow(1, Address(host, 40000), Address(host, 47001))
    chunks = [(Direction.UP, os.urandom(100_001)), (Direction.DOWN, b"ok")]
    path = write_capture(tmp_path / "sum.pcap", conversation(flow, chunks), checksums=True)
    prefs = ("tcp.check_checksum:TRUE", "ip.check_checksum:TRUE")
    assert_tshark_clean(path, *prefs)
    rows = fields(path, "tcp.checksum.status", "ip.checksum.status", prefs=prefs)
    assert {row[0] for row in rows} == {"1"}
    assert {row[1] for row in rows} == ({""} if ":" in host else {"1"})  # IPv6 has none


def test_unix_socket_flows_use_placeholders_and_name_the_path(tmp_path: Path) -> None:
    flow = make_flow(7, Address("", path="/tmp/app.sock"), Address("", path="/run/redis.sock"))
    v6 = make_flow(8, Address("", path="/tmp/app.sock"), Address("::1", 6379))
    events = [
        *conversation(flow, [(Direction.UP, b"PING\r\n"), (Direction.DOWN, b"+PONG\r\n")]),
        *conversation(v6, [(Direction.UP, b"INFO\r\n")]),
    ]
    path = write_capture(tmp_path / "unix.pcapng", events)
    assert_tshark_clean(path)
    rows = fields(path, "ip.src", "ip.dst", "tcp.srcport", "tcp.dstport", display_filter="ip")
    assert rows[0] == ["127.1.0.1", "127.1.0.2", str(1024 + 7), "1"]
    rows6 = fields(path, "ipv6.src", "ipv6.dst", display_filter="ipv6")
    assert rows6[0] == ["fd00:f10e::1", "::1"]
    comments = [row[0] for row in fields(path, "frame.comment", display_filter="frame.comment")]
    opening = json.loads(comments[0].removeprefix("flowtap "))
    assert opening["client"] == "unix:/tmp/app.sock"
    assert opening["server"] == "unix:/run/redis.sock"
    assert follow_tcp(path, 0) == (b"PING\r\n", b"+PONG\r\n")


def test_mixed_families_are_written_as_ipv6_with_mapped_ipv4(tmp_path: Path) -> None:
    flow = make_flow(1, Address("::1", 40000), Address("127.0.0.1", 6379))
    path = write_capture(
        tmp_path / "mixed.pcap", conversation(flow, [(Direction.UP, b"x" * 70000)])
    )
    assert_tshark_clean(path)
    rows = fields(path, "ipv6.src", "ipv6.dst")
    assert rows[0] == ["::1", "::ffff:127.0.0.1"]
    assert follow_tcp(path, 0)[0] == b"x" * 70000


def test_capture_files_are_private(tmp_path: Path) -> None:
    target = tmp_path / "secret.pcapng"
    target.write_bytes(b"old")
    target.chmod(0o644)
    write_capture(target, [])
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert_tshark_clean(target)


def test_unknown_extension_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(FlowtapError, match=r"name the file \.pcap or \.pcapng"):
        open_packet_file(tmp_path / "capture.txt")
    with pytest.raises(FlowtapError, match="cannot create capture file"):
        open_packet_file(tmp_path / "missing" / "capture.pcap")


def test_closed_capture_keeps_no_blocks_reserved_ahead(tmp_path: Path) -> None:
    flow = make_flow(1, Address("127.0.0.1", 40000), Address("127.0.0.1", 47000))
    path = write_capture(tmp_path / "small.pcapng", conversation(flow, [(Direction.UP, b"hi")]))
    assert_tshark_clean(path)
    assert path.stat().st_blocks * 512 < 64 * 1024


@pytest.mark.parametrize("checksums", [False, True], ids=["plain", "checksums"])
@pytest.mark.parametrize("suffix", [".pcap", ".pcapng"])
@pytest.mark.parametrize("server_host", ["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
def test_chunks_received_into_the_file_recorded_or_copied_are_the_packets_written_one_by_one(
    tmp_path: Path, suffix: str, server_host: str, checksums: bool
) -> None:
    client_host = server_host
    flow = make_flow(7, Address(client_host, 40000), Address(server_host, 47000))
    # Every padding a record can need, a full segment and a chunk of several segments.
    sizes = [1, 2, 3, 4, 5, 6, 7, 1000, 65495, 150_000, 1, 1]
    chunks = [
        (Direction.UP if i % 2 == 0 else Direction.DOWN, bytes([i + 1]) * size)
        for i, size in enumerate(sizes)
    ]
    events = conversation(flow, chunks)
    ordinary = write_capture(tmp_path / f"ordinary{suffix}", events, checksums=checksums)
    # Classic pcap frames every packet on its own (no in-place framing): the reference.
    reference = write_capture(tmp_path / "reference.pcap", events, checksums=checksums)

    in_place = tmp_path / f"in-place{suffix}"
    out = open_packet_file(in_place)
    writer = CaptureWriter(out, checksums=checksums)
    writer.write(events[0])
    sender, receiver = socket.socketpair()
    with sender, receiver:
        receiver.setblocking(False)
        for direction, data in chunks:
            sender.sendall(data)
            got = b""
            while len(got) < len(data):
                chunk = writer.receive(flow.id, direction, receiver, 256 * 1024)
                got += b"".join(chunk.parts)
                assert chunk.loan is not None
                chunk.loan.release()
            assert got == data
    writer.write(events[-1])
    out.close()

    # Chunks the relay received into its own buffer and hands over once sent.
    recorded = tmp_path / f"recorded{suffix}"
    out = open_packet_file(recorded)
    writer = CaptureWriter(out, checksums=checksums)
    writer.write(events[0])
    for event in events[1:-1]:
        assert isinstance(event, FlowData)
        writer.record(flow.id, event.direction, int(event.timestamp * 1e9), memoryview(event.data))
    writer.write(events[-1])
    out.close()

    def packets(path: Path) -> list[bytes]:
        return [record.data for record in CaptureReader(path).records()]

    assert packets(in_place) == packets(reference)
    assert packets(ordinary) == packets(reference)
    assert packets(recorded) == packets(reference)
    assert_tshark_clean(ordinary)
    assert_tshark_clean(in_place)
    assert_tshark_clean(recorded)
