"""`flowtap replay` and `flowtap serve` on the command line: arguments and one-line errors."""

from __future__ import annotations

import subprocess

import pytest

from conftest import flowtap_command


def _flowtap(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*flowtap_command(), *args], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--to", "nowhere"], "malformed address 'nowhere'"),
        (["--to", "127.0.0.1:1", "--speed", "0"], "--speed must be above 0"),
        (["--to", "127.0.0.1:1", "--concurrency", "0"], "--concurrency must be at least 1"),
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
