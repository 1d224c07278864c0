"""`flowtap show` on captures that tcpdump, dumpcap, scapy and flowtap made from real peers."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from capture_checks import (
    assert_tshark_clean,
    capture_loopback,
    flowtap_show,
    follow_tcp,
    tshark,
)

from conftest import free_port, wait_port
from flowtap.inspector.show import printable

BODY = bytes(range(256)) * 800  # 200 KiB: several segments even on loopback


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[int]:
    """`python -m http.server` on a free loopback port, serving `blob.bin` (BODY)."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "blob.bin").write_bytes(BODY)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def curl(port: int, tmp_path: Path) -> tuple[bytes, bytes]:
    """Fetch blob.bin; return (headers as received, body)."""
    headers, body = tmp_path / "headers", tmp_path / "body"
    subprocess.run(
        ["curl", "-s", "--http1.1", "-D", str(headers), "-o", str(body),
         f"http://127.0.0.1:{port}/blob.bin"],
        check=True, timeout=30,
    )  # fmt: skip
    return headers.read_bytes(), body.read_bytes()


@pytest.fixture
def curl_capture(http_server: int, tmp_path: Path) -> tuple[Path, bytes]:
    """A tcpdump capture of curl fetching blob.bin, and the bytes curl received."""
    path = tmp_path / "curl.pcap"
    with capture_loopback("tcpdump", path, f"tcp port {http_server}"):
        headers, body = curl(http_server, tmp_path)
    assert body == BODY
    return path, headers + body


def test_show_lists_and_reassembles_a_tcpdump_capture_of_curl(
    curl_capture: tuple[Path, bytes],
) -> None:
    path, received = curl_capture
    listing = flowtap_show(str(path))
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.decode().splitlines()
    assert lines[0].startswith("curl.pcap: pcap") and "1 flow" in lines[0]
    assert lines[1].split()[:4] == ["ID", "PROTO", "CLIENT", "SERVER"]
    assert lines[2].split()[0:2] == ["1", "tcp"]
    raw = flowtap_show(str(path), "--flow", "1", "--raw", "server")
    assert raw.returncode == 0 and raw.stdout == received
    request = flowtap_show(str(path), "--flow", "1", "--raw", "client").stdout
    assert request.startswith(b"GET /blob.bin HTTP/1.1\r\n")
    assert follow_tcp(path, 0) == (request, received)
    conversation = flowtap_show(str(path), "--flow", "1").stdout.decode()
    assert ">> client" in conversation and "<< server" in conversation
    assert "GET /blob.bin HTTP/1.1\\r\\n" in conversation
    assert conversation.rstrip().splitlines()[-1].split()[2] in ("client-closed:", "server-closed:")


def test_show_hex_and_json_agree_with_the_raw_bytes(curl_capture: tuple[Path, bytes]) -> None:
    path, received = curl_capture
    events = [
        json.loads(line)
        for line in flowtap_show(str(path), "--flow", "1", "--json").stdout.splitlines()
    ]
    assert events[0]["event"] == "opened" and events[-1]["event"] == "closed"
    import base64

    down = b"".join(
        base64.b64decode(e["data_b64"])
        for e in events
        if e["event"] == "data" and e["direction"] == "down"
    )
    assert down == received
    assert events[-1]["bytes_down"] == len(received)
    hexdump = flowtap_show(str(path), "--flow", "1", "--hex").stdout.decode()
    assert "00000000  48 54 54 50 2f 31 2e 30" in hexdump  # "HTTP/1.0" from the server
    listing = [json.loads(line) for line in flowtap_show(str(path), "--json").stdout.splitlines()]
    assert listing[0]["flow"] == 1 and listing[0]["gap_bytes_down"] == 0


