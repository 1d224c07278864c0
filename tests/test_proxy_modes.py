"""Proxy-mode listeners with real clients and servers: curl through SOCKS5 and the HTTP proxy,
proxychains4 running redis-cli, every bad input against a raw socket, captures read by tshark."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from capture_checks import assert_tshark_clean, fields, follow_tcp

from conftest import (
    FlowtapProcess,
    Recorder,
    flowtap_command,
    free_port,
    json_events,
    recv_exactly,
    start_flowtap,
    wait_for,
)
from flowtap.proxy.events import Bus
from flowtap.proxy.flow import Address, CloseReason
from flowtap.proxy.listener import ListenerSpec
from flowtap.proxy.policy import Mode, ProxyPolicy
from flowtap.proxy.relay import Relay
from flowtap.proxy.socks5 import pack_address
from flowtap.proxy.transparent_udp import original_destination

BODY = b"hello through the proxy\n" * 40


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so that clients reuse connections

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _V6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


@dataclass
class WebServer:
    """A loopback http.server serving `index.txt`, on IPv4 and IPv6."""

    port: int
    port6: int


@pytest.fixture
def web_server(tmp_path: Path) -> Iterator[WebServer]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.txt").write_bytes(BODY)

    def handler(*args: Any) -> _QuietHandler:
        return _QuietHandler(*args, directory=str(root))

    servers = [
        http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler),
        _V6Server(("::1", 0), handler),
    ]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    try:
        yield WebServer(servers[0].server_address[1], servers[1].server_address[1])
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Any]:
    """Start `flowtap run --json --no-control` with proxy listeners; stopped at teardown."""
    started: list[FlowtapProcess] = []

    def start(*args: str, listeners: int = 1) -> FlowtapProcess:
        process = start_flowtap("run", "--json", "--no-control", *args, listeners=listeners)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()


def _address(process: FlowtapProcess, index: int = 0) -> tuple[str, int]:
    host, _, port = process.listeners[index][1].rpartition(":")
    return host, int(port)


def _curl(*args: str) -> bytes:
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "10", *args], capture_output=True, timeout=20, check=False
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def _closed(process: FlowtapProcess, count: int = 1) -> list[dict[str, Any]]:
    wait_for(lambda: len(json_events(process, "closed")) >= count, 10, f"{count} closed flows")
    return json_events(process, "closed")


def test_curl_socks5_hostname_asks_flowtap_for_the_name(proxy: Any, web_server: WebServer) -> None:
    relay = proxy("--listen", "socks5:127.0.0.1:0")
    host, port = _address(relay)
    body = _curl(
        "--socks5-hostname", f"{host}:{port}", f"http://localhost:{web_server.port}/index.txt"
    )
    assert body == BODY
    (closed,) = _closed(relay)
    assert closed["requested"] == f"localhost:{web_server.port}"
    assert closed["server"] == f"127.0.0.1:{web_server.port}"
    assert closed["reason"] == "client-closed"
    assert closed["bytes_down"] > len(BODY)
    (opened,) = json_events(relay, "opened")
    assert opened["requested"] == f"localhost:{web_server.port}"


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_curl_socks5_by_address_reaches_the_server(
    proxy: Any, web_server: WebServer, family: str
) -> None:
    relay = proxy("--listen", "socks5:127.0.0.1:0")
    host, port = _address(relay)
    url = (
        f"http://127.0.0.1:{web_server.port}/index.txt"
        if family == "ipv4"
        else f"http://[::1]:{web_server.port6}/index.txt"
    )
    assert _curl("--socks5", f"{host}:{port}", url) == BODY
    (closed,) = _closed(relay)
    expected = f"127.0.0.1:{web_server.port}" if family == "ipv4" else f"[::1]:{web_server.port6}"
    assert closed["requested"] == expected
    assert closed["server"] == expected


def test_socks5_listener_on_ipv6_with_credentials(proxy: Any, web_server: WebServer) -> None:
    relay = proxy("--listen", "socks5:[::1]:0", "--auth", "alice:s3cret")
    _, port = _address(relay)
    body = _curl(
        "--socks5-hostname",
        f"[::1]:{port}",
        "--proxy-user",
        "alice:s3cret",
        f"http://localhost:{web_server.port}/index.txt",
    )
    assert body == BODY
    (closed,) = _closed(relay)
    assert closed["user"] == "alice"
    assert closed["client"].startswith("[::1]:")


def test_curl_plain_request_through_the_http_proxy(proxy: Any, web_server: WebServer) -> None:
    relay = proxy("--listen", "http:127.0.0.1:0")
    host, port = _address(relay)
    body = _curl("-x", f"http://{host}:{port}", f"http://localhost:{web_server.port}/index.txt")
    assert body == BODY
    (closed,) = _closed(relay)
    assert closed["requested"] == f"localhost:{web_server.port}"
    assert closed["bytes_up"] > 0


def test_curl_connect_tunnel_through_the_http_proxy(proxy: Any, web_server: WebServer) -> None:
    relay = proxy("--listen", "http:127.0.0.1:0", "--auth", "bob:pw")
    host, port = _address(relay)
    body = _curl(
        "-p",
        "-x",
        f"http://{host}:{port}",
        "--proxy-user",
        "bob:pw",
        f"http://localhost:{web_server.port}/index.txt",
    )
    assert body == BODY
    (closed,) = _closed(relay)
    assert closed["requested"] == f"localhost:{web_server.port}"
    assert closed["user"] == "bob"


def test_curl_without_proxy_credentials_gets_407(proxy: Any, web_server: WebServer) -> None:
    relay = proxy("--listen", "http:127.0.0.1:0", "--auth", "bob:pw")
    host, port = _address(relay)
    result = subprocess.run(
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-x",
            f"http://{host}:{port}",
            f"http://localhost:{web_server.port}/index.txt",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.stdout == "407"
    (closed,) = _closed(relay)
    assert closed["reason"] == "handshake-error"


def test_proxychains_runs_redis_cli_through_socks5(
    proxy: Any, redis_server: int, tmp_path: Path
) -> None:
    if shutil.which("proxychains4") is None:
        pytest.fail("proxychains4 is not installed: run tests/setup-debian.sh")
    relay = proxy("--listen", "socks5:127.0.0.1:0")
    host, port = _address(relay)
    config = tmp_path / "proxychains.conf"
    config.write_text(f"strict_chain\nquiet_mode\n[ProxyList]\nsocks5 {host} {port}\n")
    result = subprocess.run(
        [
            "proxychains4",
            "-q",
            "-f",
            str(config),
            "redis-cli",
            "-h",
            "127.0.0.1",
            "-p",
            str(redis_server),
            "SET",
            "asked",
            "through-socks",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.stdout.strip() == "OK", result.stderr
    (closed,) = _closed(relay)
    assert closed["requested"] == f"127.0.0.1:{redis_server}"
    assert closed["bytes_up"] > len("SET asked through-socks")


# -- bad input against a raw socket -------------------------------------------------------------


def _raw(address: tuple[str, int], data: bytes, *, read_bytes: int = 10) -> bytes:
    """Send `data`, then read until the proxy closes (or `read_bytes` arrived)."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while len(received) < read_bytes:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


