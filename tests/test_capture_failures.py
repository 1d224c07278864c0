"""A capture that fails (open, write, rotate, close, a pipe's reader gone) costs the relay nothing.

Real failures only: a full disk is a small tmpfs mounted in a private mount namespace that
dies with the process (`unshare`), a file-size limit is RLIMIT_FSIZE, a pipe is a FIFO whose
reader quits. Each test pushes tens of MiB through flowtap to a real echo server and checks
that every byte came back, that the flow's byte counts are whole, that one log line says the
capture stopped and why, that later flows are relayed, and that what was written reads clean.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from capture_checks import assert_tshark_clean
from test_capture_relay import exchange

from conftest import FlowtapProcess, flowtap_command, json_events, start_flowtap, wait_for

PUSH_BYTES = 24 << 20

# Mounts a tmpfs of SIZE on DIR (in the caller's private mount namespace), fills FILL bytes of
# it, runs the command, passes SIGTERM/SIGINT on to it, and once it has exited copies what is
# left on the tmpfs to OUT (the tmpfs goes away with the namespace).
_SMALL_DISK = r"""
dir=$1; out=$2; size=$3; fill=$4; shift 4
mount -t tmpfs -o size="$size" tmpfs "$dir" || exit 97
if [ "$fill" != 0 ]; then head -c "$fill" /dev/zero > "$dir/filler" 2>/dev/null; fi
"$@" &
child=$!
trap 'kill -TERM $child' TERM INT
while wait $child; code=$?; kill -0 $child 2>/dev/null; do :; done
rm -f "$dir/filler"
cp -a "$dir"/. "$out"/
exit $code
"""


@pytest.fixture(scope="module")
def can_mount_tmpfs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip unless this process may mount a tmpfs in a private mount namespace (root)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed: no private mount namespace")
    probe = tmp_path_factory.mktemp("probe")
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs -o size=1m tmpfs "$0"', str(probe)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace: {result.stderr.strip()}")


@pytest.fixture
def small_disk(
    can_mount_tmpfs: None, tmp_path: Path
) -> Iterator[Callable[..., tuple[FlowtapProcess, Path, Path]]]:
    """`small_disk(size, *flowtap_args, fill=0)`: flowtap with a tmpfs of `size` at DISK, which
    the args name as `{disk}`; returns the process, the disk's path and where its files are
    copied once flowtap has exited."""
    started: list[FlowtapProcess] = []

    def start(size: str, *args: str, fill: int = 0) -> tuple[FlowtapProcess, Path, Path]:
        disk = tmp_path / f"disk{len(started)}"
        out = tmp_path / f"left{len(started)}"
        disk.mkdir()
        out.mkdir()
        command = [a.format(disk=disk) for a in args]
        wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _SMALL_DISK,
                   "sh", str(disk), str(out), size, str(fill)]  # fmt: skip
        proc = subprocess.Popen(
            [*wrapper, *flowtap_command(), *command],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        process = FlowtapProcess(proc)
        started.append(process)
        wait_for(
            lambda: bool(process.listeners) or proc.poll() is not None, 15, "flowtap to listen"
        )
        return process, disk, out

    yield start
    for process in started:
        if process.proc.poll() is None:
            _kill_tree(process.proc.pid)
            process.proc.wait(10)


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid` and its children (the wrapper shell and the flowtap it runs)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        _kill_tree(int(child))
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _echo_whole(port: int, size_bytes: int) -> None:
    """Push `size_bytes` of random bytes through `port` to the echo server: all come back."""
    payload = os.urandom(size_bytes)
    echoed = exchange(port, payload)
    assert len(echoed) == len(payload), f"{len(payload) - len(echoed)} bytes lost"
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()


def _assert_relay_unharmed(proxy: FlowtapProcess, sizes: list[int]) -> None:
    """Every flow's closed event counts every byte pushed, and it closed as the client did."""
    for number in range(1, len(sizes) + 1):
        proxy.wait_line(rf'"event":"closed","flow":{number},', timeout_s=60)
    closed = sorted(json_events(proxy, "closed"), key=lambda r: int(r["flow"]))
    assert [(r["bytes_up"], r["bytes_down"]) for r in closed] == [(s, s) for s in sizes]
    assert {r["reason"] for r in closed} == {"client-closed"}


