"""The relay's control socket, spoken to by a plain socket client: subscribe, list, kill,
budgets, and who may connect; and the `--control` path errors of `flowtap run`."""

from __future__ import annotations

import os
import pwd
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_tls_relay import Pki, pki, tls_client

from conftest import UdpEchoServer, exchange, flowtap_command, start_flowtap, wait_for
from flowtap.inspector.tui.viewer import ControlClient
from flowtap.proxy.control import ControlServer
from flowtap.proxy.control_protocol import (
    HEADER,
    KIND_DATA,
    KIND_JSON,
    VERSION,
    DataNotShown,
    DataRun,
    FrameReader,
    ProtocolError,
    decode_data,
    decode_json,
    encode_data,
    encode_json,
    flow_from_json,
    flow_to_json,
)
from flowtap.proxy.events import Bus
from flowtap.proxy.flow import (
    Address,
    Direction,
    Flow,
    FlowClosed,
    FlowData,
    FlowState,
    Transport,
)
from flowtap.proxy.listener import ListenerSpec
from flowtap.proxy.relay import Relay

__all__ = ["pki"]  # a fixture this module's tests use


class PlainClient:
    """A control-socket client written against the wire format alone."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.reader = FrameReader()
        self.pending: list[tuple[int, bytes]] = []
        self.next_id = 0
        self.hello = self.message()

    def request(self, cmd: str, **fields: Any) -> int:
        self.next_id += 1
        self.sock.sendall(encode_json({"id": self.next_id, "cmd": cmd, **fields}))
        return self.next_id

    def frame(self, timeout_s: float = 10.0) -> tuple[int, bytes] | None:
        """The next frame, or None at the end of the stream."""
        deadline = time.monotonic() + timeout_s
        while not self.pending:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(1 << 20)
            if not data:
                return None
            self.pending += self.reader.feed(data)
        return self.pending.pop(0)

    def message(self) -> dict[str, Any]:
        frame = self.frame()
        assert frame is not None and frame[0] != KIND_DATA, frame
        return decode_json(frame[1])

    def reply(self, request_id: int) -> dict[str, Any]:
        """The reply to `request_id`; events before it are kept for `events`."""
        skipped: list[tuple[int, bytes]] = []
        while True:
            frame = self.frame()
            assert frame is not None, "the server closed the socket"
            if frame[0] != KIND_DATA:
                message = decode_json(frame[1])
                if message.get("type") == "reply" and message["id"] == request_id:
                    self.pending[:0] = skipped
                    return message
            skipped.append(frame)

    def events(self, until: Any, timeout_s: float = 20.0) -> list[dict[str, Any] | FlowData]:
        """Events until `until(events)` holds."""
        got: list[dict[str, Any] | FlowData] = []
        deadline = time.monotonic() + timeout_s
        while not until(got):
            assert time.monotonic() < deadline, f"timed out; got {len(got)} events"
            frame = self.frame(deadline - time.monotonic())
            assert frame is not None, "the server closed the socket"
            if frame[0] == KIND_DATA:
                got += decode_data(frame[1]).events()
            else:
                got.append(decode_json(frame[1]))
        return got

    def close(self) -> None:
        self.sock.close()


class Served:
    """A relay in front of the echo server with a control server on `path`."""

    def __init__(self, upstream: tuple[str, int], path: Path, **options: Any) -> None:
        self.control = ControlServer(str(path), **options)
        self.bus = Bus([self.control])
        spec = ListenerSpec(Address("127.0.0.1", 0), Address(*upstream))
        self.relay = Relay([spec], self.bus)
        self.relay.start()
        self.control.start(self.relay)
        self.path = path
        self.port = self.relay.listeners[0].address.port

    def exchange(self, payload: bytes) -> bytes:
        return exchange(self.port, payload)

    def stop(self) -> None:
        self.relay.stop(1.0)
        self.bus.close()


@pytest.fixture
def served(echo_server: tuple[str, int], tmp_path: Path) -> Iterator[Any]:
    started: list[Served] = []

    def start(**options: Any) -> Served:
        server = Served(echo_server, tmp_path / f"control-{len(started)}.sock", **options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def kinds(events: list[dict[str, Any] | FlowData], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if isinstance(e, dict) and e.get("type") == kind]


def counts_reach(client: PlainClient, expected: list[int], timeout_s: float = 20.0) -> None:
    """Wait for a `counts` message whose last flow has the `expected` (up, down) counts."""

    def reached(events: list[dict[str, Any] | FlowData]) -> bool:
        found = kinds(events, "counts")
        return bool(found) and list(found[-1]["flows"].values())[-1] == expected

    client.events(reached, timeout_s)


def test_the_socket_is_owner_only_and_the_hello_gives_the_relays_facts(served: Any) -> None:
    server = served()
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
    client = PlainClient(server.path)
    hello = client.hello
    assert hello["type"] == "hello" and hello["version"] == VERSION
    assert hello["pid"] == os.getpid()
    assert hello["listeners"] == [
        {
            "transport": "tcp",
            "address": f"127.0.0.1:{server.port}",
            "upstream": str(server.relay.listeners[0].spec.upstream),
        }
    ]
    info = client.reply(client.request("info"))
    assert info["ok"] and info["open_flows"] == 0 and info["path"] == str(server.path)
    client.close()


def test_subscribe_sends_recent_and_open_flows_then_live_events_with_raw_bytes(
    served: Any,
) -> None:
    server = served()
    assert server.exchange(b"before") == b"before"
    held = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    held.sendall(b"held open")
    assert held.recv(100) == b"held open"
    wait_for(lambda: server.relay.open_flows == 1, 5, "the held flow")
    client = PlainClient(server.path)
    reply = client.reply(client.request("subscribe"))
    assert [f["reason"] for f in reply["recent"]] == ["client-closed"]
    [live] = reply["open"]
    assert (live["bytes_up"], live["bytes_down"]) == (9, 9)  # counted before subscribing
    payload = bytes(range(256))  # not text: frames carry the bytes as they are
    held.sendall(payload)
    assert held.recv(1000) == payload
    held.close()
    events = client.events(lambda got: kinds(got, "closed"))
    data = [e for e in events if isinstance(e, FlowData)]
    assert all(e.flow_id == live["flow"] for e in data)
    assert b"".join(e.data for e in data if e.direction is Direction.UP) == payload
    assert b"".join(e.data for e in data if e.direction is Direction.DOWN) == payload
    assert kinds(events, "closed")[0]["flow"]["bytes_up"] == 9 + 256
    # a new flow: opened, data, closed, in that order
    server.exchange(b"after")
    events = client.events(lambda got: kinds(got, "closed"))
    assert [e["type"] if isinstance(e, dict) else "data" for e in events] == [
        "opened",
        "data",
        "data",
        "closed",
    ]
    listing = client.reply(client.request("list"))
    assert len(listing["recent"]) == 3 and listing["open"] == []
    client.close()


def test_a_busy_flows_chunks_reach_a_viewer_whole_and_in_order_over_many_frames(
    served: Any,
) -> None:
    # 1-byte round trips on an open flow: chunks alone, framed many batches at a time.
    server = served()
    held = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    held.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    wait_for(lambda: server.relay.open_flows == 1, 5, "the flow")
    client = PlainClient(server.path)
    [flow] = client.reply(client.request("subscribe"))["open"]
    sent = bytes(i % 251 for i in range(1500))
    for byte in sent:
        held.sendall(bytes((byte,)))
        assert held.recv(1) == bytes((byte,))
    held.close()
    events = client.events(lambda got: kinds(got, "closed"))
    data = [e for e in events if isinstance(e, FlowData)]
    assert events[-1] == kinds(events, "closed")[0]  # after every chunk
    assert {e.flow_id for e in data} == {flow["flow"]}
    assert b"".join(e.data for e in data if e.direction is Direction.UP) == sent
    assert b"".join(e.data for e in data if e.direction is Direction.DOWN) == sent
    # No byte came down before it went up.
    up = down = 0
    for event in data:
        if event.direction is Direction.UP:
            up += len(event.data)
        else:
            down += len(event.data)
            assert down <= up
    assert [e.timestamp for e in data] == sorted(e.timestamp for e in data)
    client.close()


def test_kill_over_the_socket_resets_both_sides(served: Any) -> None:
    server = served()
    client = PlainClient(server.path)
    client.reply(client.request("subscribe"))
    held = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    [opened] = kinds(client.events(lambda got: kinds(got, "opened")), "opened")
    reply = client.reply(client.request("kill", flow=opened["flow"]["flow"]))
    assert reply["ok"] and reply["live"]
    [closed] = kinds(client.events(lambda got: kinds(got, "closed")), "closed")
    assert closed["flow"]["reason"] == "killed"
    with pytest.raises(ConnectionResetError):
        while held.recv(100):
            pass
    held.close()
    bad = client.reply(client.request("kill", flow="one"))
    assert not bad["ok"] and "integer" in bad["error"]
    unknown = client.reply(client.request("intercept"))
    assert not unknown["ok"] and "unknown command" in unknown["error"]
    client.close()


def test_a_viewer_that_stops_reading_loses_data_counted_but_no_opened_or_closed(
    served: Any,
) -> None:
    server = served(budget_bytes=64 * 1024, forward_cap_bytes=64 * 1024 * 1024)
    client = PlainClient(server.path)
    client.reply(client.request("subscribe"))
    flows, size = 20, 256 * 1024
    started = time.monotonic()
    for n in range(flows):  # the viewer reads nothing meanwhile
        assert server.exchange(bytes([n]) * size) == bytes([n]) * size
    relayed_s = time.monotonic() - started
    assert relayed_s < 15, f"the relay waited on the viewer ({relayed_s:.1f}s)"
    total = flows * size * 2

    def accounted(got: list[dict[str, Any] | FlowData]) -> bool:
        shown = sum(len(e.data) for e in got if isinstance(e, FlowData))
        lost = sum(e["bytes"] for e in kinds(got, "not-shown"))
        return len(kinds(got, "closed")) == flows and shown + lost == total

    events = client.events(accounted)
    assert len(kinds(events, "opened")) == flows
    assert sorted(e["flow"]["flow"] for e in kinds(events, "closed")) == sorted(
        e["flow"]["flow"] for e in kinds(events, "opened")
    )
    lost = sum(e["bytes"] for e in kinds(events, "not-shown"))
    assert lost > total // 2, "a 64 KiB budget cannot have held most of 10 MiB"
    client.close()


def test_a_viewer_hopelessly_behind_is_told_and_disconnected_and_the_relay_goes_on(
    served: Any,
) -> None:
    server = served(max_behind_events=50)
    client = PlainClient(server.path)
    client.reply(client.request("subscribe"))
    # Enough opened/closed events to fill the socket's kernel buffer and then 50 more.
    for _ in range(1500):
        socket.create_connection(("127.0.0.1", server.port), timeout=10).close()
    messages: list[dict[str, Any]] = []
    while (frame := client.frame()) is not None:
        messages.append(decode_json(frame[1]))
    assert messages[-1]["type"] == "bye" and "behind" in messages[-1]["reason"]
    assert server.exchange(b"still relaying") == b"still relaying"
    again = PlainClient(server.path)
    assert again.reply(again.request("subscribe"))["ok"]
    again.close()


def test_a_client_sending_garbage_is_dropped_alone(served: Any) -> None:
    server = served()
    rude = PlainClient(server.path)
    rude.sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
    assert rude.frame() is None
    polite = PlainClient(server.path)
    assert polite.reply(polite.request("info"))["ok"]
    polite.close()


_CONNECT = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(5)
try:
    sock.connect(sys.argv[1])
    print("closed" if sock.recv(100) == b"" else "hello")
except PermissionError:
    print("permission denied")
"""


