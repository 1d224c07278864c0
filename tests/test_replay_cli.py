"""`flowtap replay` and `flowtap serve` on the command line: arguments and one-line errors."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import flowtap_command


def _flowtap(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*flowtap_command(), *args], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--to", "nowhere"], "malformed address 'nowhere'"),
        (["--to", "127.0.0.1:1", "--speed", "0"], "--speed: '0' is not a speed factor"),
        (
            ["--to", "127.0.0.1:1", "--concurrency", "0"],
            "--concurrency: '0' is not a number of flows at once",
        ),
        (["--to", "127.0.0.1:1", "--filter", "port x"], "column 6: expected a port"),
        (["--to", "127.0.0.1:1", "--ignore", "(unclosed"], "is not a regular expression"),
        (["--to", "127.0.0.1:1", "--speed", "2", "--asap"], "not allowed with argument"),
    ],
)
def test_replay_rejects_bad_arguments_in_one_line(args: list[str], message: str) -> None:
    result = _flowtap("replay", "capture.pcap", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowtap: error: "), result.stderr
    assert message in lines[0]


def test_serve_rejects_a_malformed_listen_address_in_one_line() -> None:
    result = _flowtap("serve", "capture.pcap", "--listen", "127.0.0.1:99999")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "the port must be a number" in result.stderr


def _user0_capture(tmp_path: Path) -> Path:
    """A real capture whose packets are all of link type 147 (USER0), made by editcap."""
    from test_show import flowtap_capture

    path = tmp_path / "user0.pcapng"
    subprocess.run(
        ["editcap", "-F", "pcapng", "-T", "user0", str(flowtap_capture(tmp_path)), str(path)],
        check=True, timeout=60,
    )  # fmt: skip
    return path


def _unreadable_capture(tmp_path: Path) -> Path:
    """A capture damaged in its first packet's record: nothing in it can be read."""
    from test_show import flowtap_capture

    whole = flowtap_capture(tmp_path).read_bytes()
    path = tmp_path / "unreadable.pcap"
    path.write_bytes(whole[:24] + b"\xff" * 16 + whole[40:])  # a record claiming 4 GiB
    return path


@pytest.mark.parametrize("make", [_user0_capture, _unreadable_capture])
@pytest.mark.parametrize(
    "command",
    [["replay", "--to", "127.0.0.1:9"], ["serve", "--listen", "127.0.0.1:0"]],
)
def test_replay_and_serve_say_what_show_says_of_a_capture_with_nothing_readable(
    tmp_path: Path, make: Callable[[Path], Path], command: list[str]
) -> None:
    path = make(tmp_path)
    shown = _flowtap("show", str(path))
    assert shown.returncode == 2 and shown.stderr.count("\n") == 1, shown.stderr
    result = _flowtap(command[0], str(path), *command[1:])
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == shown.stderr
    if make is _user0_capture:
        assert "link type 147 (user-defined)" in result.stderr
    else:
        assert "nothing could be read" in result.stderr
