"""The relay worker: one thread, one epoll loop, into which TCP flows and UDP sessions plug.

A worker knows nothing of TCP or UDP. What relays plugs in through small protocols:

- a `Handler` gets the epoll events of the descriptors it `watch`es (a TCP flow watches its
  client socket and, once it has one, its upstream socket; a flow that finds its upstream
  only after a handshake watches the client alone until then);
- a `Ready` item queued on `ready` is given another turn (`progress`) after the others had
  theirs, so that one busy socket cannot starve the rest;
- a callback is called at the time it was asked for (`call_at`: connect and handshake
  deadlines);
- a `Service` holds the flows of one kind (a worker's TCP flows, one UDP listener's
  sessions): the worker asks it for its next `deadline`, how many flows it has open, and has
  it stop accepting, kill a flow or close them all.

The worker owns what they share: the receive buffer, the bus the events go out on, the
queue of commands other threads `submit`, busy polling, and what happens when something
raises unexpectedly (its flows close with reason error and the failure is reported, never
lost with the thread).
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import math
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from .errors import describe_failure
from .events import Bus
from .flow import CloseReason, Flow, FlowClosed

if TYPE_CHECKING:
    # Imported when a flow first needs TLS: cryptography and ssl cost ~60 ms of start-up.
    from .tls_intercept import TlsSettings

_IN = select.EPOLLIN
# A worker sleeps at most this long at a time, however far its next deadline is: epoll takes
# no timeout past what the platform's time_t holds, and an hour costs nothing.
_MAX_SLEEP_S = 3600.0


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """Tunables of the relay; the defaults suit an interactive proxy."""

    connect_timeout_s: float = 10.0
    idle_timeout_s: float | None = None
    buffer_size_bytes: int = 256 * 1024
    # One relay thread by default: Python work shares one lock (the GIL), so a second thread
    # mostly contends for it (measured here: new connections/s -25%, ping-pong p50 +25%).
    # More processes sharing a port (`--reuse-port`) scale instead.
    workers: int = 1
    udp_idle_timeout_s: float | None = 60.0
    udp_max_sessions: int = 10_000
    # While events come closer together than this, a worker polls without sleeping between
    # them (see `Worker._loop`); 0 turns it off.
    busy_poll_s: float = 200e-6
    # TLS interception or passthrough of TCP flows (`--tls`); None relays bytes untouched.
    tls: TlsSettings | None = None


class Handler(Protocol):
    """Whatever watches descriptors on a worker: it gets their epoll events on that thread."""

    def on_ready(self, fd: int, mask: int, now: float) -> None: ...


class Ready(Protocol):
    """Something that stopped to let others run and is queued on `Worker.ready` to go on."""

    @property
    def closed(self) -> bool: ...

    def progress(self, now: float) -> None: ...


class Service(Protocol):
    """The flows of one kind on a worker; `deadline` is when `on_deadline` is due (inf: never)."""

    @property
    def deadline(self) -> float: ...

    @property
    def open_count(self) -> int:
        """Flows (or sessions) open now."""
        ...

    def on_deadline(self, now: float) -> None: ...

    def stop_accepting(self, now: float) -> None:
        """Take no new flows; the open ones go on."""
        ...

    def kill(self, flow_id: int) -> None:
        """Reset flow `flow_id` if it is one of this service's; ignore it otherwise."""
        ...

    def close_all(self, reason: CloseReason, note: str | None = None) -> None:
        """Close every open flow with `reason` (and `note` as its error)."""
        ...


_T = TypeVar("_T")


class Deadlines(Generic[_T]):
    """Things each due `timeout_s` after it was added, so due in the order they were added:
    adding or dropping one is a dict operation, and nothing is kept once dropped (a timer
    heap keeps every entry until it falls due: seconds of connections, which the garbage
    collector walks again and again)."""

    __slots__ = ("_due", "timeout_s")

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._due: dict[_T, float] = {}

    def add(self, item: _T, now: float) -> float:
        """Have `item` fall due `timeout_s` after `now`; when that is."""
        when = self._due[item] = now + self.timeout_s
        return when

    def discard(self, item: _T) -> None:
        """`item` no longer falls due (if it was to)."""
        self._due.pop(item, None)

    @property
    def next_due(self) -> float:
        """When the first item falls due (inf: none will)."""
        for when in self._due.values():
            return when
        return math.inf

    def pop_due(self, now: float) -> list[_T]:
        """The items due at `now`, oldest first, dropped from here."""
        due = []
        for item, when in self._due.items():
            if when > now:
                break
            due.append(item)
        for item in due:
            del self._due[item]
        return due

    def __len__(self) -> int:
        return len(self._due)


