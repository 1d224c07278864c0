"""`flowtap tui --attach` and `flowtap tui --listen` in real terminals (tmux), against real
relay processes: attach, detach, reattach, several viewers, kill, a stopped viewer, and
relays that die under their viewers."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_demo_tui import ROW, Tmux

from conftest import (
    FlowtapProcess,
    exchange,
    flowtap_command,
    process_state,
    start_flowtap,
    wait_for,
)

MiB = 1024 * 1024


@pytest.fixture
def terminals(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Callable[..., Tmux]]:
    """Start commands in private tmux servers; relays and TUIs share a private runtime folder,
    so that other relays on this machine are not found."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    started: list[Tmux] = []

    def start(args: str, status: Path | None = None) -> Tmux:
        session = Tmux(f"flowtap-attach-{os.getpid()}-{len(started)}")
        started.append(session)
        command = " ".join(shlex.quote(part) for part in flowtap_command())
        tail = f"; echo $? > {shlex.quote(str(status))}; sleep 30" if status else ""
        # Under pytest COLUMNS and LINES may be set, and they would override the window's size.
        session.start(
            f"env -u COLUMNS -u LINES XDG_RUNTIME_DIR={shlex.quote(str(runtime))} "
            f"{command} {args}{tail}",
            tmp_path,
        )
        return session

    yield start
    for session in started:
        session.kill()


def relay_process(upstream: tuple[str, int], *extra: str) -> FlowtapProcess:
    process = start_flowtap(
        "run", "--quiet", "--listen", "127.0.0.1:0", "--upstream", f"{upstream[0]}:{upstream[1]}",
        *extra,
    )  # fmt: skip
    process.wait_line("^control unix:")
    return process


def control_path(process: FlowtapProcess) -> str:
    return process.wait_line("^control unix:")[len("control unix:") :]


def get(port: int, path: str) -> None:
    request = f"GET {path} HTTP/1.1\r\nHost: attach.test\r\n\r\n".encode()
    assert exchange(port, request) == request


def shows(tmux: Tmux, *texts: str, timeout_s: float = 15.0) -> None:
    try:
        wait_for(lambda: all(t in tmux.screen() for t in texts), timeout_s, f"{texts} shown")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the screen:\n{tmux.screen()}") from None


def exited(status: Path, code: str = "0") -> None:
    wait_for(lambda: status.exists() and status.read_text().strip() != "", 15, "the TUI to exit")
    assert status.read_text().strip() == code


def tui_pid(tmux: Tmux) -> int:
    """The flowtap process in a tmux window started with a status file (the child of the
    window's shell)."""
    shell = int(tmux.run("display-message", "-p", "-t", tmux.session, "#{pane_pid}").strip())
    children = Path(f"/proc/{shell}/task/{shell}/children")
    wait_for(lambda: children.read_text().split() != [], 10, "the TUI process")
    return int(children.read_text().split()[0])


def test_tuis_attach_detach_and_reattach_while_the_relay_runs(
    terminals: Callable[..., Tmux], tmp_path: Path, echo_server: tuple[str, int]
) -> None:
    relay = relay_process(echo_server)
    try:
        get(relay.port, "/before")
        first_status = tmp_path / "first"
        first = terminals("tui --attach", first_status)  # the only relay: no path needed
        # Flows from before attaching: their facts (the relay's backlog), not their bytes.
        shows(first, f"attached to relay pid {relay.proc.pid}", "client-closed          43B")
        second = terminals(f"tui --attach {control_path(relay)}")
        shows(second, "client-closed          43B")
        get(relay.port, "/both")
        shows(first, "GET /both (attach.test)")
        shows(second, "GET /both (attach.test)")
        first.run("send-keys", "-t", first.session, "q")  # detach: the relay goes on
        exited(first_status)
        get(relay.port, "/after-detach")
        shows(second, "GET /after-detach (attach.test)")
        assert relay.proc.poll() is None
        again = terminals("tui --attach")
        wait_for(lambda: len(ROW.findall(again.screen())) == 3, 15, "the recent flows, again")
        # With two relays running, --attach lists them and asks.
        other = relay_process(echo_server)
        try:
            picker_status = tmp_path / "picker"
            picker = terminals("tui --attach", picker_status)
            shows(picker, f"pid {relay.proc.pid}", f"pid {other.proc.pid}", "Attach to which")
            number = next(
                line.split(")")[0]
                for line in picker.screen().splitlines()
                if f"pid {other.proc.pid} " in line
            )
            picker.run("send-keys", "-t", picker.session, number, "Enter")
            shows(picker, f"attached to relay pid {other.proc.pid}")
            picker.run("send-keys", "-t", picker.session, "q")
            exited(picker_status)
        finally:
            other.stop()
    finally:
        assert relay.stop() == 0


def test_killing_a_flow_from_an_attached_tui_resets_it(
    terminals: Callable[..., Tmux], echo_server: tuple[str, int]
) -> None:
    relay = relay_process(echo_server)
    try:
        tui = terminals(f"tui --attach {control_path(relay)}")
        shows(tui, "attached to relay")
        held = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
        held.sendall(b"keep me\r\n")
        assert held.recv(100) == b"keep me\r\n"
        shows(tui, "tcp open ")
        tui.run("send-keys", "-t", tui.session, "k")
        shows(tui, "killed")
        with pytest.raises(ConnectionResetError):
            while held.recv(100):
                pass
        held.close()
    finally:
        relay.stop()


