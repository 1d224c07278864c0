"""Option values are checked when the command line is parsed: one line naming the option, the
value and what it accepts, exit 2; the largest accepted values work end to end."""

from __future__ import annotations

import resource
import signal
import socket
import subprocess
from typing import Any

import pytest

from conftest import flowtap_command, json_events, wait_for
from flowtap.inspector.cli import build_parser

RUN = ["run", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9"]
REPLAY = ["replay", "capture.pcapng", "--to", "127.0.0.1:9"]
SERVE = ["serve", "capture.pcapng"]
SHOW = ["show", "capture.pcapng"]


def _flowtap(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*flowtap_command(), *args], capture_output=True, text=True, timeout=30, **kwargs
    )


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowtap: error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            [*RUN, "--connect-timeout", "inf"],
            "--connect-timeout: 'inf' is not a number of seconds between 0.001 and 86400",
        ),
        (
            [*RUN, "--connect-timeout", "1e10"],
            "--connect-timeout: '1e10' is not a number of seconds between 0.001 and 86400",
        ),
        (
            [*RUN, "--connect-timeout", "0"],
            "--connect-timeout: '0' is not a number of seconds between 0.001 and 86400",
        ),
        (
            [*RUN, "--udp-idle-timeout", "1e10"],
            "--udp-idle-timeout: '1e10' is not a number of seconds between 0.001 and "
            "31536000 (or 0: never)",
        ),
        (
            [*RUN, "--idle-timeout", "nan"],
            "--idle-timeout: 'nan' is not a number of seconds between 0.001 and 31536000 "
            "(or 0: never)",
        ),
        (
            [*RUN, "--grace", "inf"],
            "--grace: 'inf' is not a number of seconds between 0 and 86400",
        ),
        ([*RUN, "--grace", "-1"], "--grace: '-1' is not a number of seconds between 0 and 86400"),
        (
            [*RUN, "--busy-poll", "nan"],
            "--busy-poll: 'nan' is not a number of microseconds between 0 and 1000000",
        ),
        (
            [*RUN, "--workers", "0"],
            "--workers: '0' is not a number of relay threads between 1 and 64",
        ),
        (
            [*RUN, "--workers", "-3"],
            "--workers: '-3' is not a number of relay threads between 1 and 64",
        ),
        (
            [*RUN, "--workers", "100000"],
            "--workers: '100000' is not a number of relay threads between 1 and 64",
        ),
        (
            [*RUN, "--udp-max-sessions", "1.5"],
            "--udp-max-sessions: '1.5' is not a number of sessions between 1 and 1000000",
        ),
        (
            [*RUN, "--pcap-max-size", "9" * 40],
            f"--pcap-max-size: '{'9' * 40}' is not a number of megabytes between 1 and 1000000",
        ),
        (
            [*RUN, "--pcap-max-files", "0"],
            "--pcap-max-files: '0' is not a number of files between 1 and 100000",
        ),
        (
            ["run", "--listen", "0", "--upstream", "127.0.0.1:0"],
            "--upstream: '127.0.0.1:0' has port 0, where nothing listens; give the server's port",
        ),
        (
            ["tui", "--listen", "0", "--upstream", "127.0.0.1:1", "--grace", "nan"],
            "--grace: 'nan' is not a number of seconds between 0 and 86400",
        ),
        (
            [*REPLAY, "--speed", "inf"],
            "--speed: 'inf' is not a speed factor between 0.001 and 1000000",
        ),
        (
            [*REPLAY, "--turn-timeout", "-0.5"],
            "--turn-timeout: '-0.5' is not a number of seconds between 0.001 and 86400",
        ),
        (
            [*REPLAY, "--connect-timeout", "0"],
            "--connect-timeout: '0' is not a number of seconds between 0.001 and 86400",
        ),
        (
            [*REPLAY, "--concurrency", "-1"],
            "--concurrency: '-1' is not a number of flows at once between 1 and 10000",
        ),
        (
            [*REPLAY, "--flow", "0"],
            "--flow: '0' is not a flow number between 1 and 1000000000",
        ),
        (
            ["replay", "capture.pcapng", "--to", "localhost:0"],
            "--to: 'localhost:0' has port 0, where nothing listens; give the server's port",
        ),
        (
            [*SERVE, "--turn-timeout", "inf"],
            "--turn-timeout: 'inf' is not a number of seconds between 0.001 and 86400",
        ),
        ([*SHOW, "--flow", "-2"], "--flow: '-2' is not a flow number between 1 and 1000000000"),
    ],
)
def test_an_out_of_range_option_is_one_line_naming_option_value_and_range(
    args: list[str], line: str
) -> None:
    assert _one_error_line(_flowtap(*args)) == f"flowtap: error: {line}"


