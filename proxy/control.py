"""The relay's control socket: viewers in other processes subscribe to flow events, list and
kill flows, and read the relay's facts (the wire format is `control_protocol`).

`ControlServer` is a `Bus` observer with a thread of its own (an epoll loop). The relay
threads never wait on it: `handle` appends an event to each subscribed viewer's inbox under a
short lock and wakes the server thread only when it is not already due to run. Each viewer
has a budget of data bytes waiting for it (in its inbox and its unsent frames); data beyond
it is dropped, counted per flow direction and reported to the viewer as `not-shown` once it
catches up. Opened and closed events are never dropped; a viewer so far behind that more
than `max_behind_events` of them wait for it is disconnected with a `bye`, as Redis does to a
subscriber past its output buffer limit, so memory stays bounded. Past `forward_cap_bytes`
of a flow direction (what a viewer keeps for display) the data is no longer copied for
viewers at all; they get the flow's live byte counts twice a second instead.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .control_protocol import (
    KIND_JSON,
    MAX_FRAME_BYTES,
    VERSION,
    FrameReader,
    ProtocolError,
    decode_json,
    encode_data,
    encode_json,
    flow_to_json,
    frame_data,
)
from .errors import FlowtapError
from .flow import (
    EVENT_NAMES,
    Direction,
    Flow,
    FlowClosed,
    FlowData,
    FlowEvent,
    FlowOpened,
    FlowUpdated,
)

if TYPE_CHECKING:
    from .relay import Relay

log = logging.getLogger(__name__)

_PEERCRED = struct.Struct("3i")
_IOV_MAX = 1024
_FLUSH_DELAY_S = 0.05
"""After a wake-up the server waits this long, so that one send carries many small events (a
viewer drains 20 times a second at most). Each wake-up of this thread takes the GIL from the
relay threads once or more; at 5 ms, 200 wake-ups a second held up one round trip in a hundred
of an interactive flow (p99 x4 with a viewer attached, benchmarks/latency.py), at 50 ms few."""
_EVENTS_PER_FRAME_BATCH = 4096
"""Data events framed into one buffer between sends, about 1 ms of this thread's time for
1-byte chunks. Each batch takes the GIL from a busy relay thread once, and each time costs a
round trip waiting on it and on waking again (tens of microseconds on a virtual machine): what
counts is how many times, not how long. A viewer that only read its socket took the median
p99 of 1-byte round trips (windows of 1,000) from 43 to 93 us with batches of 128, from 42 to
46 us with 4,096 (16 s each, interleaved). A batch also ends well before the 5 ms after which
the interpreter would make this thread let go of the GIL anyway."""
_FLOW_EVENT_WEIGHT = 48
"""How many data events one opened, updated or closed event counts for in a batch: its JSON
takes about 11 us to encode against 0.23 us to frame a data event, so a batch of them holds
the GIL about as long as one of data events."""
_RUN_BYTES = 1024 * 1024
"""A run of data events ends past this many bytes, well inside a frame's limit."""
_COUNTS_INTERVAL_S = 0.5
_DOWN = Direction.DOWN


def default_control_dir() -> Path:
    """`$XDG_RUNTIME_DIR/flowtap`, else `/tmp/flowtap-UID`: where relays put their sockets."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "flowtap"
    return Path(f"/tmp/flowtap-{os.getuid()}")


def check_control_dir(folder: Path, *, create: bool) -> None:
    """Make sure `folder` is this user's own (created 0700 if `create`); FlowtapError if not."""
    if create:
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise FlowtapError(
                f"cannot create the control folder {folder}: {exc.strerror}: "
                "give --control PATH or --no-control"
            ) from None
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode):
        raise FlowtapError(f"{folder} is not a folder: remove it, or give --control PATH")
    if info.st_uid != os.getuid():
        raise FlowtapError(
            f"the control folder {folder} belongs to uid {info.st_uid}, not to you: "
            "remove it, or give --control PATH"
        )
    if info.st_mode & 0o022:
        raise FlowtapError(
            f"the control folder {folder} is writable by others (mode "
            f"{stat.S_IMODE(info.st_mode):o}): chmod 700 it, or give --control PATH"
        )


