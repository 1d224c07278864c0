"""A burst of stop signals stops flowtap once, cleanly: a SIGKILLed TUI sends its relay child a
parent-death SIGTERM per thread that dies, and users press ^C more than once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from conftest import FlowtapProcess, start_flowtap

SAMPLES = Path(__file__).resolve().parent.parent / "captures" / "samples"


def _burst(process: FlowtapProcess, seconds: float) -> int:
    """SIGTERM `process` back to back until it ends or `seconds` pass; how many were sent."""
    sent = 0
    deadline = time.monotonic() + seconds
    while process.proc.poll() is None and time.monotonic() < deadline:
        try:
            os.kill(process.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            break
        sent += 1
        # Spread them, so that some land inside whatever the process does when the first one
        # arrives; a tight loop mostly coalesces into one pending signal.
        pause = time.perf_counter() + (sent % 7) * 5e-6
        while time.perf_counter() < pause:
            pass
    return sent


@pytest.mark.parametrize(
    "command",
    [
        ["run", "--quiet", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9"],
        ["run", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--grace", "0"],
        ["serve", str(SAMPLES / "redis.pcapng"), "--listen", "127.0.0.1:0"],
    ],
    ids=["run-quiet", "run", "serve"],
)
def test_a_burst_of_sigterms_stops_flowtap_once_and_cleanly(command: list[str]) -> None:
    for _ in range(3):
        process = start_flowtap(*command)
        assert _burst(process, 1.0) >= 1
        try:
            code = process.proc.wait(15)
        except Exception:
            process.proc.kill()
            raise AssertionError("flowtap hung after a burst of SIGTERMs") from None
        stderr = process.read_stderr()
        assert code == 0, stderr
        assert stderr == "", stderr
