"""`flowtap run --pcap`: real peers relayed, the capture read back by tshark and scapy."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from capture_checks import assert_tshark_clean, fields, follow_tcp, scapy_count

from conftest import flowtap_command, start_flowtap, wait_for


def exchange(port: int, payload: bytes, host: str = "127.0.0.1") -> bytes:
    """Send `payload`, half-close, and return everything the peer sent back."""
    with socket.create_connection((host, port), timeout=30) as sock:
        received = bytearray()

        def read() -> None:
            while data := sock.recv(262144):
                received.extend(data)

        reader = threading.Thread(target=read)
        reader.start()
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        reader.join(60)
        return bytes(received)


@pytest.mark.parametrize("suffix", [".pcap", ".pcapng"])
def test_relayed_flows_follow_in_tshark_to_the_bytes_peers_sent(
    flowtap, echo_server: tuple[str, int], tmp_path: Path, suffix: str
) -> None:
    capture = tmp_path / f"session{suffix}"
    proxy = flowtap(
        "run", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{echo_server[1]}",
        "--pcap", str(capture),
    )  # fmt: skip
    payloads = [b"hello\r\n", os.urandom(1_000_000), os.urandom(3) + b"\x00\xff"]
    for payload in payloads:
        assert exchange(proxy.port, payload) == payload
    proxy.wait_line(r"#3 closed")
    assert proxy.stop() == 0
    assert stat.S_IMODE(capture.stat().st_mode) == 0o600
    assert_tshark_clean(capture, data_port=echo_server[1])
    for stream, payload in enumerate(payloads):
        assert follow_tcp(capture, stream) == (payload, payload)
    assert scapy_count(capture) == len(fields(capture, "frame.number"))


def test_redis_through_flowtap_is_captured_over_tcp_and_unix_socket(
    flowtap, redis_server: int, tmp_path: Path
) -> None:
    capture = tmp_path / "redis.pcapng"
    sock_path = tmp_path / "flowtap.sock"
    proxy = flowtap(
        "run",
        "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{redis_server}",
        "--listen", f"unix:{sock_path}", "--upstream", f"127.0.0.1:{redis_server}",
        "--pcap", str(capture),
        listeners=2,
    )  # fmt: skip
    tcp = subprocess.run(
        ["redis-cli", "-p", str(proxy.port), "SET", "greeting", "hello"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    unix = subprocess.run(
        ["redis-cli", "-s", str(sock_path), "GET", "greeting"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert tcp.stdout.strip() == "OK" and unix.stdout.strip() == "hello"
    proxy.wait_line(r"#2 closed")
    assert proxy.stop() == 0
    assert_tshark_clean(capture)
    up, down = follow_tcp(capture, 0)
    assert b"SET" in up and b"greeting" in up and down == b"+OK\r\n"
    up, down = follow_tcp(capture, 1)
    assert b"GET" in up and down == b"$5\r\nhello\r\n"
    rows = fields(capture, "ip.src", "ip.dst", "tcp.dstport", display_filter="tcp.stream == 1")
    assert rows[0] == ["127.1.0.1", "127.0.0.1", str(redis_server)]
    comments = fields(capture, "frame.comment", display_filter="tcp.stream == 1 && frame.comment")
    assert json.loads(comments[0][0].removeprefix("flowtap "))["client"] == f"unix:{sock_path}"


def test_capture_survives_sigkill_up_to_the_last_flush(
    flowtap, echo_server: tuple[str, int], tmp_path: Path
) -> None:
    capture = tmp_path / "killed.pcapng"
    proxy = flowtap(
        "run", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{echo_server[1]}",
        "--pcap", str(capture),
    )  # fmt: skip
    payload = os.urandom(200_000)
    assert exchange(proxy.port, payload) == payload
    proxy.wait_line(r"#1 closed")
    # Flushed within a second: the whole flow is on disk before the process dies.
    wait_for(lambda: capture.stat().st_size > 2 * len(payload), 5.0, "the capture to be flushed")
    proxy.stop(signal.SIGKILL)
    assert_tshark_clean(capture, data_port=echo_server[1])
    assert follow_tcp(capture, 0) == (payload, payload)


def test_rotation_keeps_a_ring_of_the_newest_files(
    flowtap, echo_server: tuple[str, int], tmp_path: Path
) -> None:
    proxy = flowtap(
        "run", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{echo_server[1]}",
        "--pcap", str(tmp_path / "ring.pcap"), "--pcap-max-size", "1", "--pcap-max-files", "3",
    )  # fmt: skip
    payload = os.urandom(3_000_000)  # 6 MB captured: about six files made, three kept
    assert exchange(proxy.port, payload) == payload
    proxy.wait_line(r"#1 closed")
    assert proxy.stop() == 0
    files = sorted(tmp_path.glob("ring_*.pcap"))
    numbers = [int(f.name.split("_")[1]) for f in files]
    assert numbers[-1] >= 5 and numbers == [numbers[-1] - 2, numbers[-1] - 1, numbers[-1]]
    for path in files[:-1]:
        assert 1_000_000 <= path.stat().st_size < 1_000_000 + 70_000
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        # A file that starts mid-flow has no handshake; tshark still reads it cleanly.
        # A file that starts in the middle of the flow reads cleanly too.
        assert_tshark_clean(path, data_port=echo_server[1])
        assert scapy_count(path) > 0


def test_capture_without_a_file_name_goes_to_captures_folder(
    echo_server: tuple[str, int], tmp_path: Path
) -> None:
    proc = subprocess.Popen(
        [
            *flowtap_command(), "run", "--listen", "127.0.0.1:0",
            "--upstream", f"127.0.0.1:{echo_server[1]}", "--capture",
        ],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        port = int(line.split()[2].rsplit(":", 1)[1])
        assert exchange(port, b"ping") == b"ping"
        wait_for(lambda: "#1 closed" in proc.stdout.readline(), 10, "the flow to close")  # type: ignore[union-attr]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    files = list((tmp_path / "captures").glob("flowtap-*.pcapng"))
    assert len(files) == 1
    assert stat.S_IMODE((tmp_path / "captures").stat().st_mode) == 0o700
    assert_tshark_clean(files[0])
    assert follow_tcp(files[0], 0) == (b"ping", b"ping")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pcap", "/nonexistent-folder/x.pcap"], "cannot create capture file"),
        (["--pcap", "x.cap"], "name the file .pcap or .pcapng"),
        (["--pcap-max-size", "5"], "need --pcap FILE or --capture"),
        (["--pcap", "x.pcap", "--pcap-max-files", "2"], "needs --pcap-max-size"),
    ],
)
def test_bad_capture_options_are_one_line_errors(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = subprocess.run(
        [*flowtap_command(), "run", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowtap: error:") and message in lines[0]


def test_a_full_disk_at_start_is_a_one_line_error(tmp_path: Path) -> None:
    full = tmp_path / "full.pcapng"
    full.symlink_to("/dev/full")  # every write fails with ENOSPC
    result = subprocess.run(
        [*flowtap_command(), "run", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9",
         "--pcap", str(full)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0], result.stderr
    assert "free space or pick another folder" in lines[0]


def test_a_capture_that_cannot_grow_stops_with_one_line_and_the_relay_goes_on(
    echo_server: tuple[str, int], tmp_path: Path
) -> None:
    """A file-size limit makes writes fail mid-capture, as a full disk does."""
    import resource

    capture = tmp_path / "limited.pcapng"
    limit = 1 << 20

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proxy = start_flowtap(
        "run", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{echo_server[1]}",
        "--pcap", str(capture), preexec_fn=limit_file_size,
    )  # fmt: skip
    payloads = [os.urandom(4 << 20), b"still relayed\n", os.urandom(4 << 20)]
    for payload in payloads:
        assert exchange(proxy.port, payload) == payload
    proxy.wait_line(r"#3 closed")
    assert proxy.stop() == 0
    errors = [line for line in proxy.stderr.splitlines() if "capture" in line]
    assert len(errors) == 1 and "File too large" in errors[0], proxy.stderr
    assert "Traceback" not in proxy.stderr
    assert capture.stat().st_size <= limit
    # The file ends after the last record that fit: it reads clean, the flow open at its end.
    assert_tshark_clean(capture, data_port=echo_server[1])
    shown = subprocess.run(
        [*flowtap_command(), "show", str(capture)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert shown.returncode == 0 and "1 flow" in shown.stdout, shown.stderr
    assert "open at capture end" in shown.stdout and not shown.stderr


def test_a_slow_capture_reader_slows_the_relay_and_loses_nothing(
    echo_server: tuple[str, int], tmp_path: Path
) -> None:
    """A FIFO read slowly (as Wireshark reading `-i -` might) is a disk that lags."""
    fifo = tmp_path / "live.pcapng"
    os.mkfifo(fifo)
    saved = tmp_path / "saved.pcapng"
    rate = 16 << 20  # bytes a second the reader takes

    def read_slowly() -> None:
        with fifo.open("rb") as source, saved.open("wb") as out:
            while chunk := source.read(1 << 20):
                out.write(chunk)
                time.sleep(len(chunk) / rate)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    proxy = start_flowtap(
        "run", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{echo_server[1]}",
        "--pcap", str(fifo),
    )  # fmt: skip
    try:
        payload = os.urandom(16 << 20)
        started = time.monotonic()
        assert exchange(proxy.port, payload) == payload
        elapsed = time.monotonic() - started
        proxy.wait_line(r"#1 closed", timeout_s=60)
    finally:
        assert proxy.stop() == 0
        reader.join(60)
    # 32 MiB of capture at 16 MiB/s: the relay waited for the reader instead of dropping.
    assert elapsed > 1.0
    assert_tshark_clean(saved, data_port=echo_server[1])
    assert follow_tcp(saved, 0) == (payload, payload)


def test_a_burst_is_relayed_whole_while_the_client_waits_for_the_answer(
    flowtap, echo_server: tuple[str, int], tmp_path: Path
) -> None:
    """No half-close to wake the relay: every byte of a burst must be read while it is there,
    whatever size of reads the capture asks for."""
    capture = tmp_path / "burst.pcapng"
    proxy = flowtap(
        "run", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{echo_server[1]}",
        "--pcap", str(capture),
    )  # fmt: skip
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        for size in (300_000, 1_000_000, 65_495 * 4, 65_495 * 4 + 1, 262_144):
            payload = os.urandom(size)
            sender = threading.Thread(target=sock.sendall, args=(payload,))
            sender.start()
            echoed = b""
            with contextlib.suppress(TimeoutError):  # a stranded rest never comes
                while len(echoed) < size and (data := sock.recv(size - len(echoed))):
                    echoed += data
            sender.join(10)
            assert echoed == payload, f"{len(echoed)} of {size} bytes came back"
    proxy.wait_line(r"#1 closed")
    assert proxy.stop() == 0
    assert_tshark_clean(capture, data_port=echo_server[1])


@pytest.mark.parametrize("suffix", [".pcap", ".pcapng"])
def test_parallel_flows_to_slow_readers_are_captured_exactly(
    flowtap, echo_server: tuple[str, int], tmp_path: Path, suffix: str
) -> None:
    """Chunks received straight into the capture's buffers, sent from there in pieces to
    readers that lag, on two relay workers at once, still follow to the exact bytes."""
    capture = tmp_path / f"parallel{suffix}"
    proxy = flowtap(
        "run", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{echo_server[1]}",
        "--pcap", str(capture), "--workers", "2",
    )  # fmt: skip
    payloads = [os.urandom(8 << 20) for _ in range(4)]
    echoed: list[bytes] = [b""] * len(payloads)

    def slow_exchange(index: int) -> None:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            sender = threading.Thread(target=sock.sendall, args=(payloads[index],))
            sender.start()
            received = bytearray()
            while len(received) < len(payloads[index]):
                data = sock.recv(65536)
                if not data:
                    break
                received += data
                time.sleep(0.001)
            sender.join(30)
            echoed[index] = bytes(received)

    threads = [threading.Thread(target=slow_exchange, args=(i,)) for i in range(len(payloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert echoed == payloads
    for number in range(1, len(payloads) + 1):
        proxy.wait_line(rf"#{number} closed")
    assert proxy.stop() == 0
    assert_tshark_clean(capture, data_port=echo_server[1])
    streams = {follow_tcp(capture, stream) for stream in range(len(payloads))}
    assert streams == {(payload, payload) for payload in payloads}


def _sha256_of_stream(size_bytes: int, seed: bytes) -> tuple[bytes, str]:
    block = hashlib.sha256(seed).digest() * (1 << 15)  # 1 MiB
    digest = hashlib.sha256()
    for _ in range(size_bytes // len(block)):
        digest.update(block)
    return block, digest.hexdigest()


@pytest.mark.slow
def test_64_mib_each_way_is_captured_without_loss(
    flowtap, echo_server: tuple[str, int], tmp_path: Path
) -> None:
    size = 64 << 20
    capture = tmp_path / "bulk.pcapng"
    proxy = flowtap(
        "run", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{echo_server[1]}",
        "--pcap", str(capture),
    )  # fmt: skip
    block, expected = _sha256_of_stream(size, b"lossless")
    received = hashlib.sha256()
    count = 0
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=60) as sock:

        def read() -> None:
            nonlocal count
            while data := sock.recv(262144):
                received.update(data)
                count += len(data)

        reader = threading.Thread(target=read)
        reader.start()
        for _ in range(size // len(block)):
            sock.sendall(block)
        sock.shutdown(socket.SHUT_WR)
        reader.join(120)
    assert count == size and received.hexdigest() == expected
    proxy.wait_line(r"#1 closed")
    assert proxy.stop() == 0
    assert_tshark_clean(capture, data_port=echo_server[1])
    up, down = follow_tcp(capture, 0)
    assert hashlib.sha256(up).hexdigest() == expected
    assert hashlib.sha256(down).hexdigest() == expected


def test_dns_over_the_udp_relay_is_captured_as_checksummed_datagrams(
    flowtap, dns_server: int, tmp_path: Path
) -> None:
    from capture_checks import flowtap_show, follow_udp

    capture = tmp_path / "dns.pcapng"
    proxy = flowtap(
        "run", "--listen", "udp:127.0.0.1:0", "--upstream", f"127.0.0.1:{dns_server}",
        "--udp-idle-timeout", "0.5", "--pcap", str(capture),
    )  # fmt: skip
    answer = subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(proxy.port), "+time=2", "+tries=2", "+short",
         "example.test"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert answer.stdout.strip() == "127.0.0.9"
    proxy.wait_line(r"#1 closed udp")
    assert proxy.stop() == 0
    prefs = ("udp.check_checksum:TRUE", "ip.check_checksum:TRUE")
    assert_tshark_clean(capture, *prefs)
    rows = fields(capture, "udp.checksum.status", "dns.qry.name", "dns.a", prefs=prefs)
    assert [row[0] for row in rows] == ["1", "1"]
    assert rows[0][1] == "example.test" and rows[1][2] == "127.0.0.9"
    query, reply = follow_udp(capture, 0)
    listing = flowtap_show(str(capture)).stdout.decode()
    assert " udp " in listing and f"127.0.0.1:{dns_server}" in listing
    assert flowtap_show(str(capture), "--flow", "1", "--raw", "server").stdout == reply
    conversation = flowtap_show(str(capture), "--flow", "1").stdout.decode()
    assert f">> client {len(query)} bytes" in conversation
    assert f"<< server {len(reply)} bytes" in conversation


def test_capture_is_flushed_within_a_second_while_flows_stay_open(
    flowtap, echo_server: tuple[str, int], tmp_path: Path
) -> None:
    from flowtap.inspector.pcapfile.reassembly import read_capture
    from flowtap.proxy.errors import FlowtapError
    from flowtap.proxy.flow import FlowData

    capture = tmp_path / "live.pcap"
    proxy = flowtap(
        "run", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{echo_server[1]}",
        "--pcap", str(capture),
    )  # fmt: skip
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"still open\n")
        assert sock.recv(100) == b"still open\n"

        def on_disk() -> bytes:
            try:
                events = list(read_capture(capture))
            except FlowtapError:  # a record half-written as we read
                return b""
            return b"".join(
                e.data for e in events if isinstance(e, FlowData) and e.direction == "up"
            )

        started = time.monotonic()
        wait_for(lambda: on_disk() == b"still open\n", 5.0, "the open flow's bytes on disk")
        assert time.monotonic() - started < 1.5
        assert proxy.proc.poll() is None
