"""A viewer's side of a relay's control socket: find the relays this user runs, connect, and
receive flow events on a reader thread for the TUI to drain on its timer.

The reader thread never lets events pile up without bound either: past `max_waiting_bytes`
of data waiting for the app, data is dropped and reported as `DataNotShown`, like the relay
does for a viewer that falls behind.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowtap.proxy.control import default_control_dir, probe_control_socket
from flowtap.proxy.control_protocol import (
    KIND_DATA,
    KIND_JSON,
    VERSION,
    DataNotShown,
    DataRun,
    FrameReader,
    ProtocolError,
    decode_data,
    decode_json,
    encode_json,
    flow_from_json,
)
from flowtap.proxy.errors import FlowtapError
from flowtap.proxy.flow import EVENT_NAMES, Direction, FlowClosed, FlowData, FlowEvent, FlowOpened

MiB = 1024 * 1024
# The flow events the relay pushes, by the name it sends them under.
_EVENT_TYPES = {name: kind for kind, name in EVENT_NAMES.items()}


@dataclass(frozen=True, slots=True)
class RelayGone:
    """The relay closed the control socket (it stopped, died, or dropped this viewer)."""

    text: str


@dataclass(frozen=True, slots=True)
class RelayFacts:
    """What a relay's hello says about it."""

    path: str
    pid: int
    started_at: float
    listeners: tuple[str, ...]
    open_flows: int

    @classmethod
    def from_hello(cls, path: str, hello: dict[str, Any]) -> RelayFacts:
        try:
            return cls(
                path=path,
                pid=int(hello["pid"]),
                started_at=float(hello["started_at"]),
                listeners=tuple(
                    f"{lst['transport']} {lst['address']} -> {lst['upstream']}"
                    for lst in hello["listeners"]
                ),
                open_flows=int(hello["open_flows"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed hello: {exc}") from None

    def describe(self) -> str:
        """One line for the TUI's header: which relay this is."""
        listeners = ", ".join(item.split(" ", 1)[1] for item in self.listeners)
        return f"relay pid {self.pid}  {listeners}"

    def listing(self) -> str:
        """One line for the list of relays to pick from."""
        started = datetime.datetime.fromtimestamp(self.started_at).strftime("%Y-%m-%d %H:%M:%S")
        return (
            f"pid {self.pid}  started {started}  {self.open_flows} open flow(s)  "
            f"{'; '.join(self.listeners)}  ({self.path})"
        )


def _connect(path: str, timeout_s: float = 5.0) -> tuple[socket.socket, FrameReader, RelayFacts]:
    """Connect to the control socket at `path` and read its hello; FlowtapError if it fails."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(path)
    except FileNotFoundError:
        sock.close()
        raise FlowtapError(
            f"no control socket at {path}: check the path the relay printed"
        ) from None
    except ConnectionRefusedError:
        sock.close()
        raise FlowtapError(
            f"no relay listens on {path} any more: start one, or pick another"
        ) from None
    except PermissionError:
        sock.close()
        raise FlowtapError(f"{path} belongs to another user: attach to a relay you run") from None
    except OSError as exc:
        sock.close()
        raise FlowtapError(f"cannot connect to {path}: {exc.strerror or exc}") from None
    reader = FrameReader()
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                raise ProtocolError("the socket closed before the hello")
            frames = reader.feed(data)
            if frames:
                break
        kind, payload = frames[0]
        hello = decode_json(payload) if kind == KIND_JSON else {}
        if hello.get("type") != "hello":
            raise ProtocolError("the first frame is not a hello")
        if hello.get("version") != VERSION:
            raise FlowtapError(
                f"the relay at {path} speaks control protocol {hello.get('version')}, this "
                f"flowtap speaks {VERSION}: attach with the flowtap that started it"
            )
        facts = RelayFacts.from_hello(path, hello)
    except (ProtocolError, OSError) as exc:
        sock.close()
        raise FlowtapError(
            f"{path} is not a flowtap control socket ({exc}): check the path"
        ) from None
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return sock, reader, facts


def find_relays(folder: Path | None = None) -> list[RelayFacts]:
    """The relays of this user with a socket in the control folder; stale sockets are removed."""
    folder = folder or default_control_dir()
    found: list[RelayFacts] = []
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("*.sock")):
        try:
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                continue
            if not probe_control_socket(str(path)):
                path.unlink()  # a dead relay's
                continue
            sock, _, facts = _connect(str(path), timeout_s=2.0)
        except (OSError, FlowtapError):
            continue
        sock.close()
        found.append(facts)
    return found


class ControlClient:
    """A connection to one relay's control socket; events are read on a thread of its own.

    `drain` hands them over as flow events (`FlowOpened`, `FlowClosed`...), data as it came
    (a `DataRun` of consecutive chunks, or a `FlowData` of one), `DataNotShown` for what was
    dropped, and finally one `RelayGone`.
    """

    def __init__(
        self,
        path: str,
        *,
        max_waiting_bytes: int = 16 * MiB,
        gone_note: Callable[[], str] | None = None,
    ) -> None:
        self.path = path
        self._sock, self._reader, self.facts = _connect(path)
        self._max_waiting = max_waiting_bytes
        self._gone_note = gone_note
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._events: collections.deque[object] = collections.deque()
        self._waiting_bytes = 0
        self._not_shown: dict[tuple[int, Direction], int] = {}
        self._counts: dict[int, tuple[int, int]] = {}
        self._next_id = 0
        self._subscribed = threading.Event()  # set by the answer to subscribe, or the end
        self.gone: str | None = None
        self.on_events: Callable[[], object] | None = None
        """Called on the viewer's thread after events are queued (an app that sleeps while
        nothing comes wakes up)."""
        self._thread = threading.Thread(target=self._run, name="flowtap-viewer", daemon=True)
        self._thread.start()

    # -- requests ---------------------------------------------------------------------------

    def _request(self, command: str, **fields: object) -> bool:
        """Send a request; False if the relay is gone."""
        with self._send_lock:
            self._next_id += 1
            frame = encode_json({"id": self._next_id, "cmd": command, **fields})
            try:
                self._sock.sendall(frame)
            except OSError:
                return False
        return True

    def subscribe(self, timeout_s: float = 10.0) -> bool:
        """Receive the open flows, the recent closed ones, then every event as it happens;
        return once the relay has answered (what it relays from then on comes as events),
        False if the relay is gone or `timeout_s` passed first."""
        if not self._request("subscribe"):
            return False
        return self._subscribed.wait(timeout_s) and self.gone is None

    def kill(self, flow_id: int) -> bool:
        """Ask the relay to reset both sides of a flow; False if the relay is gone."""
        return self._request("kill", flow=flow_id)

    def byte_counts(self, flow_id: int) -> tuple[int, int] | None:
        """The latest (up, down) byte counts the relay sent for a flow past the data cap."""
        return self._counts.get(flow_id)

    def close(self) -> None:
        """Detach: the relay goes on."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(2.0)
        self._sock.close()

    # -- events -----------------------------------------------------------------------------

    def drain(self, limit: int = 100_000) -> list[object]:
        """Take waiting events, oldest first, until about `limit` (a run counts a chunk each)."""
        out: list[object] = []
        pop = self._events.popleft
        data_bytes = 0
        taken = 0
        try:
            while taken < limit:
                event = pop()
                if isinstance(event, DataRun):
                    data_bytes += len(event.payload)
                    taken += len(event)
                else:
                    if isinstance(event, FlowData):
                        data_bytes += len(event.data)
                    taken += 1
                out.append(event)
        except IndexError:
            pass
        with self._lock:
            self._waiting_bytes -= data_bytes
            if self._not_shown and not self._events:
                out.extend(
                    DataNotShown(flow_id, direction, size)
                    for (flow_id, direction), size in self._not_shown.items()
                )
                self._not_shown.clear()
        return out

    def _put_data(self, run: DataRun) -> None:
        """Queue a run of data for the app; past the waiting budget its chunks are counted
        instead."""
        with self._lock:
            waiting = self._waiting_bytes
            limit = self._max_waiting
            if waiting + len(run.payload) <= limit:
                self._events.append(run)
                self._waiting_bytes = waiting + len(run.payload)
                return
            append = self._events.append
            for event in run.events():  # the chunks that still fit are queued
                size = len(event.data)
                if waiting + size > limit:
                    key = (event.flow_id, event.direction)
                    self._not_shown[key] = self._not_shown.get(key, 0) + size
                    continue
                waiting += size
                append(event)
            self._waiting_bytes = waiting

    def _run(self) -> None:
        reason = ""
        try:
            for frames in self._frame_batches():
                reason = self._take(frames) or reason
                if (notify := self.on_events) is not None:
                    notify()
        except (OSError, ProtocolError) as exc:
            reason = str(exc)
        note = self._gone_note() if self._gone_note is not None else ""
        text = note or f"the relay (pid {self.facts.pid}) has gone"
        if reason and not note:
            text += f": {reason}"
        self.gone = text
        self._subscribed.set()
        self._events.append(RelayGone(text))
        if (notify := self.on_events) is not None:
            notify()

    def _take(self, frames: list[tuple[int, bytes]]) -> str | None:
        """Queue the events of one read's frames, in order; the reason of a `bye` among them."""
        bye = None
        for kind, payload in frames:
            if kind == KIND_DATA:
                self._put_data(decode_data(payload))
            else:
                bye = self._on_message(decode_json(payload)) or bye
        return bye

    def _frame_batches(self) -> Iterator[list[tuple[int, bytes]]]:
        reader = self._reader
        recv_into = self._sock.recv_into
        # A reusable buffer: recv(1 MiB) would map and unmap a fresh one per call.
        buffer = bytearray(1024 * 1024)
        view = memoryview(buffer)
        while True:
            size = recv_into(buffer)
            if not size:
                return
            yield reader.feed(view[:size])

    def _on_message(self, message: dict[str, Any]) -> str | None:
        kind = message.get("type")
        events: list[FlowEvent | DataNotShown] = []
        if kind in _EVENT_TYPES:
            events.append(_EVENT_TYPES[kind](flow_from_json(message["flow"])))
        elif kind == "not-shown":
            events.append(
                DataNotShown(
                    int(message["flow"]), Direction(message["direction"]), int(message["bytes"])
                )
            )
        elif kind == "counts":
            for flow_id, (up, down) in message["flows"].items():
                self._counts[int(flow_id)] = (int(up), int(down))
        elif kind == "reply" and "recent" in message:
            # The answer to subscribe: recent closed flows first, then the open ones.
            events += [FlowClosed(flow_from_json(flow)) for flow in message["recent"]]
            events += [FlowOpened(flow_from_json(flow)) for flow in message["open"]]
            self._events.extend(events)
            self._subscribed.set()
            return None
        elif kind == "bye":
            return str(message.get("reason", "the relay said bye"))
        self._events.extend(events)
        return None