def test_udp_with_a_tcp_listen_prefix_is_a_contradiction() -> None:
    result = _flowtap("run", "--udp", "--listen", "tcp:127.0.0.1:0", "--upstream", "127.0.0.1:9")
    line = _one_error_line(result)
    assert "--listen tcp:127.0.0.1:0 asks for TCP but --udp for UDP" in line


@pytest.mark.parametrize(
    ("option", "text", "value"),
    [
        ("--idle-timeout", "0", 0.0),  # never
        ("--udp-idle-timeout", "0", 0.0),  # never
        ("--grace", "0", 0.0),  # close the open flows at once
        ("--busy-poll", "0", 0.0),  # off
        ("--connect-timeout", "0.001", 0.001),
        ("--idle-timeout", "31536000", 31_536_000.0),
        ("--workers", "64", 64),
        ("--udp-max-sessions", "+7", 7),
    ],
)
def test_documented_values_at_the_edges_are_accepted(option: str, text: str, value: float) -> None:
    args = build_parser().parse_args([*RUN, option, text])
    assert getattr(args, option[2:].replace("-", "_")) == value


def _low_descriptor_limit() -> None:
    # Enough for Python and a listener, not for 64 relay threads (an epoll and an eventfd each).
    resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))


def test_workers_that_run_out_of_descriptors_are_one_line() -> None:
    result = _flowtap(*RUN, "--workers", "64", preexec_fn=_low_descriptor_limit)
    line = _one_error_line(result)
    assert "cannot set up 64 relay threads (Too many open files)" in line
    assert "ulimit -n" in line


def test_the_largest_accepted_timeouts_relay_and_stop_cleanly(
    flowtap: Any, echo_server: tuple[str, int], udp_echo: Any
) -> None:
    """Deadlines a year away still relay TCP and UDP, and SIGTERM still stops at once."""
    udp = udp_echo()
    proxy = flowtap(
        "run", "--json",
        "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{echo_server[1]}",
        "--listen", "udp:127.0.0.1:0", "--upstream", udp.address,
        "--connect-timeout", "86400", "--idle-timeout", "31536000",
        "--udp-idle-timeout", "31536000", "--grace", "86400", "--busy-poll", "1000000",
        listeners=2,
    )  # fmt: skip
    tcp_port = int(proxy.listeners[0][1].rsplit(":", 1)[1])
    udp_port = int(proxy.listeners[1][1].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", tcp_port), timeout=5) as client:
        client.sendall(b"ping")
        assert client.recv(16) == b"ping"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        client.sendto(b"hello", ("127.0.0.1", udp_port))
        assert client.recv(16) == b"hello"
    wait_for(lambda: len(json_events(proxy, "closed")) == 1, 10, "the TCP flow to close")
    assert proxy.stop(signal.SIGTERM, timeout_s=15) == 0
    closed = json_events(proxy, "closed")
    assert sorted(event["reason"] for event in closed) == ["client-closed", "shutdown"]
    assert "Traceback" not in proxy.stderr
