"""How flow events leave the relay: one `Bus`, observers subscribed to it.

The relay calls `Bus.emit` on its own thread for every event. An observer's `handle` must
return quickly: a display observer hands events to another thread without ever blocking
(`EventQueue`), while a lossless observer may block the relay when it falls behind, which
is how backpressure reaches the sockets: the capture waits for a free file buffer, and
`LosslessObserver` gives any consumer a thread behind a bounded queue.

An observer that is also a `ChunkSink` can take a flow's data where it is received: when it
is the only observer that wants data, the relay has it read each chunk into its own memory
and sends the chunk from there, so the data is never copied for it.
"""

from __future__ import annotations

import collections
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

from .errors import log_failure
from .flow import (
    CloseReason,
    Direction,
    Flow,
    FlowClosed,
    FlowData,
    FlowEvent,
    FlowOpened,
    FlowWire,
)

log = logging.getLogger(__name__)


class Observer(Protocol):
    """Receives flow events on the relay thread that owns the flow."""

    @property
    def wants_data(self) -> bool:
        """Whether `FlowData` events are delivered; when no observer wants them, none are built."""
        ...

    def handle(self, event: FlowEvent) -> bool | None:
        """Take one event; called from relay threads, possibly several at once.

        For a `FlowData`, returning False says this observer needs no more data of that
        direction of that flow; once no observer needs it, the relay stops copying it.
        """
        ...

    def close(self) -> None:
        """Flush and release resources; called once after the relay has stopped."""
        ...


@runtime_checkable
class WireObserver(Protocol):
    """An observer that may also take the ciphertext and secrets of intercepted TLS flows."""

    @property
    def wants_wire(self) -> bool:
        """Whether `FlowWire` events are delivered (a `--tls-capture wire` capture)."""
        ...

    def handle_wire(self, event: FlowWire) -> None:
        """Take one `FlowWire`; called from relay threads, possibly several at once."""
        ...


class Loan(Protocol):
    """Memory a `ChunkSink` lent the relay for one chunk."""

    def release(self) -> None:
        """The relay is done with the chunk's memory (sent, or what was left copied)."""
        ...


class Chunk(NamedTuple):
    """One chunk a `ChunkSink` received for the relay."""

    size: int  # bytes received; 0 at the end of the stream
    parts: list[memoryview]  # the bytes, in order, for the relay to send
    loan: Loan | None  # to release once they are sent (or what is left of them copied)
    asked: int  # bytes the read asked for: fewer received means the socket is drained


@runtime_checkable
class ChunkSink(Protocol):
    """An observer that takes a flow's TCP data with no copy made for it alone.

    For each chunk the relay either calls `receive`, sends the parts it returns (which may
    be in the sink's memory) and releases the loan, or (for a flow direction moving small
    chunks) receives the chunk into its own buffer, sends it and hands it to `record`;
    either way before it receives the next chunk. The sink keeps lent memory from being
    reused until the loan is released (and may finish its own work on the chunk then, once
    the chunk is on its way). `receive` raises what `socket.recv` raises.
    """

    def receive(self, flow_id: int, direction: Direction, sock: socket.socket, size: int) -> Chunk:
        """Read at most `size` bytes of `sock` (one flow direction), as `FlowData` would carry."""
        ...

    def record(
        self, flow_id: int, direction: Direction, timestamp_ns: int, data: memoryview
    ) -> None:
        """Take a chunk the relay received into its own memory at `timestamp_ns` and has
        sent (a small one: copying it after the send costs the round trip less than
        receiving it in place); `data` is valid only during the call."""
        ...