def test_show_reads_a_capture_edited_to_reorder_and_duplicate_segments(
    curl_capture: tuple[Path, bytes], tmp_path: Path
) -> None:
    from scapy.layers.inet import TCP
    from scapy.utils import rdpcap, wrpcap

    path, received = curl_capture
    packets = list(rdpcap(str(path)))
    server_port = packets[0][TCP].dport
    data = [i for i, p in enumerate(packets) if p[TCP].sport == server_port and len(p[TCP].payload)]
    assert len(data) >= 3, "the response should span several segments"
    first, second, third = data[:3]
    edited = list(packets)
    # The second data segment arrives before the first; the third is sent twice.
    edited[first], edited[second] = packets[second], packets[first]
    edited.insert(third + 1, packets[third])
    edited.append(packets[first])  # and a late retransmission of the first
    out = tmp_path / "edited.pcap"
    wrpcap(str(out), edited)
    assert len(tshark("-r", str(out)).splitlines()) == len(packets) + 2
    raw = flowtap_show(str(out), "--flow", "1", "--raw", "server")
    assert raw.returncode == 0 and raw.stdout == received
    listing = flowtap_show(str(out)).stdout.decode()
    assert "missing" not in listing


def test_show_reports_a_segment_missing_from_the_capture_as_a_gap(
    curl_capture: tuple[Path, bytes], tmp_path: Path
) -> None:
    from scapy.layers.inet import TCP
    from scapy.utils import rdpcap, wrpcap

    path, received = curl_capture
    packets = list(rdpcap(str(path)))
    server_port = packets[0][TCP].dport
    index = next(
        i for i, p in enumerate(packets) if p[TCP].sport == server_port and len(p[TCP].payload)
    )
    lost = len(packets[index][TCP].payload)
    out = tmp_path / "lossy.pcap"
    wrpcap(str(out), packets[:index] + packets[index + 1 :])
    tshark("-r", str(out))
    conversation = flowtap_show(str(out), "--flow", "1").stdout.decode()
    assert f"server: gap of {lost} bytes missing from the capture" in conversation
    raw = flowtap_show(str(out), "--flow", "1", "--raw", "server")
    assert raw.returncode == 1 and len(raw.stdout) == len(received) - lost
    assert f"misses {lost} bytes in 1 gaps" in raw.stderr.decode()
    assert "missing" in flowtap_show(str(out)).stdout.decode()