def _socks_connect(host: str, port: int) -> bytes:
    return b"\x05\x01\x00" + b"\x05\x01\x00" + pack_address(host, port)


@pytest.mark.parametrize(
    ("payload", "reply", "reason"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", b"\x05\xff", "handshake-error"),
        (b"\x05\x01\x00\x05\x02\x00" + pack_address("127.0.0.1", 1), b"\x05\x00\x05\x07", None),
        (b"\x05\x01\x00\x05\x09\x00" + pack_address("127.0.0.1", 1), b"\x05\x00\x05\x07", None),
        (b"\x05\x01\x00\x05\x01\x00\x07", b"\x05\x00\x05\x08", None),
        (b"\x05\x01\x02", b"\x05\xff", None),
    ],
    ids=["garbage", "bind", "unknown-command", "address-type", "no-acceptable-method"],
)
def test_bad_socks_input_gets_its_reply_and_a_closed_flow(
    proxy: Any, payload: bytes, reply: bytes, reason: str | None
) -> None:
    relay = proxy("--listen", "socks5:127.0.0.1:0")
    received = _raw(_address(relay), payload)
    assert received[: len(reply)] == reply
    (closed,) = _closed(relay)
    assert closed["reason"] == (reason or "handshake-error")
    assert closed["error"]


