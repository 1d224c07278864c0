"""`flowtap replay` and `flowtap serve` on real captures: flowtap's own and dumpcap's on lo."""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from capture_checks import assert_tshark_clean, follow_tcp, tshark

from conftest import FlowtapProcess, flowtap_command, free_port, wait_for, wait_port

Start = Callable[..., FlowtapProcess]


def _flowtap(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*flowtap_command(), *args], capture_output=True, text=True, timeout=timeout_s
    )


def _redis_cli(port: int, *command: str) -> str:
    return subprocess.run(
        ["redis-cli", "-p", str(port), *command],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout


_REDIS_COMMANDS = [
    ("SET", "greeting", "hello"),
    ("RPUSH", "queue", "a", "b", "c"),
    ("INCR", "hits"),
    ("INCR", "hits"),
    ("HSET", "user:1", "name", "ada"),
    ("GET", "greeting"),
]


@pytest.fixture
def redis_capture(flowtap: Start, redis_server: int, tmp_path: Path) -> tuple[Path, list[str]]:
    """A redis-cli session recorded with `flowtap run --pcap`, and what redis-cli printed."""
    pcap = tmp_path / "redis.pcapng"
    proc = flowtap(
        "run", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{redis_server}",
        "--pcap", str(pcap),
    )  # fmt: skip
    answers = [_redis_cli(proc.port, *command) for command in _REDIS_COMMANDS]
    proc.wait_line(rf"^#{len(_REDIS_COMMANDS)} closed")
    assert proc.stop() == 0
    assert_tshark_clean(pcap)
    return pcap, answers


def test_redis_session_recorded_by_flowtap_replays_into_a_fresh_server(
    redis_capture: tuple[Path, list[str]], start_redis: Callable[[], int]
) -> None:
    pcap, _ = redis_capture
    fresh = start_redis()
    result = _flowtap("replay", str(pcap), "--to", f"127.0.0.1:{fresh}", "--asap", "--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" ok: ") == len(_REDIS_COMMANDS)
    assert _redis_cli(fresh, "GET", "greeting") == "hello\n"
    assert _redis_cli(fresh, "LRANGE", "queue", "0", "-1") == "a\nb\nc\n"
    assert _redis_cli(fresh, "GET", "hits") == "2\n"
    assert _redis_cli(fresh, "HGET", "user:1", "name") == "ada\n"


def test_serve_answers_redis_cli_from_a_recorded_session(
    redis_capture: tuple[Path, list[str]], flowtap: Start
) -> None:
    pcap, answers = redis_capture
    proc = flowtap("serve", str(pcap), "--listen", "127.0.0.1:0", "--turn-timeout", "0.3")
    assert proc.listeners[0] == ("tcp", f"127.0.0.1:{proc.port}", pcap.name)
    for index in (5, 0, 1, 4):  # any order: each request finds its recorded flow
        assert _redis_cli(proc.port, *_REDIS_COMMANDS[index]) == answers[index]
    proc.wait_line(r"^#4 .* served flow \d+ ok")
    assert proc.stop(signal.SIGINT) == 0


class _Dumpcap:
    """dumpcap on lo for one TCP port, started and stopped by the test.

    dumpcap reads packets in blocks that the kernel hands over when full or after a timeout
    (250 ms), and counts what it has written on stderr ("Packets: N", twice a second). The
    start waits until it has counted an ICMP port-unreachable the test provokes (the reader
    skips ICMP); the stop waits until the count has not moved for a second, so the last
    block of the test's traffic is in the file before dumpcap is told to stop.
    """

    _QUIET_S = 1.0

    def __init__(self, path: Path, port: int) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            ["dumpcap", "-i", "lo", "-f", f"tcp port {port} or icmp", "-w", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.stderr = b""
        self.counted_at = time.monotonic()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        closed = free_port(socket.SOCK_DGRAM)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:

            def counted() -> bool:
                probe.sendto(b"probe", ("127.0.0.1", closed))
                return b"Packets: " in self.stderr or self.proc.poll() is not None

            wait_for(counted, 15, "dumpcap to count packets")
        assert self.proc.poll() is None, self.stderr

    def _read(self) -> None:
        assert self.proc.stderr is not None
        while chunk := os.read(self.proc.stderr.fileno(), 4096):
            self.stderr += chunk
            self.counted_at = time.monotonic()

    def stop(self) -> None:
        traffic_ended = time.monotonic()
        wait_for(
            lambda: time.monotonic() - max(self.counted_at, traffic_ended) >= self._QUIET_S,
            30,
            "dumpcap to write the last packets",
        )
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(15)
        self._reader.join(5)


def _http_server(directory: Path) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
         "--directory", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("site")
    (directory / "index.txt").write_text("".join(f"line {i}\n" for i in range(200)))
    (directory / "blob.bin").write_bytes(bytes(range(256)) * 2000)
    return directory


@pytest.fixture(scope="module")
def curl_capture(
    site: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, dict[str, bytes]]]:
    """Two curl downloads from `python -m http.server`, captured once by dumpcap on lo."""
    for port in _http_server(site):
        pcap = tmp_path_factory.mktemp("dumpcap") / "curl.pcapng"
        dumpcap = _Dumpcap(pcap, port)
        bodies = {}
        for name in ("index.txt", "blob.bin"):
            bodies[name] = subprocess.run(
                ["curl", "-sS", f"http://127.0.0.1:{port}/{name}"],
                capture_output=True,
                timeout=20,
                check=True,
            ).stdout
        dumpcap.stop()
        assert bodies["blob.bin"] == (site / "blob.bin").read_bytes()
        # tshark reassembles the same body the client got.
        _, server_side = follow_tcp(pcap, 1)
        assert server_side.endswith(bodies["blob.bin"])
        yield pcap, bodies


_VOLATILE = ["--ignore", r"Date: [^\r]*"]


def test_curl_downloads_replay_clean_against_the_same_content(
    curl_capture: tuple[Path, dict[str, bytes]], site: Path
) -> None:
    pcap, _ = curl_capture
    for port in _http_server(site):
        result = _flowtap(
            "replay", str(pcap), "--to", f"127.0.0.1:{port}", *_VOLATILE, "--check", "--json"
        )
        assert result.returncode == 0, result.stdout + result.stderr
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        assert [line["status"] for line in lines[:-1]] == ["ok", "ok"]
        assert lines[-1] == {**lines[-1], "event": "summary", "ok": 2, "differs": 0}
        assert all(
            line["server_bytes_received"] == line["server_bytes_expected"] for line in lines[:-1]
        )


def test_curl_downloads_against_changed_content_report_a_diff_and_fail_check(
    curl_capture: tuple[Path, dict[str, bytes]], site: Path, tmp_path: Path
) -> None:
    pcap, _ = curl_capture
    changed = tmp_path / "changed"
    changed.mkdir()
    text = (site / "index.txt").read_text().replace("line 100\n", "line one hundred\n")
    (changed / "index.txt").write_text(text)
    (changed / "blob.bin").write_bytes((site / "blob.bin").read_bytes())
    for port in _http_server(changed):
        result = _flowtap(
            "replay", str(pcap), "--to", f"127.0.0.1:{port}", *_VOLATILE, "--diff", "--check",
            "--ignore", r"Last-Modified: [^\r]*", "--ignore", r"Content-Length: \d+",
        )  # fmt: skip
        assert result.returncode == 1, result.stdout + result.stderr
        out = result.stdout
        assert "flow 1 tcp differs" in out and "flow 2 tcp ok" in out
        assert "first difference at server byte" in out
        assert "-line 100\n" in out and "+line one hundred\n" in out
        # Without --check a difference is reported but is not a failure.
        again = _flowtap("replay", str(pcap), "--to", f"127.0.0.1:{port}", "--flow", "1")
        assert again.returncode == 0 and "differs" in again.stdout


def test_serve_gives_curl_the_recorded_body(
    curl_capture: tuple[Path, dict[str, bytes]], flowtap: Start
) -> None:
    pcap, bodies = curl_capture
    proc = flowtap("serve", str(pcap), "--listen", "127.0.0.1:0", "--turn-timeout", "0.3")
    for name in ("blob.bin", "index.txt"):
        served = subprocess.run(
            ["curl", "-sS", f"http://127.0.0.1:{proc.port}/{name}"],
            capture_output=True,
            timeout=20,
            check=True,
        ).stdout
        assert hashlib.sha256(served).hexdigest() == hashlib.sha256(bodies[name]).hexdigest()
    proc.wait_line(r"^#2 .* served flow 1 ")
    assert proc.stop() == 0


def test_replay_pcap_captures_the_replay_itself(
    redis_capture: tuple[Path, list[str]], start_redis: Callable[[], int], tmp_path: Path
) -> None:
    pcap, _ = redis_capture
    out = tmp_path / "replayed.pcapng"
    fresh = start_redis()
    result = _flowtap(
        "replay", str(pcap), "--to", f"127.0.0.1:{fresh}", "--asap", "--flow", "1",
        "--pcap", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert_tshark_clean(out)
    assert follow_tcp(out, 0) == follow_tcp(pcap, 0)


def test_speed_scales_recorded_pauses_as_a_ratio(
    flowtap: Start, echo_server: tuple[str, int], tmp_path: Path
) -> None:
    pcap = tmp_path / "paced.pcapng"
    proc = flowtap(
        "run", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{echo_server[1]}",
        "--pcap", str(pcap),
    )  # fmt: skip
    with socket.create_connection(("127.0.0.1", proc.port)) as sock:
        for word in (b"one\n", b"two\n", b"three\n", b"four\n"):
            time.sleep(0.15)  # the recorded think time
            sock.sendall(word)
            got = b""
            while len(got) < len(word):
                got += sock.recv(100)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(100):
            pass
    proc.wait_line(r"^#1 closed")
    assert proc.stop() == 0
    durations = {}
    for speed in ("1", "4"):
        result = _flowtap(
            "replay", str(pcap), "--to", f"127.0.0.1:{echo_server[1]}", "--speed", speed, "--json"
        )
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout.splitlines()[-1])
        assert summary["ok"] == 1
        durations[speed] = summary["duration_s"]
    ratio = durations["1"] / durations["4"]
    assert 2.5 < ratio < 5.5, durations


def _one_line_error(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowtap: error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0]


def test_capture_without_tcp_or_udp_flows_is_one_line(tmp_path: Path) -> None:
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap

    pcap = tmp_path / "ping.pcap"
    wrpcap(str(pcap), [Ether() / IP(src="127.0.0.1", dst="127.0.0.1") / ICMP()])
    assert "ICMP" in tshark("-r", str(pcap))
    _one_line_error(
        _flowtap("replay", str(pcap), "--to", "127.0.0.1:1"), "no TCP or UDP flows", "show"
    )
    _one_line_error(_flowtap("serve", str(pcap)), "no TCP or UDP flows")


def test_unknown_flow_and_missing_file_are_one_line(
    redis_capture: tuple[Path, list[str]], tmp_path: Path
) -> None:
    pcap, _ = redis_capture
    _one_line_error(
        _flowtap("replay", str(pcap), "--to", "127.0.0.1:1", "--flow", "42"),
        "no flow 42",
        "flowtap show",
    )
    _one_line_error(_flowtap("serve", str(pcap), "--flow", "42"), "no flow 42")
    _one_line_error(_flowtap("replay", str(tmp_path / "absent.pcap"), "--to", "127.0.0.1:1"))


def test_refused_target_fails_each_flow_and_exits_non_zero(
    redis_capture: tuple[Path, list[str]],
) -> None:
    pcap, _ = redis_capture
    result = _flowtap("replay", str(pcap), "--to", f"127.0.0.1:{free_port()}", "--asap")
    assert result.returncode == 1
    assert result.stdout.count("failed: ") == len(_REDIS_COMMANDS)
    assert "refused" in result.stdout


def test_gap_in_the_capture_stops_that_flow_and_says_how_to_fix_it(
    redis_capture: tuple[Path, list[str]], start_redis: Callable[[], int], tmp_path: Path
) -> None:
    from scapy.layers.inet import TCP
    from scapy.utils import rdpcap, wrpcap

    pcap, _ = redis_capture
    packets = list(rdpcap(str(pcap)))
    # Drop flow 2's request (the first client segment with data on its connection).
    ports = []
    for packet in packets:
        if TCP in packet and packet[TCP].flags & 0x02 and not packet[TCP].flags & 0x10:
            ports.append(packet[TCP].sport)
    second = ports[1]
    victim = next(
        i for i, p in enumerate(packets) if TCP in p and p[TCP].sport == second and p[TCP].payload
    )
    holed = tmp_path / "holed.pcap"
    wrpcap(str(holed), packets[:victim] + packets[victim + 1 :])
    assert tshark("-r", str(holed))
    fresh = start_redis()
    result = _flowtap("replay", str(holed), "--to", f"127.0.0.1:{fresh}", "--asap", "--check")
    assert result.returncode == 1, result.stdout + result.stderr
    warnings = result.stderr.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("flowtap: warning: flow 2: ")
    assert "client to server" in warnings[0] and "dumpcap -s 0" in warnings[0]
    assert "flow 2 tcp stopped" in result.stdout
    assert result.stdout.count(" ok: ") == len(_REDIS_COMMANDS) - 1


def test_reordered_and_retransmitted_segments_replay_the_same(
    curl_capture: tuple[Path, dict[str, bytes]], site: Path, tmp_path: Path
) -> None:
    from scapy.layers.inet import TCP
    from scapy.layers.l2 import Ether
    from scapy.utils import RawPcapNgReader, wrpcap

    pcap, _ = curl_capture
    # rdpcap cuts frames at 65,535 bytes, and loopback frames reach 65,549.
    packets = []
    reader = RawPcapNgReader(str(pcap))
    while True:
        try:
            raw, meta = reader._read_packet(size=1 << 18)
        except EOFError:
            break
        packet = Ether(raw)
        packet.time = ((meta.tshigh << 32) | meta.tslow) / meta.tsresol
        packets.append(packet)
    reader.close()
    data = [i for i, p in enumerate(packets) if TCP in p and len(p[TCP].payload) > 1000]
    assert len(data) >= 4
    # The third data segment reaches the capture before the second (the ACKs in between
    # cover the second only, so they stay after it), and the fourth is sent twice.
    order = list(range(len(packets)))
    order.remove(data[2])
    order.insert(order.index(data[1]), data[2])
    order.insert(order.index(data[3]) + 1, data[3])
    edited = [packets[i] for i in order]
    messy = tmp_path / "messy.pcap"
    wrpcap(str(messy), edited, snaplen=262144)  # loopback frames exceed 65535
    listing = tshark("-r", str(messy))
    assert "Previous segment not captured" in listing and "Retransmission" in listing
    for port in _http_server(site):
        result = _flowtap(
            "replay", str(messy), "--to", f"127.0.0.1:{port}", *_VOLATILE, "--check"
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.count(" ok: ") == 2


def test_filter_picks_flows_by_port(
    redis_capture: tuple[Path, list[str]], start_redis: Callable[[], int], redis_server: int
) -> None:
    pcap, _ = redis_capture
    fresh = start_redis()
    picked = _flowtap(
        "replay", str(pcap), "--to", f"127.0.0.1:{fresh}", "--asap",
        "--filter", f"tcp port {redis_server}",
    )  # fmt: skip
    assert picked.returncode == 0 and picked.stdout.count(" ok: ") == len(_REDIS_COMMANDS)
    none = _flowtap("replay", str(pcap), "--to", f"127.0.0.1:{fresh}", "--filter", "udp")
    _one_line_error(none, "no flow", "matches the --filter")


def test_dns_queries_recorded_through_the_udp_relay_replay_against_dnsmasq(
    flowtap: Start, dns_server: int, tmp_path: Path
) -> None:
    pcap = tmp_path / "dns.pcapng"
    proc = flowtap(
        "run", "--listen", "udp:127.0.0.1:0", "--upstream", f"127.0.0.1:{dns_server}",
        "--pcap", str(pcap),
    )  # fmt: skip
    assert proc.listeners[0][0] == "udp"
    answers = [
        subprocess.run(
            ["dig", "@127.0.0.1", "-p", str(proc.port), "+time=2", "+tries=1", "+short", *query],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        for query in (["example.test"], ["TXT", "txt.example.test"])
    ]
    assert answers == ["127.0.0.9\n", '"flowtap relays datagrams"\n']
    assert proc.stop() == 0
    assert_tshark_clean(pcap)
    result = _flowtap("replay", str(pcap), "--to", f"127.0.0.1:{dns_server}", "--check", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    reports = [json.loads(line) for line in result.stdout.splitlines()[:-1]]
    assert [(r["transport"], r["status"], r["turns_sent"]) for r in reports] == [
        ("udp", "ok", 1),
        ("udp", "ok", 1),
    ]


def test_progress_bar_shows_on_a_terminal(
    redis_capture: tuple[Path, list[str]], start_redis: Callable[[], int]
) -> None:
    import pty

    pcap, _ = redis_capture
    fresh = start_redis()
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [*flowtap_command(), "replay", str(pcap), "--to", f"127.0.0.1:{fresh}"],
        stdout=subprocess.PIPE,
        stderr=terminal,
        text=True,
    )
    os.close(terminal)
    shown = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        readable, _, _ = select.select([controller], [], [], deadline - time.monotonic())
        if not readable:
            break
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal closes with the process
            break
        if not chunk:
            break
        shown += chunk
    out, _ = proc.communicate(timeout=30)
    os.close(controller)
    assert proc.returncode == 0
    assert b"replay" in shown and f"/{len(_REDIS_COMMANDS)}".encode() in shown
    assert "replayed 6 flows" in out
