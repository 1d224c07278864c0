"""What every UDP listener with sessions does as a worker service: idle and drain timeouts,
kill, close-all and stop-accepting, over sessions kept least recently active first."""

from __future__ import annotations

import collections
import math
import select
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

from .flow import CloseReason, Direction, Flow, FlowData

if TYPE_CHECKING:
    import socket

    from .events import Bus
    from .worker import Worker

# After stop-accepting, a session closes once it has been quiet this long (replies in flight
# still reach their client), or when the relay's grace period ends.
DRAIN_QUIET_S = 0.25


@dataclass(slots=True, eq=False)
class DatagramFlow:
    """A UDP flow's byte counts, and whether observers still want each direction's datagrams
    (they stop past a display cap, until the relay asks for them again: `Relay.want_data`)."""

    flow: Flow
    bytes_up: int = field(default=0, init=False)
    bytes_down: int = field(default=0, init=False)
    wants_up: bool = field(default=True, init=False)
    wants_down: bool = field(default=True, init=False)

    def wants(self, bus: Bus, direction: Direction) -> bool:
        """Whether observers want this direction's next datagrams."""
        return bus.wants_data and (self.wants_up if direction is Direction.UP else self.wants_down)

    def emit(self, bus: Bus, direction: Direction, timestamp: float, datagram: bytes) -> None:
        """Hand one relayed datagram to the observers (once `wants` said they want it)."""
        if not bus.emit_data(FlowData(self.flow.id, direction, timestamp, datagram)):
            if direction is Direction.UP:
                self.wants_up = False
            else:
                self.wants_down = False


@dataclass(slots=True, eq=False, kw_only=True)
class Session(DatagramFlow):
    """What every kind of UDP session holds besides its flow and counts: when it was last
    active, and whether it is closed or waits in the worker's queue for another turn."""

    last_active: float
    closed: bool = field(default=False, init=False)
    queued: bool = field(default=False, init=False)

    def ended(self, reason: CloseReason, error: str | None) -> Flow:
        """The session's flow as it ends now, with its byte counts."""
        return self.flow.closed(
            ended_at=time.time(),
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            reason=reason,
            error=error,
        )


K = TypeVar("K", bound=Hashable)
S = TypeVar("S", bound=Session)


class UdpSessions(Generic[K, S]):
    """The sessions of one UDP listener, owned by one worker that delivers its socket's events;
    subclasses read the listener (`_relay_up`) and drop a closing session (`_forget`)."""

    __slots__ = (
        "by_flow",
        "closed",
        "deadline",
        "idle_timeout_s",
        "max_sessions",
        "queued",
        "sessions",
        "sock",
        "stopping",
        "worker",
    )

    def __init__(self, worker: Worker, sock: socket.socket) -> None:
        self.worker = worker
        self.sock = sock
        # Least recently active first: the front is the next to time out or to be evicted.
        self.sessions: collections.OrderedDict[K, S] = collections.OrderedDict()
        self.by_flow: dict[int, S] = {}  # the same sessions, by flow id
        self.idle_timeout_s = worker.config.udp_idle_timeout_s
        self.max_sessions = max(1, worker.config.udp_max_sessions)
        self.deadline = math.inf
        self.closed = False
        self.queued = False
        self.stopping = False

    def watch(self) -> None:
        """Have the worker deliver the listening socket's events; once set up."""
        self.worker.watch(self.sock.fileno(), select.EPOLLIN | select.EPOLLET, self)
        self.worker.add_service(self)

    def _relay_up(self, now: float) -> None:
        """Relay clients' datagrams to their sessions, one turn's worth."""
        raise NotImplementedError

    def close_session(self, session: S, reason: CloseReason, *, note: str | None = None) -> None:
        """Close the session's sockets and emit its one `FlowClosed`."""
        if session.closed:
            return
        session.closed = True
        self.by_flow.pop(session.flow.id, None)
        error = self._forget(session, note)
        self.worker.emit_closed(session.ended(reason, error))

    def _forget(self, session: S, note: str | None) -> str | None:
        """Drop a closing session and close its sockets; what went wrong in it (`note` too)."""
        raise NotImplementedError

    @property
    def open_count(self) -> int:
        return len(self.sessions)

    def on_ready(self, fd: int, mask: int, now: float) -> None:
        if not self.stopping:
            self._relay_up(now)

    def progress(self, now: float) -> None:
        """Continue reading clients' datagrams after giving other sockets a turn."""
        self.queued = False
        if not self.stopping:
            self._relay_up(now)

    def on_deadline(self, now: float) -> None:
        """Close the sessions that have been idle too long (or quiet, once stopping)."""
        if self.stopping:
            idle, reason = DRAIN_QUIET_S, CloseReason.SHUTDOWN
        elif self.idle_timeout_s:
            idle, reason = self.idle_timeout_s, CloseReason.IDLE_TIMEOUT
        else:
            self.deadline = math.inf
            return
        sessions = self.sessions
        while sessions:
            oldest = next(iter(sessions.values()))
            if oldest.last_active + idle > now:
                self.deadline = oldest.last_active + idle
                return
            self.close_session(oldest, reason)
        self.deadline = math.inf

    def add_session(self, key: K, session: S) -> None:
        """Keep a session just opened, the most recently active."""
        self.sessions[key] = session
        self.by_flow[session.flow.id] = session

    def kill(self, flow_id: int) -> None:
        """Close the session of flow `flow_id` as killed, if it is one of ours."""
        session = self.by_flow.get(flow_id)
        if session is not None:
            self.close_session(session, CloseReason.KILLED)

    def byte_counts(self, flow_id: int) -> tuple[int, int] | None:
        """Bytes the session of flow `flow_id` has moved so far (up, down), if it is one of
        ours; any thread."""
        session = self.by_flow.get(flow_id)
        return None if session is None else (session.bytes_up, session.bytes_down)

    def want_data(self, flow_id: int, then: Callable[[], None] | None = None) -> None:
        """Have the session of flow `flow_id` hand its datagrams to observers again, then
        call `then` (on this service's relay thread, as `Relay.want_data` asks)."""
        session = self.by_flow.get(flow_id)
        if session is not None:
            session.wants_up = session.wants_down = True
        if then is not None:
            then()

    def close_all(self, reason: CloseReason, note: str | None = None) -> None:
        for session in list(self.sessions.values()):
            self.close_session(session, reason, note=note)

    def stop_accepting(self, now: float) -> None:
        """Read no more client datagrams; sessions close once replies stop coming."""
        if self.stopping:
            return
        self.stopping = True
        self.worker.unwatch(self.sock.fileno())
        self.deadline = now
