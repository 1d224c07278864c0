"""The processes a benchmark starts: a free loopback port for one, waiting until it listens,
what CPU and memory it uses, stopping them."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(
    port: int,
    timeout_s: float = 15.0,
    *,
    proc: subprocess.Popen[Any] | None = None,
    name: str = "the peer",
) -> None:
    """Return once 127.0.0.1:`port` accepts; raise RuntimeError when `timeout_s` passes or
    `proc` (the process meant to listen there) exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name} exited with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} never listened on {port}") from None
            time.sleep(0.02)


def stop_processes(procs: Iterable[subprocess.Popen[Any]], timeout_s: float = 10.0) -> None:
    """SIGTERM every process, then wait for each; one that outlasts `timeout_s` is killed."""
    procs = list(procs)
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_ticks(pid: int) -> int:
    """The process's user + system CPU time so far, in clock ticks (`SC_CLK_TCK` a second)."""
    # The command name in parentheses may hold spaces: the fields that follow it are counted.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def rss_kib(pid: int) -> int:
    """The process's resident memory now, in KiB (0 once it has exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0  # a zombie has no VmRSS line
