"""Reading any tool's capture: formats, byte orders, resolutions, link types, several interfaces."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest
from capture_checks import assert_tshark_clean, scapy_count, tshark
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import CookedLinux, CookedLinuxV2, Dot1Q, Ether, Loopback
from scapy.packet import Packet

from flowtap.inspector.pcapfile.reader import CaptureReader
from flowtap.inspector.pcapfile.reassembly import CaptureEvent, FlowGap, load_flow, read_capture
from flowtap.proxy.flow import Direction, FlowClosed, FlowData, FlowOpened

T0 = 1_764_000_000


def tcp_conversation(ip: type[Packet] = IP, client: str = "10.1.1.1", server: str = "10.1.1.2"):  # type: ignore[no-untyped-def]
    """A short HTTP-like exchange as scapy packets (handshake, data both ways, FINs)."""
    c, s = 100, 900
    a, b = ip(src=client, dst=server), ip(src=server, dst=client)
    return [
        a / TCP(sport=40000, dport=80, flags="S", seq=c),
        b / TCP(sport=80, dport=40000, flags="SA", seq=s, ack=c + 1),
        a / TCP(sport=40000, dport=80, flags="A", seq=c + 1, ack=s + 1),
        a
        / TCP(sport=40000, dport=80, flags="PA", seq=c + 1, ack=s + 1)
        / b"GET / HTTP/1.0\r\n\r\n",
        b / TCP(sport=80, dport=40000, flags="PA", seq=s + 1, ack=c + 19) / b"HTTP/1.0 200 OK\r\n",
        b / TCP(sport=80, dport=40000, flags="FA", seq=s + 18, ack=c + 19),
        a / TCP(sport=40000, dport=80, flags="FA", seq=c + 19, ack=s + 19),
        a / TCP(sport=40000, dport=80, flags="A", seq=c + 20, ack=s + 19),
    ]


def write_pcap(
    path: Path, frames: list[bytes], linktype: int, *, endianness: str = "<", nano: bool = False
) -> Path:
    """A pcap file as libpcap writes it (scapy's writer cannot write link type 0)."""
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = [struct.pack(endianness + "IHHiIII", magic, 2, 4, 0, 0, 262144, linktype)]
    for i, frame in enumerate(frames):
        fraction = 123456789 if nano else 123456
        out.append(struct.pack(endianness + "IIII", T0 + i, fraction, len(frame), len(frame)))
        out.append(frame)
    path.write_bytes(b"".join(out))
    assert len(tshark("-r", str(path)).splitlines()) == len(frames)
    assert scapy_count(path) == len(frames)
    return path


def summary(events: list[CaptureEvent]) -> tuple[list[str], bytes, bytes, list[str]]:
    opened = [f"{e.flow.client}->{e.flow.server}" for e in events if isinstance(e, FlowOpened)]
    up = b"".join(e.data for e in events if isinstance(e, FlowData) and e.direction == "up")
    down = b"".join(e.data for e in events if isinstance(e, FlowData) and e.direction == "down")
    reasons = [str(e.flow.reason) for e in events if isinstance(e, FlowClosed)]
    return opened, up, down, reasons


EXPECTED = (
    ["10.1.1.1:40000->10.1.1.2:80"],
    b"GET / HTTP/1.0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n",
    ["server-closed"],
)


@pytest.mark.parametrize(
    ("name", "linktype", "frame"),
    [
        ("ethernet", 1, lambda p: Ether() / p),
        ("ethernet-vlan", 1, lambda p: Ether() / Dot1Q(vlan=7) / p),
        ("linux-cooked-v1", 113, lambda p: CookedLinux(proto=0x0800) / p),
        ("linux-cooked-v2", 276, lambda p: CookedLinuxV2(proto=0x0800) / p),
        ("raw-ip", 101, lambda p: p),
        ("bsd-loopback", 0, lambda p: Loopback(type=2) / p),
    ],
)
def test_every_supported_link_type_reads_to_the_same_flow(
    tmp_path: Path, name: str, linktype: int, frame
) -> None:  # type: ignore[no-untyped-def]
    frames = [bytes(frame(p)) for p in tcp_conversation()]
    path = write_pcap(tmp_path / f"{name}.pcap", frames, linktype)
    assert len(tshark("-r", str(path)).splitlines()) == len(frames)
    assert summary(list(read_capture(path))) == EXPECTED


@pytest.mark.parametrize("endianness", ["<", ">"])
@pytest.mark.parametrize("nano", [False, True])
def test_pcap_byte_orders_and_resolutions(tmp_path: Path, endianness: str, nano: bool) -> None:
    frames = [bytes(Ether() / p) for p in tcp_conversation()]
    path = write_pcap(tmp_path / "t.pcap", frames, 1, endianness=endianness, nano=nano)
    with CaptureReader(path) as reader:
        times = [record.timestamp for record in reader.records()]
        assert reader.format == ("pcap (nanosecond)" if nano else "pcap")
    fraction = 0.123456789 if nano else 0.123456
    assert times == [pytest.approx(T0 + i + fraction, abs=1e-7) for i in range(len(frames))]
    assert summary(list(read_capture(path))) == EXPECTED


def test_ipv6_and_udp_are_read(tmp_path: Path) -> None:
    frames = [bytes(Ether() / p) for p in tcp_conversation(IPv6, "fd00::1", "fd00::2")]
    frames += [
        bytes(Ether() / IP(src="10.0.0.5", dst="10.0.0.6") / UDP(sport=5000, dport=6000) / b"q"),
        bytes(Ether() / IP(src="10.0.0.6", dst="10.0.0.5") / UDP(sport=6000, dport=5000) / b"ok"),
    ]
    path = write_pcap(tmp_path / "v6.pcap", frames, 1)
    events = list(read_capture(path))
    opened = [e.flow for e in events if isinstance(e, FlowOpened)]
    assert [str(f.client) for f in opened] == ["[fd00::1]:40000", "10.0.0.5:5000"]
    assert [f.transport for f in opened] == ["tcp", "udp"]
    udp = [(e.direction, e.data) for e in events if isinstance(e, FlowData) and e.flow_id == 2]
    assert udp == [(Direction.UP, b"q"), (Direction.DOWN, b"ok")]


def test_pcapng_with_several_interfaces_and_sections(tmp_path: Path) -> None:
    eth = write_pcap(
        tmp_path / "eth.pcap", [bytes(Ether() / p) for p in tcp_conversation()], 1, nano=True
    )
    sll = write_pcap(
        tmp_path / "sll.pcap",
        [bytes(CookedLinux(proto=0x0800) / p) for p in tcp_conversation(IP, "10.9.9.9")],
        113,
    )
    merged = tmp_path / "merged.pcapng"
    subprocess.run(["mergecap", "-w", str(merged), str(eth), str(sll)], check=True, timeout=60)
    # A second section: pcapng files may simply be concatenated.
    second = tmp_path / "second.pcapng"
    subprocess.run(
        ["editcap", "-F", "pcapng", str(write_pcap(tmp_path / "raw.pcap", [
            bytes(p) for p in tcp_conversation(IP, "10.7.7.7")
        ], 101)), str(second)],
        check=True, timeout=60,
    )  # fmt: skip
    both = tmp_path / "sections.pcapng"
    both.write_bytes(merged.read_bytes() + second.read_bytes())
    assert len(tshark("-r", str(both)).splitlines()) == 24
    assert scapy_count(both) == 24
    with CaptureReader(both) as reader:
        records = list(reader.records())
        assert reader.format == "pcapng"
    assert {r.linktype for r in records} == {1, 113, 101}
    # mergecap keeps the nanosecond resolution of the first file's interface.
    assert any(abs(r.timestamp - (T0 + 0.123456789)) < 1e-7 for r in records)
    events = list(read_capture(both))
    clients = sorted(str(e.flow.client) for e in events if isinstance(e, FlowOpened))
    assert clients == ["10.1.1.1:40000", "10.7.7.7:40000", "10.9.9.9:40000"]
    assert len([e for e in events if isinstance(e, FlowClosed)]) == 3


def test_load_flow_returns_one_flows_events(tmp_path: Path) -> None:
    frames = [bytes(Ether() / p) for p in tcp_conversation()]
    frames += [bytes(Ether() / p) for p in tcp_conversation(IP, "10.3.3.3")]
    path = write_pcap(tmp_path / "two.pcap", frames, 1)
    events = load_flow(path, 2)
    assert isinstance(events[0], FlowOpened) and str(events[0].flow.client) == "10.3.3.3:40000"
    assert isinstance(events[-1], FlowClosed) and events[-1].flow.id == 2
    assert not any(isinstance(e, FlowGap) for e in events)
    assert b"".join(e.data for e in events if isinstance(e, FlowData)).startswith(b"GET")


@pytest.mark.parametrize("suffix", [".pcap", ".pcapng"])
def test_flowtap_captures_read_back_to_the_flows_written(tmp_path: Path, suffix: str) -> None:
    from test_capture_writer import conversation, make_flow, write_capture

    from flowtap.proxy.flow import Address, CloseReason

    unix = make_flow(1, Address("", path="/tmp/app.sock"), Address("127.0.0.1", 6379))
    tcp = make_flow(2, Address("::1", 40000), Address("::1", 8080))
    payload = bytes(range(256)) * 1000
    events = [
        *conversation(unix, [(Direction.UP, b"PING\r\n"), (Direction.DOWN, b"+PONG\r\n")]),
        *conversation(
            tcp,
            [(Direction.UP, payload), (Direction.DOWN, b"bye")],
            CloseReason.UPSTREAM_TIMEOUT,
            "no answer",
        ),
    ]
    path = write_capture(tmp_path / f"round{suffix}", events)
    assert_tshark_clean(path, allowed_warnings=("Connection reset (RST)",))
    read = list(read_capture(path))
    flows = {e.flow.id: e.flow for e in read if isinstance(e, FlowClosed)}
    assert summary([e for e in read if not isinstance(e, FlowGap)])[1] == b"PING\r\n" + payload
    assert not any(isinstance(e, FlowGap) for e in read)
    if suffix == ".pcapng":
        # The packet comments give back the unix path and the exact reason.
        assert str(flows[1].client) == "unix:/tmp/app.sock"
        assert flows[2].reason is CloseReason.UPSTREAM_TIMEOUT and flows[2].error == "no answer"
    else:
        assert str(flows[1].client) == "127.1.0.1:1025"
        assert flows[2].reason is CloseReason.SERVER_RESET
    assert flows[1].reason is CloseReason.CLIENT_CLOSED
    assert (flows[2].bytes_up, flows[2].bytes_down) == (len(payload), 3)
