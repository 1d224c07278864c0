"""The real `flowtap demo` in a real terminal (tmux): flows on screen fast, `q` quits cleanly."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from capture_checks import fields

from conftest import flowtap_command, wait_for
from flowtap.inspector.demo import DemoServices, dns_answer, dns_query
from flowtap.inspector.pcapfile.capture import CaptureObserver
from flowtap.inspector.summary import summarize
from flowtap.proxy.events import Bus
from flowtap.proxy.flow import Address
from flowtap.proxy.listener import ListenerSpec
from flowtap.proxy.relay import Relay

ROW = re.compile(r"^\s*\d+ \d\d:\d\d:\d\d\.\d{3} 127\.0\.0\.1:\d+\s+127\.0\.0\.1:\d+\s+tcp ", re.M)


class Tmux:
    """A private tmux server (its own socket) running one command in a 160x48 window."""

    def __init__(self, name: str) -> None:
        self.socket = name
        self.session = name

    def run(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True
        )
        return result.stdout

    def start(self, command: str, cwd: Path) -> None:
        self.run(
            "new-session",
            "-d",
            "-s",
            self.session,
            "-x",
            "160",
            "-y",
            "48",
            "-c",
            str(cwd),
            command,
        )

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", self.session)

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)
        folder = Path(os.environ.get("TMUX_TMPDIR", "/tmp")) / f"tmux-{os.getuid()}"
        (folder / self.socket).unlink(missing_ok=True)  # tmux leaves its socket file behind


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed: run tests/setup-debian.sh")
    session = Tmux(f"flowtap-test-{os.getpid()}")
    yield session
    session.kill()


def test_demo_shows_flow_rows_in_a_terminal_and_quits_on_q(tmux: Tmux, tmp_path: Path) -> None:
    status = tmp_path / "status"
    command = " ".join(shlex.quote(part) for part in flowtap_command())
    started = time.monotonic()
    # Under pytest COLUMNS and LINES may be set, and they would override the terminal's size.
    tmux.start(
        f"env -u COLUMNS -u LINES {command} demo; echo $? > {shlex.quote(str(status))}; sleep 30",
        tmp_path,
    )
    wait_for(lambda: len(ROW.findall(tmux.screen())) >= 3, 15, "three flow rows on screen")
    appeared_s = time.monotonic() - started
    # tmux may size the window just after the app's first frame; the app redraws on resize.
    wait_for(lambda: "GET / (127.0.0.1:" in tmux.screen(), 10, "an HTTP flow's summary")
    wait_for(lambda: "query shop.flowtap.test. A" in tmux.screen(), 10, "the DNS flow")
    # the footer lists the keys
    wait_for(lambda: "q Quit" in tmux.screen() and "Filter" in tmux.screen(), 10, "the footer")
    # Python and Textual start in about a second; allow for a loaded shared machine.
    assert appeared_s < 6, f"flows took {appeared_s:.1f}s to appear"
    tmux.run("send-keys", "-t", tmux.session, "q")
    wait_for(status.exists, 15, "flowtap demo to exit")
    wait_for(lambda: status.read_text().strip() != "", 5, "the exit status")
    assert status.read_text().strip() == "0"
    assert "Traceback" not in tmux.screen()
    captures = list((tmp_path / "captures").glob("flowtap-*.pcapng"))
    assert len(captures) == 1, captures
    streams = {row[0] for row in fields(captures[0], "tcp.stream") if row[0]}
    assert len(streams) >= 3


def _flowtap(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*flowtap_command(), *args], capture_output=True, text=True, timeout=30, check=False
    )


def test_tui_on_a_port_in_use_fails_with_one_line_before_the_app_starts() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _flowtap("tui", "--listen", f"127.0.0.1:{port}", "--upstream", "127.0.0.1:9")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"flowtap: error: port {port} is in use on 127.0.0.1: pick another port, or :0 for a "
        "free one"
    ]
    assert "\x1b[" not in result.stdout  # no screen was drawn


def test_tui_rejects_a_missing_capture_and_mixed_modes_with_one_line(tmp_path: Path) -> None:
    missing = _flowtap("tui", str(tmp_path / "nope.pcapng"))
    assert missing.returncode == 2
    assert missing.stderr.startswith("flowtap: error: ") and missing.stderr.count("\n") == 1
    assert "nope.pcapng" in missing.stderr
    both = _flowtap("tui", str(tmp_path), "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9")
    assert both.returncode == 2 and "not both" in both.stderr
    neither = _flowtap("tui")
    assert neither.returncode == 2
    assert neither.stderr.startswith("flowtap: error: nothing to show: give --listen")


def _record(path: Path, upstream: tuple[str, int], payloads: list[bytes]) -> None:
    """Relay one flow per payload to `upstream` while flowtap's capture writes `path`."""
    bus = Bus([CaptureObserver(path)])
    relay = Relay([ListenerSpec(Address("127.0.0.1", 0), Address(*upstream))], bus)
    relay.start()
    try:
        for payload in payloads:
            with socket.create_connection(("127.0.0.1", relay.listeners[0].address.port)) as s:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                while s.recv(65536):
                    pass
    finally:
        relay.stop(2.0)
        bus.close()


