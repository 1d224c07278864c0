"""The headless flow log: one line per flow event, as text or JSON lines, off the relay thread."""

from __future__ import annotations

import collections
import json
import threading
from typing import Any, TextIO

from flowtap.proxy.control_protocol import flow_to_json
from flowtap.proxy.flow import (
    EVENT_NAMES,
    Flow,
    FlowClosed,
    FlowData,
    FlowEvent,
    FlowOpened,
    FlowUpdated,
)


def human_bytes(size_bytes: int) -> str:
    """`size_bytes` in B, KiB, MiB or GiB with at most one decimal."""
    value = float(size_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def flow_record(flow: Flow) -> dict[str, Any]:
    """A flow as a JSON-ready dict; the field names are part of the `--json` contract."""
    return flow_to_json(flow)


def server_text(flow: Flow) -> str:
    """The server's address, with what the client asked for in a proxy mode:
    `93.184.216.34:443 (example.com:443)`."""
    if flow.requested is None:
        return str(flow.server)
    return f"{flow.server} ({flow.requested.label})"


def event_line(event: FlowOpened | FlowUpdated | FlowClosed, *, as_json: bool) -> str:
    """The log line for one opened, updated or closed event."""
    flow = event.flow
    name = EVENT_NAMES[type(event)]
    if as_json:
        return json.dumps({"event": name, **flow_record(flow)}, separators=(",", ":"))
    head = f"#{flow.id} {name} {flow.transport} {flow.client} -> {server_text(flow)}"
    if isinstance(event, FlowOpened):
        return f"{head} via {flow.listener}"
    if isinstance(event, FlowUpdated):
        return head if flow.tls is None else f"{head} [{flow.tls.summary()}]"
    line = (
        f"{head} {flow.reason} up={human_bytes(flow.bytes_up)} "
        f"down={human_bytes(flow.bytes_down)} {flow.duration_s or 0.0:.3f}s"
    )
    if flow.tls is not None:
        line = f"{line} [{flow.tls.summary()}]"
    return f"{line} ({flow.error})" if flow.error else line


class FlowLog:
    """Prints opened/updated/closed lines from its own thread; it never blocks the relay."""

    wants_data = False

    def __init__(self, out: TextIO, *, as_json: bool = False) -> None:
        self._out = out
        self._as_json = as_json
        self._events: collections.deque[FlowOpened | FlowUpdated | FlowClosed] = collections.deque()
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="flowtap-log", daemon=True)
        self._thread.start()

    def handle(self, event: FlowEvent) -> None:
        if isinstance(event, FlowData):
            return
        self._events.append(event)
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            self._write_waiting()
            if self._stopped:
                self._write_waiting()
                return

    def _write_waiting(self) -> None:
        lines = []
        pop = self._events.popleft
        while True:
            try:
                event = pop()
            except IndexError:
                break
            lines.append(event_line(event, as_json=self._as_json))
        if lines:
            try:
                self._out.write("\n".join(lines) + "\n")
                self._out.flush()
            except (BrokenPipeError, ValueError):
                pass

    def close(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join()