def test_wrong_socks_credentials_get_rfc1929_failure(proxy: Any) -> None:
    relay = proxy("--listen", "socks5:127.0.0.1:0", "--auth", "alice:s3cret")
    received = _raw(_address(relay), b"\x05\x01\x02\x01\x05alice\x04nope")
    assert received == b"\x05\x02\x01\x01"
    (closed,) = _closed(relay)
    assert "wrong credentials" in closed["error"]


def test_unresolvable_name_gets_04_and_refused_upstream_05(proxy: Any) -> None:
    relay = proxy("--listen", "socks5:127.0.0.1:0")
    address = _address(relay)
    unresolvable = _raw(address, _socks_connect("no-such-host.invalid", 80), read_bytes=12)
    assert unresolvable[:4] == b"\x05\x00\x05\x04"
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        refused_port = unused.getsockname()[1]
    refused = _raw(address, _socks_connect("127.0.0.1", refused_port), read_bytes=12)
    assert refused[:4] == b"\x05\x00\x05\x05"
    reasons = sorted(record["reason"] for record in _closed(relay, 2))
    assert reasons == ["unresolvable", "upstream-refused"]


def test_metadata_address_and_excluded_ports_are_denied(proxy: Any) -> None:
    relay = proxy(
        "--listen", "socks5:127.0.0.1:0", "--listen", "http:127.0.0.1:0",
        "--allow-ports", "1-1000", listeners=2,
    )  # fmt: skip
    socks, http = _address(relay, 0), _address(relay, 1)
    metadata = _raw(socks, _socks_connect("169.254.169.254", 80), read_bytes=12)
    assert metadata[:4] == b"\x05\x00\x05\x02"
    port = _raw(socks, _socks_connect("127.0.0.1", 6379), read_bytes=12)
    assert port[:4] == b"\x05\x00\x05\x02"
    forbidden = _raw(http, b"CONNECT 127.0.0.1:6379 HTTP/1.1\r\n\r\n", read_bytes=1 << 20)
    assert forbidden.startswith(b"HTTP/1.1 403 ")
    # Asked again: the relay keeps what it found of a destination, refusals too.
    again = _raw(socks, _socks_connect("169.254.169.254", 80), read_bytes=12)
    assert again[:4] == b"\x05\x00\x05\x02"
    closed = _closed(relay, 4)
    assert [record["reason"] for record in closed] == ["denied"] * 4
    assert any("--allow-ports" in record["error"] for record in closed)


def test_http_request_line_of_64_kib_gets_431(proxy: Any) -> None:
    relay = proxy("--listen", "http:127.0.0.1:0")
    answer = _raw(_address(relay), b"GET http://x.test/" + b"a" * 65536, read_bytes=1 << 20)
    assert answer.startswith(b"HTTP/1.1 431 ")
    (closed,) = _closed(relay)
    assert closed["reason"] == "handshake-error"


def test_http_unresolvable_and_refused_get_502_with_one_line_body(proxy: Any) -> None:
    relay = proxy("--listen", "http:127.0.0.1:0")
    answer = _raw(
        _address(relay), b"CONNECT no-such-host.invalid:80 HTTP/1.1\r\n\r\n", read_bytes=1 << 20
    )
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 502 ")
    assert body.count(b"\n") == 1


def test_http_connect_to_a_refusing_address_gets_502_and_its_reason(proxy: Any) -> None:
    # An address literal in the common form, decided as the head is read: the refusal comes
    # once the upstream refuses, answered as the general path answers it.
    relay = proxy("--listen", "http:127.0.0.1:0")
    port = free_port()
    head = f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    answer = _raw(_address(relay), head, read_bytes=1 << 20)
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 502 ")
    assert body.count(b"\n") == 1
    (closed,) = _closed(relay)
    assert closed["reason"] == "upstream-refused"
    assert closed["requested"] == f"127.0.0.1:{port}"


