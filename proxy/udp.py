"""The UDP relay: one session per client address, each with its own connected upstream socket.

A `UdpListener` belongs to one relay worker, whose epoll loop delivers the events of the
listening socket and of every session's upstream socket, so a session's events come from one
thread, like a TCP flow's. A session is a `Flow` with transport udp. Each datagram is one
`FlowData`, emitted once the kernel took the datagram, so boundaries are kept and a datagram
that could not be sent is never reported as relayed. A session ends after an idle timeout, when
the session limit needs its place (least recently active first), on kill or at shutdown; what
went wrong meanwhile (ICMP port unreachable, datagrams too large or truncated, full buffers) is
counted, logged once per listener, and told in the flow's `error` when it closes.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import math
import os
import select
import socket
import time
from typing import TYPE_CHECKING, Any

from .errors import FlowtapError
from .flow import (
    Address,
    CloseReason,
    Direction,
    Flow,
    FlowClosed,
    FlowData,
    FlowOpened,
    FlowState,
    Transport,
    next_flow_id,
)

if TYPE_CHECKING:
    from .listener import ListenerSpec
    from .relay import BoundListener, Worker

log = logging.getLogger(__name__)

MAX_IPV4_PAYLOAD_BYTES = 65_507
"""The largest UDP payload IPv4 can carry (IPv6 carries up to 65,527 without jumbograms)."""

# How many datagrams one socket may move before other sockets get a turn.
_DATAGRAMS_PER_TURN = 64
# After stop-accepting, a session closes once it has been quiet this long (replies in flight
# still reach their client), or when the relay's grace period ends.
_DRAIN_QUIET_S = 0.25
# Receive buffers: the listener absorbs bursts from all clients; the kernel caps the request
# at net.core.rmem_max, and it is a limit, not an allocation.
_LISTENER_RCVBUF_BYTES = 4 << 20
_SESSION_RCVBUF_BYTES = 1 << 20
_SESSION_EVENTS = select.EPOLLIN | select.EPOLLET  # EPOLLERR (ICMP errors) always arrives
_TRUNC = socket.MSG_TRUNC
_FULL_ERRORS = (errno.EAGAIN, errno.ENOBUFS)

ClientAddr = tuple[Any, ...]
"""A client's socket address as `recvfrom` returns it: the key of its session."""


def check_spec(spec: ListenerSpec) -> None:
    """Raise FlowtapError if `spec` is a UDP listener flowtap cannot relay."""
    if spec.listen.is_unix or spec.upstream.is_unix:
        raise FlowtapError(
            f"UDP over unix sockets is not supported ({spec.listen} -> {spec.upstream}): "
            "give IP addresses with --udp, or drop --udp for a unix stream socket"
        )


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class UdpSession:
    """One client address of a UDP listener, with its connected upstream socket."""

    __slots__ = (
        "bytes_down",
        "bytes_up",
        "client_addr",
        "closed",
        "dropped",
        "dropped_text",
        "failure",
        "flow",
        "last_active",
        "note",
        "owner",
        "queued",
        "refused",
        "sock",
        "too_large",
        "truncated",
    )

    def __init__(
        self,
        owner: UdpListener,
        flow: Flow,
        client_addr: ClientAddr,
        sock: socket.socket,
        now: float,
    ) -> None:
        self.owner = owner
        self.flow = flow
        self.client_addr = client_addr
        self.sock = sock
        self.last_active = now
        self.bytes_up = 0
        self.bytes_down = 0
        self.closed = False
        self.queued = False
        self.refused = 0
        self.too_large = 0
        self.truncated = 0
        self.dropped = 0
        self.dropped_text = ""
        self.failure: str | None = None
        self.note: str | None = None

    def on_ready(self, fd: int, mask: int, now: float) -> None:
        if not self.closed:
            self._relay_down(now)

    def progress(self, now: float) -> None:
        """Continue relaying replies after giving other sockets a turn."""
        self.queued = False
        self._relay_down(now)

    def _relay_down(self, now: float) -> None:
        """Relay the upstream's datagrams to the client, up to one turn's worth."""
        owner = self.owner
        worker = owner.worker
        buf = worker.buffer
        view = worker.view
        size = len(buf)
        recv_into = self.sock.recv_into
        sendto = owner.sock.sendto
        client_addr = self.client_addr
        bus = worker.bus
        flow_id = self.flow.id
        for _ in range(_DATAGRAMS_PER_TURN):
            try:
                n = recv_into(buf, size, _TRUNC)
            except BlockingIOError:
                return
            except ConnectionRefusedError:
                # ICMP port unreachable for an earlier datagram: the session goes on.
                self.refused += 1
                continue
            except OSError as exc:
                self.failure = f"receive from {self.flow.server}: {exc.strerror or exc}"
                owner.warn_once("recv-down", self.failure)
                continue
            if self.last_active != now:
                self.last_active = now
                owner.sessions.move_to_end(client_addr)
            if n > size:
                owner.count_truncated(self, n, size)
                continue
            chunk = view[:n]
            try:
                sendto(chunk, client_addr)
            except OSError as exc:
                owner.count_unsent(self, exc, n, Direction.DOWN)
                continue
            self.bytes_down += n
            if bus.wants_data:
                bus.emit(FlowData(flow_id, Direction.DOWN, time.time(), bytes(chunk)))
        if not self.queued:
            self.queued = True
            worker.ready.append(self)

    def problems(self) -> str | None:
        """What went wrong during the session, in one line, or None."""
        parts = []
        if self.note:
            parts.append(self.note)
        if self.refused:
            parts.append(
                f"ICMP port unreachable from {self.flow.server} "
                f"({_plural(self.refused, 'time')}): nothing listened there"
            )
        if self.too_large:
            parts.append(
                f"{_plural(self.too_large, 'datagram')} too large for the other side "
                f"(IPv4 carries at most {MAX_IPV4_PAYLOAD_BYTES} bytes) not relayed"
            )
        if self.truncated:
            parts.append(
                f"{_plural(self.truncated, 'datagram')} larger than the "
                f"{len(self.owner.worker.buffer)}-byte receive buffer not relayed"
            )
        if self.dropped:
            parts.append(f"{_plural(self.dropped, 'datagram')} dropped ({self.dropped_text})")
        if self.failure:
            parts.append(self.failure)
        return "; ".join(parts) or None