def probe_control_socket(path: str) -> bool:
    """Whether a live process accepts connections on the socket at `path` (False: stale)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    finally:
        probe.close()
    return True


def claim_control_path(path: str) -> None:
    """Make `path` free for a new control socket, removing a dead relay's; FlowtapError if
    it is taken, not a socket, or in a missing folder."""
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise FlowtapError(
            f"--control {path}: the folder {folder} does not exist: create it or pick another path"
        )
    if len(os.fsencode(path)) > 107:
        raise FlowtapError(
            f"--control {path}: the path is longer than 107 bytes: use a shorter one"
        )
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FlowtapError(
            f"--control {path} exists and is not a socket: remove it or pick another path"
        )
    try:
        alive = probe_control_socket(path)
    except OSError as exc:
        raise FlowtapError(
            f"--control {path}: cannot tell whether it is in use ({exc.strerror or exc}): "
            "remove it if it is stale, or pick another path"
        ) from None
    if alive:
        raise FlowtapError(
            f"--control {path} is in use by a running relay: stop it or pick another path"
        )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def remove_stale_sockets(folder: Path) -> None:
    """Remove the socket files in `folder` that no live process accepts on."""
    for path in folder.glob("*.sock"):
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(path).st_mode) and not probe_control_socket(str(path)):
                path.unlink()


def default_control_path() -> str:
    """A fresh control socket path in this user's control folder (made safe, stale ones gone)."""
    folder = default_control_dir()
    check_control_dir(folder, create=True)
    remove_stale_sockets(folder)
    return str(folder / f"relay-{os.getpid()}.sock")


class _Viewer:
    """One connected client; `inbox` and the counters marked (relay) are shared with relay
    threads under the server's lock, the rest belongs to the server thread."""

    __slots__ = (
        "batch",
        "batch_at",
        "batch_is_data",
        "behind_in",
        "behind_sent",
        "closing",
        "dropped",
        "fd",
        "inbox",
        "inbox_flow_events",
        "out",
        "overflowed",
        "queued_in",
        "queued_sent",
        "reader",
        "sock",
        "writing",
    )

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.reader = FrameReader()
        # Flow events, and messages framed in order with them (counts).
        self.inbox: list[FlowEvent | bytes] = []
        self.inbox_flow_events = 0  # (relay) the inbox's items that are not `FlowData`
        self.batch: list[FlowEvent | bytes] = []  # taken from the inbox, framed from `batch_at` on
        self.batch_at = 0
        self.batch_is_data = False  # whether every event of the batch is a `FlowData`
        self.queued_in = 0  # (relay) data bytes ever queued
        self.queued_sent = 0  # data bytes sent to the socket (or discarded)
        self.behind_in = 0  # (relay) flow events and counts ever queued
        self.behind_sent = 0
        self.dropped: dict[tuple[int, Direction], int] = {}  # (relay)
        self.overflowed = False  # (relay)
        # Unsent frames: (bytes, data bytes charged to the budget, opened/closed events).
        self.out: collections.deque[tuple[memoryview, int, int]] = collections.deque()
        self.writing = False  # waiting for EPOLLOUT
        self.closing = False

    def framed_to(self, at: int) -> None:
        """The batch's events before `at` are framed; a batch framed to its end is let go at
        once, its chunks with it."""
        if at == len(self.batch):
            self.batch = []
            at = 0
        self.batch_at = at


