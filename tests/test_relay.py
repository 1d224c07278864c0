"""The relay against real peers on loopback, through the real `flowtap run` process."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    FlowtapProcess,
    flowtap_command,
    free_port,
    json_events,
    process_state,
    start_flowtap,
    wait_for,
    wait_port,
)
from flowtap.proxy.flow import Address
from flowtap.proxy.listener import ListenerSpec, bind
from flowtap.proxy.relay import _clients_waiting


def closed_events(
    process: FlowtapProcess, count: int = 1, timeout_s: float = 10.0
) -> list[dict[str, Any]]:
    """Wait for `count` JSON `closed` events and return them."""

    wait_for(
        lambda: len(json_events(process, "closed")) >= count, timeout_s, f"{count} closed events"
    )
    return json_events(process, "closed")


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_echo_round_trip_and_json_events(flowtap: Any, echo_server: tuple[str, int]) -> None:
    proc = flowtap(
        "run", "--json", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{echo_server[1]}"
    )
    with socket.create_connection(("127.0.0.1", proc.port)) as sock:
        sock.sendall(b"hello flowtap")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"hello flowtap"
    (event,) = closed_events(proc)
    assert event["bytes_up"] == 13 and event["bytes_down"] == 13
    assert event["reason"] == "client-closed"
    assert event["server"] == f"127.0.0.1:{echo_server[1]}"
    assert event["listener"] == f"127.0.0.1:{proc.port}"
    assert event["state"] == "closed" and event["duration_s"] >= 0
    opened = [json.loads(line) for line in proc.lines if '"opened"' in line]
    assert [o["flow"] for o in opened] == [event["flow"]]


def test_text_events_name_flow_and_reason(flowtap: Any, echo_server: tuple[str, int]) -> None:
    proc = flowtap("run", "--listen", "0", "--upstream", f"127.0.0.1:{echo_server[1]}")
    assert proc.listeners[0][1].startswith("127.0.0.1:")
    with socket.create_connection(("127.0.0.1", proc.port)) as sock:
        sock.sendall(b"x" * 100)
        sock.recv(100)
    line = proc.wait_line(r"^#\d+ closed tcp ")
    assert "client-closed up=100B down=100B" in line


def test_json_lines_are_read_by_jq(flowtap: Any, echo_server: tuple[str, int]) -> None:
    proc = flowtap("run", "--json", "--listen", "0", "--upstream", f"127.0.0.1:{echo_server[1]}")
    with socket.create_connection(("127.0.0.1", proc.port)) as sock:
        sock.sendall(b"ping")
        sock.recv(10)
    closed_events(proc)
    assert proc.stop() == 0
    text = "\n".join(line for line in proc.lines if line.startswith("{")) + "\n"
    out = subprocess.run(
        ["jq", "-r", "[.event, .flow, .bytes_up] | @tsv"],
        input=text,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.splitlines() == ["opened\t1\t0", "closed\t1\t4"]


def test_redis_cli_works_as_against_redis(flowtap: Any, redis_server: int) -> None:
    proc = flowtap("run", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{redis_server}")

    def cli(port: int, *args: str) -> str:
        return subprocess.run(
            ["redis-cli", "-p", str(port), *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout

    assert cli(proc.port, "SET", "greeting", "hello") == "OK\n"
    assert cli(proc.port, "GET", "greeting") == cli(redis_server, "GET", "greeting") == "hello\n"
    assert cli(proc.port, "RPUSH", "l", "a", "b", "c") == "3\n"
    assert cli(proc.port, "LRANGE", "l", "0", "-1") == cli(redis_server, "LRANGE", "l", "0", "-1")
    assert cli(proc.port, "INFO", "server").startswith("# Server")


def test_redis_python_client_moves_1mib_values(flowtap: Any, redis_server: int) -> None:
    redis = pytest.importorskip("redis")
    proc = flowtap("run", "--json", "--listen", "0", "--upstream", f"127.0.0.1:{redis_server}")
    client = redis.Redis(host="127.0.0.1", port=proc.port)
    values = {f"key{i}": os.urandom(1 << 20) for i in range(8)}
    for key, value in values.items():
        assert client.set(key, value)
    pipe = client.pipeline()
    for key in values:
        pipe.get(key)
    assert pipe.execute() == list(values.values())
    client.close()
    (event,) = closed_events(proc)
    assert event["bytes_up"] > 8 << 20 and event["bytes_down"] > 8 << 20


def test_several_listeners_in_one_process(
    flowtap: Any, echo_server: tuple[str, int], redis_server: int
) -> None:
    proc = flowtap(
        "run",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        f"127.0.0.1:{echo_server[1]}",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        f"127.0.0.1:{redis_server}",
        listeners=2,
    )
    echo_port = int(proc.listeners[0][1].rsplit(":", 1)[1])
    redis_port = int(proc.listeners[1][1].rsplit(":", 1)[1])
    assert proc.listeners[1][2] == f"127.0.0.1:{redis_server}"
    with socket.create_connection(("127.0.0.1", echo_port)) as sock:
        sock.sendall(b"abc")
        assert sock.recv(3) == b"abc"
    with socket.create_connection(("127.0.0.1", redis_port)) as sock:
        sock.sendall(b"PING\r\n")
        assert sock.recv(100) == b"+PONG\r\n"


@pytest.fixture
def http_root(tmp_path: Path) -> tuple[Path, str]:
    """A 50 MiB file and its sha256, served by `python -m http.server` from tmp_path."""
    path = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for _ in range(50):
            block = os.urandom(1 << 20)
            digest.update(block)
            out.write(block)
    return tmp_path, digest.hexdigest()


def test_curl_downloads_50mib_intact(
    flowtap: Any, http_root: tuple[Path, str], tmp_path: Path
) -> None:
    root, digest = http_root
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            str(port),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(root),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        proc = flowtap("run", "--json", "--listen", "0", "--upstream", f"127.0.0.1:{port}")
        out = tmp_path / "download.bin"
        subprocess.run(
            ["curl", "-sS", "--fail", "-o", str(out), f"http://127.0.0.1:{proc.port}/big.bin"],
            check=True,
            timeout=120,
        )
        assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
        (event,) = closed_events(proc)
        assert event["bytes_down"] > 50 << 20
    finally:
        server.terminate()
        server.wait(10)


def test_half_close_reaches_upstream_while_reply_flows_back(flowtap: Any) -> None:
    """The client shuts its write side; the server sees EOF, then answers, then closes."""
    upstream = socket.create_server(("127.0.0.1", 0))
    seen: dict[str, Any] = {}

    def serve() -> None:
        conn, _ = upstream.accept()
        with conn:
            seen["request"] = recv_all(conn)  # returns only once the FIN arrived
            conn.sendall(b"reply after EOF " * 1000)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    proc = flowtap(
        "run", "--json", "--listen", "0", "--upstream", f"127.0.0.1:{upstream.getsockname()[1]}"
    )
    with socket.create_connection(("127.0.0.1", proc.port)) as sock:
        sock.sendall(b"request body")
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"reply after EOF " * 1000
    thread.join(10)
    assert seen["request"] == b"request body"
    (event,) = closed_events(proc)
    assert event["reason"] == "client-closed"
    upstream.close()


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_client_reset_becomes_reset_upstream(flowtap: Any) -> None:
    upstream = socket.create_server(("127.0.0.1", 0))
    proc = flowtap(
        "run", "--json", "--listen", "0", "--upstream", f"127.0.0.1:{upstream.getsockname()[1]}"
    )
    client = socket.create_connection(("127.0.0.1", proc.port))
    server_side, _ = upstream.accept()
    client.sendall(b"before reset")
    assert server_side.recv(100) == b"before reset"
    _reset(client)
    server_side.settimeout(10)
    with pytest.raises(ConnectionResetError):
        while server_side.recv(100):
            pass
    (event,) = closed_events(proc)
    assert event["reason"] == "client-reset"
    server_side.close()
    upstream.close()


def test_bytes_a_client_sent_just_before_its_reset_still_reach_upstream(flowtap: Any) -> None:
    upstream = socket.create_server(("127.0.0.1", 0))
    proc = flowtap(
        "run", "--json", "--listen", "0", "--upstream", f"127.0.0.1:{upstream.getsockname()[1]}"
    )
    client = socket.create_connection(("127.0.0.1", proc.port))
    server_side, _ = upstream.accept()
    client.sendall(b"hello")
    assert server_side.recv(100) == b"hello"
    # The relay is stopped while the last words and the reset arrive, so it wakes to both at
    # once, as a busy relay does: the words are relayed before the reset.
    proc.proc.send_signal(signal.SIGSTOP)
    wait_for(lambda: process_state(proc.proc.pid) == "T", 10, "the relay to stop")
    try:
        client.sendall(b"last words")
        _reset(client)  # on loopback both are queued for the relay before this returns
    finally:
        proc.proc.send_signal(signal.SIGCONT)
    server_side.settimeout(10)
    received = b""
    with pytest.raises(ConnectionResetError):
        while chunk := server_side.recv(100):
            received += chunk
    assert received == b"last words"
    (event,) = closed_events(proc)
    assert event["reason"] == "client-reset"
    assert event["bytes_up"] == len(b"hellolast words")
    server_side.close()
    upstream.close()


def test_server_reset_becomes_reset_to_client(flowtap: Any) -> None:
    upstream = socket.create_server(("127.0.0.1", 0))
    proc = flowtap(
        "run", "--json", "--listen", "0", "--upstream", f"127.0.0.1:{upstream.getsockname()[1]}"
    )
    client = socket.create_connection(("127.0.0.1", proc.port))
    server_side, _ = upstream.accept()
    server_side.sendall(b"hello")
    assert client.recv(100) == b"hello"
    _reset(server_side)
    client.settimeout(10)
    with pytest.raises(ConnectionResetError):
        while client.recv(100):
            pass
    (event,) = closed_events(proc)
    assert event["reason"] == "server-reset"
    client.close()
    upstream.close()


def test_upstream_refused_resets_client_and_records_reason(flowtap: Any) -> None:
    dead_port = free_port()
    proc = flowtap("run", "--json", "--listen", "0", "--upstream", f"127.0.0.1:{dead_port}")
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", proc.port)) as sock:
            sock.settimeout(10)
            with pytest.raises(ConnectionResetError):
                sock.recv(100)
    events = closed_events(proc, 3)
    assert {e["reason"] for e in events} == {"upstream-refused"}
    assert all("refused" in e["error"].lower() for e in events)
    assert proc.proc.poll() is None  # a per-flow fault: still serving


def test_upstream_connect_timeout_is_recorded(flowtap: Any) -> None:
    # A listener whose accept queue is full drops further SYNs, so connecting times out.
    upstream = socket.socket()
    upstream.bind(("127.0.0.1", 0))
    upstream.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(upstream.getsockname())
        fillers.append(filler)
    time.sleep(0.2)  # let the fillers' handshakes complete before flowtap connects
    proc = flowtap(
        "run",
        "--json",
        "--connect-timeout",
        "0.5",
        "--listen",
        "0",
        "--upstream",
        f"127.0.0.1:{upstream.getsockname()[1]}",
    )
    with socket.create_connection(("127.0.0.1", proc.port)) as sock:
        sock.settimeout(10)
        with pytest.raises(ConnectionResetError):
            sock.recv(100)
    (event,) = closed_events(proc)
    assert event["reason"] == "upstream-timeout"
    assert 0.4 < event["duration_s"] < 5
    for filler in fillers:
        filler.close()
    upstream.close()


def test_idle_timeout_closes_quiet_flows(flowtap: Any, echo_server: tuple[str, int]) -> None:
    proc = flowtap(
        "run",
        "--json",
        "--idle-timeout",
        "0.5",
        "--listen",
        "0",
        "--upstream",
        f"127.0.0.1:{echo_server[1]}",
    )
    with socket.create_connection(("127.0.0.1", proc.port)) as sock:
        sock.sendall(b"hi")
        assert sock.recv(10) == b"hi"
        sock.settimeout(10)
        assert recv_all(sock) == b""  # flowtap closed the quiet flow
    (event,) = closed_events(proc)
    assert event["reason"] == "idle-timeout"


def test_client_vanishing_mid_stream_leaves_relay_serving(
    flowtap: Any, echo_server: tuple[str, int]
) -> None:
    proc = flowtap("run", "--json", "--listen", "0", "--upstream", f"127.0.0.1:{echo_server[1]}")
    sock = socket.create_connection(("127.0.0.1", proc.port))
    sock.sendall(os.urandom(4 << 20))  # more than the echo can return before we vanish
    _reset(sock)
    (event,) = closed_events(proc)
    assert event["reason"] == "client-reset"
    with socket.create_connection(("127.0.0.1", proc.port)) as again:
        again.sendall(b"still here")
        assert again.recv(100) == b"still here"


def test_sigterm_closes_open_flows_as_shutdown_and_exits_0(echo_server: tuple[str, int]) -> None:
    proc = start_flowtap(
        "run",
        "--json",
        "--grace",
        "0.5",
        "--listen",
        "0",
        "--upstream",
        f"127.0.0.1:{echo_server[1]}",
    )
    clients = [socket.create_connection(("127.0.0.1", proc.port)) for _ in range(5)]
    for sock in clients:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
    started = time.monotonic()
    assert proc.stop() == 0
    assert time.monotonic() - started < 5
    events = [json.loads(line) for line in proc.lines if '"closed"' in line]
    assert len(events) == 5 and {e["reason"] for e in events} == {"shutdown"}
    for sock in clients:
        sock.settimeout(5)
        assert recv_all(sock) == b""
        sock.close()
    assert "Traceback" not in proc.stderr


def test_a_signal_right_after_the_listening_line_is_a_clean_exit(
    echo_server: tuple[str, int],
) -> None:
    # Scripts stop flowtap as soon as they have seen it listen: that must be a graceful stop.
    for sig in (signal.SIGTERM, signal.SIGINT) * 3:
        proc = subprocess.Popen(
            [
                *flowtap_command(),
                "run",
                "--listen",
                "0",
                "--upstream",
                f"127.0.0.1:{echo_server[1]}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("listening tcp ")
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=20)
        assert (proc.returncode, stderr) == (0, "")


def test_sigint_lets_a_finishing_flow_end_normally(echo_server: tuple[str, int]) -> None:
    proc = start_flowtap(
        "run",
        "--json",
        "--grace",
        "10",
        "--listen",
        "0",
        "--upstream",
        f"127.0.0.1:{echo_server[1]}",
    )
    sock = socket.create_connection(("127.0.0.1", proc.port))
    sock.sendall(b"last words")
    assert sock.recv(100) == b"last words"
    proc.proc.send_signal(2)
    time.sleep(0.3)  # flowtap is now draining; the flow finishes within the grace period
    sock.shutdown(socket.SHUT_WR)
    assert recv_all(sock) == b""
    sock.close()
    # The last flow has ended: flowtap exits 0 on its own, with no second signal.
    assert proc.proc.wait(15) == 0
    assert proc.stop() == 0
    events = [json.loads(line) for line in proc.lines if '"closed"' in line]
    assert [e["reason"] for e in events] == ["client-closed"]


def test_thousand_concurrent_connections(flowtap: Any, echo_server: tuple[str, int]) -> None:
    proc = flowtap("run", "--json", "--listen", "0", "--upstream", f"127.0.0.1:{echo_server[1]}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    clients = []
    for i in range(1000):
        sock = socket.create_connection(("127.0.0.1", proc.port))
        sock.sendall(f"{i:06d}".encode())
        clients.append(sock)
    for i, sock in enumerate(clients):
        sock.settimeout(20)
        assert sock.recv(6) == f"{i:06d}".encode()
    for sock in clients:
        sock.close()
    events = closed_events(proc, 1000, timeout_s=30)
    assert len({e["flow"] for e in events}) == 1000


@pytest.mark.slow
def test_slow_reader_backpressure_bounds_memory(flowtap: Any) -> None:
    """A sender pushing 200 MiB to a reader that drains slowly must not grow flowtap's RSS."""
    upstream = socket.create_server(("127.0.0.1", 0))
    total = 200 << 20
    received = 0

    def slow_reader() -> None:
        nonlocal received
        conn, _ = upstream.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        with conn:
            deadline = time.monotonic() + 120
            while received < total and time.monotonic() < deadline:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                received += len(chunk)
                if received < 16 << 20:
                    time.sleep(0.01)  # the slow phase: the relay must hold the sender back

    thread = threading.Thread(target=slow_reader, daemon=True)
    thread.start()
    proc = flowtap("run", "--listen", "0", "--upstream", f"127.0.0.1:{upstream.getsockname()[1]}")
    rss_samples: list[int] = []

    def rss_kib() -> int:
        for line in Path(f"/proc/{proc.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    baseline = rss_kib()
    block = os.urandom(1 << 20)
    with socket.create_connection(("127.0.0.1", proc.port)) as sock:
        for i in range(200):
            sock.sendall(block)
            if i % 10 == 0:
                rss_samples.append(rss_kib())
    thread.join(120)
    assert received == total
    assert max(rss_samples) - baseline < 32 << 10, (baseline, rss_samples)
    upstream.close()


def test_too_many_open_files_keeps_running_and_recovers(echo_server: tuple[str, int]) -> None:
    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    proc = start_flowtap(
        "run",
        "--json",
        "--listen",
        "0",
        "--upstream",
        f"127.0.0.1:{echo_server[1]}",
        preexec_fn=low_fd_limit,
    )
    clients = []
    for _ in range(40):  # more than 48 descriptors once each flow has two sockets
        sock = socket.create_connection(("127.0.0.1", proc.port))
        sock.settimeout(5)
        clients.append(sock)
    for sock in clients:
        sock.close()
    # Every client is accepted in the end (some only once descriptors freed up) and closed.
    closed_events(proc, 40, timeout_s=20)
    with socket.create_connection(("127.0.0.1", proc.port)) as sock:
        sock.settimeout(10)
        sock.sendall(b"after the storm")
        assert sock.recv(100) == b"after the storm"
    assert proc.stop() == 0
    assert proc.stderr.count("cannot accept more connections") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--listen", "127.0.0.1:99999", "--upstream", "127.0.0.1:1"],
            "the port must be a number 0-65535",
        ),
        (["--listen", "nonsense", "--upstream", "127.0.0.1:1"], "malformed address 'nonsense'"),
        (["--listen", "0", "--upstream", "[::1:5"], "write IPv6 as [::1]:PORT"),
        (["--listen", "0"], "no --upstream given"),
        (["--upstream", "127.0.0.1:1"], "no --listen given"),
        (
            [
                "--listen",
                "0",
                "--listen",
                "0",
                "--listen",
                "0",
                "--upstream",
                "127.0.0.1:1",
                "--upstream",
                "127.0.0.1:2",
            ],
            "3 --listen but 2 --upstream",
        ),
        (
            ["--listen", "0", "--upstream", "no-such-host.invalid:80"],
            "cannot resolve 'no-such-host.invalid'",
        ),
        (
            ["--listen", "0", "--upstream", "127.0.0.1:1", "--connect-timeout", "soon"],
            "is not a number of seconds",
        ),
        (
            ["--listen", "0", "--upstream", "127.0.0.1:1", "--busy-poll", "-5"],
            "is not a number of microseconds between 0 and 1000000",
        ),
    ],
)
def test_bad_arguments_get_one_line_error(args: list[str], message: str) -> None:
    result = subprocess.run(
        [*flowtap_command(), "run", *args], capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowtap: error: "), result.stderr
    assert message in lines[0]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("busy_poll", ["200", "0"])
def test_dense_traffic_is_relayed_and_then_the_relay_sleeps(
    flowtap: Any, echo_server: tuple[str, int], busy_poll: str
) -> None:
    """Busy polling (on by default) lasts only while events are dense: once traffic stops,
    the relay uses no CPU."""
    proxy = flowtap(
        "run", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{echo_server[1]}",
        "--busy-poll", busy_poll,
    )  # fmt: skip
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for index in range(2000):  # ping-pong: events tens of microseconds apart
            message = b"%08d" % index
            sock.sendall(message)
            assert sock.recv(8, socket.MSG_WAITALL) == message
        time.sleep(0.2)
        before = _cpu_seconds(proxy.proc.pid)
        time.sleep(1.0)
        idle_cpu = _cpu_seconds(proxy.proc.pid) - before
    assert idle_cpu < 0.05, f"{idle_cpu:.2f} s of CPU in 1 s without traffic"


def test_port_in_use_names_port_and_suggests_zero() -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    result = subprocess.run(
        [*flowtap_command(), "run", "--listen", f"127.0.0.1:{port}", "--upstream", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    taken.close()
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"flowtap: error: port {port} is in use on 127.0.0.1: "
        "pick another port, or :0 for a free one"
    )


def test_non_loopback_listener_warns(flowtap: Any, echo_server: tuple[str, int]) -> None:
    proc = flowtap("run", "--listen", "0.0.0.0:0", "--upstream", f"127.0.0.1:{echo_server[1]}")
    assert proc.stop() == 0
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "anyone who can reach it" in warnings[0]


def test_reuse_port_lets_two_processes_share_one_port(
    flowtap: Any, echo_server: tuple[str, int]
) -> None:
    upstream = f"127.0.0.1:{echo_server[1]}"
    first = flowtap("run", "--json", "--reuse-port", "--listen", "0", "--upstream", upstream)
    port = str(first.port)
    second = flowtap("run", "--json", "--reuse-port", "--listen", port, "--upstream", upstream)
    assert second.port == first.port
    for i in range(200):
        with socket.create_connection(("127.0.0.1", first.port)) as sock:
            sock.sendall(b"%d" % i)
            assert sock.recv(10) == b"%d" % i
    wait_for(
        lambda: (
            sum(line.count('"event":"closed"') for p in (first, second) for line in list(p.lines))
            == 200
        ),
        20,
        "200 closed events across both processes",
    )
    shares = [sum('"event":"closed"' in line for line in p.lines) for p in (first, second)]
    assert min(shares) > 0, shares  # the kernel spread the clients over both


def test_port_in_use_without_reuse_port_on_the_other_side() -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    result = subprocess.run(
        [*flowtap_command(), "run", "--reuse-port", "--listen", str(port), "--upstream", "1"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    taken.close()
    assert result.returncode == 2
    assert "every sharer needs --reuse-port" in result.stderr


def test_clients_are_accepted_with_nagle_off_from_the_listening_socket() -> None:
    # The relay sets no TCP_NODELAY per client: Linux copies it from the listening socket.
    listener = bind(ListenerSpec(Address("127.0.0.1", 0), Address("127.0.0.1", 9)))
    with listener, socket.create_connection(listener.getsockname(), timeout=5):
        listener.setblocking(True)
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_listener_tells_how_many_clients_wait_to_be_accepted() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        assert _clients_waiting(listener) == 0
        clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
        try:
            # Each is queued once the server side has its last handshake packet.
            wait_for(lambda: _clients_waiting(listener) == 3, 5, "3 clients queued")
            listener.accept()[0].close()
            assert _clients_waiting(listener) == 2
        finally:
            for client in clients:
                client.close()