class UdpListener:
    """The sessions of one UDP listener, owned by one worker that delivers its socket's events."""

    __slots__ = (
        "_warned",
        "closed",
        "deadline",
        "idle_timeout_s",
        "listener",
        "max_sessions",
        "queued",
        "sessions",
        "sock",
        "stopping",
        "worker",
    )

    def __init__(self, worker: Worker, listener: BoundListener) -> None:
        self.worker = worker
        self.listener = listener
        self.sock = listener.sock
        # Least recently active first: the front is the next to time out or to be evicted.
        self.sessions: collections.OrderedDict[ClientAddr, UdpSession] = collections.OrderedDict()
        self.idle_timeout_s = worker.config.udp_idle_timeout_s
        self.max_sessions = max(1, worker.config.udp_max_sessions)
        self.deadline = math.inf
        self.closed = False
        self.queued = False
        self.stopping = False
        self._warned: set[str] = set()
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _LISTENER_RCVBUF_BYTES)

    # -- events from the worker ------------------------------------------------------------

    def on_ready(self, fd: int, mask: int, now: float) -> None:
        if not self.stopping:
            self._relay_up(now)

    def progress(self, now: float) -> None:
        """Continue reading clients' datagrams after giving other sockets a turn."""
        self.queued = False
        if not self.stopping:
            self._relay_up(now)

    def _relay_up(self, now: float) -> None:
        """Relay clients' datagrams to their sessions' upstream sockets, one turn's worth."""
        worker = self.worker
        buf = worker.buffer
        view = worker.view
        size = len(buf)
        recvfrom_into = self.sock.recvfrom_into
        sessions = self.sessions
        move_to_end = sessions.move_to_end
        bus = worker.bus
        for _ in range(_DATAGRAMS_PER_TURN):
            try:
                n, addr = recvfrom_into(buf, size, _TRUNC)
            except BlockingIOError:
                return
            except OSError as exc:
                self.warn_once("recv-up", f"receive on {self.listener.address}: {exc.strerror}")
                continue
            session = sessions.get(addr)
            if session is None:
                session = self._open(addr, now)
                if session is None:
                    continue
            elif session.last_active != now:
                session.last_active = now
                move_to_end(addr)
            if n > size:
                self.count_truncated(session, n, size)
                continue
            chunk = view[:n]
            try:
                session.sock.send(chunk)
            except ConnectionRefusedError:
                # The error of an earlier datagram's ICMP reply, reported on this send: the
                # kernel cleared it and did not send, so send again once.
                session.refused += 1
                try:
                    session.sock.send(chunk)
                except OSError as exc:
                    self.count_unsent(session, exc, n, Direction.UP)
                    continue
            except OSError as exc:
                self.count_unsent(session, exc, n, Direction.UP)
                continue
            session.bytes_up += n
            if bus.wants_data:
                bus.emit(FlowData(session.flow.id, Direction.UP, time.time(), bytes(chunk)))
        if not self.queued:
            self.queued = True
            worker.ready.append(self)

    def on_deadline(self, now: float) -> None:
        """Close the sessions that have been idle too long (or quiet, once stopping)."""
        if self.stopping:
            idle, reason = _DRAIN_QUIET_S, CloseReason.SHUTDOWN
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

    # -- sessions ---------------------------------------------------------------------------

    def _open(self, addr: ClientAddr, now: float) -> UdpSession | None:
        """A new session for client `addr`, or None if no upstream socket could be made."""
        listener = self.listener
        if len(self.sessions) >= self.max_sessions:
            self.close_session(
                next(iter(self.sessions.values())),
                CloseReason.IDLE_TIMEOUT,
                note=f"closed early: the session limit ({self.max_sessions}) was reached and "
                "this session was the least recently active",
            )
        try:
            sock = socket.socket(listener.upstream_family, socket.SOCK_DGRAM)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE) and self.sessions:
                self.close_session(
                    next(iter(self.sessions.values())),
                    CloseReason.IDLE_TIMEOUT,
                    note=f"closed early: out of file descriptors ({exc.strerror})",
                )
                try:
                    sock = socket.socket(listener.upstream_family, socket.SOCK_DGRAM)
                except OSError as again:
                    exc = again
                else:
                    return self._start(addr, sock, now)
            self.warn_once(
                "socket",
                f"cannot open an upstream socket ({exc.strerror}); datagrams of new clients "
                "are dropped until sessions end (raise the limit with ulimit -n)",
            )
            return None
        return self._start(addr, sock, now)

    def _start(self, addr: ClientAddr, sock: socket.socket, now: float) -> UdpSession | None:
        listener = self.listener
        flow = Flow(
            id=next_flow_id(),
            transport=Transport.UDP,
            client=Address(host=str(addr[0]), port=int(addr[1])),
            server=listener.upstream,
            listener=listener.address,
            started_at=time.time(),
            state=FlowState.OPEN,
        )
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SESSION_RCVBUF_BYTES)
        session = UdpSession(self, flow, addr, sock, now)
        self.worker.bus.emit(FlowOpened(flow))
        err = sock.connect_ex(listener.upstream_sockaddr)  # type: ignore[arg-type]
        if err:
            sock.close()
            session.closed = True
            self.worker.bus.emit(
                FlowClosed(
                    flow.closed(
                        ended_at=time.time(),
                        bytes_up=0,
                        bytes_down=0,
                        reason=CloseReason.ERROR,
                        error=f"connect to {flow.server}: {os.strerror(err)}",
                    )
                )
            )
            return None
        if not self.sessions and self.idle_timeout_s:
            self.deadline = now + self.idle_timeout_s
        self.sessions[addr] = session
        self.worker.watch(sock.fileno(), _SESSION_EVENTS, session)
        return session

    def close_session(
        self, session: UdpSession, reason: CloseReason, *, note: str | None = None
    ) -> None:
        """Close the session's upstream socket and emit its one `FlowClosed`."""
        if session.closed:
            return
        session.closed = True
        if note:
            session.note = note
        del self.sessions[session.client_addr]
        self.worker.unwatch(session.sock.fileno())
        session.sock.close()
        self.worker.bus.emit(
            FlowClosed(
                session.flow.closed(
                    ended_at=time.time(),
                    bytes_up=session.bytes_up,
                    bytes_down=session.bytes_down,
                    reason=reason,
                    error=session.problems(),
                )
            )
        )

    def kill(self, flow_id: int) -> bool:
        """Close the session of flow `flow_id` as killed; False if it is not one of ours."""
        for session in self.sessions.values():
            if session.flow.id == flow_id:
                self.close_session(session, CloseReason.KILLED)
                return True
        return False

    def close_all(self, reason: CloseReason) -> None:
        for session in list(self.sessions.values()):
            self.close_session(session, reason)

    def stop_accepting(self, now: float) -> None:
        """Read no more client datagrams; sessions close once replies stop coming."""
        if self.stopping:
            return
        self.stopping = True
        self.worker.unwatch(self.sock.fileno())
        self.deadline = now

    # -- trouble, counted on the flow and logged once ----------------------------------------

    def count_truncated(self, session: UdpSession, size_bytes: int, buffer_bytes: int) -> None:
        session.truncated += 1
        self.warn_once(
            "truncated",
            f"a datagram of {size_bytes} bytes is larger than the {buffer_bytes}-byte receive "
            "buffer and was not relayed (counted on its flow)",
        )

    def count_unsent(
        self, session: UdpSession, exc: OSError, size_bytes: int, direction: Direction
    ) -> None:
        """Count a datagram the kernel would not send; the session goes on."""
        to = session.flow.server if direction is Direction.UP else session.flow.client
        if exc.errno == errno.EMSGSIZE:
            session.too_large += 1
            self.warn_once(
                "too-large",
                f"a datagram of {size_bytes} bytes is too large to send to {to} and was not "
                f"relayed (IPv4 carries at most {MAX_IPV4_PAYLOAD_BYTES} bytes; counted on "
                "its flow)",
            )
        elif exc.errno in _FULL_ERRORS:
            session.dropped += 1
            session.dropped_text = f"send buffer towards {to} full"
            self.warn_once(
                "full", f"datagrams dropped: send buffer towards {to} full (counted on the flow)"
            )
        elif exc.errno == errno.ECONNREFUSED:
            session.refused += 1
        else:
            session.dropped += 1
            session.dropped_text = f"send to {to}: {exc.strerror or exc}"
            self.warn_once("send", f"datagrams dropped: send to {to}: {exc.strerror or exc}")

    def warn_once(self, kind: str, text: str) -> None:
        """Log `text` the first time trouble of this `kind` happens on this listener."""
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("udp %s: %s (logged once)", self.listener.address, text)