class ControlServer:
    """Serves one relay's control socket on its own thread; a `Bus` observer."""

    def __init__(
        self,
        path: str,
        *,
        budget_bytes: int = 4 * 1024 * 1024,
        forward_cap_bytes: int = 1024 * 1024,
        max_behind_events: int = 100_000,
        recent_flows: int = 1000,
    ) -> None:
        if budget_bytes > MAX_FRAME_BYTES:
            raise ValueError("a viewer's budget must fit in one frame (see _drain_inbox)")
        claim_control_path(path)
        self.path = path
        self.budget_bytes = budget_bytes
        self.forward_cap_bytes = forward_cap_bytes
        self.max_behind_events = max_behind_events
        self.started_at = time.time()
        self._relay: Relay | None = None
        self._lock = threading.Lock()
        self._subscribers: tuple[_Viewer, ...] = ()
        self._viewers: dict[int, _Viewer] = {}
        self._open: dict[int, Flow] = {}
        self._recent: collections.deque[Flow] = collections.deque(maxlen=recent_flows)
        self._forwarded: dict[int, list[int]] = {}  # a flow's data bytes up, down
        self._capped: set[int] = set()
        self._counts_sent: dict[int, tuple[int, int]] = {}
        # Whether the capped flows had all gone quiet at the last count: the counts timer is
        # then off (an idle relay sleeps) until `handle` sees one of them move.
        self._counts_quiet = False
        self._wake_pending = False
        self._flush_at: float | None = None
        self._next_counts = 0.0
        self._stopping = False
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket file is born 0600: no window for others
        try:
            self._sock.bind(path)
        except OSError as exc:
            self._sock.close()
            raise FlowtapError(f"--control {path}: cannot bind: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        self._sock.listen(64)
        self._sock.setblocking(False)
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep = select.epoll()
        self._ep.register(self._sock.fileno(), select.EPOLLIN)
        self._ep.register(self._wake_fd, select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name="flowtap-control", daemon=True)

    def describe(self) -> str:
        """The `control unix:PATH` line the CLI prints once the socket is up."""
        return f"control unix:{self.path}"

    def start(self, relay: Relay) -> None:
        """Serve clients of `relay` from now on."""
        self._relay = relay
        self._thread.start()

    # -- the observer side: relay threads ----------------------------------------------------

    @property
    def wants_data(self) -> bool:
        return bool(self._subscribers)

    def handle(self, event: FlowEvent) -> bool | None:
        wake = False
        if isinstance(event, FlowData):
            # Once per relayed chunk, on the relay's path: a flow's counts are indexed by
            # whether the chunk went down, and the lock is taken without `with`, which costs
            # twice as much (Python 3.11).
            flow_id = event.flow_id
            forwarded_both = self._forwarded.get(flow_id)
            if forwarded_both is None:
                forwarded_both = self._forwarded[flow_id] = [0, 0]
            down = event.direction is _DOWN
            forwarded = forwarded_both[down]
            cap = self.forward_cap_bytes
            if forwarded >= cap:
                if self._counts_quiet:  # a quiet capped flow moves again: count it again
                    with self._lock:
                        self._counts_quiet = False
                    os.eventfd_write(self._wake_fd, 1)
                return False
            size = len(event.data)
            forwarded += size
            forwarded_both[down] = forwarded
            budget = self.budget_bytes
            lock = self._lock
            lock.acquire()
            try:
                for viewer in self._subscribers:
                    if viewer.queued_in - viewer.queued_sent + size > budget:
                        key = (flow_id, event.direction)
                        viewer.dropped[key] = viewer.dropped.get(key, 0) + size
                    else:
                        viewer.queued_in += size
                        viewer.inbox.append(event)
                if self._subscribers and not self._wake_pending:
                    self._wake_pending = wake = True
            finally:
                lock.release()
            if wake:
                os.eventfd_write(self._wake_fd, 1)
            if forwarded >= cap:
                self._capped.add(flow_id)
                return False
            return True
        flow = event.flow
        with self._lock:
            if isinstance(event, FlowOpened):
                self._open[flow.id] = flow
            elif isinstance(event, FlowUpdated):
                if flow.id in self._open:  # a viewer subscribing later gets it as it is now
                    self._open[flow.id] = flow
            elif isinstance(event, FlowClosed):
                self._open.pop(flow.id, None)
                self._recent.append(flow)
                self._forwarded.pop(flow.id, None)
                self._capped.discard(flow.id)
                self._counts_sent.pop(flow.id, None)
            for viewer in self._subscribers:
                if viewer.overflowed:
                    continue
                if viewer.behind_in - viewer.behind_sent >= self.max_behind_events:
                    viewer.overflowed = True
                    viewer.inbox.clear()  # it is disconnected: free its backlog at once
                    viewer.inbox_flow_events = 0
                    continue
                viewer.behind_in += 1
                viewer.inbox_flow_events += 1
                viewer.inbox.append(event)
            if self._subscribers and not self._wake_pending:
                self._wake_pending = wake = True
        if wake:
            os.eventfd_write(self._wake_fd, 1)
        return None

    def close(self) -> None:
        """Send what waits, say bye to every viewer, and remove the socket file."""
        if self._thread.is_alive():
            self._stopping = True
            os.eventfd_write(self._wake_fd, 1)
            self._thread.join(5.0)
        for viewer in list(self._viewers.values()):
            viewer.sock.close()
        self._viewers.clear()
        self._ep.close()
        self._sock.close()
        os.close(self._wake_fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # -- the server thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:
            log.exception("the control socket failed; the relay goes on without it")
            with self._lock:
                self._subscribers = ()
            self._refresh_bus()

    def _loop(self) -> None:
        listen_fd = self._sock.fileno()
        while True:
            now = time.monotonic()
            timeout = -1.0
            if self._flush_at is not None:
                timeout = max(0.0, self._flush_at - now)
            if self._capped and self._subscribers and not self._counts_quiet:
                counts_in = max(0.0, self._next_counts - now)
                timeout = counts_in if timeout < 0 else min(timeout, counts_in)
            for fd, mask in self._ep.poll(timeout):
                if fd == listen_fd:
                    self._accept()
                elif fd == self._wake_fd:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._wake_fd)
                    if self._flush_at is None:
                        self._flush_at = time.monotonic() + _FLUSH_DELAY_S
                else:
                    viewer = self._viewers.get(fd)
                    if viewer is None:
                        continue
                    if mask & select.EPOLLIN:
                        self._read(viewer)
                    if mask & (select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP):
                        self._pump(viewer)
            now = time.monotonic()
            if self._stopping:
                self._flush_all()
                self._say_bye("the relay stopped")
                return
            if self._flush_at is not None and now >= self._flush_at:
                self._flush_at = None
                self._flush_all()
            if (
                self._capped
                and self._subscribers
                and not self._counts_quiet
                and now >= self._next_counts
            ):
                self._next_counts = now + _COUNTS_INTERVAL_S
                self._push_counts()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("control socket: accept failed: %s", exc.strerror)
                return
            pid, uid, _gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            if uid != os.getuid():
                log.warning(
                    "control socket: refused a connection from uid %d (pid %d): only uid %d "
                    "may connect",
                    uid,
                    pid,
                    os.getuid(),
                )
                sock.close()
                continue
            sock.setblocking(False)
            viewer = _Viewer(sock)
            self._viewers[viewer.fd] = viewer
            self._ep.register(viewer.fd, select.EPOLLIN | select.EPOLLRDHUP)
            self._queue_json(viewer, {"type": "hello", **self.facts()})
            self._send(viewer)

    def facts(self) -> dict[str, Any]:
        """What `--attach` lists about this relay: pid, listeners, start time, open flows."""
        relay = self._relay
        listeners = (
            []
            if relay is None
            else [
                {
                    "transport": str(lst.spec.transport),
                    "address": str(lst.address),
                    # A proxy-mode listener's clients each say where they go.
                    "upstream": "*" if lst.spec.upstream is None else str(lst.spec.upstream),
                }
                for lst in relay.listeners
            ]
        )
        return {
            "version": VERSION,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "listeners": listeners,
            "open_flows": len(self._open),
            "path": self.path,
        }

    def _read(self, viewer: _Viewer) -> None:
        while True:
            try:
                data = viewer.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                self._drop_viewer(viewer)
                return
            if not data:
                self._drop_viewer(viewer)
                return
            try:
                frames = viewer.reader.feed(data)
                for kind, payload in frames:
                    if kind != KIND_JSON:
                        raise ProtocolError("clients send JSON frames only")
                    self._answer(viewer, decode_json(payload))
            except ProtocolError as exc:
                log.warning("control socket: dropped a client: %s", exc)
                self._drop_viewer(viewer)
                return
            self._pump(viewer)

    def _answer(self, viewer: _Viewer, request: dict[str, Any]) -> None:
        command = request.get("cmd")
        reply: dict[str, Any] = {"type": "reply", "id": request.get("id"), "ok": True}
        if command == "info":
            reply.update(self.facts())
        elif command in ("list", "subscribe"):
            with self._lock:
                # Counted under the lock: a chunk relayed after this goes to the viewer, one
                # relayed before is in the counts, none in both.
                open_flows = [self._live(flow) for flow in self._open.values()]
                recent = list(self._recent)
                if command == "subscribe" and viewer not in self._subscribers:
                    self._subscribers = (*self._subscribers, viewer)
                    first = len(self._subscribers) == 1
                else:
                    first = False
            if first:
                self._refresh_bus()
            reply["open"] = [flow_to_json(flow) for flow in open_flows]
            reply["recent"] = [flow_to_json(flow) for flow in recent]
        elif command == "unsubscribe":
            self._unsubscribe(viewer)
        elif command == "kill":
            flow_id = request.get("flow")
            if not isinstance(flow_id, int) or self._relay is None:
                reply.update(ok=False, error="kill needs an integer 'flow'")
            else:
                reply["live"] = flow_id in self._open
                self._relay.kill(flow_id)
        else:
            reply.update(ok=False, error=f"unknown command {command!r}")
        self._queue_json(viewer, reply)

    def _live(self, flow: Flow) -> Flow:
        """`flow` (as opened) with the bytes it has moved so far."""
        counts = self._byte_counts(flow.id)
        if counts is None:
            return flow
        return Flow(
            flow.id,
            flow.transport,
            flow.client,
            flow.server,
            flow.listener,
            flow.started_at,
            None,
            counts[0],
            counts[1],
            flow.state,
            tls=flow.tls,
            requested=flow.requested,
        )

    def _push_counts(self) -> None:
        relay = self._relay
        if relay is None:
            return
        counts: dict[str, list[int]] = {}
        sent = self._counts_sent
        for flow_id in list(self._capped):
            live = self._byte_counts(flow_id)
            if live is not None and sent.get(flow_id) != live:
                sent[flow_id] = live
                counts[str(flow_id)] = [live[0], live[1]]
        if counts:
            # In each inbox, behind the chunks relayed before the counts were read: a viewer
            # adds chunks to what it shows and takes counts as they are, so counts ahead of
            # chunks would count those twice.
            frame = encode_json({"type": "counts", "flows": counts})
            with self._lock:
                for viewer in self._subscribers:
                    viewer.inbox.append(frame)
                    viewer.inbox_flow_events += 1
                    viewer.behind_in += 1  # bounded as flow events are
            for viewer in self._subscribers:
                self._pump(viewer)
            return
        # Nothing moved: stop counting until something does, and have the relay hand the
        # capped flows' next chunks to `handle` again so that it sees them move.
        with self._lock:
            self._counts_quiet = True
        for flow_id in list(self._capped):
            relay.want_data(flow_id, functools.partial(self._recount, flow_id))

    def _byte_counts(self, flow_id: int) -> tuple[int, int] | None:
        """Bytes a live flow has moved so far (up, down), as the relay counts them."""
        relay = self._relay
        return None if relay is None else relay.byte_counts(flow_id)

    def _recount(self, flow_id: int) -> None:
        """On the flow's relay thread, once it hands its chunks to `handle` again: bytes it
        moved since the counts were last read reached no `handle`, so count them here."""
        live = self._byte_counts(flow_id)
        if live is not None and self._counts_quiet and live != self._counts_sent.get(flow_id):
            with self._lock:
                self._counts_quiet = False
            os.eventfd_write(self._wake_fd, 1)

    def _queue_json(self, viewer: _Viewer, message: dict[str, Any]) -> None:
        viewer.out.append((memoryview(encode_json(message)), 0, 0))

    def _flush_all(self) -> None:
        with self._lock:
            self._wake_pending = False
        for viewer in self._subscribers:
            self._pump(viewer)

    def _pump(self, viewer: _Viewer) -> None:
        """Send the viewer's waiting events while its socket takes them.

        Frames are built only once the previous ones are sent: while a viewer is stopped its
        events wait in the inbox, bounded by its budget, and its drop counts keep adding up
        into one notice per flow direction.
        """
        for _ in range(64):
            if viewer.closing:
                return
            if not viewer.out:
                self._drain_inbox(viewer)
            if not viewer.out or not self._send(viewer):
                return
        # More waits (a viewer catching up on a backlog): it goes at the loop's next turn,
        # once the other viewers and requests have had theirs.
        self._flush_at = time.monotonic()

    def _drain_inbox(self, viewer: _Viewer) -> None:
        """Turn a bounded batch of waiting events into one buffer of frames (and,
        once none wait, the drop counts into notices).

        Each batch takes the GIL from the relay threads once (see `_EVENTS_PER_FRAME_BATCH`)
        and is followed by a send that lets go of it; one buffer per batch keeps the
        per-event work to a header packed into it.
        """
        batch = viewer.batch
        at = viewer.batch_at
        if at == len(batch):
            with self._lock:
                batch = viewer.batch = viewer.inbox
                viewer.batch_is_data = not viewer.inbox_flow_events
                viewer.batch_at = at = 0
                viewer.inbox = []
                viewer.inbox_flow_events = 0
                dropped = viewer.dropped
                if dropped and not batch:
                    viewer.dropped = {}
                else:
                    dropped = {}
                overflowed = viewer.overflowed
            if overflowed:
                self._disconnect_behind(viewer)
                return
            if dropped:
                for (flow_id, direction), size in dropped.items():
                    notice = {"type": "not-shown", "flow": flow_id, "direction": str(direction)}
                    notice["bytes"] = size
                    viewer.out.append((memoryview(encode_json(notice)), 0, 0))
                return
        end = min(len(batch), at + _EVENTS_PER_FRAME_BATCH)
        if at == end:
            return
        if viewer.batch_is_data:
            # Chunks alone, no flow opening or closing among them (a busy flow's steady
            # state): one slice, one frame, no Python work per chunk. What a batch carries is
            # within the viewer's budget, so within a frame's limit.
            frame, charge = frame_data(cast("list[FlowData]", batch[at:end]))
            viewer.framed_to(end)
            viewer.out.append((memoryview(frame), charge, 0))
            return
        buffer = bytearray()
        charge = 0
        events = 0
        room = end - at
        while room > 0:
            event = batch[at]
            at += 1
            room -= 1
            if isinstance(event, FlowData):
                # Consecutive data events go out as one run: one frame, a column each.
                run = [event]
                size = len(event.data)
                while room > 0 and size < _RUN_BYTES:
                    following = batch[at]
                    if not isinstance(following, FlowData):
                        break
                    at += 1
                    run.append(following)
                    size += len(following.data)
                    room -= 1
                buffer += encode_data(run)
                charge += size
            elif isinstance(event, bytes):
                buffer += event
                events += 1
            else:
                kind = EVENT_NAMES[type(event)]
                buffer += encode_json({"type": kind, "flow": flow_to_json(event.flow)})
                events += 1
                room -= _FLOW_EVENT_WEIGHT - 1
        viewer.framed_to(at)
        if buffer:
            viewer.out.append((memoryview(buffer), charge, events))

    def _disconnect_behind(self, viewer: _Viewer) -> None:
        log.warning("control socket: disconnected a viewer that fell too far behind")
        viewer.out.clear()
        self._queue_json(
            viewer,
            {
                "type": "bye",
                "reason": f"this viewer fell more than {self.max_behind_events} flow events "
                "behind; attach again",
            },
        )
        with contextlib.suppress(OSError):
            viewer.sock.send(viewer.out[0][0])
        self._drop_viewer(viewer)

    def _send(self, viewer: _Viewer) -> bool:
        """Write as much of the viewer's frames as its socket takes, in few system calls;
        True once all are sent."""
        out = viewer.out
        if viewer.closing:
            return False
        while out:
            parts = [item[0] for item in itertools.islice(out, _IOV_MAX)]
            try:
                sent = viewer.sock.sendmsg(parts)
            except BlockingIOError:
                break
            except OSError:
                self._drop_viewer(viewer)
                return False
            data_sent = 0
            events_sent = 0
            while sent:
                view, charge, events = out[0]
                if sent >= len(view):
                    sent -= len(view)
                    data_sent += charge
                    events_sent += events
                    out.popleft()
                else:
                    out[0] = (view[sent:], charge, events)
                    sent = 0
            viewer.queued_sent += data_sent
            viewer.behind_sent += events_sent
        want_out = bool(out)
        if want_out != viewer.writing:
            viewer.writing = want_out
            mask = select.EPOLLIN | select.EPOLLRDHUP | (select.EPOLLOUT if want_out else 0)
            self._ep.modify(viewer.fd, mask)
        return not want_out

    def _unsubscribe(self, viewer: _Viewer) -> None:
        with self._lock:
            if viewer not in self._subscribers:
                return
            self._subscribers = tuple(v for v in self._subscribers if v is not viewer)
            last = not self._subscribers
        if last:
            self._refresh_bus()

    def _drop_viewer(self, viewer: _Viewer) -> None:
        if viewer.closing:
            return
        viewer.closing = True
        self._unsubscribe(viewer)
        self._viewers.pop(viewer.fd, None)
        with contextlib.suppress(OSError, ValueError):
            self._ep.unregister(viewer.fd)
        viewer.sock.close()

    def _say_bye(self, reason: str) -> None:
        deadline = time.monotonic() + 1.0
        for viewer in list(self._viewers.values()):
            self._queue_json(viewer, {"type": "bye", "reason": reason})
            while viewer.out and not viewer.closing and time.monotonic() < deadline:
                self._send(viewer)
                if viewer.out:
                    select.select([], [viewer.sock], [], max(0.0, deadline - time.monotonic()))
            self._drop_viewer(viewer)

    def _refresh_bus(self) -> None:
        if self._relay is not None:
            self._relay.bus.refresh()