def _capture_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "capture" in line]


def _assert_one_stop_line(stderr: str, *words: str) -> None:
    lines = _capture_lines(stderr)
    assert len(lines) == 1, stderr
    assert "the capture stopped" in lines[0], stderr
    for word in words:
        assert word in lines[0], stderr
    assert "Traceback" not in stderr


def _assert_files_read_clean(folder: Path, echo_port: int) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix in (".pcap", ".pcapng"))
    for path in files:
        assert path.stat().st_size > 0, f"{path.name} is empty"
        assert_tshark_clean(path, data_port=echo_port)
    return files


def test_a_full_disk_at_the_first_file_is_a_one_line_error_that_leaves_no_file(
    small_disk: Callable[..., tuple[FlowtapProcess, Path, Path]],
) -> None:
    proxy, _, left = small_disk(
        "1m", "run", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9",
        "--pcap", "{disk}/session.pcapng", fill=1 << 20,
    )  # fmt: skip
    assert proxy.proc.wait(30) == 2
    lines = proxy.read_stderr().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("flowtap: error: ") and "No space left on device" in lines[0]
    assert "free space or pick another folder" in lines[0]
    assert list(left.iterdir()) == []  # no empty capture file left behind


@pytest.mark.slow
def test_a_full_disk_stops_the_capture_and_loses_no_relayed_byte(
    small_disk: Callable[..., tuple[FlowtapProcess, Path, Path]], echo_server: tuple[str, int]
) -> None:
    proxy, _, left = small_disk(
        "5m", "run", "--json", "--listen", "127.0.0.1:0",
        "--upstream", f"127.0.0.1:{echo_server[1]}", "--pcap", "{disk}/session.pcapng",
    )  # fmt: skip
    _echo_whole(proxy.port, PUSH_BYTES)
    _echo_whole(proxy.port, 1 << 20)  # relayed after the capture stopped
    _assert_relay_unharmed(proxy, [PUSH_BYTES, 1 << 20])
    assert proxy.stop() == 0
    _assert_one_stop_line(
        proxy.stderr, "session.pcapng", "No space left on device", "free space or pick another"
    )
    assert len(_assert_files_read_clean(left, echo_server[1])) == 1


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pcap", ".pcapng"])
def test_a_ring_that_cannot_start_its_next_file_loses_no_relayed_byte(
    small_disk: Callable[..., tuple[FlowtapProcess, Path, Path]],
    echo_server: tuple[str, int],
    suffix: str,
) -> None:
    """The reported bug: the chunk received into the full file was never sent."""
    proxy, _, left = small_disk(
        "5m", "run", "--json", "--listen", "127.0.0.1:0",
        "--upstream", f"127.0.0.1:{echo_server[1]}", "--pcap", "{disk}/ring" + suffix,
        "--pcap-max-size", "2", "--pcap-max-files", "5",
    )  # fmt: skip
    _echo_whole(proxy.port, PUSH_BYTES)
    _echo_whole(proxy.port, 1 << 20)
    _assert_relay_unharmed(proxy, [PUSH_BYTES, 1 << 20])
    assert proxy.stop() == 0
    _assert_one_stop_line(proxy.stderr, "No space left on device", "free space or pick another")
    assert len(_assert_files_read_clean(left, echo_server[1])) >= 2


def _file_size_limit(limit_bytes: int) -> Callable[[], None]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return limit


@pytest.mark.slow
def test_a_file_size_limit_stops_the_capture_and_loses_no_relayed_byte(
    echo_server: tuple[str, int], tmp_path: Path
) -> None:
    capture = tmp_path / "limited.pcap"
    proxy = start_flowtap(
        "run", "--json", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{echo_server[1]}",
        "--pcap", str(capture), preexec_fn=_file_size_limit(5 << 20),
    )  # fmt: skip
    try:
        _echo_whole(proxy.port, PUSH_BYTES)
        _echo_whole(proxy.port, 1 << 20)
        _assert_relay_unharmed(proxy, [PUSH_BYTES, 1 << 20])
    finally:
        assert proxy.stop() == 0
    _assert_one_stop_line(proxy.stderr, "File too large", "file size limit")
    assert 0 < capture.stat().st_size <= 5 << 20
    assert_tshark_clean(capture, data_port=echo_server[1])