class Bus:
    """Fans flow events out to a fixed list of observers."""

    def __init__(self, observers: Iterable[Observer] = ()) -> None:
        self._observers: tuple[Observer, ...] = tuple(observers)
        self.observed = False
        self.wants_data = False
        self.sink: ChunkSink | None = None
        self._survey()

    def _survey(self) -> None:
        # With no observer at all, the relay builds no events (opened, closed) either.
        self.observed = bool(self._observers)
        wanting = [o for o in self._observers if o.wants_data]
        self.wants_data = bool(wanting)
        only = wanting[0] if len(wanting) == 1 else None
        self.sink = only if isinstance(only, ChunkSink) else None
        self.wire_observers = tuple(
            o for o in self._observers if isinstance(o, WireObserver) and o.wants_wire
        )
        """Who takes TLS ciphertext and secrets; when nobody, TLS flows record none."""

    @property
    def observers(self) -> Sequence[Observer]:
        return self._observers

    def subscribe(self, observer: Observer) -> None:
        """Add an observer; call before the relay starts."""
        self._observers = (*self._observers, observer)
        self._survey()

    def refresh(self) -> None:
        """Ask the observers again whether they want data (one's answer changed); any thread."""
        self._survey()

    def emit_data(self, event: FlowData) -> bool:
        """Deliver one data event; False once no observer wants more of this flow direction."""
        wanted = False
        for observer in self._observers:
            if observer.wants_data and observer.handle(event) is not False:
                wanted = True
        return wanted

    def emit_wire(self, event: FlowWire) -> None:
        """Deliver TLS ciphertext or secrets to the observers that take them."""
        for observer in self.wire_observers:
            observer.handle_wire(event)

    def emit(self, event: FlowEvent) -> None:
        if isinstance(event, FlowData):
            self.emit_data(event)
            return
        for observer in self._observers:
            observer.handle(event)

    def emit_unrelayed(self, flow: Flow, reason: CloseReason, error: str | None) -> None:
        """Emit a flow that ended before relaying anything (a refused proxy client): its
        opened event and its closed one, with `reason`."""
        self.emit(FlowOpened(flow))
        ended = flow.closed(
            ended_at=time.time(), bytes_up=0, bytes_down=0, reason=reason, error=error
        )
        self.emit(FlowClosed(ended))

    def emit_each(self, event: FlowEvent) -> None:
        """Deliver `event` to every observer, logging what one raises instead of raising it
        (for the events of a relay thread cleaning up after a failure)."""
        for observer in self._observers:
            try:
                observer.handle(event)
            except Exception as exc:
                log_failure(log, f"observer {type(observer).__name__}", exc)

    def close(self) -> None:
        for observer in self._observers:
            try:
                observer.close()
            except Exception as exc:
                log_failure(log, f"closing observer {type(observer).__name__}", exc)


class EventQueue:
    """A never-blocking hand-over for displays: the consumer drains events in batches.

    Opened and closed events are always kept; data events beyond `max_data_events` waiting
    are dropped for display only (counted in `dropped_data_events`).
    """

    def __init__(self, *, wants_data: bool = True, max_data_events: int = 10_000) -> None:
        self._wants_data = wants_data
        self._events: collections.deque[FlowEvent] = collections.deque()
        self._data_waiting = 0
        self._max_data_events = max_data_events
        self._lock = threading.Lock()
        self.dropped_data_events = 0

    @property
    def wants_data(self) -> bool:
        return self._wants_data

    def handle(self, event: FlowEvent) -> None:
        if isinstance(event, FlowData):
            with self._lock:
                if self._data_waiting >= self._max_data_events:
                    self.dropped_data_events += 1
                    return
                self._data_waiting += 1
                self._events.append(event)
            return
        self._events.append(event)

    def drain(self, limit: int = 100_000) -> list[FlowEvent]:
        """Take up to `limit` waiting events, oldest first."""
        out: list[FlowEvent] = []
        pop = self._events.popleft
        data = 0
        try:
            while len(out) < limit:
                event = pop()
                if isinstance(event, FlowData):
                    data += 1
                out.append(event)
        except IndexError:
            pass
        if data:
            with self._lock:
                self._data_waiting -= data
        return out

    def close(self) -> None:
        pass


_STOP = object()


class LosslessObserver:
    """Hands events to one consumer thread through a bounded queue; the relay waits when full.

    `consume` receives every event, in order, in batches; nothing is ever dropped.
    """

    def __init__(
        self,
        consume: Callable[[list[FlowEvent]], None],
        *,
        wants_data: bool = True,
        max_pending: int = 1024,
        name: str = "flowtap-observer",
        on_idle: Callable[[], None] | None = None,
        idle_interval_s: float = 0.5,
    ) -> None:
        self._consume = consume
        self._wants_data = wants_data
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_pending)
        self._on_idle = on_idle
        self._idle_interval_s = idle_interval_s
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def wants_data(self) -> bool:
        return self._wants_data

    @property
    def error(self) -> BaseException | None:
        """The exception that stopped the consumer, if any."""
        return self._error

    def handle(self, event: FlowEvent) -> None:
        if self._error is None:
            self._queue.put(event)

    def _run(self) -> None:
        get = self._queue.get
        get_nowait = self._queue.get_nowait
        while True:
            try:
                item = get(timeout=self._idle_interval_s)
            except queue.Empty:
                self._idle()
                continue
            batch: list[FlowEvent] = []
            stop = False
            while True:
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)  # type: ignore[arg-type]
                if len(batch) >= 256:
                    break
                try:
                    item = get_nowait()
                except queue.Empty:
                    break
            if batch and self._error is None:
                try:
                    self._consume(batch)
                except BaseException as exc:  # keep draining so the relay never deadlocks
                    log_failure(log, f"observer thread {self._thread.name}", exc)
                    self._error = exc
            if stop:
                return

    def _idle(self) -> None:
        if self._on_idle is not None and self._error is None:
            try:
                self._on_idle()
            except BaseException as exc:
                log_failure(log, f"idle hook of observer thread {self._thread.name}", exc)
                self._error = exc

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()