def test_tui_browses_a_capture_file_in_a_terminal(
    tmux: Tmux, tmp_path: Path, echo_server: tuple[str, int]
) -> None:
    path = tmp_path / "browse.pcapng"
    _record(
        path,
        echo_server,
        [b"GET /browse/%d HTTP/1.1\r\nHost: offline.test\r\n\r\n" % n for n in range(3)],
    )
    status = tmp_path / "status"
    command = " ".join(shlex.quote(part) for part in flowtap_command())
    tmux.start(
        f"env -u COLUMNS -u LINES {command} tui {shlex.quote(str(path))}; "
        f"echo $? > {shlex.quote(str(status))}; sleep 30",
        tmp_path,
    )
    wait_for(lambda: len(ROW.findall(tmux.screen())) == 3, 15, "three rows from the capture")
    wait_for(lambda: "GET /browse/2 (offline.test)" in tmux.screen(), 10, "the summaries")
    tmux.run("send-keys", "-t", tmux.session, "q")
    wait_for(lambda: status.exists() and status.read_text().strip() != "", 15, "exit")
    assert status.read_text().strip() == "0"


def test_the_demo_dns_service_answers_dig_and_its_flow_is_summarised() -> None:
    services = DemoServices.start()
    try:
        port = services.dns.server_address[1]
        result = subprocess.run(
            ["dig", "@127.0.0.1", "-p", str(port), "shop.flowtap.test", "A", "+short", "+tries=1"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        assert result.stdout.strip() == "127.0.0.1"
    finally:
        services.stop()
    query = dns_query("shop.flowtap.test", 7)
    answer = dns_answer(query)
    assert answer is not None
    summary = summarize(query, answer, transport="udp")
    assert summary.headline == "query shop.flowtap.test. A → 127.0.0.1"
    assert dns_answer(answer) is None  # an answer is not a query


def test_show_tui_opens_a_capture_on_the_asked_flow(
    tmux: Tmux, tmp_path: Path, echo_server: tuple[str, int]
) -> None:
    path = tmp_path / "show.pcap"
    _record(path, echo_server, [b"first flow\r\n", b"second flow, the one asked for\r\n"])
    status = tmp_path / "status"
    command = " ".join(shlex.quote(part) for part in flowtap_command())
    tmux.start(
        f"env -u COLUMNS -u LINES {command} show {shlex.quote(str(path))} --tui --flow 2; "
        f"echo $? > {shlex.quote(str(status))}; sleep 30",
        tmp_path,
    )
    wait_for(lambda: "\n #2 tcp 127.0.0.1:" in tmux.screen(), 15, "flow 2 in the detail pane")
    assert "second flow, the one asked for\\r\\n" in tmux.screen()  # its conversation
    tmux.run("send-keys", "-t", tmux.session, "q")
    wait_for(lambda: status.exists() and status.read_text().strip() != "", 15, "exit")
    assert status.read_text().strip() == "0"