@pytest.mark.parametrize(
    ("tool", "interface", "link"),
    [
        ("dumpcap", "lo", None),
        ("tcpdump", "any", "LINUX_SLL"),
        ("tcpdump", "any", "LINUX_SLL2"),
    ],
)
def test_show_reads_redis_captured_by_dumpcap_and_in_linux_cooked_form(
    redis_server: int, tmp_path: Path, tool: str, interface: str, link: str | None
) -> None:
    path = tmp_path / ("redis.pcapng" if tool == "dumpcap" else "redis.pcap")
    with capture_loopback(tool, path, f"tcp port {redis_server}", interface=interface, link=link):
        result = subprocess.run(
            ["redis-cli", "-p", str(redis_server), "SET", "answer", "42"],
            capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip
        assert result.stdout.strip() == "OK"
    listing = flowtap_show(str(path))
    assert listing.returncode == 0, listing.stderr
    assert f"127.0.0.1:{redis_server}" in listing.stdout.decode()
    up = flowtap_show(str(path), "--flow", "1", "--raw", "client").stdout
    down = flowtap_show(str(path), "--flow", "1", "--raw", "server").stdout
    assert up.endswith(b"*3\r\n$3\r\nSET\r\n$6\r\nanswer\r\n$2\r\n42\r\n")
    assert down.endswith(b"+OK\r\n")
    assert follow_tcp(path, 0) == (up, down)


def test_show_names_unix_socket_paths_in_flowtap_captures(
    flowtap, redis_server: int, tmp_path: Path
) -> None:
    capture = tmp_path / "unix.pcapng"
    sock_path = tmp_path / "relay.sock"
    proxy = flowtap(
        "run", "--listen", f"unix:{sock_path}", "--upstream", f"127.0.0.1:{redis_server}",
        "--pcap", str(capture),
    )  # fmt: skip
    subprocess.run(["redis-cli", "-s", str(sock_path), "PING"], check=True, timeout=30)
    proxy.wait_line(r"#1 closed")
    assert proxy.stop() == 0
    listing = flowtap_show(str(capture)).stdout.decode()
    assert f"unix:{sock_path}" in listing and "client-closed" in listing
    conversation = flowtap_show(str(capture), "--flow", "1").stdout.decode()
    assert f"via unix:{sock_path}" in conversation.splitlines()[0]
    assert "+PONG\\r\\n" in conversation


def test_printable_escapes_everything_but_plain_text() -> None:
    assert printable(b"GET / \\ \t\x00\xff\r\nnext") == "GET / \\\\ \\t\\x00\\xff\\r\\n\nnext"


def one_line_error(result: subprocess.CompletedProcess[bytes], code: int = 2) -> str:
    stderr = result.stderr.decode()
    assert result.returncode == code, (result.returncode, stderr)
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def flowtap_capture(tmp_path: Path, suffix: str = ".pcap") -> Path:
    """A capture of three small flows, written by flowtap's writer and checked by tshark."""
    from test_capture_writer import conversation, make_flow, write_capture

    from flowtap.proxy.flow import Address, Direction

    events = []
    for flow_id in (1, 2, 3):
        flow = make_flow(flow_id, Address("127.0.0.1", 40000 + flow_id), Address("127.0.0.1", 80))
        events += conversation(
            flow, [(Direction.UP, b"GET / HTTP/1.0\r\n\r\n"), (Direction.DOWN, b"x" * 3000)]
        )
    path = write_capture(tmp_path / f"three{suffix}", events)
    assert_tshark_clean(path)
    assert len(tshark("-r", str(path)).splitlines()) == 3 * 10
    return path


def test_show_rejects_a_missing_file(tmp_path: Path) -> None:
    line = one_line_error(flowtap_show(str(tmp_path / "nope.pcap")))
    assert "nope.pcap" in line and "No such file" in line


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"hello, this is a text file\n", "is not a pcap or pcapng capture"),
        (bytes(range(7, 250)) * 10, "is not a pcap or pcapng capture"),
        (b"\xd4\xc3\xb2\xa1\x02\x00", "cut short inside its pcap file header"),
        (b"\x0a\x0d\x0d\x0a\x1c\x00\x00\x00", "cut short inside its pcapng section header"),
    ],
    ids=["empty", "text", "garbage", "pcap-header-cut", "pcapng-header-cut"],
)
def test_show_rejects_files_that_are_not_captures_with_one_line(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "bad.pcap"
    path.write_bytes(content)
    assert message in one_line_error(flowtap_show(str(path)))


@pytest.mark.parametrize("suffix", [".pcap", ".pcapng"])
def test_show_truncated_last_record_shows_what_was_read_and_says_how_much(
    tmp_path: Path, suffix: str
) -> None:
    path = flowtap_capture(tmp_path, suffix)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(path.read_bytes()[:-10])
    result = flowtap_show(str(cut))
    line = one_line_error(result, code=1)
    assert line.startswith("flowtap: warning:") and "cut short" in line
    assert "after 29 packets" in line
    listing = result.stdout.decode().splitlines()
    assert "29 packets, 3 flows" in listing[0] and len(listing) == 5
    assert flowtap_show(str(cut), "--flow", "1", "--raw", "server").stdout == b"x" * 3000


def test_show_rejects_unsupported_link_types_naming_them(tmp_path: Path) -> None:
    import struct

    pcap = tmp_path / "wifi.pcap"
    pcap.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 105))
    line = one_line_error(flowtap_show(str(pcap)))
    assert "link type 105 (IEEE 802.11)" in line
    pcapng = tmp_path / "usb.pcapng"
    subprocess.run(
        ["editcap", "-F", "pcapng", "-T", "usb-linux", str(flowtap_capture(tmp_path)), str(pcapng)],
        check=True, timeout=60,
    )  # fmt: skip
    line = one_line_error(flowtap_show(str(pcapng)))
    assert "link type 189 (USB Linux)" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--flow", "9"], "has no flow 9 (it has 3)"),
        (["--raw", "client"], "add --flow ID"),
        (["--flow", "1", "--raw", "client", "--json"], "drop --hex and --json"),
        (["--flow", "1", "--raw", "client", "--hex"], "not allowed with argument"),
        (["--flow", "0"], "is not a flow number between 1 and"),
    ],
)
def test_show_bad_options_are_one_line_errors(
    tmp_path: Path, args: list[str], message: str
) -> None:
    path = flowtap_capture(tmp_path)
    assert message in one_line_error(flowtap_show(str(path), *args))
