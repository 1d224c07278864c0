"""The UDP relay: sessions per client, datagram boundaries, timeouts, limits and errors."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    SOL_UDP,
    UDP_GRO,
    UdpEchoServer,
    free_port,
    json_events,
    recv_exactly,
    send_segmented,
    wait_for,
)
from conftest import EventRecorder as Recorder
from flowtap.proxy.events import Bus
from flowtap.proxy.flow import (
    Address,
    CloseReason,
    Direction,
    FlowData,
    FlowEvent,
    Transport,
)
from flowtap.proxy.listener import ListenerSpec
from flowtap.proxy.policy import Mode, ProxyPolicy
from flowtap.proxy.relay import Relay, RelayConfig
from flowtap.proxy.socks5 import pack_address


class Relays:
    """In-process UDP relays, each with a `Recorder`; whatever is still running is stopped."""

    def __init__(self) -> None:
        self._running: list[Relay] = []

    def start(
        self, upstream: str, listen: str = "127.0.0.1:0", **config: Any
    ) -> tuple[Relay, Recorder]:
        recorder = Recorder()
        spec = ListenerSpec(Address.parse(listen), Address.parse(upstream), Transport.UDP)
        relay = Relay([spec], Bus([recorder]), RelayConfig(**config))
        relay.start()
        self._running.append(relay)
        return relay, recorder

    def stop(self, relay: Relay) -> None:
        self._running.remove(relay)
        relay.stop(grace_s=1.0)

    def stop_all(self) -> None:
        for relay in list(self._running):
            self.stop(relay)


@pytest.fixture
def relays() -> Iterator[Relays]:
    harness = Relays()
    yield harness
    harness.stop_all()


def udp_client(host: str = "127.0.0.1", timeout_s: float = 5.0) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.settimeout(timeout_s)
    return sock


def listen_port(relay: Relay) -> int:
    return relay.listeners[0].address.port


# -- DNS through flowtap ------------------------------------------------------------------------


def dig(port: int, *query: str) -> str:
    result = subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(port), "+time=2", "+tries=1", "+noall", "+answer", *query],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_dig_through_flowtap_gets_the_same_answers_as_directly(
    dns_server: int, flowtap: Any
) -> None:
    process = flowtap(
        "run",
        "--json",
        "--udp",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        f"127.0.0.1:{dns_server}",
        "--udp-idle-timeout",
        "0.5",
    )
    assert process.listeners[0][0] == "udp"
    queries = [
        ("example.test", "A"),
        ("www.example.test", "A"),
        ("example.test", "AAAA"),
        ("txt.example.test", "TXT"),
        ("example.test", "MX"),
    ]
    for name, kind in queries:
        direct = dig(dns_server, name, kind)
        relayed = dig(process.port, name, kind)
        assert direct.strip(), f"dnsmasq gave no answer for {name} {kind}"
        assert relayed == direct
    wait_for(lambda: len(json_events(process, "closed")) == len(queries), 10, "sessions to end")
    for record in json_events(process, "closed"):
        assert record["transport"] == "udp"
        assert record["server"] == f"127.0.0.1:{dns_server}"
        assert record["reason"] == "idle-timeout"
        assert record["bytes_up"] > 0 and record["bytes_down"] > 0
        assert record["error"] is None
    assert process.stop() == 0


# -- sessions and datagrams ---------------------------------------------------------------------


def test_each_client_gets_its_own_session_and_only_its_own_replies(
    udp_echo: Any, relays: Relays
) -> None:
    echo: UdpEchoServer = udp_echo()
    relay, recorder = relays.start(echo.address)
    target = ("127.0.0.1", listen_port(relay))
    clients = [udp_client() for _ in range(3)]
    for round_ in range(5):
        for i, client in enumerate(clients):
            client.sendto(f"client {i} round {round_}".encode(), target)
        for i, client in enumerate(clients):
            assert client.recv(100) == f"client {i} round {round_}".encode()
    opened = recorder.opened()
    assert len(opened) == 3
    ports = {client.getsockname()[1] for client in clients}
    assert {e.flow.client.port for e in opened} == ports
    assert all(e.flow.transport is Transport.UDP for e in opened)
    relays.stop(relay)
    closed = recorder.closed()
    assert len(closed) == 3
    assert all(e.flow.reason is CloseReason.SHUTDOWN for e in closed)
    assert all(e.flow.bytes_up == e.flow.bytes_down == 5 * 16 for e in closed)


def test_datagram_boundaries_are_kept_one_event_per_datagram(udp_echo: Any, relays: Relays) -> None:
    echo: UdpEchoServer = udp_echo()
    relay, recorder = relays.start(echo.address)
    client = udp_client()
    sizes = [0, 1, 64, 1400, 9000, 65_507, 3]
    sent = [bytes((i + size) % 251 for i in range(size)) for size in sizes]
    for payload in sent:
        client.sendto(payload, ("127.0.0.1", listen_port(relay)))
        assert client.recv(70_000) == payload
    assert recorder.data(Direction.UP) == sent
    wait_for(lambda: len(recorder.data(Direction.DOWN)) == len(sent), 5, "replies recorded")
    assert recorder.data(Direction.DOWN) == sent
    assert echo.stop() == (len(sizes), sum(sizes))


def test_bursts_keep_every_datagram_boundary_and_order_both_ways(relays: Relays) -> None:
    # Back-to-back datagrams leave the relay in batches; each must still arrive on its own.
    upstream = udp_client()
    upstream.bind(("127.0.0.1", 0))
    relay, recorder = relays.start(f"127.0.0.1:{upstream.getsockname()[1]}")
    target = ("127.0.0.1", listen_port(relay))
    first, second = udp_client(), udp_client()
    for sock in (first, second, upstream):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    burst = [b"%03d" % i + b"a" * 97 for i in range(100)]  # equal sizes: more than one batch
    burst += [b"b" * 1400] * 50 + [b"", b"", b"c"] + [b"d" * 20_000] * 4 + [b"e" * 7]
    for payload in burst:
        first.sendto(payload, target)
    second.sendto(b"other client", target)
    arrived = [upstream.recvfrom(70_000) for _ in range(len(burst) + 1)]
    from_first = [data for data, addr in arrived if data != b"other client"]
    assert from_first == burst
    session_of_first = next(addr for data, addr in arrived if data == burst[0])
    replies = [b"%03d" % i + b"r" * 61 for i in range(130)] + [b"z" * 30_000, b"y"]
    for payload in replies:
        upstream.sendto(payload, session_of_first)
    assert [first.recv(70_000) for _ in range(len(replies))] == replies
    assert recorder.data(Direction.UP) == [*burst, b"other client"]
    # Equal-sized datagrams of two clients, interleaved: each reaches upstream from its session.
    for i in range(20):
        first.sendto(b"first %02d" % i, target)
        second.sendto(b"secnd %02d" % i, target)
    interleaved = [upstream.recvfrom(100) for _ in range(40)]
    session_of_second = next(addr for data, addr in arrived if data == b"other client")
    assert [d for d, a in interleaved if a == session_of_first] == [
        b"first %02d" % i for i in range(20)
    ]
    assert [d for d, a in interleaved if a == session_of_second] == [
        b"secnd %02d" % i for i in range(20)
    ]
    wait_for(lambda: len(recorder.data(Direction.DOWN)) == len(replies), 5, "replies recorded")
    assert recorder.data(Direction.DOWN) == replies
    relays.stop(relay)
    sizes = {e.flow.client.port: (e.flow.bytes_up, e.flow.bytes_down) for e in recorder.closed()}
    assert sizes[first.getsockname()[1]] == (sum(map(len, burst)) + 20 * 8, sum(map(len, replies)))
    assert sizes[second.getsockname()[1]] == (12 + 20 * 8, 0)


@pytest.mark.parametrize(
    ("client_host", "upstream_host"),
    [("127.0.0.1", "127.0.0.1"), ("::1", "::1"), ("::1", "127.0.0.1")],
)
def test_runs_sent_with_segmentation_offload_keep_every_boundary(
    relays: Relays, client_host: str, upstream_host: str
) -> None:
    # The relay receives such a run whole (UDP_GRO) and must still relay, record and count
    # each datagram on its own, a shorter last one included, both ways.
    upstream = udp_client(upstream_host)
    upstream.bind((upstream_host, 0))
    relay, recorder = relays.start(
        str(Address(upstream_host, upstream.getsockname()[1])),
        listen=str(Address(client_host, 0)),
    )
    client = udp_client(client_host)
    for sock in (client, upstream):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    runs = [
        [b"%02d" % i + b"u" * 98 for i in range(16)],
        [b"%02d" % i + b"v" * 98 for i in range(15)] + [b"short"],
        [b"w" * 1400] * 40,
        [b"x" * 100, b"y"],
    ]
    target = (client_host, listen_port(relay))
    for run in runs:
        send_segmented(client, run, target)
    sent_up = [payload for run in runs for payload in run]
    arrived = [upstream.recvfrom(70_000) for _ in sent_up]
    assert [data for data, _ in arrived] == sent_up
    session = arrived[0][1]
    replies = [[b"%02d" % i + b"r" * 62 for i in range(64)], [b"z" * 999] * 3 + [b"end"]]
    for run in replies:
        send_segmented(upstream, run, session)
    sent_down = [payload for run in replies for payload in run]
    assert [client.recv(70_000) for _ in sent_down] == sent_down
    wait_for(lambda: len(recorder.data(Direction.DOWN)) == len(sent_down), 5, "replies recorded")
    assert recorder.data(Direction.UP) == sent_up
    assert recorder.data(Direction.DOWN) == sent_down
    relays.stop(relay)
    (closed,) = recorder.closed()
    assert (closed.flow.bytes_up, closed.flow.bytes_down) == (
        sum(map(len, sent_up)),
        sum(map(len, sent_down)),
    )
    assert closed.flow.error is None


def coalesced_receives(sock: socket.socket, datagrams: int) -> list[tuple[int, int]]:
    """(bytes, segment size) of each receive until `datagrams` arrived, with UDP_GRO on."""
    receives = []
    while datagrams > 0:
        data, ancillary, _flags, _addr = sock.recvmsg(70_000, socket.CMSG_SPACE(4))
        segment = next(
            (
                int.from_bytes(cmsg[:4], sys.byteorder)
                for level, kind, cmsg in ancillary
                if (level, kind) == (SOL_UDP, UDP_GRO)
            ),
            len(data),
        )
        receives.append((len(data), segment))
        datagrams -= -(-len(data) // segment)
    return receives


def test_a_run_leaves_as_its_first_datagram_then_one_segmented_send(relays: Relays) -> None:
    # Seen by an upstream that asks for receive coalescing, each send of the relay arrives
    # whole: the first datagram of a run on its own (a sleeping peer wakes on it sooner), the
    # rest in one send with segmentation offload, not datagram by datagram.
    upstream = udp_client()
    upstream.bind(("127.0.0.1", 0))
    upstream.setsockopt(SOL_UDP, UDP_GRO, 1)
    probe = udp_client()
    send_segmented(probe, [b"p" * 100] * 4, upstream.getsockname())
    if coalesced_receives(upstream, 4) != [(400, 100)]:
        pytest.skip("this kernel does not deliver a run sent with UDP_SEGMENT whole")
    relay, recorder = relays.start(f"127.0.0.1:{upstream.getsockname()[1]}")
    client = udp_client()
    run = [b"%02d" % i + b"q" * 98 for i in range(16)]
    send_segmented(client, run, ("127.0.0.1", listen_port(relay)))
    assert coalesced_receives(upstream, 16) == [(100, 100), (1500, 100)]
    wait_for(lambda: len(recorder.data(Direction.UP)) == 16, 5, "datagrams recorded")
    assert recorder.data(Direction.UP) == run


def test_runs_the_route_cannot_segment_go_datagram_by_datagram() -> None:
    # In a network namespace of its own, the upstream's route has a 600-byte MTU: the kernel
    # refuses to segment runs of 1,000-byte datagrams, which then leave one at a time.
    if (
        shutil.which("unshare") is None
        or subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode
    ):
        pytest.skip("needs unshare --net (root) for a network namespace")
    runs = [[b"a" * 1000] * 3 + [b"b" * 10], [b"c" * 1000] * 2, [b"d" * 100] * 4]
    script = Path(__file__).with_name("udp_small_mtu.py")
    result = subprocess.run(
        [
            "unshare",
            "--net",
            sys.executable,
            str(script),
            json.dumps([[p.hex() for p in run] for run in runs]),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=script.parent,
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    sent = [payload.hex() for run in runs for payload in run]
    assert outcome["received"] == sent
    assert outcome["recorded"] == sent
    assert outcome["error"] is None
    assert outcome["bytes_up"] == sum(len(bytes.fromhex(p)) for p in sent)


def test_100k_datagrams_are_relayed_and_counted_exactly(udp_echo: Any, flowtap: Any) -> None:
    echo: UdpEchoServer = udp_echo()
    process = flowtap(
        "run", "--json", "--udp", "--listen", "127.0.0.1:0", "--upstream", echo.address
    )
    client = udp_client(timeout_s=5.0)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    client.connect(("127.0.0.1", process.port))
    total, window, size = 100_000, 32, 64
    # A bounded window in flight: a rate the relay sustains, so any loss is the relay's.
    template = bytearray(size)
    received = 0
    expected_next = 0
    started = time.monotonic()
    for seq in range(total):
        template[:8] = seq.to_bytes(8, "big")
        client.send(template)
        if seq >= window - 1:
            reply = client.recv(2048)
            assert int.from_bytes(reply[:8], "big") == expected_next and len(reply) == size
            expected_next += 1
            received += 1
    while received < total:
        reply = client.recv(2048)
        assert int.from_bytes(reply[:8], "big") == expected_next
        expected_next += 1
        received += 1
    elapsed = time.monotonic() - started
    assert received == total
    assert process.stop() == 0
    (closed,) = json_events(process, "closed")
    assert closed["bytes_up"] == closed["bytes_down"] == total * size
    assert closed["error"] is None
    assert echo.stop() == (total, total * size)
    print(f"{total} datagrams echoed through flowtap in {elapsed:.2f}s ({total / elapsed:.0f}/s)")


# -- session life cycle -------------------------------------------------------------------------


def test_idle_session_closes_with_reason_idle_timeout(udp_echo: Any, flowtap: Any) -> None:
    echo: UdpEchoServer = udp_echo()
    process = flowtap(
        "run",
        "--json",
        "--udp",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        echo.address,
        "--udp-idle-timeout",
        "0.6",
    )
    client = udp_client()
    target = ("127.0.0.1", process.port)
    started = time.monotonic()
    pings = 0
    # Keep the session busy past the timeout: activity must postpone it.
    while time.monotonic() - started < 1.2:
        client.sendto(b"ping", target)
        assert client.recv(10) == b"ping"
        pings += 1
        time.sleep(0.1)  # pacing the client, not waiting for the relay
    assert json_events(process, "closed") == []
    wait_for(lambda: json_events(process, "closed"), 5, "the idle session to close")
    ended = time.monotonic()
    (closed,) = json_events(process, "closed")
    assert closed["reason"] == "idle-timeout"
    assert closed["state"] == "closed"
    assert closed["bytes_up"] == closed["bytes_down"] == 4 * pings
    # The last ping went out after 1.1 s; the session outlived it by the 0.6 s timeout.
    assert 1.6 <= ended - started < 1.2 + 3
    assert closed["duration_s"] >= 1.6
    # The same client later gets a new session.
    client.sendto(b"again", target)
    assert client.recv(10) == b"again"
    wait_for(lambda: len(json_events(process, "opened")) == 2, 5, "a second session")
    assert process.stop() == 0


def test_session_limit_closes_the_least_recently_active(udp_echo: Any, flowtap: Any) -> None:
    echo: UdpEchoServer = udp_echo()
    process = flowtap(
        "run",
        "--json",
        "--udp",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        echo.address,
        "--udp-max-sessions",
        "3",
    )
    target = ("127.0.0.1", process.port)
    a, b, c, d = (udp_client() for _ in range(4))
    for client in (a, b, c, a):  # b is now the least recently active
        client.sendto(b"hi", target)
        assert client.recv(10) == b"hi"
    assert json_events(process, "closed") == []
    d.sendto(b"hi", target)
    assert d.recv(10) == b"hi"
    wait_for(lambda: json_events(process, "closed"), 5, "a session to make room")
    (closed,) = json_events(process, "closed")
    assert closed["client"] == f"127.0.0.1:{b.getsockname()[1]}"
    assert closed["reason"] == "idle-timeout"
    assert "session limit (3)" in closed["error"]
    # a, c and d still relay in their sessions; no new session opens for them.
    for client in (a, c, d):
        client.sendto(b"still", target)
        assert client.recv(10) == b"still"
    # Counted once flowtap has exited: the output of a busy relay may lag the datagrams.
    assert process.stop() == 0
    assert len(json_events(process, "opened")) == 4
    assert len(json_events(process, "closed")) == 4


def test_icmp_port_unreachable_is_recorded_and_the_session_goes_on(
    udp_echo: Any, flowtap: Any
) -> None:
    port = free_port(socket.SOCK_DGRAM)  # nothing listens here yet
    process = flowtap(
        "run", "--json", "--udp", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{port}"
    )
    client = udp_client(timeout_s=0.3)
    target = ("127.0.0.1", process.port)
    for _ in range(3):
        client.sendto(b"anyone?", target)
        with pytest.raises(TimeoutError):
            client.recv(10)
    echo: UdpEchoServer = udp_echo(port=port)
    client.settimeout(5)
    client.sendto(b"now?", target)
    assert client.recv(10) == b"now?"
    assert process.stop() == 0
    assert len(json_events(process, "opened")) == 1  # one session throughout
    (closed,) = json_events(process, "closed")
    assert closed["reason"] == "shutdown"
    assert "ICMP port unreachable" in closed["error"]
    assert f"127.0.0.1:{port}" in closed["error"]
    assert closed["bytes_up"] == 3 * 7 + 4
    assert closed["bytes_down"] == 4
    assert echo.stop() == (1, 4)


def test_oversized_datagram_is_reported_once_and_the_next_one_relayed(
    udp_echo: Any, flowtap: Any
) -> None:
    # An IPv6 client can send 65,527 bytes; an IPv4 upstream can take at most 65,507.
    echo: UdpEchoServer = udp_echo()
    process = flowtap("run", "--json", "--udp", "--listen", "[::1]:0", "--upstream", echo.address)
    client = udp_client("::1", timeout_s=0.5)
    target = ("::1", process.port)
    for _ in range(3):
        client.sendto(b"x" * 65_527, target)
    largest = bytes(i % 256 for i in range(65_507))
    client.settimeout(5)
    client.sendto(largest, target)
    assert client.recv(70_000) == largest
    assert process.stop() == 0
    (closed,) = json_events(process, "closed")
    assert "3 datagrams too large" in closed["error"]
    assert closed["bytes_up"] == closed["bytes_down"] == 65_507
    assert process.stderr.count("too large to send") == 1
    assert echo.stop() == (1, 65_507)


def test_datagram_larger_than_the_buffer_is_reported_not_truncated(
    udp_echo: Any, relays: Relays, caplog: pytest.LogCaptureFixture
) -> None:
    echo: UdpEchoServer = udp_echo()
    caplog.set_level(logging.WARNING, logger="flowtap.proxy.udp")
    relay, recorder = relays.start(echo.address, buffer_size_bytes=2048)
    client = udp_client()
    target = ("127.0.0.1", listen_port(relay))
    for _ in range(2):
        client.sendto(b"y" * 4000, target)
    client.sendto(b"z" * 2048, target)
    assert client.recv(5000) == b"z" * 2048
    relays.stop(relay)
    (closed,) = recorder.closed()
    assert closed.flow.error is not None
    assert "2 datagrams larger than the 2048-byte receive buffer" in closed.flow.error
    assert recorder.data(Direction.UP) == [b"z" * 2048]
    assert len([r for r in caplog.records if "receive buffer" in r.getMessage()]) == 1
    assert echo.stop() == (1, 2048)


class FirstDatagramOnly:
    """An observer that wants no more of a direction after its first datagram (as a display
    past its cap does)."""

    wants_data = True

    def __init__(self) -> None:
        self.data: list[FlowData] = []

    def handle(self, event: FlowEvent) -> bool | None:
        if isinstance(event, FlowData):
            self.data.append(event)
            return False
        return None

    def close(self) -> None:
        pass


def _round_trips_through(
    relay: Relay, how: str, echo: UdpEchoServer, stack: contextlib.ExitStack
) -> Callable[[bytes], None]:
    """A client of `relay` (a UDP listener, or a SOCKS5 one through UDP ASSOCIATE) whose
    datagrams `echo` sends back: what sends one and checks its echo."""
    sock = stack.enter_context(udp_client())
    if how == "udp":
        sock.connect(("127.0.0.1", listen_port(relay)))
        header = b""
    else:
        control = stack.enter_context(
            socket.create_connection(("127.0.0.1", listen_port(relay)), timeout=10)
        )
        control.sendall(b"\x05\x01\x00\x05\x03\x00" + pack_address("0.0.0.0", 0))
        reply = recv_exactly(control, 12)  # the method reply, then the association's (IPv4)
        assert reply[:4] == b"\x05\x00\x05\x00", reply
        sock.connect(("127.0.0.1", struct.unpack("!H", reply[-2:])[0]))
        header = b"\0\0\0" + pack_address(echo.host, echo.port)

    def round_trip(payload: bytes) -> None:
        sock.send(header + payload)
        assert sock.recv(2048) == header + payload

    return round_trip


@pytest.mark.parametrize("how", ["udp", "socks5"])
def test_a_direction_no_observer_wants_gets_no_datagrams_until_they_are_asked_for_again(
    udp_echo: Any, how: str
) -> None:
    echo = udp_echo()
    observer = FirstDatagramOnly()
    if how == "udp":
        spec = ListenerSpec(Address("127.0.0.1", 0), Address(echo.host, echo.port), Transport.UDP)
    else:
        spec = ListenerSpec(Address("127.0.0.1", 0), None, mode=Mode.SOCKS5, policy=ProxyPolicy())
    relay = Relay([spec], Bus([observer]))
    relay.start()
    try:
        with contextlib.ExitStack() as stack:
            round_trip = _round_trips_through(relay, how, echo, stack)
            for n in range(5):
                round_trip(b"first %d" % n)
            wait_for(lambda: len(observer.data) >= 2, 10, "the first datagram each way")
            flow_id = observer.data[0].flow_id
            wait_for(lambda: relay.byte_counts(flow_id) == (35, 35), 10, "the counts of all five")
            assert [(e.direction, e.data) for e in observer.data] == [
                (Direction.UP, b"first 0"),
                (Direction.DOWN, b"first 0"),
            ]
            asked = threading.Event()
            relay.want_data(flow_id, asked.set)
            assert asked.wait(10)
            for n in range(3):
                round_trip(b"again %d" % n)
            wait_for(lambda: len(observer.data) >= 4, 10, "one more datagram each way")
            wait_for(lambda: relay.byte_counts(flow_id) == (56, 56), 10, "the counts of all eight")
            assert [(e.direction, e.data) for e in observer.data[2:]] == [
                (Direction.UP, b"again 0"),
                (Direction.DOWN, b"again 0"),
            ]
    finally:
        relay.stop(grace_s=1.0)


def test_killed_session_closes_with_reason_killed(udp_echo: Any, relays: Relays) -> None:
    echo: UdpEchoServer = udp_echo()
    relay, recorder = relays.start(echo.address)
    client = udp_client()
    client.sendto(b"one", ("127.0.0.1", listen_port(relay)))
    assert client.recv(10) == b"one"
    (opened,) = recorder.opened()
    relay.kill(opened.flow.id)
    wait_for(lambda: recorder.closed(), 5, "the killed session to close")
    assert recorder.closed()[0].flow.reason is CloseReason.KILLED
    assert relay.open_flows == 0


def test_shutdown_closes_udp_sessions_promptly(udp_echo: Any, flowtap: Any) -> None:
    echo: UdpEchoServer = udp_echo()
    process = flowtap(
        "run", "--json", "--udp", "--listen", "127.0.0.1:0", "--upstream", echo.address
    )
    client = udp_client()
    client.sendto(b"hello", ("127.0.0.1", process.port))
    assert client.recv(10) == b"hello"
    started = time.monotonic()
    assert process.stop(signal.SIGINT) == 0
    assert time.monotonic() - started < 3  # well inside the 5 s grace period
    (closed,) = json_events(process, "closed")
    assert closed["reason"] == "shutdown"


def test_tcp_and_udp_listeners_run_in_one_process(
    udp_echo: Any, echo_server: tuple[str, int], flowtap: Any
) -> None:
    echo: UdpEchoServer = udp_echo()
    process = flowtap(
        "run",
        "--json",
        "--listen",
        "tcp:127.0.0.1:0",
        "--upstream",
        f"127.0.0.1:{echo_server[1]}",
        "--listen",
        "udp:127.0.0.1:0",
        "--upstream",
        echo.address,
        listeners=2,
    )
    kinds = {
        transport: int(address.rsplit(":", 1)[1]) for transport, address, _ in process.listeners
    }
    assert set(kinds) == {"tcp", "udp"}
    with socket.create_connection(("127.0.0.1", kinds["tcp"]), timeout=5) as tcp:
        tcp.sendall(b"over tcp")
        tcp.shutdown(socket.SHUT_WR)
        assert tcp.recv(100) == b"over tcp"
    client = udp_client()
    client.sendto(b"over udp", ("127.0.0.1", kinds["udp"]))
    assert client.recv(100) == b"over udp"
    wait_for(lambda: len(json_events(process, "opened")) == 2, 5, "both flows")
    assert process.stop() == 0
    assert sorted(r["transport"] for r in json_events(process, "closed")) == ["tcp", "udp"]


def test_many_clients_at_once_each_get_their_replies(udp_echo: Any, relays: Relays) -> None:
    echo: UdpEchoServer = udp_echo()
    relay, recorder = relays.start(echo.address, workers=2)
    target = ("127.0.0.1", listen_port(relay))
    failures: list[str] = []

    def client_run(index: int) -> None:
        client = udp_client()
        for n in range(50):
            message = f"{index}:{n}".encode()
            client.sendto(message, target)
            reply = client.recv(100)
            if reply != message:
                failures.append(f"{message!r} got {reply!r}")
                return

    threads = [threading.Thread(target=client_run, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert failures == []
    assert len(recorder.opened()) == 20
    assert echo.stop() == (1000, sum(len(f"{i}:{n}") for i in range(20) for n in range(50)))


# -- bad input ----------------------------------------------------------------------------------


def test_udp_over_unix_socket_is_a_one_line_error(tmp_path: Any) -> None:
    from conftest import flowtap_command

    result = subprocess.run(
        [
            *flowtap_command(),
            "run",
            "--udp",
            "--listen",
            f"unix:{tmp_path}/a.sock",
            "--upstream",
            "127.0.0.1:53",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("flowtap: error: UDP over unix sockets is not supported")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("option", "value"), [("--udp-max-sessions", "0"), ("--udp-idle-timeout", "soon")]
)
def test_bad_udp_option_is_a_one_line_error(option: str, value: str) -> None:
    from conftest import flowtap_command

    result = subprocess.run(
        [*flowtap_command(), "run", "--udp", "--listen", "0", "--upstream", "53", option, value],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("flowtap: error:") and option in result.stderr
    assert result.stderr.count("\n") == 1
