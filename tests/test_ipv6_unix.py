"""IPv6 everywhere (mixed families too) and unix-domain sockets on either side of the relay."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis

from conftest import UdpEchoServer, flowtap_command, json_events, wait_for
from flowtap.proxy.flow import Address


def redis_cli(*args: str) -> str:
    result = subprocess.run(["redis-cli", *args], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


def exercise_redis(client: redis.Redis) -> None:
    """Real redis traffic both ways: small commands and a 1 MiB value."""
    value = os.urandom(1 << 20)
    assert client.ping()
    assert client.set("flowtap:key", value)
    assert client.get("flowtap:key") == value
    assert client.delete("flowtap:key") == 1


def run_flowtap_error(*args: str) -> str:
    """Run flowtap expecting a one-line error; return that line."""
    result = subprocess.run([*flowtap_command(), *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("flowtap: error: ")
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr


# -- addresses ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("[::1]:6379", "[::1]:6379"),
        ("[fe80::1%lo]:80", "[fe80::1%lo]:80"),
        ("127.0.0.1:53", "127.0.0.1:53"),
        ("unix:/tmp/a.sock", "unix:/tmp/a.sock"),
    ],
)
def test_addresses_print_as_they_parse(text: str, shown: str) -> None:
    assert str(Address.parse(text)) == shown


# -- IPv6 -------------------------------------------------------------------------------------


def test_redis_over_ipv6_shows_ipv6_addresses(redis_server: int, flowtap: Any) -> None:
    process = flowtap("run", "--listen", "[::1]:0", "--upstream", f"[::1]:{redis_server}")
    transport, listening, upstream = process.listeners[0]
    assert (transport, upstream) == ("tcp", f"[::1]:{redis_server}")
    assert listening.startswith("[::1]:")
    assert redis_cli("-h", "::1", "-p", str(process.port), "ping") == "PONG"
    exercise_redis(redis.Redis(host="::1", port=process.port))
    line = process.wait_line(r"^#1 closed ")
    assert line.startswith("#1 closed tcp [::1]:")
    assert f" -> [::1]:{redis_server} client-closed " in line
    opened = process.wait_line(r"^#1 opened ")
    assert opened.endswith(f" via {listening}")
    assert process.stop() == 0


@pytest.mark.parametrize(
    ("listen", "upstream_host"),
    [("[::1]:0", "127.0.0.1"), ("127.0.0.1:0", "[::1]")],
    ids=["ipv6-client-ipv4-upstream", "ipv4-client-ipv6-upstream"],
)
def test_redis_across_address_families(
    redis_server: int, flowtap: Any, listen: str, upstream_host: str
) -> None:
    process = flowtap(
        "run", "--json", "--listen", listen, "--upstream", f"{upstream_host}:{redis_server}"
    )
    client_host = "::1" if listen.startswith("[") else "127.0.0.1"
    exercise_redis(redis.Redis(host=client_host, port=process.port))
    wait_for(lambda: json_events(process, "closed"), 10, "the flow to close")
    (closed,) = json_events(process, "closed")
    assert closed["server"] == f"{upstream_host}:{redis_server}"
    client = closed["client"]
    assert client.startswith("[::1]:") if client_host == "::1" else client.startswith("127.")
    assert closed["listener"] == process.listeners[0][1]
    assert closed["reason"] == "client-closed"
    assert closed["bytes_up"] > 1 << 20 and closed["bytes_down"] > 1 << 20
    assert process.stop() == 0


@pytest.mark.parametrize(
    ("listen", "client_host", "echo_host"),
    [
        ("[::1]:0", "::1", "::1"),
        ("[::1]:0", "::1", "127.0.0.1"),
        ("127.0.0.1:0", "127.0.0.1", "::1"),
    ],
    ids=["ipv6", "ipv6-client-ipv4-upstream", "ipv4-client-ipv6-upstream"],
)
def test_udp_echo_over_ipv6(
    udp_echo: Any, flowtap: Any, listen: str, client_host: str, echo_host: str
) -> None:
    echo: UdpEchoServer = udp_echo(echo_host)
    process = flowtap("run", "--json", "--udp", "--listen", listen, "--upstream", echo.address)
    transport, listening, upstream = process.listeners[0]
    assert (transport, upstream) == ("udp", echo.address)
    family = socket.AF_INET6 if ":" in client_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        for size in (1, 1400, 60_000):
            payload = os.urandom(size)
            client.sendto(payload, (client_host, process.port))
            assert client.recv(70_000) == payload
        client_port = client.getsockname()[1]
    assert process.stop() == 0
    (closed,) = json_events(process, "closed")
    shown_client = f"[{client_host}]" if ":" in client_host else client_host
    assert closed["client"] == f"{shown_client}:{client_port}"
    assert closed["server"] == echo.address
    assert closed["listener"] == listening
    assert closed["bytes_up"] == closed["bytes_down"] == 61_401
    assert echo.stop() == (3, 61_401)


# -- unix sockets -----------------------------------------------------------------------------


def test_unix_listener_relays_to_redis(redis_server: int, flowtap: Any, tmp_path: Path) -> None:
    path = tmp_path / "flowtap.sock"
    process = flowtap(
        "run", "--json", "--listen", f"unix:{path}", "--upstream", f"127.0.0.1:{redis_server}"
    )
    assert process.listeners[0] == ("tcp", f"unix:{path}", f"127.0.0.1:{redis_server}")
    assert redis_cli("-s", str(path), "ping") == "PONG"
    exercise_redis(redis.Redis(unix_socket_path=str(path)))
    wait_for(lambda: len(json_events(process, "closed")) == 2, 10, "both flows to close")
    for closed in json_events(process, "closed"):
        assert closed["client"] == f"unix:{path}"
        assert closed["listener"] == f"unix:{path}"
        assert closed["server"] == f"127.0.0.1:{redis_server}"
        assert closed["reason"] == "client-closed"
    assert process.stop() == 0
    assert not path.exists(), "flowtap left its socket file behind"


def test_upstream_unix_socket_of_redis(redis_server: int, flowtap: Any, tmp_path: Path) -> None:
    redis_socket = tmp_path / "redis.sock"
    wait_for(redis_socket.exists, 10, "redis to create its unix socket")
    process = flowtap(
        "run", "--json", "--listen", "127.0.0.1:0", "--upstream", f"unix:{redis_socket}"
    )
    assert process.listeners[0][2] == f"unix:{redis_socket}"
    exercise_redis(redis.Redis(host="127.0.0.1", port=process.port))
    wait_for(lambda: json_events(process, "closed"), 10, "the flow to close")
    (closed,) = json_events(process, "closed")
    assert closed["server"] == f"unix:{redis_socket}"
    assert closed["reason"] == "client-closed"
    assert closed["bytes_up"] > 1 << 20
    assert process.stop() == 0
    assert redis_socket.exists(), "flowtap must not touch the upstream's socket"


def test_unix_to_unix(redis_server: int, flowtap: Any, tmp_path: Path) -> None:
    redis_socket = tmp_path / "redis.sock"
    wait_for(redis_socket.exists, 10, "redis to create its unix socket")
    path = tmp_path / "front.sock"
    flowtap("run", "--listen", f"unix:{path}", "--upstream", f"unix:{redis_socket}")
    assert redis_cli("-s", str(path), "set", "k", "v") == "OK"
    assert redis_cli("-s", str(redis_socket), "get", "k") == "v"


def test_missing_upstream_unix_socket_is_upstream_refused(flowtap: Any, tmp_path: Path) -> None:
    missing = tmp_path / "nobody.sock"
    process = flowtap("run", "--json", "--listen", "127.0.0.1:0", "--upstream", f"unix:{missing}")
    # The refusal comes back as a reset, possibly before connect() returns.
    with (
        contextlib.suppress(ConnectionResetError),
        socket.create_connection(("127.0.0.1", process.port), timeout=5) as client,
    ):
        assert client.recv(10) == b""
    wait_for(lambda: json_events(process, "closed"), 10, "the flow to close")
    (closed,) = json_events(process, "closed")
    assert closed["reason"] == "upstream-refused"
    assert str(missing) in closed["error"]


def test_stale_unix_socket_file_is_replaced(flowtap: Any, tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # bound, then closed: the file stays, nothing listens
    assert path.exists()
    with socket.socket() as upstream:
        upstream.bind(("127.0.0.1", 0))
        upstream.listen()
        port = upstream.getsockname()[1]
        process = flowtap("run", "--listen", f"unix:{path}", "--upstream", f"127.0.0.1:{port}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect(str(path))
            client.sendall(b"through")
            server, _ = upstream.accept()
            with server:
                server.settimeout(5)
                assert server.recv(10) == b"through"
        assert process.stop() == 0
    assert not path.exists()


def test_unix_socket_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen()
        error = run_flowtap_error("run", "--listen", f"unix:{path}", "--upstream", "127.0.0.1:6379")
        assert f"unix:{path} is in use" in error
        assert path.exists(), "flowtap removed a socket that something listens on"
        live.settimeout(5)
        probe, _ = live.accept()  # flowtap's probe was the only connection
        probe.close()


def test_file_that_is_not_a_socket_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    error = run_flowtap_error("run", "--listen", f"unix:{path}", "--upstream", "127.0.0.1:6379")
    assert "is not a socket" in error
    assert path.read_text() == "keep me"


def test_unix_socket_path_too_long_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / ("x" * 120)
    error = run_flowtap_error("run", "--listen", f"unix:{path}", "--upstream", "127.0.0.1:6379")
    assert "use a shorter path" in error


def test_unix_socket_in_missing_directory_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "dir.sock"
    error = run_flowtap_error("run", "--listen", f"unix:{path}", "--upstream", "127.0.0.1:6379")
    assert "does not exist" in error