def _connect_as_nobody(path: str) -> str:
    """Run a client as `nobody` (a child that setuid()s before it starts) against `path`."""
    nobody = pwd.getpwnam("nobody")

    def become_nobody() -> None:
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    result = subprocess.run(
        ["/usr/bin/python3", "-c", _CONNECT, path],
        preexec_fn=become_nobody,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    return result.stdout.strip()


def test_another_users_connection_is_refused_with_one_log_line() -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as another user (nobody)")
    folder = Path(tempfile.mkdtemp(prefix="flowtap-peer-"))
    try:
        folder.chmod(0o711)  # others may reach the socket file, not list the folder
        path = folder / "control.sock"
        relay = start_flowtap(
            "run", "--quiet", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9",
            "--control", str(path),
        )  # fmt: skip
        relay.wait_line("^control unix:")
        # The file's mode 0600 stops others first.
        assert _connect_as_nobody(str(path)) == "permission denied"
        # With the mode opened up, the peer's uid (SO_PEERCRED) still stops them.
        path.chmod(0o666)
        assert _connect_as_nobody(str(path)) == "closed"
        assert PlainClient(path).hello["type"] == "hello"  # the owner still gets in
        assert relay.stop() == 0
        lines = relay.read_stderr().splitlines()
        nobody = pwd.getpwnam("nobody").pw_uid
        assert len(lines) == 1, lines
        assert f"refused a connection from uid {nobody}" in lines[0]
    finally:
        for item in folder.iterdir():
            item.unlink()
        folder.rmdir()


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*flowtap_command(), "run", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )


def _one_error_line(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowtap: error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def test_control_paths_taken_missing_or_not_sockets_are_one_line_errors(tmp_path: Path) -> None:
    taken = tmp_path / "taken.sock"
    relay = start_flowtap(
        "run", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--control", str(taken)
    )
    try:
        relay.wait_line("^control unix:")
        _one_error_line(_run("--control", str(taken)), "in use by a running relay")
    finally:
        relay.stop()
    assert not taken.exists()  # the relay removed its socket file on exit
    _one_error_line(_run("--control", str(tmp_path / "nowhere" / "c.sock")), "does not exist")
    plain = tmp_path / "plain-file"
    plain.write_text("not a socket")
    _one_error_line(_run("--control", str(plain)), "is not a socket")
    assert plain.read_text() == "not a socket"


def test_a_dead_relays_socket_is_replaced_and_an_unsafe_folder_refused(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(stale))
    dead.close()  # the file stays, nothing listens: like a relay that was killed
    relay = start_flowtap(
        "run", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--control", str(stale)
    )
    try:
        assert relay.wait_line("^control unix:") == f"control unix:{stale}"
    finally:
        relay.stop()
    runtime = tmp_path / "runtime"
    (runtime / "flowtap").mkdir(parents=True)
    (runtime / "flowtap").chmod(0o777)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    _one_error_line(_run(env=env), "writable by others", "chmod 700")
    (runtime / "flowtap").chmod(0o700)
    # the default folder, now safe, serves the socket
    process = subprocess.Popen(
        [*flowtap_command(), "run", "--quiet", "--listen", "127.0.0.1:0", "--upstream",
         "127.0.0.1:9"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline().strip() for _ in range(2)]
        assert lines[1] == f"control unix:{runtime}/flowtap/relay-{process.pid}.sock"
    finally:
        process.terminate()
        process.wait(10)
    assert not list((runtime / "flowtap").iterdir())


def test_frames_split_anywhere_decode_to_the_same_messages_and_data() -> None:
    flow = Flow(
        7,
        Transport.TCP,
        Address("::1", 40000),
        Address("", path="/run/redis.sock"),
        Address("127.0.0.1", 6380),
        1700000000.25,
        state=FlowState.OPEN,
    )
    data = [
        FlowData(7, Direction.DOWN, 1700000000.5, bytes(range(256)) * 3),
        FlowData(8, Direction.UP, 1700000000.75, b""),
        FlowData(7, Direction.UP, 1700000001.0, b"x"),
    ]
    stream = (
        encode_json({"type": "opened", "flow": flow_to_json(flow)})
        + encode_data(data)
        + encode_json({"type": "bye", "reason": "done"})
    )
    for step in (1, 2, 5, 64, len(stream)):
        reader = FrameReader()
        frames = []
        for start in range(0, len(stream), step):
            frames += reader.feed(stream[start : start + step])
        assert [kind for kind, _ in frames] == [KIND_JSON, KIND_DATA, KIND_JSON]
        assert flow_from_json(decode_json(frames[0][1])["flow"]) == flow
        run = decode_data(frames[1][1])
        assert list(run.events()) == data
        assert run.flow_id() is None
        assert decode_json(frames[2][1]) == {"type": "bye", "reason": "done"}
    assert decode_data(encode_data(data[2:])[HEADER.size :]).flow_id() == 7


def test_a_data_frame_that_does_not_add_up_is_a_protocol_error() -> None:
    good = encode_data([FlowData(1, Direction.UP, 1.0, b"abc")])[HEADER.size :]
    directions_at = len(good) - 3 - 1
    for bad in (
        b"",  # no count
        bytes(4),  # no chunks
        good[:-1],  # a byte short of its lengths
        good + b"d",  # a byte over
        good[:directions_at] + b"\x07" + good[directions_at + 1 :],  # direction 7
        (1000).to_bytes(4, sys.byteorder) + good[4:],  # more chunks than columns
    ):
        with pytest.raises(ProtocolError):
            decode_data(bad)


def test_a_stream_that_is_not_control_frames_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        FrameReader().feed(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(ProtocolError):
        decode_json(b"[1, 2]")
    with pytest.raises(ProtocolError):
        flow_from_json({"id": 1, "transport": "sctp"})


def test_counts_of_a_capped_flow_stop_while_it_is_quiet_and_resume_when_it_moves(
    served: Any,
) -> None:
    server = served(forward_cap_bytes=1024)
    client = PlainClient(server.path)
    client.reply(client.request("subscribe"))
    held = socket.create_connection(("127.0.0.1", server.port), timeout=10)

    def echo(payload: bytes) -> None:
        held.sendall(payload)
        got = b""
        while len(got) < len(payload):
            got += held.recv(1 << 16)

    echo(b"a" * 4096)  # past the cap: from now on the relay sends counts, not data
    counts_reach(client, [4096, 4096])
    # Quiet: no counts come any more (before, the same ones came twice a second).
    with pytest.raises((AssertionError, TimeoutError), match="timed out"):
        client.events(lambda events: bool(kinds(events, "counts")), 1.5)
    echo(b"b" * 100)
    counts_reach(client, [4196, 4196])
    echo(b"c" * 100)
    counts_reach(client, [4296, 4296])
    held.close()
    client.close()


def test_counts_never_come_before_the_chunks_relayed_before_them(served: Any) -> None:
    # A viewer adds a chunk to the bytes it shows and takes a flow's counts as they are: counts
    # ahead of chunks relayed before them would count those chunks twice. Chunks wait a moment
    # to be sent together, counts go out twice a second: flows capped one after another, some
    # just before the counts are read.
    server = served(forward_cap_bytes=1024)
    client = PlainClient(server.path)
    client.reply(client.request("subscribe"))
    flows = []
    for _ in range(40):
        flow = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        flow.sendall(b"a" * 4096)
        got = 0
        while got < 4096:
            got += len(flow.recv(1 << 16))
        flows.append(flow)
        time.sleep(0.03)
    shown: dict[int, list[int]] = {}  # flow id: bytes up, down, as a viewer shows them
    looked = [0]

    def all_shown(events: list[dict[str, Any] | FlowData]) -> bool:
        for event in events[looked[0] :]:
            if isinstance(event, FlowData):
                shown.setdefault(event.flow_id, [0, 0])[event.direction is Direction.DOWN] += len(
                    event.data
                )
            elif event.get("type") == "counts":
                for flow_id, counts in event["flows"].items():
                    shown[int(flow_id)] = counts
        looked[0] = len(events)
        return len(shown) == 40 and all(counts == [4096, 4096] for counts in shown.values())

    try:
        client.events(all_shown, 30)
    except AssertionError:
        wrong = {flow_id: counts for flow_id, counts in shown.items() if counts != [4096, 4096]}
        raise AssertionError(f"a viewer would show {wrong}") from None
    for flow in flows:
        flow.close()
    client.close()


def test_counts_of_a_capped_udp_flow_keep_up_with_its_datagrams(
    udp_echo: type[UdpEchoServer], tmp_path: Path
) -> None:
    echo = udp_echo()
    control = ControlServer(str(tmp_path / "control.sock"), forward_cap_bytes=1024)
    bus = Bus([control])
    spec = ListenerSpec(
        Address("127.0.0.1", 0), Address(echo.host, echo.port), transport=Transport.UDP
    )
    relay = Relay([spec], bus)
    relay.start()
    control.start(relay)
    client = PlainClient(tmp_path / "control.sock")
    try:
        client.reply(client.request("subscribe"))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(10)
            sock.connect(("127.0.0.1", relay.listeners[0].address.port))
            for sent in range(1, 9):  # 4 KiB each way: past the 1 KiB a viewer is sent
                sock.send(b"a" * 512)
                assert sock.recv(2048) == b"a" * 512
                if sent == 2:
                    counts_reach(client, [1024, 1024])  # the cap reached: counts from now on
            counts_reach(client, [4096, 4096])
            # Quiet: no counts come any more; then it moves again, and they come again.
            with pytest.raises((AssertionError, TimeoutError), match="timed out"):
                client.events(lambda events: bool(kinds(events, "counts")), 1.5)
            sock.send(b"b" * 100)
            assert sock.recv(2048) == b"b" * 100
            counts_reach(client, [4196, 4196])
    finally:
        client.close()
        relay.stop(1.0)
        bus.close()


@pytest.fixture
def tls_echo(pki: Pki) -> Iterator[int]:
    """A TLS echo server on loopback (one connection at a time); yields its port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*pki.server("self"))
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(raw, server_side=True) as conn:
                    while data := conn.recv(1 << 16):
                        conn.sendall(data)
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (closing the socket does not)
    listener.close()
    thread.join(10)
    assert not thread.is_alive()


def test_counts_of_a_capped_intercepted_tls_flow_resume_when_it_moves_again(
    pki: Pki, tls_echo: int, tmp_path: Path
) -> None:
    """A TLS flow stops handing its plaintext to observers past the display cap, as a plain
    one does, and is asked for it again once it has gone quiet."""
    control = tmp_path / "relay.sock"
    relay = start_flowtap(
        "run", "--quiet", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{tls_echo}",
        "--tls", "intercept", "--ca", str(pki.flowtap_ca), "--upstream-insecure",
        "--control", str(control),
    )  # fmt: skip
    client = PlainClient(control)
    try:
        client.reply(client.request("subscribe"))
        with tls_client(pki, relay.port) as held:

            def echo(payload: bytes) -> None:
                held.sendall(payload)
                got = 0
                while got < len(payload):
                    got += len(held.recv(1 << 16))

            size = 3 * 1024 * 1024  # past the 1 MiB a viewer is sent of each direction
            echo(b"a" * size)
            counts_reach(client, [size, size])
            with pytest.raises((AssertionError, TimeoutError), match="timed out"):
                client.events(lambda events: bool(kinds(events, "counts")), 1.5)
            echo(b"b" * 100)
            counts_reach(client, [size + 100, size + 100])
    finally:
        client.close()
        assert relay.stop() == 0


def test_a_viewer_queues_events_in_order_and_counts_data_past_its_budget(served: Any) -> None:
    server = served()
    viewer = ControlClient(str(server.path), max_waiting_bytes=100)
    try:
        assert viewer.subscribe()
        assert server.control.wants_data  # answered: what is relayed now comes as events
        assert server.exchange(b"a" * 60) == b"a" * 60  # 60 up fit, 60 more down do not
        taken: list[object] = []

        def counted() -> bool:
            taken.extend(viewer.drain())
            kinds = {type(event) for event in taken}
            return DataNotShown in kinds and FlowClosed in kinds

        # Nothing taken before the close is in: taken between the two chunks, the first
        # would leave room for the second.
        wait_for(
            lambda: any(isinstance(event, FlowClosed) for event in list(viewer._events)),
            10,
            "the close",
        )
        wait_for(counted, 10, "the data past the budget counted, and the close")
        # Data comes in runs; a run that does not fit whole comes as the chunks that do.
        events = [e for x in taken for e in (x.events() if isinstance(x, DataRun) else [x])]
        # The count comes once the viewer has caught up: after the close if that came in the
        # same read, before it if the relay sent the close later.
        assert [type(event).__name__ for event in events[:2]] == ["FlowOpened", "FlowData"]
        assert sorted(type(event).__name__ for event in events[2:]) == [
            "DataNotShown",
            "FlowClosed",
        ]
        data = events[1]
        (missing,) = [event for event in events if isinstance(event, DataNotShown)]
        assert isinstance(data, FlowData) and data.direction is Direction.UP
        assert data.data == b"a" * 60
        assert isinstance(missing, DataNotShown) and missing.direction is Direction.DOWN
        assert missing.size_bytes == 60
    finally:
        viewer.close()