def _round_trip(sock: socket.socket, payload: bytes) -> None:
    """Send `payload` on a flow to the echo server and read it back whole."""
    sender = threading.Thread(target=sock.sendall, args=(payload,))
    sender.start()
    echoed = bytearray()
    while len(echoed) < len(payload) and (data := sock.recv(262144)):
        echoed += data
    sender.join(10)
    assert bytes(echoed) == payload


# What one 1-byte round trip adds to a pcapng file of an IPv4 flow: two data records and two
# ACK records, each an Enhanced Packet Block of 32 bytes around 54 bytes of headers plus the
# payload, padded to 4.
_ONE_BYTE_ROUND_TRIP_PCAPNG = 4 * 88


def test_a_final_flush_that_fails_is_one_line_and_the_file_reads_to_its_last_record(
    echo_server: tuple[str, int], tmp_path: Path
) -> None:
    """All but the end of a flow is flushed; then the file may not grow (RLIMIT_FSIZE set on
    the running process), and the flush at shutdown, which writes the flow's end, fails."""
    capture = tmp_path / "closing.pcapng"
    proxy = start_flowtap(
        "run", "--json", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{echo_server[1]}",
        "--pcap", str(capture), "--grace", "0.2",
    )  # fmt: skip
    sent = 2 << 20
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _round_trip(sock, os.urandom(sent))
            # Everything staged is on disk once a round trip's records alone make the file
            # grow (a flush writes all that was staged, and one follows every half second).
            while True:
                before = capture.stat().st_size
                _round_trip(sock, b"x")
                sent += 1
                wait_for(lambda b=before: capture.stat().st_size > b, 5, "a flush")  # type: ignore[misc]
                if capture.stat().st_size - before == _ONE_BYTE_ROUND_TRIP_PCAPNG:
                    break
            size = capture.stat().st_size
            resource.prlimit(proxy.proc.pid, resource.RLIMIT_FSIZE, (size, size))
            proxy.proc.send_signal(signal.SIGTERM)
            assert sock.recv(1) == b""  # the relay closed the flow at shutdown
    finally:
        assert proxy.stop() == 0
    closed = json_events(proxy, "closed")
    assert [(r["bytes_up"], r["bytes_down"], r["reason"]) for r in closed] == [
        (sent, sent, "shutdown")
    ]
    _assert_one_stop_line(proxy.stderr, "File too large", "file size limit")
    assert capture.stat().st_size == size  # the flow's end did not fit; all before it did
    assert_tshark_clean(capture, data_port=echo_server[1])


@pytest.mark.slow
def test_a_capture_pipe_whose_reader_quits_stops_the_capture_and_loses_no_relayed_byte(
    echo_server: tuple[str, int], tmp_path: Path
) -> None:
    fifo = tmp_path / "live.pcapng"
    os.mkfifo(fifo)
    taken: list[int] = []

    def read_then_quit() -> None:
        with fifo.open("rb") as source:
            taken.append(len(source.read(1 << 20)))

    reader = threading.Thread(target=read_then_quit)
    reader.start()
    proxy = start_flowtap(
        "run", "--json", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{echo_server[1]}",
        "--pcap", str(fifo),
    )  # fmt: skip
    try:
        _echo_whole(proxy.port, PUSH_BYTES)
        reader.join(30)
        _echo_whole(proxy.port, 1 << 20)
        _assert_relay_unharmed(proxy, [PUSH_BYTES, 1 << 20])
    finally:
        assert proxy.stop() == 0
    assert taken == [1 << 20]
    # The pipe holds what its reader took; where it stopped reading was its own choice.
    _assert_one_stop_line(proxy.stderr, "the program reading the capture pipe", "went away")
    assert "free space" not in proxy.stderr