def test_bytes_sent_with_a_connect_reach_the_server(proxy: Any, echo_server: Any) -> None:
    relay = proxy("--listen", "http:127.0.0.1:0")
    host, port = echo_server
    with socket.create_connection(_address(relay), timeout=10) as sock:
        sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\n\r\npipelined bytes".encode())
        established = b"HTTP/1.1 200 Connection established\r\n\r\n"
        received = recv_exactly(sock, len(established) + len(b"pipelined bytes"))
    assert received == established + b"pipelined bytes"
    (closed,) = _closed(relay)
    assert closed["requested"] == f"{host}:{port}"
    assert closed["bytes_up"] == closed["bytes_down"] == len(b"pipelined bytes")


def test_greeting_that_never_completes_times_out(proxy: Any) -> None:
    relay = proxy("--listen", "socks5:127.0.0.1:0", "--handshake-timeout", "0.3")
    with socket.create_connection(_address(relay), timeout=10) as sock:
        sock.sendall(b"\x05\x02\x00")
        assert sock.recv(100) == b""
    (closed,) = _closed(relay)
    assert closed["reason"] == "handshake-timeout"


def test_each_listener_times_out_handshakes_after_its_own_timeout() -> None:
    # A stalled client of a slow listener, then one of a quick listener: the second is due
    # first, though it came second.
    recorder = Recorder()
    specs = [
        ListenerSpec(
            Address("127.0.0.1", 0), None, mode=mode, policy=ProxyPolicy(handshake_timeout_s=s)
        )
        for mode, s in ((Mode.SOCKS5, 30.0), (Mode.HTTP, 0.3))
    ]
    relay = Relay(specs, Bus([recorder]))
    relay.start()
    slow, quick = (("127.0.0.1", listener.address.port) for listener in relay.listeners)
    try:
        with (
            socket.create_connection(slow, timeout=10) as stalled,
            socket.create_connection(quick, timeout=10) as sock,
        ):
            stalled.sendall(b"\x05")
            sock.sendall(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n")
            assert sock.recv(1 << 16).startswith(b"HTTP/1.1 408 ")
            wait_for(lambda: len(recorder.closed()) == 1, 5, "the quick listener's flow closed")
            (closed,) = recorder.closed()
            assert closed.flow.reason is CloseReason.HANDSHAKE_TIMEOUT
            assert closed.flow.listener.port == quick[1]
    finally:
        relay.stop(0.0)
        relay.bus.close()


def test_bytes_sent_with_the_request_reach_the_server(proxy: Any, echo_server: Any) -> None:
    relay = proxy("--listen", "socks5:127.0.0.1:0")
    host, port = echo_server
    with socket.create_connection(_address(relay), timeout=10) as sock:
        sock.sendall(_socks_connect(host, port) + b"pipelined bytes")
        received = recv_exactly(sock, 2 + 10 + len(b"pipelined bytes"))
    assert received[:2] == b"\x05\x00"
    assert received[2:4] == b"\x05\x00"
    assert received[12:] == b"pipelined bytes"


def test_bytes_sent_while_a_name_resolves_reach_the_server(proxy: Any, echo_server: Any) -> None:
    # Sent apart from the request, they come while flowtap resolves the name: the client is
    # read by its handshake until then and by its flow after, and neither may lose them.
    relay = proxy("--listen", "socks5:127.0.0.1:0")
    _, port = echo_server
    with socket.create_connection(_address(relay), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(_socks_connect("localhost", port))
        sock.sendall(b"sent after the request")
        received = recv_exactly(sock, 2 + 10 + len(b"sent after the request"))
    assert received[:4] == b"\x05\x00\x05\x00"
    assert received[12:] == b"sent after the request"


def test_client_outside_allow_from_is_closed_at_once(proxy: Any) -> None:
    relay = proxy("--listen", "socks5:127.0.0.1:0", "--allow-from", "10.0.0.0/8")
    try:
        received = _raw(_address(relay), b"\x05\x01\x00")
    except ConnectionResetError:
        received = b""
    assert received == b""
    relay.proc.send_signal(2)
    relay.proc.wait(10)
    assert not json_events(relay, "opened")
    assert "outside --allow-from" in relay.read_stderr()


def test_proxy_listener_on_a_public_address_needs_allow_from() -> None:
    result = subprocess.run(
        [*flowtap_command(), "run", "--listen", "socks5:0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowtap: error: ")
    assert "--allow-from" in lines[0]


def test_capture_of_a_socks_flow_names_what_the_client_asked_for(
    proxy: Any, web_server: WebServer, tmp_path: Path
) -> None:
    capture = tmp_path / "socks.pcapng"
    relay = proxy("--listen", "socks5:127.0.0.1:0", "--pcap", str(capture))
    host, port = _address(relay)
    assert (
        _curl(
            "--socks5-hostname", f"{host}:{port}", f"http://localhost:{web_server.port}/index.txt"
        )
        == BODY
    )
    _closed(relay)
    relay.proc.send_signal(2)
    assert relay.proc.wait(10) == 0
    assert_tshark_clean(capture)
    client_bytes, server_bytes = follow_tcp(capture, 0)
    assert client_bytes.startswith(b"GET /index.txt HTTP/1.1\r\nHost: localhost:")
    assert server_bytes.endswith(BODY)
    comments = [row[0] for row in fields(capture, "frame.comment") if row[0]]
    first = json.loads(comments[0].removeprefix("flowtap "))
    assert first["requested"] == f"localhost:{web_server.port}"
    show = subprocess.run(
        [*flowtap_command(), "show", str(capture)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert f"(localhost:{web_server.port})" in show.stdout
    filtered = subprocess.run(
        [
            *flowtap_command(),
            "show",
            str(capture),
            "--json",
            "--filter",
            "host localhost",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert len(filtered.stdout.splitlines()) == 1
    assert json.loads(filtered.stdout)["requested"] == f"localhost:{web_server.port}"


def test_socks4a_connect_by_name(proxy: Any, echo_server: Any) -> None:
    relay = proxy("--listen", "socks5:127.0.0.1:0")
    _, port = echo_server
    request = b"\x04\x01" + struct.pack("!H", port) + b"\x00\x00\x00\x01me\x00localhost\x00"
    with socket.create_connection(_address(relay), timeout=10) as sock:
        sock.sendall(request + b"ping")
        received = b""
        while len(received) < 12:
            chunk = sock.recv(100)
            assert chunk
            received += chunk
    assert received == b"\x00\x5a" + b"\x00" * 6 + b"ping"


# -- transparent mode in a network namespace the test creates -----------------------------------


def _in_own_namespace(scenario: str, *args: str) -> dict[str, Any]:
    """What the scenario script `scenario` (beside this file) printed as JSON, run with
    `args` in a network namespace of its own."""
    script = Path(__file__).with_name(scenario)
    result = subprocess.run(
        ["unshare", "--net", sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=script.parent,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    outcome: dict[str, Any] = json.loads(result.stdout)
    return outcome


def _can_make_namespaces() -> bool:
    if shutil.which("unshare") is None or shutil.which("iptables") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--net", "iptables", "-t", "nat", "-L", "OUTPUT"],
        capture_output=True,
        timeout=20,
        check=False,
    )
    return probe.returncode == 0


def test_transparent_mode_relays_redirected_clients_to_where_they_meant(tmp_path: Path) -> None:
    if not _can_make_namespaces():
        pytest.skip("needs unshare --net and iptables (root) for a network namespace")
    capture = tmp_path / "transparent.pcapng"
    outcome = _in_own_namespace("transparent_scenario.py", str(capture))
    assert outcome["body4"] == outcome["expected"]
    assert outcome["body6"] == outcome["expected"]
    assert outcome["exit"] == 0, outcome["stderr"]
    # In the order the flows opened (the curls, then the direct client): the IPv6 flow may
    # end after the direct client's refusal.
    closed = sorted(
        (event for event in outcome["events"] if event["event"] == "closed"),
        key=lambda event: int(event["flow"]),
    )
    assert [(e["requested"], e["server"]) for e in closed[:2]] == [
        ("10.99.0.2:80", "10.99.0.2:80"),
        ("[fd00:99::2]:80", "[fd00:99::2]:80"),
    ]
    # Either side may close first: curl once it has the whole body, the server after it.
    assert {e["reason"] for e in closed[:2]} <= {"client-closed", "server-closed"}
    assert closed[2]["reason"] == "denied"
    assert "not redirected" in closed[2]["error"]
    assert outcome["direct_answer"] == ""
    assert_tshark_clean(capture)
    for stream in (0, 1):
        client_bytes, server_bytes = follow_tcp(capture, stream)
        assert client_bytes.startswith(b"GET /index.txt HTTP/1.1\r\n")
        assert server_bytes.endswith(outcome["expected"].encode())
    comments = [
        json.loads(row[0].removeprefix("flowtap "))
        for row in fields(capture, "frame.comment")
        if row[0].startswith("flowtap ")
    ]
    assert {c.get("requested") for c in comments} >= {"10.99.0.2:80", "[fd00:99::2]:80"}


_TPROXY_PROBE = (
    "ip link add name ftp0 type veth peer name ftp1 || exit 11; "
    "iptables -t mangle -A PREROUTING -p udp -j TPROXY --on-port 1 --tproxy-mark 1 || exit 12; "
    "ip6tables -t mangle -A PREROUTING -p udp -j TPROXY --on-port 1 --tproxy-mark 1 || exit 13; "
    "ip rule add fwmark 1 lookup 100 && ip route add local 0.0.0.0/0 dev lo table 100 || exit 14"
)
_TPROXY_STEPS = {
    11: "a veth pair (ip link add ... type veth)",
    12: "the iptables TPROXY target (xt_TPROXY)",
    13: "the ip6tables TPROXY target",
    14: "policy routing (ip rule fwmark, a local route in table 100)",
}


def _tproxy_refusal() -> str | None:
    """Why this system cannot run the TPROXY scenario (which step it refuses), or None."""
    for tool in ("unshare", "nsenter", "iptables", "ip6tables", "ip"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    probe = subprocess.run(
        ["unshare", "--net", "sh", "-c", _TPROXY_PROBE],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    if probe.returncode == 0:
        return None
    step = _TPROXY_STEPS.get(probe.returncode, "unshare --net (root)")
    return f"the kernel refuses {step} in a new network namespace: {probe.stderr.strip()}"


def _transparent_udp_scenario(*flowtap_options: str) -> dict[str, Any]:
    """What `transparent_udp_scenario.py` saw, run in a network namespace of its own."""
    refusal = _tproxy_refusal()
    if refusal is not None:
        pytest.skip(refusal)
    return _in_own_namespace("transparent_udp_scenario.py", *flowtap_options)


def test_transparent_udp_answers_clients_from_the_address_they_asked() -> None:
    outcome = _transparent_udp_scenario()
    assert outcome["exit"] == 0, outcome["stderr"]
    assert [line.split()[:2] for line in outcome["listening"]] == [
        ["listening", "transparent:udp"]
    ] * 2
    # The relay's namespace does not forward: the answer came through flowtap (the server
    # saw flowtap's address, 10.98.1.1), from the very address and port the client asked.
    assert outcome["client"] == {
        "10.99.1.53": [
            "answer; asked by 10.98.1.1: query for 10.99.1.53",
            "10.99.1.53",
            53,
            "0.0.0.0",
        ],
        "fd00:99:1::53": [
            "answer; asked by fd00:98:1::1: query for fd00:99:1::53",
            "fd00:99:1::53",
            53,
            "::",
        ],
    }, outcome["client_error"]
    closed = {
        event["requested"]: event for event in outcome["events"] if event["event"] == "closed"
    }
    for asked, question, answer in (
        ("10.99.1.53:53", "query for 10.99.1.53", "answer; asked by 10.98.1.1: "),
        ("[fd00:99:1::53]:53", "query for fd00:99:1::53", "answer; asked by fd00:98:1::1: "),
    ):
        flow = closed[asked]
        assert flow["server"] == asked
        assert flow["transport"] == "udp"
        assert flow["reason"] == "shutdown"
        assert (flow["bytes_up"], flow["bytes_down"]) == (
            len(question),
            len(answer) + len(question),
        )
    assert closed["10.99.1.53:53"]["client"].startswith("10.98.0.2:")
    assert closed["[fd00:99:1::53]:53"]["client"].startswith("[fd00:98::2]:")
    direct = [e for e in closed.values() if e["client"].startswith("127.0.0.1:")]
    assert [(e["reason"], e["error"]) for e in direct] == [
        ("denied", "the datagram was sent to the listener itself, not steered to it")
    ]


def test_transparent_udp_without_the_network_admin_capability_says_what_it_needs() -> None:
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs setpriv and root, to drop CAP_NET_ADMIN and CAP_NET_RAW")
    result = subprocess.run(
        [
            "setpriv",
            "--bounding-set",
            "-net_admin,-net_raw",
            *flowtap_command(),
            "run",
            "--listen",
            "transparent:udp:127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "flowtap: error: transparent:udp:127.0.0.1:0 needs IP_TRANSPARENT (Operation not "
        "permitted): run as root or with the CAP_NET_ADMIN capability\n"
    )


def test_curl_keeps_a_forwarded_connection_alive_for_its_next_request(
    proxy: Any, web_server: WebServer
) -> None:
    relay = proxy("--listen", "http:127.0.0.1:0")
    host, port = _address(relay)
    url = f"http://localhost:{web_server.port}/index.txt"
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-x", f"http://{host}:{port}", url, url],
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == BODY + BODY
    (closed,) = _closed(relay)
    assert closed["reason"] == "client-closed"
    assert closed["bytes_down"] > 2 * len(BODY)


def test_a_forwarded_connection_asked_for_another_server_ends_and_curl_reconnects(
    proxy: Any, web_server: WebServer
) -> None:
    relay = proxy("--listen", "http:127.0.0.1:0")
    host, port = _address(relay)
    first = f"http://localhost:{web_server.port}/index.txt"
    second = f"http://127.0.0.1:{web_server.port}/index.txt"
    body = _curl("-x", f"http://{host}:{port}", first, second)
    assert body == BODY + BODY
    requested = sorted(record["requested"] for record in _closed(relay, 2))
    assert requested == sorted([f"localhost:{web_server.port}", f"127.0.0.1:{web_server.port}"])


# -- UDP ASSOCIATE -------------------------------------------------------------------------------


def _dns_query(name: str, ident: int) -> bytes:
    labels = b"".join(bytes((len(part),)) + part.encode() for part in name.split("."))
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + b"\0\x00\x01\x00\x01"


def test_pysocks_dns_query_over_udp_associate_reaches_dnsmasq(
    proxy: Any, dns_server: int, tmp_path: Path
) -> None:
    import socks

    capture = tmp_path / "udp.pcapng"
    relay = proxy("--listen", "socks5:127.0.0.1:0", "--pcap", str(capture))
    host, port = _address(relay)
    sock = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.set_proxy(socks.SOCKS5, host, port)
    sock.settimeout(10)
    query = _dns_query("example.test", 0x4242)
    try:
        sock.sendto(query, ("127.0.0.1", dns_server))
        answer = sock.recv(4096)
    finally:
        sock.close()
    assert answer[:2] == b"\x42\x42"
    assert answer.endswith(socket.inet_aton("127.0.0.9"))
    (closed,) = _closed(relay)
    assert closed["transport"] == "udp"
    assert closed["requested"] == f"127.0.0.1:{dns_server}"
    assert closed["server"] == f"127.0.0.1:{dns_server}"
    assert closed["reason"] == "client-closed"
    assert (closed["bytes_up"], closed["bytes_down"]) == (len(query), len(answer))
    relay.proc.send_signal(2)
    assert relay.proc.wait(10) == 0
    assert_tshark_clean(capture)
    rows = fields(capture, "udp.payload", display_filter="udp")
    assert [bytes.fromhex(row[0].replace(":", "")) for row in rows] == [query, answer]


def test_udp_associate_by_name_and_denied_destinations(proxy: Any, dns_server: int) -> None:
    relay = proxy("--listen", "socks5:127.0.0.1:0", "--allow-ports", f"{dns_server}")
    address = _address(relay)
    with socket.create_connection(address, timeout=10) as control:
        control.sendall(b"\x05\x01\x00\x05\x03\x00" + pack_address("0.0.0.0", 0))
        reply = recv_exactly(control, 12)
        assert reply[:4] == b"\x05\x00\x05\x00"
        bound_port = struct.unpack("!H", reply[-2:])[0]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(10)
            query = _dns_query("example.test", 7)
            udp.sendto(
                b"\0\0\0" + pack_address("localhost", dns_server) + query, ("127.0.0.1", bound_port)
            )
            answer = udp.recv(4096)
            header = b"\0\0\0" + pack_address("127.0.0.1", dns_server)
            assert answer.startswith(header)
            assert answer[len(header) : len(header) + 2] == b"\x00\x07"
            # A fragment is dropped; a port outside --allow-ports is a denied flow.
            udp.sendto(
                b"\0\0\x01" + pack_address("127.0.0.1", dns_server) + query,
                ("127.0.0.1", bound_port),
            )
            udp.sendto(b"\0\0\0" + pack_address("127.0.0.1", 9) + query, ("127.0.0.1", bound_port))
            wait_for(lambda: len(json_events(relay, "closed")) >= 1, 10, "the denied flow")
    closed = _closed(relay, 2)
    assert [(c["requested"], c["reason"]) for c in closed] == [
        ("127.0.0.1:9", "denied"),
        (f"localhost:{dns_server}", "client-closed"),
    ]


def test_transparent_udp_reads_the_original_destination_from_the_kernels_control_messages() -> None:
    # struct sockaddr_in / sockaddr_in6 as IP_ORIGDSTADDR / IPV6_ORIGDSTADDR carry them:
    # the family in host order, the port in network order, then the address.
    v4 = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 53) + socket.inet_aton("10.9.8.7")
    v6 = (
        struct.pack("=H", socket.AF_INET6)
        + struct.pack("!HI", 443, 0)
        + socket.inet_pton(socket.AF_INET6, "fd00::7")
        + b"\0" * 4
    )
    mapped = v6[:8] + socket.inet_pton(socket.AF_INET6, "::ffff:10.9.8.7") + b"\0" * 4
    assert original_destination([(socket.IPPROTO_IP, 20, v4 + b"\0" * 8)]) == ("10.9.8.7", 53)
    assert original_destination([(socket.IPPROTO_IPV6, 74, v6)]) == ("fd00::7", 443)
    assert original_destination([(socket.IPPROTO_IPV6, 74, mapped)]) == ("10.9.8.7", 443)
    # Other control messages, or none: no original destination (the datagram is dropped).
    assert original_destination([(17, 104, b"\x10\x00\x00\x00")]) is None
    assert original_destination([]) is None


def test_transparent_udp_drops_clients_outside_allow_from_with_one_log_line() -> None:
    outcome = _transparent_udp_scenario(
        "--allow-from", "10.98.5.0/24", "--allow-from", "fd00:98:5::/64"
    )
    assert outcome["exit"] == 0, outcome["stderr"]
    # Nothing reached the servers and nothing came back: each client's flow closed at once
    # as denied, with no byte relayed (the one sent to the listener itself too).
    for answer in outcome["client"].values():
        assert answer[0].startswith("no answer: "), answer
    closed = [event for event in outcome["events"] if event["event"] == "closed"]
    assert sorted(event["client"].rsplit(":", 1)[0] for event in closed) == [
        "10.98.0.2",
        "127.0.0.1",
        "[fd00:98::2]",
    ]
    for event in closed:
        assert event["reason"] == "denied"
        assert (event["bytes_up"], event["bytes_down"]) == (0, 0)
        assert event["error"].endswith(" is outside --allow-from")
    # Counted, and said once: at most one line a minute.
    lines = outcome["stderr"].splitlines()
    assert len(lines) == 1, lines
    assert "refused a client from 10.98.0.2 outside --allow-from (1 refused so far)" in lines[0]
