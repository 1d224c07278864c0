"""The UDP relay: one session per client address, each with its own connected upstream socket.

A `UdpListener` belongs to one relay worker, whose epoll loop delivers the events of the
listening socket and of every session's upstream socket, so a session's events come from one
thread, like a TCP flow's. A session is a `Flow` with transport udp. Each datagram is one
`FlowData`, emitted once the kernel took the datagram, so boundaries are kept and a datagram
that could not be sent is never reported as relayed. A session ends after an idle timeout, when
the session limit needs its place (least recently active first), on kill or at shutdown; what
went wrong meanwhile (ICMP port unreachable, datagrams too large or truncated, full buffers) is
counted, logged once per listener, and told in the flow's `error` when it closes.

Datagrams that arrive back to back from one side of a session are received into consecutive
regions of the worker's buffer, and a run of equal-sized ones leaves in a single `sendmsg`
with UDP generic segmentation offload (`UDP_SEGMENT`, Linux 4.18+): the kernel still sends
them as separate datagrams of the same sizes, but the relay pays for one system call and one
route lookup per run, which about halves its CPU time per datagram in bursts (see
benchmarks/udp.py). Only the first datagram of a run leaves ahead of it, on its own, so that a
peer asleep in a receive wakes sooner (request/response in windows ran a third faster so).
Where segmentation is refused (a segment larger than the path MTU allows), the run goes out
datagram by datagram.

The other way round, each socket asks for receive coalescing (`UDP_GRO`, Linux 5.0+): a run a
peer sent with segmentation offload (as QUIC stacks do) reaches the relay in one receive, with
its segment size in a control message, and leaves again as one run. The relay still records,
counts and reports each datagram of it on its own, a shorter last one included.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import FlowtapError
from .flow import (
    Address,
    CloseReason,
    Direction,
    Flow,
    FlowClosed,
    FlowOpened,
    FlowState,
    Transport,
    next_flow_id,
)
from .udp_sessions import Session, UdpSessions

if TYPE_CHECKING:
    from .listener import BoundListener, ListenerSpec
    from .worker import Worker

log = logging.getLogger(__name__)

MAX_IPV4_PAYLOAD_BYTES = 65_507
"""The largest UDP payload IPv4 can carry (IPv6 carries up to 65,527 without jumbograms)."""

# How many datagrams one socket may move before other sockets get a turn.
_DATAGRAMS_PER_TURN = 64
# Receive buffers: the listener absorbs bursts from all clients; the kernel caps the request
# at net.core.rmem_max, and it is a limit, not an allocation.
_LISTENER_RCVBUF_BYTES = 4 << 20
_SESSION_RCVBUF_BYTES = 1 << 20
_SESSION_EVENTS = select.EPOLLIN | select.EPOLLET  # EPOLLERR (ICMP errors) always arrives
_TRUNC = socket.MSG_TRUNC
_FULL_ERRORS = (errno.EAGAIN, errno.ENOBUFS)
# The largest datagram a socket can return (IPv6 without jumbograms carries 65,527 bytes):
# a receive starts only where at least this much of the buffer is free.
_MAX_DATAGRAM_BYTES = 65_535
# Segmentation offload: at most 64 segments (UDP_MAX_SEGMENTS) and one IP packet's worth.
_SOL_UDP = 17
_UDP_SEGMENT = 103
_GSO_MAX_SEGMENTS = 64
_GSO_MAX_BYTES = 65_000
_GSO_REFUSED = (errno.EINVAL, errno.EIO, errno.EMSGSIZE, errno.ENOPROTOOPT, errno.EOPNOTSUPP)
_U16 = struct.Struct("=H")
# Receive coalescing (`UDP_GRO`, Linux 5.0+): a run a peer sent with segmentation offload
# arrives in one receive, with the segment size in a control message.
_UDP_GRO = 104
_GRO_ANCBUF = socket.CMSG_SPACE(4)

ClientAddr = tuple[Any, ...]
"""A client's socket address as `recvfrom` returns it: the key of its session."""


