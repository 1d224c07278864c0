"""Captures of relayed UDP, IPv6 and unix-socket flows, read back by tshark."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import redis
from capture_checks import (
    assert_tshark_clean,
    fields,
    follow_tcp,
    follow_udp,
    scapy_packets,
    tshark,
)

from conftest import UdpEchoServer, flowtap_command, wait_for
from flowtap.inspector.log import human_bytes

CHECKSUMS = ("udp.check_checksum:TRUE", "ip.check_checksum:TRUE")


def flow_comments(path: Path) -> list[dict[str, Any]]:
    rows = fields(path, "frame.comment", display_filter="frame.comment")
    return [json.loads(row[0].removeprefix("flowtap ")) for row in rows]


def test_dns_through_flowtap_is_captured_as_dns(
    dns_server: int, flowtap: Any, tmp_path: Path
) -> None:
    capture = tmp_path / "dns.pcapng"
    proxy = flowtap(
        "run", "--udp", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{dns_server}",
        "--pcap", str(capture),
    )  # fmt: skip
    answers = {}
    for name in ("example.test", "www.example.test"):
        result = subprocess.run(
            ["dig", "@127.0.0.1", "-p", str(proxy.port), "+time=2", "+tries=1", "+short", name],
            capture_output=True, text=True, timeout=20, check=True,
        )  # fmt: skip
        answers[name] = result.stdout.strip()
    assert answers == {"example.test": "127.0.0.9", "www.example.test": "127.0.0.9"}
    assert proxy.stop() == 0
    decode = f"udp.port=={dns_server},dns"
    assert_tshark_clean(capture, *CHECKSUMS)
    rows = _dns_rows(capture, decode)
    queries = [row for row in rows if row[1] in ("0", "False")]
    responses = [row for row in rows if row[1] in ("1", "True")]
    assert sorted(row[2] for row in queries) == ["example.test", "www.example.test"]
    assert sorted((row[2], row[3]) for row in responses) == [
        ("example.test", "127.0.0.9"),
        ("www.example.test", "127.0.0.9"),
    ]
    assert all(row[0] == str(dns_server) for row in queries)


def _dns_rows(capture: Path, decode: str) -> list[list[str]]:
    """Per DNS packet: UDP destination port, is-response, query name, A record."""
    out = tshark(
        "-r", str(capture), "-d", decode, "-Y", "dns", "-T", "fields", "-E", "separator=|",
        "-e", "udp.dstport", "-e", "dns.flags.response", "-e", "dns.qry.name", "-e", "dns.a",
    )  # fmt: skip
    return [line.split("|") for line in out.splitlines() if line]


def test_udp_datagrams_are_captured_one_packet_each_with_exact_bytes(
    udp_echo: Any, flowtap: Any, tmp_path: Path
) -> None:
    echo: UdpEchoServer = udp_echo()
    capture = tmp_path / "udp.pcap"
    proxy = flowtap(
        "run", "--udp", "--listen", "127.0.0.1:0", "--upstream", echo.address,
        "--pcap", str(capture),
    )  # fmt: skip
    sizes = [0, 1, 64, 1400, 30_000, 65_507]
    sent = [os.urandom(size) for size in sizes]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        for payload in sent:
            client.sendto(payload, ("127.0.0.1", proxy.port))
            assert client.recv(70_000) == payload
        client_port = client.getsockname()[1]
    assert proxy.stop() == 0
    assert_tshark_clean(capture, *CHECKSUMS, data_port=echo.port)
    rows = fields(capture, "ip.src", "udp.srcport", "udp.dstport", "udp.length", prefs=CHECKSUMS)
    assert len(rows) == 2 * len(sizes)  # one packet per datagram, each way
    echo_port = str(echo.port)
    up = [int(r[3]) - 8 for r in rows if r[1] == str(client_port) and r[2] == echo_port]
    down = [int(r[3]) - 8 for r in rows if r[1] == echo_port and r[2] == str(client_port)]
    assert up == sizes and down == sizes
    assert follow_udp(capture, 0) == (b"".join(sent), b"".join(sent))
    assert len(scapy_packets(capture)) == 2 * len(sizes)
    # `show` lists the session like a TCP flow; its end (here the relay stopping) sent no
    # packet, and `show` says so rather than calling the session open.
    shown = subprocess.run(
        [*flowtap_command(), "show", str(capture)],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    (row,) = shown.stdout.splitlines()[2:]
    assert row.split()[1:4] == ["udp", f"127.0.0.1:{client_port}", f"127.0.0.1:{echo.port}"]
    total = sum(sizes)
    assert row.split()[6:8] == [human_bytes(total), human_bytes(total)]
    assert row.endswith("no end on the wire (udp)")


def test_ipv6_flows_are_captured_as_ipv6(
    udp_echo: Any, redis_server: int, flowtap: Any, tmp_path: Path
) -> None:
    echo: UdpEchoServer = udp_echo("::1")
    capture = tmp_path / "v6.pcapng"
    proxy = flowtap(
        "run",
        "--listen", "[::1]:0", "--upstream", f"[::1]:{redis_server}",
        "--listen", "udp:[::1]:0", "--upstream", echo.address,
        "--pcap", str(capture),
        listeners=2,
    )  # fmt: skip
    ports = {kind: int(address.rsplit(":", 1)[1]) for kind, address, _ in proxy.listeners}
    value = os.urandom(200_000)
    client = redis.Redis(host="::1", port=ports["tcp"])
    assert client.set("v6", value)
    assert client.get("v6") == value
    client.close()
    datagram = os.urandom(65_527)  # the largest IPv6 UDP payload
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as udp:
        udp.settimeout(5)
        udp.sendto(datagram, ("::1", ports["udp"]))
        assert udp.recv(70_000) == datagram
    proxy.wait_line(r"#1 closed")
    assert proxy.stop() == 0
    assert_tshark_clean(capture, data_port=echo.port)
    assert fields(capture, "ip.src") == []  # nothing written as IPv4
    addresses = {tuple(row) for row in fields(capture, "ipv6.src", "ipv6.dst")}
    assert addresses == {("::1", "::1")}
    up, down = follow_tcp(capture, 0)
    assert value in up and value in down
    assert follow_udp(capture, 0) == (datagram, datagram)


def test_mixed_family_flow_is_captured_with_a_mapped_ipv4_side(
    udp_echo: Any, flowtap: Any, tmp_path: Path
) -> None:
    echo: UdpEchoServer = udp_echo("127.0.0.1")
    capture = tmp_path / "mixed.pcap"
    proxy = flowtap(
        "run", "--udp", "--listen", "[::1]:0", "--upstream", echo.address,
        "--pcap", str(capture),
    )  # fmt: skip
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as udp:
        udp.settimeout(5)
        udp.sendto(b"across families", ("::1", proxy.port))
        assert udp.recv(100) == b"across families"
    assert proxy.stop() == 0
    assert_tshark_clean(capture)
    rows = fields(capture, "ipv6.src", "ipv6.dst")
    assert rows == [["::1", "::ffff:127.0.0.1"], ["::ffff:127.0.0.1", "::1"]]
    assert follow_udp(capture, 0) == (b"across families", b"across families")


def test_unix_to_unix_flow_is_captured_between_placeholders(
    redis_server: int, flowtap: Any, tmp_path: Path
) -> None:
    redis_socket = tmp_path / "redis.sock"
    wait_for(redis_socket.exists, 10, "redis to create its unix socket")
    front = tmp_path / "front.sock"
    capture = tmp_path / "unix.pcapng"
    proxy = flowtap(
        "run", "--listen", f"unix:{front}", "--upstream", f"unix:{redis_socket}",
        "--pcap", str(capture),
    )  # fmt: skip
    value = os.urandom(100_000)
    command = b"*3\r\n$3\r\nSET\r\n$4\r\nunix\r\n$%d\r\n%s\r\n" % (len(value), value)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(str(front))
        client.sendall(command)
        assert client.recv(100) == b"+OK\r\n"
    proxy.wait_line(r"#1 closed")
    assert proxy.stop() == 0
    assert_tshark_clean(capture)
    src, dst, dstport = fields(capture, "ip.src", "ip.dst", "tcp.dstport")[0]
    assert (src, dst, dstport) == ("127.1.0.1", "127.1.0.2", "1")
    assert follow_tcp(capture, 0) == (command, b"+OK\r\n")
    opening = flow_comments(capture)[0]
    assert opening["client"] == f"unix:{front}"
    assert opening["server"] == f"unix:{redis_socket}"
