"""The sample captures the README uses stay valid, and the documented commands work on them."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from capture_checks import assert_tshark_clean

from conftest import flowtap_command

SAMPLES = Path(__file__).resolve().parent.parent / "captures" / "samples"


@pytest.mark.parametrize("name", ["redis.pcapng", "http.pcapng"])
def test_sample_capture_is_clean_in_tshark_and_listed_by_show(name: str) -> None:
    path = SAMPLES / name
    assert_tshark_clean(path)
    shown = subprocess.run(
        [*flowtap_command(), "show", str(path)], capture_output=True, text=True, timeout=30
    )
    assert shown.returncode == 0, shown.stderr
    assert "client-closed" in shown.stdout or "server-closed" in shown.stdout


def test_redis_sample_replays_into_a_fresh_redis(redis_server: int) -> None:
    replay = subprocess.run(
        [
            *flowtap_command(), "replay", str(SAMPLES / "redis.pcapng"),
            "--to", f"127.0.0.1:{redis_server}", "--asap", "--check",
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert replay.returncode == 0, replay.stdout + replay.stderr
    get = subprocess.run(
        ["redis-cli", "-p", str(redis_server), "LRANGE", "queue", "0", "-1"],
        capture_output=True, text=True, timeout=10, check=True,
    )  # fmt: skip
    assert get.stdout.split() == ["job1", "job2", "job3"]


def test_http_sample_is_served_to_curl(flowtap: Any) -> None:
    server = flowtap("serve", str(SAMPLES / "http.pcapng"), "--listen", "127.0.0.1:0")
    assert server.listeners[0][2] == "http.pcapng"
    body = subprocess.run(
        ["curl", "-s", "--fail", f"http://127.0.0.1:{server.port}/index.html"],
        capture_output=True, timeout=30, check=True,
    )  # fmt: skip
    assert body.stdout == b"<html><body><h1>flowtap sample page</h1></body></html>\n"