class _Waker:
    """Runs the commands other threads queue for a worker."""

    __slots__ = ("fd", "worker")

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def on_ready(self, fd: int, mask: int, now: float) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.fd)
        self.worker.run_commands()

    def wake(self) -> None:
        os.eventfd_write(self.fd, 1)


class Worker(threading.Thread):
    """One relay thread: an epoll loop over the descriptors its services' flows watch.

    Services plug in before `start`; from then on, everything but `submit` happens on the
    worker's own thread.
    """

    def __init__(
        self,
        index: int,
        bus: Bus,
        config: RelayConfig,
        on_empty: Callable[[], None],
        on_failure: Callable[[Worker, BaseException], None],
    ) -> None:
        super().__init__(name=f"flowtap-relay-{index}", daemon=True)
        self.bus = bus
        self.config = config
        self.buffer = bytearray(config.buffer_size_bytes)
        self.view = memoryview(self.buffer)
        self.ready: collections.deque[Ready] = collections.deque()
        self.stopping = False
        self.failure: BaseException | None = None
        self.services: list[Service] = []
        self._on_empty = on_empty
        self._on_failure = on_failure
        self._handlers: dict[int, Handler] = {}
        # Descriptors unwatched while a batch of events is dispatched: the rest of the batch
        # may hold events of theirs, which must not reach whoever reuses the number next.
        self._stale: set[int] = set()
        self._timers: list[tuple[float, int, Callable[[float], None]]] = []
        self._seq = itertools.count()
        self._commands: collections.deque[Callable[[], None]] = collections.deque()
        self._exit = False
        self._reported_empty = False
        self._ep = select.epoll()
        try:
            self._waker = _Waker(self)
        except BaseException:
            self._ep.close()
            raise
        self.watch(self._waker.fd, _IN, self._waker)

    # -- what plugs in ----------------------------------------------------------------------

    def add_service(self, service: Service) -> None:
        """Plug in the flows of one kind; before `start`."""
        self.services.append(service)

    def watch(self, fd: int, mask: int, handler: Handler) -> None:
        """Deliver the epoll events of `fd` to `handler` on this worker's thread."""
        self._handlers[fd] = handler
        self._ep.register(fd, mask)

    def unwatch(self, fd: int) -> None:
        """Stop delivering the events of `fd`; call before closing it."""
        if self._handlers.pop(fd, None) is not None:
            self._stale.add(fd)
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(fd)

    def forget(self, fd: int) -> None:
        """Stop delivering the events of `fd`, which the caller closes at once: closing a
        descriptor takes it out of epoll, so this costs no system call."""
        if self._handlers.pop(fd, None) is not None:
            self._stale.add(fd)

    def hand_over(self, fd: int, handler: Handler) -> None:
        """Deliver the events of `fd`, already watched, to `handler` from now on (its mask
        stays as it was watched with)."""
        self._handlers[fd] = handler

    def is_watched(self, fd: int) -> bool:
        return fd in self._handlers

    def call_at(self, when: float, callback: Callable[[float], None]) -> None:
        """Call `callback(now)` once `time.monotonic()` reaches `when` (one that no longer
        cares, the connect deadline of a flow that connected say, just returns)."""
        heapq.heappush(self._timers, (when, next(self._seq), callback))

    @property
    def open_count(self) -> int:
        return sum(service.open_count for service in self.services)

    # -- cross-thread commands -------------------------------------------------------------

    def submit(self, command: Callable[[], None]) -> None:
        """Run `command` on this worker's thread, soon; safe from any thread."""
        self._commands.append(command)
        self._waker.wake()

    def run_commands(self) -> None:
        while self._commands:
            self._commands.popleft()()
        self.check_empty()

    def stop_accepting(self) -> None:
        """Take no new flows; once the open ones have closed, say so (`on_empty`)."""
        self.stopping = True
        now = time.monotonic()
        for service in self.services:
            service.stop_accepting(now)

    def kill(self, flow_id: int) -> None:
        for service in self.services:
            service.kill(flow_id)

    def close_all(self, reason: CloseReason) -> None:
        for service in self.services:
            service.close_all(reason)

    def exit(self) -> None:
        """Leave the loop (closing what is left as shutdown)."""
        self._exit = True

    # -- what services call ----------------------------------------------------------------

    def emit_closed(self, flow: Flow) -> None:
        """Emit a flow's one `FlowClosed`; after a failure, to each observer whatever it raises."""
        if self.failure is None:
            self.bus.emit(FlowClosed(flow))
        else:
            self.bus.emit_each(FlowClosed(flow))

    def check_empty(self) -> None:
        """Once stopping, report (once) that the last flow has closed."""
        if self.stopping and not self._reported_empty and self.open_count == 0:
            self._reported_empty = True
            self._on_empty()

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Relay until told to exit; an unexpected exception closes this thread's flows with
        reason error and is reported to the relay, never lost with the thread."""
        try:
            self._loop()
        except BaseException as exc:
            self.failure = exc
        try:
            self._close_everything()
        except BaseException as exc:  # an observer failed on a closed event at shutdown
            self.failure = exc
            self._close_everything()  # the rest, to every observer whatever they raise
        self._ep.close()
        if self.failure is not None:
            if not self._reported_empty:
                self._reported_empty = True
                self._on_empty()
            self._on_failure(self, self.failure)

    def _close_everything(self) -> None:
        """Close every flow left: as shutdown, or as error once this thread has failed."""
        if self.failure is None:
            for service in self.services:
                service.close_all(CloseReason.SHUTDOWN)
            return
        note = f"the relay thread failed: {describe_failure(self.failure)}"
        for service in self.services:
            service.close_all(CloseReason.ERROR, note)

    def _loop(self) -> None:
        poll = self._ep.poll
        handlers = self._handlers
        ready = self.ready
        timers = self._timers
        services = self.services
        # Busy polling, like HAProxy's `busy-polling`: each time a thread sleeps in the poller
        # its CPU may halt, and on a virtual machine waking it again costs tens of
        # microseconds, more than relaying a datagram. So while events keep coming closer
        # together than `busy_poll_s` (a running average of the gaps), the worker polls
        # without sleeping, for at most `busy_poll_s` after the last event: sparse traffic
        # never spins, and an idle relay sleeps. Measured here against `--busy-poll 0`: UDP
        # ping-pong x1.7-1.8 and request/response with 16 in flight x1.6-1.9
        # (benchmarks/udp.py), TCP ping-pong p50 52 -> 40 us (benchmarks/relay.py).
        stale = self._stale
        monotonic = time.monotonic
        sched_yield = os.sched_yield
        busy_poll_s = self.config.busy_poll_s
        cold_gap_s = 4 * busy_poll_s  # the gap counted for a sleep, however long it was
        average_gap_s = cold_gap_s
        last_event = 0.0
        inf = math.inf
        max_sleep_s = _MAX_SLEEP_S
        while not self._exit:
            if ready:
                events = poll(0.0)
            elif average_gap_s < busy_poll_s and monotonic() - last_event < busy_poll_s:
                events = poll(0.0)
                if not events:
                    sched_yield()  # a peer on this CPU goes first
                    continue
            else:
                # Asleep until the first timer or service deadline (-1: none is due), worked
                # out here rather than in a method: a call costs as much as the rest of it,
                # and a connection has several sleeps.
                wake_at = timers[0][0] if timers else inf
                for service in services:
                    if service.deadline < wake_at:
                        wake_at = service.deadline
                if wake_at == inf:
                    events = poll(-1.0)
                else:
                    wait = wake_at - monotonic()
                    events = poll(
                        0.0 if wait < 0.0 else max_sleep_s if wait > max_sleep_s else wait
                    )
            now = monotonic()
            if events:
                gap = now - last_event
                if gap > cold_gap_s:
                    gap = cold_gap_s
                average_gap_s += (gap - average_gap_s) / 8
                last_event = now
            if stale:
                stale.clear()
            for fd, mask in events:
                handler = handlers.get(fd)
                if handler is not None and (not stale or fd not in stale):
                    handler.on_ready(fd, mask, now)
            if ready:
                for _ in range(len(ready)):
                    item = ready.popleft()
                    if not item.closed:
                        item.progress(now)
            if timers and timers[0][0] <= now:
                self._run_timers(now)
            for service in services:
                if now >= service.deadline:
                    service.on_deadline(now)
                    self.check_empty()

    def _run_timers(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, callback = heapq.heappop(timers)
            callback(now)

    def release(self) -> None:
        """Free the wake-up descriptor; only after the thread has ended, so no submit races it."""
        os.close(self._waker.fd)

    def discard(self) -> None:
        """Free the descriptors of a worker that never started."""
        self._ep.close()
        self.release()