def check_spec(spec: ListenerSpec) -> None:
    """Raise FlowtapError if `spec` is a UDP listener flowtap cannot relay."""
    if spec.upstream is None:
        raise FlowtapError(
            f"UDP listener {spec.listen} needs an --upstream: proxy modes take TCP clients "
            "(SOCKS5 clients reach UDP through UDP ASSOCIATE)"
        )
    if spec.listen.is_unix or spec.upstream.is_unix:
        raise FlowtapError(
            f"UDP over unix sockets is not supported ({spec.listen} -> {spec.upstream}): "
            "give IP addresses with --udp, or drop --udp for a unix stream socket"
        )


def _coalesced(n: int, ancillary: list[tuple[int, int, bytes]]) -> tuple[int, int]:
    """(segment size, datagrams) of a receive of `n` bytes with these control messages."""
    for level, kind, data in ancillary:
        if level == _SOL_UDP and kind == _UDP_GRO and len(data) >= 4:
            segment = int.from_bytes(data[:4], sys.byteorder)
            if 0 < segment < n:
                return segment, -(-n // segment)
    return n, 1


def _want_coalesced(sock: socket.socket) -> None:
    """Have the kernel deliver runs sent with segmentation offload whole, where it can."""
    with contextlib.suppress(OSError):
        sock.setsockopt(_SOL_UDP, _UDP_GRO, 1)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


@dataclass(slots=True, eq=False, kw_only=True)
class UdpSession(Session):
    """One client address of a UDP listener, with its connected upstream socket."""

    owner: UdpListener
    client_addr: ClientAddr
    sock: socket.socket
    sparse: bool = field(default=True, init=False)
    # What went wrong, counted as it happens and told when the session closes (`problems`).
    refused: int = field(default=0, init=False)
    too_large: int = field(default=0, init=False)
    truncated: int = field(default=0, init=False)
    dropped: int = field(default=0, init=False)
    dropped_text: str = field(default="", init=False)
    failure: str | None = field(default=None, init=False)
    note: str | None = field(default=None, init=False)

    def on_ready(self, fd: int, mask: int, now: float) -> None:
        if not self.closed:
            self._relay_down(now)

    def progress(self, now: float) -> None:
        """Continue relaying replies after giving other sockets a turn."""
        self.queued = False
        self._relay_down(now)

    def _relay_down(self, now: float) -> None:
        """Relay the upstream's datagrams to the client, up to one turn's worth."""
        self.owner.relay_turn(self, now)

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


class UdpListener(UdpSessions[ClientAddr, "UdpSession"]):
    """The sessions of one UDP listener, owned by one worker that delivers its socket's events."""

    __slots__ = (
        "_warned",
        "gso_max_segment_bytes",
        "listener",
        "sparse",
    )

    def __init__(self, worker: Worker, listener: BoundListener) -> None:
        super().__init__(worker, listener.sock)
        self.listener = listener
        self.sparse = True
        # Runs of datagrams up to this size leave in one segmentation-offload send.
        self.gso_max_segment_bytes = _MAX_DATAGRAM_BYTES
        self._warned: set[str] = set()
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _LISTENER_RCVBUF_BYTES)
        _want_coalesced(self.sock)
        self.watch()

    # -- events from the worker ------------------------------------------------------------

    def _relay_up(self, now: float) -> None:
        """Relay clients' datagrams to their sessions' upstream sockets, one turn's worth."""
        self.relay_turn(None, now)

    def relay_turn(self, upstream_of: UdpSession | None, now: float) -> None:
        """Relay one turn's worth of datagrams read from one socket, merged into runs: the
        listener's (`upstream_of` None: clients' datagrams up to their sessions) or a
        session's upstream socket (its replies down to its client)."""
        reader: UdpSession | UdpListener = self if upstream_of is None else upstream_of
        direction = Direction.UP if upstream_of is None else Direction.DOWN
        worker = self.worker
        view = worker.view
        size = len(view)
        refill_at = size - _MAX_DATAGRAM_BYTES
        recvmsg_into = reader.sock.recvmsg_into
        sessions = self.sessions
        move_to_end = sessions.move_to_end
        gso_max = self.gso_max_segment_bytes
        send_run = self.send_run
        # The run waiting to be sent: `count` datagrams of `segment` bytes of session `run`
        # (the last one may be shorter, as in a coalesced receive), the buffer's [start, end).
        # `got`: datagrams received this turn; when the last turn had one at most
        # (request/response traffic), the first leaves before trying another receive that
        # would delay it.
        run: UdpSession | None = None
        start = end = segment = count = got = 0
        sparse = reader.sparse
        for _ in range(_DATAGRAMS_PER_TURN):
            if end > refill_at:
                if run is not None:
                    send_run(run, direction, start, end, segment, count)
                    run = None
                end = 0
            try:
                n, ancillary, _flags, addr = recvmsg_into([view[end:]], _GRO_ANCBUF, _TRUNC)
            except BlockingIOError:
                break
            except OSError as exc:
                if upstream_of is None:
                    text = f"receive on {self.listener.address}: {exc.strerror}"
                    self.warn_once("recv-up", text)
                elif isinstance(exc, ConnectionRefusedError):
                    # ICMP port unreachable for an earlier datagram: the session goes on.
                    upstream_of.refused += 1
                else:
                    upstream_of.failure = (
                        f"receive from {upstream_of.flow.server}: {exc.strerror or exc}"
                    )
                    self.warn_once("recv-down", upstream_of.failure)
                continue
            got += 1
            if upstream_of is None:
                session = sessions.get(addr)
                if session is None:
                    if run is not None:  # opening may close a session: send what waits first
                        send_run(run, direction, start, end, segment, count)
                        run = None
                    session = self._open(addr, now)
                    if session is None:
                        continue
                elif session.last_active != now:
                    session.last_active = now
                    move_to_end(addr)
            else:
                session = upstream_of
                if session.last_active != now:
                    session.last_active = now
                    move_to_end(session.client_addr)
            if n > size - end:
                self.count_truncated(session, n, size - end)
                continue
            seg, k = _coalesced(n, ancillary) if ancillary else (n, 1)
            if run is not None and not (
                session is run
                and seg == segment
                and end - start == count * segment
                and count + k <= _GSO_MAX_SEGMENTS
                and end - start + n <= _GSO_MAX_BYTES
            ):
                send_run(run, direction, start, end, segment, count)
                run = None
            if run is None:
                run, start, segment, count = session, end, seg, 0
            count += k
            end += n
            # A coalesced receive leaves at once too: its sender batched already.
            if k > 1 or (sparse and got == 1) or not 0 < seg <= gso_max:
                send_run(run, direction, start, end, segment, count)
                run = None
        else:
            if not reader.queued:
                reader.queued = True
                worker.ready.append(reader)
        reader.sparse = got <= 1
        if run is not None:
            send_run(run, direction, start, end, segment, count)

    def send_run(
        self,
        session: UdpSession,
        direction: Direction,
        start: int,
        end: int,
        segment: int,
        count: int,
    ) -> None:
        """Send `count` datagrams of `segment` bytes, the buffer's [start, end).

        The last datagram may be shorter than `segment`, as in a coalesced receive. The first
        datagram leaves on its own and the rest in one call: a peer asleep in a receive is
        woken by the small send, and starts on it while the kernel copies the others.
        """
        if count > 1:
            if segment > self.gso_max_segment_bytes:
                self._send_one_by_one(session, direction, start, end, segment)
                return
            self.send_run(session, direction, start, start + segment, segment, 1)
            start += segment
            count -= 1
        chunk = self.worker.view[start:end]
        up = direction is Direction.UP
        try:
            self._send(session, up, chunk, segment, count)
        except ConnectionRefusedError:
            # The error of an earlier datagram's ICMP reply, reported on this send: the
            # kernel cleared it and sent nothing, so send again once.
            session.refused += 1
            try:
                self._send(session, up, chunk, segment, count)
            except OSError as exc:
                self._send_failed(session, direction, exc, start, end, segment, count)
                return
        except OSError as exc:
            self._send_failed(session, direction, exc, start, end, segment, count)
            return
        if up:
            session.bytes_up += end - start
        else:
            session.bytes_down += end - start
        bus = self.worker.bus
        if session.wants(bus, direction):
            timestamp = time.time()
            if count == 1:
                session.emit(bus, direction, timestamp, bytes(chunk))
            else:
                for offset in range(0, end - start, segment):
                    session.emit(bus, direction, timestamp, bytes(chunk[offset : offset + segment]))

    def _send_one_by_one(
        self, session: UdpSession, direction: Direction, start: int, end: int, segment: int
    ) -> None:
        for offset in range(start, end, segment):
            self.send_run(session, direction, offset, min(offset + segment, end), segment, 1)

    def _send(
        self, session: UdpSession, up: bool, chunk: memoryview, segment: int, count: int
    ) -> None:
        if count == 1:
            if up:
                session.sock.send(chunk)
            else:
                self.sock.sendto(chunk, session.client_addr)
            return
        ancillary = [(_SOL_UDP, _UDP_SEGMENT, _U16.pack(segment))]
        if up:
            session.sock.sendmsg([chunk], ancillary)
        else:
            self.sock.sendmsg([chunk], ancillary, 0, session.client_addr)

    def _send_failed(
        self,
        session: UdpSession,
        direction: Direction,
        exc: OSError,
        start: int,
        end: int,
        segment: int,
        count: int,
    ) -> None:
        if count > 1 and exc.errno in _GSO_REFUSED:
            # Segmentation refused (e.g. segments above the path MTU): batch only smaller
            # segments from now on, and send this run datagram by datagram.
            self.gso_max_segment_bytes = min(self.gso_max_segment_bytes, segment - 1)
            self._send_one_by_one(session, direction, start, end, segment)
            return
        self.count_unsent(session, exc, end - start if count == 1 else segment, direction, count)

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
        upstream = listener.upstream
        assert upstream is not None, "check_spec refuses UDP listeners without an upstream"
        flow = Flow(
            id=next_flow_id(),
            transport=Transport.UDP,
            client=Address(host=str(addr[0]), port=int(addr[1])),
            server=upstream,
            listener=listener.address,
            started_at=time.time(),
            state=FlowState.OPEN,
        )
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SESSION_RCVBUF_BYTES)
        _want_coalesced(sock)
        session = UdpSession(flow=flow, last_active=now, owner=self, client_addr=addr, sock=sock)
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
        self.add_session(addr, session)
        self.worker.watch(sock.fileno(), _SESSION_EVENTS, session)
        return session

    def _forget(self, session: UdpSession, note: str | None) -> str | None:
        if note:
            session.note = note
        del self.sessions[session.client_addr]
        self.worker.unwatch(session.sock.fileno())
        session.sock.close()
        return session.problems()

    # -- trouble, counted on the flow and logged once ----------------------------------------

    def count_truncated(self, session: UdpSession, size_bytes: int, buffer_bytes: int) -> None:
        session.truncated += 1
        self.warn_once(
            "truncated",
            f"a datagram of {size_bytes} bytes is larger than the {buffer_bytes}-byte receive "
            "buffer and was not relayed (counted on its flow)",
        )

    def count_unsent(
        self,
        session: UdpSession,
        exc: OSError,
        size_bytes: int,
        direction: Direction,
        count: int = 1,
    ) -> None:
        """Count `count` datagrams the kernel would not send; the session goes on."""
        to = session.flow.server if direction is Direction.UP else session.flow.client
        if exc.errno == errno.EMSGSIZE:
            session.too_large += count
            self.warn_once(
                "too-large",
                f"a datagram of {size_bytes} bytes is too large to send to {to} and was not "
                f"relayed (IPv4 carries at most {MAX_IPV4_PAYLOAD_BYTES} bytes; counted on "
                "its flow)",
            )
        elif exc.errno in _FULL_ERRORS:
            session.dropped += count
            session.dropped_text = f"send buffer towards {to} full"
            self.warn_once(
                "full", f"datagrams dropped: send buffer towards {to} full (counted on the flow)"
            )
        elif exc.errno == errno.ECONNREFUSED:
            session.refused += 1
            session.dropped += count
            session.dropped_text = f"{session.flow.server} refused them"
        else:
            session.dropped += count
            session.dropped_text = f"send to {to}: {exc.strerror or exc}"
            self.warn_once("send", f"datagrams dropped: send to {to}: {exc.strerror or exc}")

    def warn_once(self, kind: str, text: str) -> None:
        """Log `text` the first time trouble of this `kind` happens on this listener."""
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("udp %s: %s (logged once)", self.listener.address, text)