class Sink:
    """A TCP server that reads and discards everything, counting the bytes."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn: socket.socket) -> None:
        buffer = bytearray(MiB)
        with conn:
            while n := conn.recv_into(buffer):
                self.received += n


def send_bulk(port: int, flows: int, size: int) -> float:
    """Send `flows` flows of `size` bytes each through the relay; the MiB/s it took."""
    block = b"z" * MiB
    started = time.monotonic()
    for _ in range(flows):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            for _ in range(size // MiB):
                sock.sendall(block)
    return flows * size / MiB / (time.monotonic() - started)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_stopped_viewer_never_slows_the_relay_and_then_shows_what_it_missed(
    terminals: Callable[..., Tmux], tmp_path: Path
) -> None:
    sink = Sink()
    relay = relay_process(("127.0.0.1", sink.port))
    try:
        headless_mib_s = send_bulk(relay.port, 8, 25 * MiB)  # 200 MiB, nobody watching
        tui = terminals(f"tui --attach {control_path(relay)}", tmp_path / "status")
        shows(tui, "attached to relay")
        rss_before = rss_bytes(relay.proc.pid)
        viewer = tui_pid(tui)
        os.kill(viewer, signal.SIGSTOP)
        try:
            peak = [rss_before]
            done = threading.Event()

            def sample() -> None:
                while not done.wait(0.05):
                    peak[0] = max(peak[0], rss_bytes(relay.proc.pid))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            watched_mib_s = send_bulk(relay.port, 8, 25 * MiB)  # 200 MiB, the viewer stopped
            done.set()
            sampler.join()
            time.sleep(max(0.0, 5.0 - 200 / watched_mib_s))  # the viewer stays stopped 5 s
        finally:
            os.kill(viewer, signal.SIGCONT)
        # Loose on purpose (a shared machine); benchmarks/latency.py measures it closely.
        # A relay that waited on the viewer would not get through at all.
        assert watched_mib_s > 0.4 * headless_mib_s, (watched_mib_s, headless_mib_s)
        assert peak[0] - rss_before < 48 * MiB, f"RSS grew {(peak[0] - rss_before) / MiB:.0f} MiB"
        wait_for(lambda: sink.received == 400 * MiB, 10, "every byte at the upstream")
        shows(tui, "total 16")  # all 16 flows listed once it resumes
        tui.run("send-keys", "-t", tui.session, "End")  # the newest flow, sent while stopped
        shows(tui, "bytes not shown (this viewer fell behind the relay)")
    finally:
        relay.stop()


def test_the_relay_killed_under_an_attached_tui_is_one_line_and_q_exits_0(
    terminals: Callable[..., Tmux], tmp_path: Path, echo_server: tuple[str, int]
) -> None:
    relay = relay_process(echo_server)
    status = tmp_path / "status"
    tui = terminals(f"tui --attach {control_path(relay)}", status)
    shows(tui, "attached to relay")
    get(relay.port, "/kept")
    shows(tui, "GET /kept (attach.test)")
    relay.proc.kill()
    relay.proc.wait(10)
    shows(tui, f"the relay (pid {relay.proc.pid}) has gone", "(gone)")
    assert "GET /kept (attach.test)" in tui.screen()  # what it had stays
    tui.run("send-keys", "-t", tui.session, "k")  # no crash: a note
    shows(tui, "Cannot kill")
    tui.run("send-keys", "-t", tui.session, "q")
    exited(status)
    assert "Traceback" not in tui.screen()


def test_tui_listen_runs_a_relay_child_that_q_stops_and_whose_crash_is_one_line(
    terminals: Callable[..., Tmux], tmp_path: Path, echo_server: tuple[str, int]
) -> None:
    upstream = f"127.0.0.1:{echo_server[1]}"
    status = tmp_path / "status"
    tui = terminals(f"tui --listen 127.0.0.1:0 --upstream {upstream}", status)
    shows(tui, f"-> {upstream}")
    port = int(re.search(r"127\.0\.0\.1:(\d+) -> ", tui.screen()).group(1))  # type: ignore[union-attr]
    get(port, "/through-the-child")
    shows(tui, "GET /through-the-child (attach.test)")
    child = int(Path(f"/proc/{tui_pid(tui)}/task/{tui_pid(tui)}/children").read_text().split()[0])
    tui.run("send-keys", "-t", tui.session, "q")
    exited(status)
    wait_for(lambda: not Path(f"/proc/{child}").exists(), 10, "the relay child to end")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()

    crashed_status = tmp_path / "crashed"
    crashed = terminals(f"tui --listen 127.0.0.1:0 --upstream {upstream}", crashed_status)
    shows(crashed, f"-> {upstream}")
    pid = tui_pid(crashed)
    child = int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])
    os.kill(child, signal.SIGKILL)
    shows(crashed, f"the relay (pid {child}) was killed by signal 9")
    crashed.run("send-keys", "-t", crashed.session, "q")
    exited(crashed_status)


def test_a_relay_child_does_not_outlive_its_tui(
    terminals: Callable[..., Tmux], tmp_path: Path, echo_server: tuple[str, int]
) -> None:
    tui = terminals(
        f"tui --listen 127.0.0.1:0 --upstream 127.0.0.1:{echo_server[1]}", tmp_path / "status"
    )
    shows(tui, "-> 127.0.0.1:")
    pid = tui_pid(tui)
    child = int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)  # the TUI crashes without a chance to stop its relay
    # Ended: gone, or a zombie that whatever reaps orphans here has not reaped yet. It stops
    # as on SIGTERM (up to --grace, 5 s, for open flows), so allow for a cold, busy machine.
    # The TUI's threads each send the parent-death SIGTERM as they die: a burst that once
    # deadlocked the child's signal handler (tests/test_stop_signals.py).
    wait_for(lambda: process_state(child) in (None, "Z"), 30, "the relay child to end")
