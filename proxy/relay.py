"""The TCP relay, and the `Relay` that runs TCP and UDP listeners on its worker threads.

Every flow lives on one worker (see `worker.py`) from accept to close, so a flow's events are
emitted in order from one thread. A worker owns one receive buffer; a chunk is copied at most
once, for the observers, and only when an observer wants data; when the only one that does
is a `ChunkSink` (the capture), chunks are received straight into its memory and sent from
there. A destination that cannot take more stops its source from being read (backpressure),
so a stalled peer costs at most one chunk.
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import functools
import logging
import math
import os
import resource
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .errors import FlowtapError, log_failure
from .events import Bus, Loan
from .flow import (
    Address,
    CloseReason,
    Direction,
    Flow,
    FlowData,
    FlowOpened,
    Requested,
    TlsFacts,
    Transport,
    next_flow_id,
)
from .handshake import Failure, UpstreamRewriter
from .http_proxy import DecidedTunnel, match_plain_connect
from .listener import BoundListener, ListenerSpec, bind, bound_address, resolve
from .modes import (
    FLOW_EVENTS,
    HANDSHAKE_READ_BYTES,
    Destination,
    HandshakePhase,
    Prelude,
    Resolver,
    destination_of,
    literal_destination,
    literal_target,
    read_original_destination,
    transparent_target,
)
from .policy import Mode, ProxyPolicy
from .socks_udp import UdpAssociation
from .transparent_udp import TransparentUdpListener, prepare_listener
from .udp import UdpListener, check_spec
from .udp_sessions import DatagramFlow
from .worker import Deadlines, RelayConfig, Worker

if TYPE_CHECKING:
    # Imported when a flow first needs TLS: cryptography and ssl cost ~60 ms of start-up.
    from .tls_relay import TlsTcpFlow

__all__ = ["BoundListener", "Relay", "RelayConfig", "raise_fd_limit"]

log = logging.getLogger(__name__)

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_ERR = select.EPOLLERR
_HUP = select.EPOLLHUP
_ET = select.EPOLLET
_RDHUP = select.EPOLLRDHUP
_FLOW_EVENTS = FLOW_EVENTS
_LINGER_RESET = struct.pack("ii", 1, 0)
_NONBLOCKING_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
# The socket type's own close: socket.socket.close adds two Python calls to it, and a flow's
# sockets are never used again once closed (nor made into files).
_close_socket = _socket.socket.close
# Enum members as module names for the per-connection path: looked up on its class, a
# member costs ~0.2 us in Python 3.11 (a Python-level descriptor), a module global a tenth.
_UP = Direction.UP
_DOWN = Direction.DOWN
_TCP = Transport.TCP
_TRANSPARENT = Mode.TRANSPARENT
_HTTP = Mode.HTTP
# The handshake of every CONNECT decided on the short path (it keeps no state).
_TUNNEL = DecidedTunnel()
_CLIENT_CLOSED = CloseReason.CLIENT_CLOSED
_SERVER_CLOSED = CloseReason.SERVER_CLOSED
# How many chunks one direction may move before other flows get a turn.
_CHUNKS_PER_TURN = 8
# After a chunk smaller than this, a flow direction receives its next chunk into the worker's
# buffer and copies it to a sink once sent: setting up a receive in place costs a round trip
# more than the copy of a small chunk does, off its path. After a larger one, it receives in
# place (no copy of bulk data).
_SMALL_CHUNK = 16 * 1024
_RESET_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
# Destinations of proxy-mode clients whose checks are kept, at most (then forgotten at once).
_TARGETS_KEPT = 4096
# After running out of descriptors, accepting resumes this long after (or when a flow closes).
_ACCEPT_PAUSE_S = 0.1


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard limit, as servers do; return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            return soft
    return soft


def _sockaddr_address(family: int, sockaddr: object, fallback: Address) -> Address:
    if family == socket.AF_UNIX:
        return fallback
    assert isinstance(sockaddr, tuple)
    return Address(host=str(sockaddr[0]), port=int(sockaddr[1]))


def _reset_and_close(sock: socket.socket) -> None:
    """Close so that the peer sees a TCP RST rather than a FIN."""
    try:
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    sock.close()


# Running out of descriptors is said once per process, whichever worker meets it first.
_emfile_warned = threading.Event()


class _SideReset(Exception):
    """A socket of the flow failed; `is_client` says which side."""

    def __init__(self, is_client: bool, text: str) -> None:
        super().__init__(text)
        self.is_client = is_client


class _Pipe:
    """One direction of a TCP flow: bytes read from `src` and written to `dst`."""

    __slots__ = (
        "count",
        "direction",
        "dst",
        "dst_is_client",
        "eof",
        "peer_closed",
        "pending",
        "readable",
        "shut",
        "small",
        "src",
        "wants_data",
        "writable",
    )

    def __init__(self, src: socket.socket, dst: socket.socket, direction: Direction) -> None:
        self.src = src
        self.dst = dst
        self.direction = direction
        self.dst_is_client = direction is _DOWN
        self.pending: memoryview | None = None
        self.readable = True
        self.writable = True
        self.eof = False
        self.peer_closed = False
        self.shut = False
        self.count = 0
        self.wants_data = True
        # Whether the last chunk was small: the next is copied to a sink after its send.
        self.small = True


def _failure(exc: OSError) -> str:
    """The reason a flow's failed receive or send gives: the system's words, else `reset` for
    a reset."""
    return exc.strerror or ("reset" if isinstance(exc, _RESET_ERRORS) else str(exc))


def _send(pipe: _Pipe, data: memoryview | list[memoryview]) -> int:
    """Send what `pipe.dst` takes now (a list in one `sendmsg`); its failure is a _SideReset."""
    try:
        return pipe.dst.sendmsg(data) if isinstance(data, list) else pipe.dst.send(data)
    except BlockingIOError:
        return 0
    except OSError as exc:
        raise _SideReset(pipe.dst_is_client, _failure(exc)) from None


def _recv(pipe: _Pipe, size: int) -> bytes | None:
    """Read what `pipe.src` has now (empty at its end, None if nothing waits); its failure is
    a _SideReset."""
    try:
        return pipe.src.recv(size)
    except BlockingIOError:
        return None
    except OSError as exc:
        raise _SideReset(not pipe.dst_is_client, _failure(exc)) from None


class _TcpFlow:
    """A TCP flow owned by one worker: connect upstream, relay both ways, close exactly once."""

    is_tls = False
    tls_facts: TlsFacts | None = None
    # Whether the client's bytes go up as they are (not rewritten), so that an event may
    # relay them on the short path of `on_ready`.
    relays_up_as_is = True

    __slots__ = (
        "client",
        "client_fd",
        "closed",
        "connecting",
        "down",
        "first_eof",
        "flow",
        "last_active",
        "owner",
        "prelude",
        "queued",
        "server",
        "up",
        "worker",
    )

    def __init__(
        self, owner: _TcpFlows, flow: Flow, client: socket.socket, server: socket.socket
    ) -> None:
        self.owner = owner
        self.worker = owner.worker
        self.flow = flow
        self.client = client
        self.client_fd = client.fileno()
        self.server = server
        self.up = _Pipe(client, server, _UP)
        self.down = _Pipe(server, client, _DOWN)
        self.connecting = True
        self.closed = False
        self.queued = False
        self.first_eof: CloseReason | None = None
        self.last_active = time.monotonic()
        # A proxy-mode flow's handshake reply and the client's early bytes, owed on connect.
        self.prelude: Prelude | None = None

    # -- events from the worker ------------------------------------------------------------

    def on_ready(self, fd: int, mask: int, now: float) -> None:
        if self.closed:
            return
        if self.connecting:
            if fd == self.server.fileno():
                self.owner.finish_connect(self, mask)
            elif mask & (_IN | _HUP | _ERR | _RDHUP):
                # The client spoke (or left) while the upstream connects: read it once connected.
                self.up.readable = True
                if mask & (_RDHUP | _HUP):
                    self.up.peer_closed = True
            return
        is_client = fd == self.client_fd
        reading, writing = (self.up, self.down) if is_client else (self.down, self.up)
        if mask == _OUT and writing.pending is None:
            # Room to send and nothing waiting to go (an ACK of what went): nothing to do.
            writing.writable = True
            return
        if (
            (mask == _IN or mask == _IN | _OUT)
            and reading.pending is None
            and writing.pending is None
            and not reading.eof
            and not reading.peer_closed
            and (reading.small or self.worker.bus.sink is None)
            and (self.relays_up_as_is or not is_client)
        ):
            # The common event of a flow in full swing (a request, an answer): bytes to
            # relay one way and nothing else to do, relayed here without the general path's
            # calls (a round trip through the relay is two of these). A capture's sink
            # receives big chunks in place, which the general path does.
            if mask & _OUT:
                writing.writable = True
            self._relay_once(reading, is_client, now)
            return
        if mask & _ERR and reading.eof:
            # Nothing is left to read from this side, so no read will report its error. While
            # something is, reading goes on: bytes that came before a reset are queued ahead of
            # it, and the read after them raises the reset.
            sock = self.client if is_client else self.server
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._reset(is_client, os.strerror(err))
                return
        if mask & (_IN | _HUP | _ERR | _RDHUP):
            reading.readable = True
            if mask & (_RDHUP | _HUP):
                reading.peer_closed = True
        if mask & _OUT:
            writing.writable = True
        self.progress(now)

    def _relay_once(self, pipe: _Pipe, is_client: bool, now: float) -> None:
        """Relay one read of `pipe` (nothing pending either way; a capture's sink, if any,
        takes it as a small chunk) and hand it to observers that want it; what is not simple
        (an end, a full buffer, a short send) goes on by the general path."""
        worker = self.worker
        buf = worker.buffer
        pipe.readable = True
        try:
            n = pipe.src.recv_into(buf)
        except BlockingIOError:
            pipe.readable = False
            return
        except OSError as exc:
            self._reset(is_client, _failure(exc))
            return
        if n == 0:
            pipe.eof = True
            if self.first_eof is None:
                self.first_eof = _CLIENT_CLOSED if is_client else _SERVER_CLOSED
            self.progress(now)
            return
        self.last_active = now
        pipe.count += n
        chunk = worker.view[:n]
        bus = worker.bus
        observed = bus.wants_data and pipe.wants_data
        timestamp_ns = time.time_ns() if observed else 0
        failed: OSError | None = None
        try:
            sent = pipe.dst.send(chunk)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            sent, failed = 0, exc
        if observed:
            # As the general path does: observers get the chunk once it is on its way,
            # whatever the send did, and before a reset it caused closes the flow.
            sink = bus.sink
            if sink is not None:
                pipe.small = n < _SMALL_CHUNK
                sink.record(self.flow.id, pipe.direction, timestamp_ns, chunk)
            else:
                event = FlowData(self.flow.id, pipe.direction, timestamp_ns / 1e9, bytes(chunk))
                pipe.wants_data = bus.emit_data(event)
        if failed is not None:
            self._reset(not is_client, _failure(failed))
            return
        if sent < n:
            pipe.pending = memoryview(bytes(chunk[sent:]))
            pipe.writable = False
        elif n == len(buf):
            self.progress(now)  # more may be waiting: read on, a turn at a time
        else:
            pipe.readable = False

    def progress(self, now: float) -> None:
        """Move whatever bytes can move now, in both directions."""
        self.queued = False
        up = self.up
        down = self.down
        again = False
        try:
            # A direction with nothing to read, send or pass on is not pumped at all: most
            # events concern one direction (and a pump call is most of what one costs).
            if up.pending is not None or ((up.readable or up.eof) and not up.shut):
                again = self._pump(up, now)
            if down.pending is not None or ((down.readable or down.eof) and not down.shut):
                again = self._pump(down, now) or again
        except _SideReset as exc:
            self._reset(exc.is_client, str(exc))
            return
        if up.shut and down.shut:
            self.owner.close_flow(self, self.first_eof or CloseReason.CLIENT_CLOSED)
        elif again and not self.queued:
            self.queued = True
            self.worker.ready.append(self)

    def _sent_pending(self, pipe: _Pipe) -> bool:
        """Send what waits from the last turn, if the destination takes it; True once all is
        sent (the direction may then read again)."""
        if not pipe.writable:
            return False
        self._flush(pipe)
        return pipe.pending is None

    def _pump(self, pipe: _Pipe, now: float) -> bool:
        """Relay one direction; return True if it stopped only to let other flows run."""
        if pipe.pending is not None and not self._sent_pending(pipe):
            return False
        if not pipe.readable or pipe.eof:
            if pipe.eof and pipe.pending is None and not pipe.shut:
                self._shut(pipe)
            return False
        worker = self.worker
        buf = worker.buffer
        view = worker.view
        size = len(buf)
        src = pipe.src
        bus = worker.bus
        wants_data = bus.wants_data
        sink = bus.sink
        data = b""
        parts: list[memoryview] = []
        loan: Loan | None = None
        asked = size
        turns = 0
        while pipe.readable and not pipe.eof:
            if turns == _CHUNKS_PER_TURN:
                return True
            turns += 1
            # Observers may stop wanting a flow direction's data (a display past its cap).
            copying = wants_data and pipe.wants_data
            in_place = copying and sink is not None and not pipe.small
            try:
                if in_place and sink is not None:
                    # Received into the sink's memory (the capture's file buffer): no copy.
                    n, parts, loan, asked = sink.receive(self.flow.id, pipe.direction, src, size)
                elif copying and sink is None:
                    # Into the reusable buffer, then one copy of what came for observers to
                    # keep: recv(size) would allocate the full size per chunk (at 256 KiB,
                    # an mmap and munmap): 34 us against 4 us for a 1-byte chunk here.
                    n = src.recv_into(buf)
                    data = bytes(view[:n])
                else:
                    n = src.recv_into(buf)
            except BlockingIOError:
                pipe.readable = False
                break
            except OSError as exc:
                raise _SideReset(not pipe.dst_is_client, _failure(exc)) from None
            if n == 0:
                pipe.eof = True
                if self.first_eof is None:
                    self.first_eof = _SERVER_CLOSED if pipe.dst_is_client else _CLIENT_CLOSED
                break
            if n < asked and not pipe.peer_closed:
                # Edge-triggered epoll reports any later arrival as a new event; a FIN that
                # came with this data was flagged by EPOLLRDHUP, so the loop reads on to it.
                pipe.readable = False
            self.last_active = now
            pipe.count += n
            if in_place:
                pipe.small = n < _SMALL_CHUNK
                try:
                    if not self._send_parts(pipe, parts, n):
                        return False
                finally:
                    if loan is not None:
                        loan.release()
                continue
            if copying and sink is not None:
                pipe.small = n < _SMALL_CHUNK
                timestamp_ns = time.time_ns()
                chunk = view[:n]
                try:
                    sent = _send(pipe, chunk)
                finally:
                    sink.record(self.flow.id, pipe.direction, timestamp_ns, chunk)
                if sent < n:
                    pipe.pending = memoryview(bytes(chunk[sent:]))
                    pipe.writable = False
                    return False
                continue
            if copying:
                timestamp = time.time()
                chunk = memoryview(data)
                try:
                    sent = _send(pipe, chunk)
                finally:
                    # Observers get the chunk once it is on its way, whatever the send did:
                    # their work (a viewer's copy, say) is then off the round trip's path.
                    event = FlowData(self.flow.id, pipe.direction, timestamp, data)
                    pipe.wants_data = bus.emit_data(event)
            else:
                chunk = view[:n]
                sent = _send(pipe, chunk)
            if sent < n:
                pipe.pending = memoryview(bytes(chunk[sent:])) if chunk.obj is buf else chunk[sent:]
                pipe.writable = False
                return False
        if pipe.eof and pipe.pending is None and not pipe.shut:
            self._shut(pipe)
        return False

    def _shut(self, pipe: _Pipe) -> None:
        """Pass on the end of one direction, all of it sent: a FIN to its destination. When
        the other direction has ended too, the flow closes both sockets next, and a close
        sends that FIN (nothing is left unread on either), so no shutdown is needed."""
        pipe.shut = True
        if (self.down if pipe is self.up else self.up).shut:
            return
        try:
            pipe.dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise _SideReset(pipe.dst_is_client, exc.strerror or str(exc)) from None

    def _send_parts(self, pipe: _Pipe, parts: list[memoryview], size: int) -> bool:
        """Send a chunk held in parts; False if some is left pending (copied, so the parts'
        memory can go back to its owner)."""
        sent = _send(pipe, parts[0]) if len(parts) == 1 else _send(pipe, parts)
        if sent == size:
            return True
        rest = bytearray()
        for part in parts:
            if sent >= len(part):
                sent -= len(part)
                continue
            rest += part[sent:]
            sent = 0
        pipe.pending = memoryview(bytes(rest))
        pipe.writable = False
        return False

    def _flush(self, pipe: _Pipe) -> None:
        pending = pipe.pending
        assert pending is not None
        sent = _send(pipe, pending)
        if sent == len(pending):
            pipe.pending = None
        else:
            pipe.pending = pending[sent:]
            pipe.writable = False

    def _reset(self, is_client: bool, text: str) -> None:
        reason = CloseReason.CLIENT_RESET if is_client else CloseReason.SERVER_RESET
        self.owner.close_flow(self, reason, reset=True, error=text)


class _RewritingFlow(_TcpFlow):
    """A TCP flow whose client bytes are rewritten on their way up (an HTTP proxy's
    forwarded requests); the other direction, and every reverse-mode flow, relay as is."""

    __slots__ = ("rewriter",)
    relays_up_as_is = False

    def __init__(
        self,
        owner: _TcpFlows,
        flow: Flow,
        client: socket.socket,
        server: socket.socket,
        rewriter: UpstreamRewriter,
    ) -> None:
        super().__init__(owner, flow, client, server)
        self.rewriter = rewriter

    def _pump(self, pipe: _Pipe, now: float) -> bool:
        if pipe is self.down:
            return _TcpFlow._pump(self, pipe, now)
        if pipe.pending is not None and not self._sent_pending(pipe):
            return False
        rewriter = self.rewriter
        bus = self.worker.bus
        size = len(self.worker.buffer)
        while pipe.readable and not pipe.eof:
            data = _recv(pipe, size)
            if data is None:
                pipe.readable = False
                break
            if not data:
                pipe.eof = True
                if self.first_eof is None:
                    self.first_eof = CloseReason.CLIENT_CLOSED
                break
            self.last_active = now
            out = rewriter.feed(data)
            if rewriter.stop_reason is not None:
                # Nothing more may go to this server: end its side as if the client had.
                log.info(
                    "flow %d: %s; ending the upstream side", self.flow.id, rewriter.stop_reason
                )
                pipe.eof = True
                if self.first_eof is None:
                    self.first_eof = CloseReason.CLIENT_CLOSED
            if not out:
                continue
            pipe.count += len(out)
            if bus.wants_data and pipe.wants_data:
                pipe.wants_data = bus.emit_data(
                    FlowData(self.flow.id, Direction.UP, time.time(), out)
                )
            sent = _send(pipe, memoryview(out))
            if sent < len(out):
                pipe.pending = memoryview(out)[sent:]
                pipe.writable = False
                return False
        if pipe.eof and pipe.pending is None and not pipe.shut:
            self._shut(pipe)
        return False


def _clients_waiting(sock: socket.socket) -> int:
    """How many clients a listening TCP socket holds ready to accept (TCP_INFO's `unacked`
    counts a listener's accept queue: what `ss -l` shows as Recv-Q), or a batch's worth if
    the system does not say."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_UNACKED_END)
    except OSError:
        return _ACCEPT_BATCH
    return int.from_bytes(info[_TCP_INFO_UNACKED_END - 4 : _TCP_INFO_UNACKED_END], sys.byteorder)


# struct tcp_info (linux/tcp.h): eight one-byte fields, then rto, ato, snd_mss, rcv_mss and
# unacked, four bytes each.
_TCP_INFO_UNACKED_END = 28
# Clients accepted at most in one go (more wait for the next poll).
_ACCEPT_BATCH = 64


class _Accepter:
    """Accepts clients of one listener on behalf of one worker's TCP flows."""

    __slots__ = ("family", "listener", "owner")

    def __init__(self, owner: _TcpFlows, listener: BoundListener) -> None:
        self.owner = owner
        self.listener = listener
        self.family = int(listener.sock.family)

    def on_ready(self, fd: int, mask: int, now: float) -> None:
        # Every client waiting, in one go: one left for the next poll would wait behind the
        # events of that poll's batch (measured: -20 % new connections/s with 4 clients).
        # A TCP listener says how many wait, so that many are accepted and no accept is
        # spent to meet EAGAIN: the exception it raises makes it cost 3.3 us here against
        # 0.7 for asking (at least one is taken: epoll said one is there; a unix listener is
        # accepted from until EAGAIN).
        # `socket.accept` makes enums of the listener's family and type for every client (a
        # tenth of what accepting costs here); the socket is made from them as numbers.
        sock = self.listener.sock
        owner = self.owner
        family = self.family
        make = socket.socket
        waiting = _ACCEPT_BATCH
        if family != socket.AF_UNIX:
            waiting = min(_ACCEPT_BATCH, max(1, _clients_waiting(sock)))
        for _ in range(waiting):
            try:
                fd, addr = sock._accept()  # type: ignore[attr-defined]
                client = make(family, socket.SOCK_STREAM, 0, fd)
            except BlockingIOError:
                return
            except (InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    owner.pause_accepting(exc)
                    return
                if not owner.worker.stopping:
                    log.warning("accept on %s failed: %s", self.listener.address, exc.strerror)
                return
            owner.accepted(self.listener, client, addr)


class _TcpFlows:
    """A worker's TCP flows, accepted on the TCP listeners it shares with the other workers.

    A flow is opened in two steps: `accepted` makes the `Flow` of a client, and
    `connect_upstream` connects it to the upstream its listener names. A listener that learns
    its upstream from the client (SOCKS5, HTTP CONNECT, transparent) has a `HandshakePhase`
    find it first (reading the client, with a deadline), then connects the same way; the
    common cases it decides at accept itself (`_start_proxy_flow`).
    """

    __slots__ = (
        "_accept_resume_at",
        "_accepters",
        "_connect_targets",
        "_connects",
        "_handshakes",
        "_idle_scan_s",
        "_literal_targets",
        "_next_idle_scan",
        "_transparent_targets",
        "bus",
        "config",
        "datagram_flows",
        "deadline",
        "flows",
        "proxied",
        "ready",
        "resolver",
        "worker",
    )

    def __init__(
        self, worker: Worker, listeners: Sequence[BoundListener], resolver: Resolver
    ) -> None:
        self.worker = worker
        self.bus = worker.bus
        self.config = worker.config
        self.resolver = resolver
        self.flows: dict[int, _TcpFlow | TlsTcpFlow] = {}
        # Proxy-mode clients without a TCP flow: handshakes that have not decided their
        # upstream yet, and SOCKS5 UDP associations.
        self.proxied: set[HandshakePhase | UdpAssociation] = set()
        # The open UDP flows of this worker's SOCKS5 associations.
        self.datagram_flows: dict[int, DatagramFlow] = {}
        # What `transparent_target` said of each (listener, socket address) seen lately, and
        # what `literal_target` said of each (policy, destination).
        self._transparent_targets: dict[
            tuple[int, bytes],
            tuple[int, tuple[str, int] | tuple[str, int, int, int], Address, Requested] | None,
        ] = {}
        self._literal_targets: dict[
            tuple[int, str, int], tuple[Destination, Address] | str | None
        ] = {}
        # What a CONNECT's short path found of each (policy, host, port) as the client wrote
        # them: where it connects, or None where the handshake phase must say why not (or
        # resolve a name).
        self._connect_targets: dict[
            tuple[int, bytes, bytes], tuple[Destination, Address, Requested] | None
        ] = {}
        self.ready = worker.ready
        self._accepters = [_Accepter(self, listener) for listener in listeners]
        self._accept_resume_at: float | None = None
        # Upstream connects and handshakes under way, due in the order they began (one
        # queue per handshake timeout: listeners may have their own).
        self._connects: Deadlines[_TcpFlow | TlsTcpFlow] = Deadlines(self.config.connect_timeout_s)
        self._handshakes: dict[float, Deadlines[HandshakePhase]] = {}
        idle = self.config.idle_timeout_s
        self._idle_scan_s = min(1.0, idle / 4) if idle else math.inf
        self._next_idle_scan = time.monotonic() + self._idle_scan_s
        self.deadline = self._next_idle_scan
        self._watch_listeners()
        worker.add_service(self)

    # -- the worker's service ---------------------------------------------------------------

    @property
    def open_count(self) -> int:
        return len(self.flows) + len(self.proxied)

    def on_deadline(self, now: float) -> None:
        """Time out connects and handshakes, resume accepting after a pause, and close the
        flows idle for too long."""
        for tcp in self._connects.pop_due(now):
            if tcp.connecting and not tcp.closed:
                self.refuse_connect(
                    tcp,
                    CloseReason.UPSTREAM_TIMEOUT,
                    Failure.TIMEOUT,
                    f"no answer from {tcp.flow.server} within {self.config.connect_timeout_s:g} s",
                )
        for handshakes in self._handshakes.values():
            for phase in handshakes.pop_due(now):
                phase.on_deadline(now)
        if self._accept_resume_at is not None and now >= self._accept_resume_at:
            self._accept_resume_at = None
            if not self.worker.stopping:
                self._watch_listeners()
        if now >= self._next_idle_scan:
            self._next_idle_scan = now + self._idle_scan_s
            idle = self.config.idle_timeout_s
            if idle:
                limit = now - idle
                for flow in [f for f in self.flows.values() if f.last_active < limit]:
                    self.close_flow(flow, CloseReason.IDLE_TIMEOUT)
        self._set_deadline()

    def _set_deadline(self) -> None:
        resume = self._accept_resume_at
        deadline = min(self._next_idle_scan, self._connects.next_due)
        for handshakes in self._handshakes.values():
            deadline = min(deadline, handshakes.next_due)
        self.deadline = deadline if resume is None else min(deadline, resume)

    def stop_accepting(self, now: float) -> None:
        self._unwatch_listeners()

    def want_data(self, flow_id: int, then: Callable[[], None] | None = None) -> None:
        flow = self.flows.get(flow_id)
        if flow is not None:
            flow.up.wants_data = flow.down.wants_data = True
        datagrams = self.datagram_flows.get(flow_id)
        if datagrams is not None:
            datagrams.wants_up = datagrams.wants_down = True
        if then is not None:
            then()

    def byte_counts(self, flow_id: int) -> tuple[int, int] | None:
        """Bytes a live flow of this worker has moved so far (up, down); any thread."""
        flow = self.flows.get(flow_id)
        if flow is not None:
            return flow.up.count, flow.down.count
        datagrams = self.datagram_flows.get(flow_id)
        return None if datagrams is None else (datagrams.bytes_up, datagrams.bytes_down)

    def kill(self, flow_id: int) -> None:
        flow = self.flows.get(flow_id)
        if flow is not None:
            self.close_flow(flow, CloseReason.KILLED, reset=True)

    def close_all(self, reason: CloseReason, note: str | None = None) -> None:
        for item in list(self.proxied):
            item.close(reason, note)
        # Flows closed for an error are reset: their peers must not take it for an end.
        for flow in list(self.flows.values()):
            self.close_flow(flow, reason, reset=reason is CloseReason.ERROR, error=note)

    # -- accepting --------------------------------------------------------------------------

    def _watch_listeners(self) -> None:
        worker = self.worker
        for accepter in self._accepters:
            fd = accepter.listener.sock.fileno()
            if fd >= 0 and not worker.is_watched(fd):
                worker.watch(fd, _IN | select.EPOLLEXCLUSIVE, accepter)

    def _unwatch_listeners(self) -> None:
        for accepter in self._accepters:
            fd = accepter.listener.sock.fileno()
            if fd >= 0:
                self.worker.unwatch(fd)

    def pause_accepting(self, exc: OSError) -> None:
        """Out of descriptors: stop accepting for a moment, and say so once."""
        if not _emfile_warned.is_set():
            _emfile_warned.set()
            log.warning(
                "cannot accept more connections (%s); retrying as descriptors free up "
                "(raise the limit with ulimit -n)",
                exc.strerror,
            )
        self._unwatch_listeners()
        self._accept_resume_at = time.monotonic() + _ACCEPT_PAUSE_S
        self._set_deadline()

    # -- flow life cycle --------------------------------------------------------------------

    def accepted(self, listener: BoundListener, client: socket.socket, addr: object) -> None:
        """Open the flow of a client `listener` accepted, to the listener's upstream."""
        started = time.time()
        client.setblocking(False)
        # TCP_NODELAY comes from the listening socket (`listener.bind` sets it).
        if listener.address.path is None:
            client_address = Address(addr[0], addr[1])  # type: ignore[index]
        else:
            client_address = Address(host="", path=str(addr) or listener.address.path or "")
        upstream = listener.upstream
        if upstream is None:
            self._start_proxy_flow(listener, client, client_address, started)
            return
        flow = Flow.opening(
            next_flow_id(), _TCP, client_address, upstream, listener.address, started
        )
        self.connect_upstream(flow, client, listener.upstream_family, listener.upstream_sockaddr)

    # -- proxy modes: what a handshake phase and a UDP association use ----------------------

    def _start_proxy_flow(
        self,
        listener: BoundListener,
        client: socket.socket,
        client_address: Address,
        started: float,
    ) -> None:
        policy = listener.spec.policy or ProxyPolicy()
        if client_address.path is None and not policy.is_client_allowed(client_address.host):
            policy.refuse_client(client_address.host)
            _reset_and_close(client)
            return
        mode = listener.spec.mode
        if mode is _TRANSPARENT:
            # The common case cut to the bone, to cost about what a reverse listener's client
            # does: one getsockopt, and the checks of a destination done once (its answer
            # kept: the same policy gives it again), no handshake phase.
            # Kept by the socket address as the kernel gives it: a destination seen before
            # costs no parse of it.
            try:
                # An IPv6 socket's peer is written with colons, an IPv4 one's never is.
                raw = read_original_destination(client, ":" in client_address.host)
            except OSError:
                raw = None
            if raw is not None:
                key = (id(listener), raw)
                targets = self._transparent_targets
                if key in targets:
                    target = targets[key]
                else:
                    target = self._transparent_target(listener, policy, raw)
                    if len(targets) >= _TARGETS_KEPT:
                        targets.clear()
                    targets[key] = target
                if target is not None:
                    family, sockaddr, server, requested = target
                    flow = Flow.opening(
                        next_flow_id(),
                        _TCP,
                        client_address,
                        server,
                        listener.address,
                        started,
                        requested,
                    )
                    self.connect_upstream(flow, client, family, sockaddr)
                    return
            # Refused, or not redirected: the phase finds out again and says why.
        first = b""
        if mode is _HTTP and not policy.credentials:
            # The common CONNECT cut to the bone, as transparent's: its head read at once
            # (most clients' is all there at accept), matched whole, and the checks of its
            # destination done once (their answer kept: the same policy gives it again).
            # Anything else goes to a handshake phase, with what was read.
            try:
                first = client.recv(HANDSHAKE_READ_BYTES)
            except BlockingIOError:
                pass
            except OSError as exc:
                HandshakePhase(
                    self, mode, policy, client, client_address, listener.address, started
                ).close(CloseReason.CLIENT_RESET, f"during the handshake: {exc.strerror or exc}")
                return
            plain = match_plain_connect(first)
            if plain is not None:
                asked = (id(policy), plain[1], plain[2])
                connects = self._connect_targets
                if asked in connects:
                    decided = connects[asked]
                else:
                    decided = self._connect_target(policy, plain[1], plain[2])
                    if len(connects) >= _TARGETS_KEPT:
                        connects.clear()
                    connects[asked] = decided
                if decided is not None:
                    where, server, requested = decided
                    flow = Flow.opening(
                        next_flow_id(),
                        _TCP,
                        client_address,
                        server,
                        listener.address,
                        started,
                        requested,
                    )
                    prelude = Prelude(
                        _TUNNEL, first[plain.end() :], len(first) == HANDSHAKE_READ_BYTES
                    )
                    self.connect_upstream(flow, client, where.family, where.sockaddr, prelude)
                    return
        phase = HandshakePhase(
            self, mode, policy, client, client_address, listener.address, started
        )
        phase.start(first)
        if not phase.closed:
            # Still reading its handshake, or resolving: kept until it ends (shutdown closes
            # it). Most clients' requests are all there at accept, and have a flow already.
            self.proxied.add(phase)

    def _transparent_target(
        self, listener: BoundListener, policy: ProxyPolicy, raw: bytes
    ) -> tuple[int, tuple[str, int] | tuple[str, int, int, int], Address, Requested] | None:
        """Where a client redirected to the socket address `raw` connects (its family and
        socket address, its server and what it asked for), or None where the handshake
        phase must refuse it and say why."""
        destination = destination_of(raw)
        sockaddr = destination.sockaddr
        target = transparent_target(listener.address, policy, sockaddr[0], sockaddr[1])
        if target is None:
            return None
        return destination.family, sockaddr, target[0], target[1]

    def _connect_target(
        self, policy: ProxyPolicy, host_text: bytes, port_text: bytes
    ) -> tuple[Destination, Address, Requested] | None:
        """Where a CONNECT to `host_text`:`port_text` (as a plain head wrote them) connects
        at once, or None where the handshake phase must take it (a port out of range, a
        name to resolve, a refused destination: the phase says why)."""
        port = int(port_text)
        if not 0 < port <= 65535:
            return None
        host = host_text.decode("ascii")
        target = self.literal_target(policy, host, port)
        if target is None or isinstance(target, str):
            return None
        return target[0], target[1], Requested(host, port)

    def watch_client(self, fd: int, mask: int, phase: HandshakePhase) -> None:
        """Deliver the epoll events of a proxy-mode client to its handshake phase."""
        self.worker.watch(fd, mask, phase)

    def watch_association(self, fd: int, mask: int, association: UdpAssociation) -> None:
        """Deliver the epoll events of a UDP association's socket to it."""
        self.worker.watch(fd, mask, association)

    def unwatch(self, fd: int) -> None:
        self.worker.unwatch(fd)

    def add_deadline(self, phase: HandshakePhase) -> None:
        """Call `phase.on_deadline(now)` once its listener's handshake timeout has passed,
        unless it ended before (`proxy_ended`)."""
        timeout = phase.policy.handshake_timeout_s
        handshakes = self._handshakes.get(timeout)
        if handshakes is None:
            handshakes = self._handshakes[timeout] = Deadlines(timeout)
        when = handshakes.add(phase, time.monotonic())
        if when < self.deadline:
            self.deadline = when

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run `callback` on this worker's thread (callable from any thread)."""
        self.worker.submit(callback)

    def proxy_ended(self, item: object) -> None:
        """A handshake that has an upstream or was closed, or an association that ended: it
        no longer keeps the worker busy."""
        proxied = self.proxied
        if item not in proxied:
            # Never kept: a handshake whose request was all there at accept (it has neither
            # a place here nor a deadline), the common case.
            return
        proxied.discard(item)
        for handshakes in self._handshakes.values():
            handshakes.discard(item)  # type: ignore[arg-type]
        if self.worker.stopping:
            self.worker.check_empty()

    def add_association(self, association: UdpAssociation) -> None:
        """Keep `association` until it ends (shutdown closes it)."""
        self.proxied.add(association)

    def resolve(
        self, host: str, port: int, done: Callable[[list[tuple[int, object]] | str], None]
    ) -> None:
        """Call `done` on this thread with the addresses of `host` (an address literal at
        once, a name once the resolver answers), or why there are none."""
        literal = literal_destination(host, port)
        if literal is not None:
            done([(literal.family, literal.sockaddr)])
            return

        def answered(found: list[Destination] | str) -> None:
            result = found if isinstance(found, str) else [(d.family, d.sockaddr) for d in found]
            self.call_soon(lambda: done(result))  # type: ignore[arg-type]

        self.resolver.resolve(host, port, answered)

    def literal_target(
        self, policy: ProxyPolicy, host: str, port: int
    ) -> tuple[Destination, Address] | str | None:
        """What `literal_target` says of a destination, kept for the next client that asks
        for it through a listener of `policy` (which lives as long as the relay)."""
        key = (id(policy), host, port)
        targets = self._literal_targets
        target = targets.get(key, self)
        if target is self:
            target = literal_target(policy, host, port)
            if len(targets) >= _TARGETS_KEPT:
                targets.clear()
            targets[key] = target
        return target  # type: ignore[return-value]

    # -- connecting -------------------------------------------------------------------------

    def connect_upstream(
        self,
        flow: Flow,
        client: socket.socket,
        family: int,
        sockaddr: object,
        prelude: Prelude | None = None,
    ) -> None:
        """Emit `flow` opened and connect its client to `flow.server` (at `family`, `sockaddr`);
        the flow relays once connected (after `prelude`, for a proxy-mode flow), or closes
        (refused, timed out) with its one event. A client watched already (a proxy handshake
        read it) has its events go to the flow from now on."""
        try:
            # Non-blocking from its creation: no ioctl of its own.
            server = socket.socket(family, _NONBLOCKING_STREAM)
        except OSError as exc:
            self.worker.forget(client.fileno())
            self.bus.emit(FlowOpened(flow))
            _reset_and_close(client)
            self.worker.emit_closed(
                flow.closed(
                    ended_at=time.time(),
                    bytes_up=0,
                    bytes_down=0,
                    reason=CloseReason.ERROR,
                    error=exc.strerror,
                )
            )
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self.pause_accepting(exc)
            return
        if family != socket.AF_UNIX:
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = self.config.tls
        tcp: _TcpFlow | TlsTcpFlow
        rewriter = None
        if prelude is not None and prelude.handshake is not None:
            rewriter = prelude.handshake.upstream_rewriter()
        # TLS is peeked for where the client's bytes go as they are: a fixed upstream, a
        # SOCKS or CONNECT tunnel, a transparent flow (not forwarded HTTP requests).
        if tls is not None and rewriter is None and not flow.server.is_unix:
            from .tls_relay import TlsTcpFlow

            tcp = TlsTcpFlow(self, flow, client, server, tls)
            tcp.prelude = prelude
        else:
            if rewriter is None:
                tcp = _TcpFlow(self, flow, client, server)
            else:
                tcp = _RewritingFlow(self, flow, client, server, rewriter)
            tcp.prelude = prelude
            # What the client sends while the upstream connects is announced by an event;
            # what a handshake left unread, or sent before the client was watched, is not.
            tcp.up.readable = prelude is not None and prelude.unread
            tcp.down.readable = False
        self.flows[flow.id] = tcp
        if self.bus.observed:
            self.bus.emit(FlowOpened(flow))
        worker = self.worker
        fd = client.fileno()
        if worker.is_watched(fd):
            worker.hand_over(fd, tcp)
        else:
            # Watched from now on: epoll reports at once what the client sent before.
            worker.watch(fd, _FLOW_EVENTS, tcp)
        err = server.connect_ex(sockaddr)  # type: ignore[arg-type]
        if err in (0, errno.EINPROGRESS, errno.EAGAIN):
            worker.watch(server.fileno(), _FLOW_EVENTS, tcp)
            when = self._connects.add(tcp, time.monotonic())
            if when < self.deadline:
                self.deadline = when
        else:
            self._fail_connect(tcp, err)

    def finish_connect(self, tcp: _TcpFlow | TlsTcpFlow, mask: int | None = None) -> None:
        """The upstream socket of `tcp`, connecting, has an event (`mask`, when known): relay
        if it connected, close the flow if it failed."""
        if mask is None or mask & (_ERR | _HUP):
            err = tcp.server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail_connect(tcp, err)
                return
        if mask is None:
            try:
                tcp.server.getpeername()
            except OSError:
                return  # not connected yet
        elif not mask & _OUT:
            # A connecting socket turns writable when it connects; the worker drops events
            # of a descriptor closed in the batch, so none from a former owner of the number.
            return
        self._connected(tcp, 0 if mask is None else mask)

    def _connected(self, tcp: _TcpFlow | TlsTcpFlow, mask: int) -> None:
        self._connects.discard(tcp)
        if isinstance(tcp, _TcpFlow):
            plain = tcp
            plain.connecting = False
            if mask & (_IN | _HUP | _RDHUP):
                # The server spoke first (or left) as it accepted.
                plain.down.readable = True
                if mask & (_HUP | _RDHUP):
                    plain.down.peer_closed = True
            prelude = plain.prelude
            if prelude is not None:
                self._deliver_prelude(plain, prelude)
            elif plain.up.readable or plain.down.readable:
                plain.progress(time.monotonic())
            return
        tls = tcp
        reply = early = b""
        prelude = tls.prelude
        if prelude is not None:
            tls.prelude = None
            if prelude.handshake is not None:
                name = tls.server.getsockname()
                bound = Address(host=str(name[0]), port=int(name[1]))
                reply = prelude.handshake.succeeded(bound)
            early = prelude.early_data
        tls.on_connected(time.monotonic(), reply=reply, early_data=early)
        if not tls.closed:
            self.worker.call_at(tls.handshake_deadline, tls.deadline_callback())

    def _deliver_prelude(self, tcp: _TcpFlow, prelude: Prelude) -> None:
        """Send the handshake's reply to the client and the client's early bytes to the
        server, or what of them the sockets do not take now, before anything read later."""
        tcp.prelude = None
        up = tcp.up
        down = tcp.down
        handshake = prelude.handshake
        if handshake is not None:
            bound = None
            if handshake.names_bound:
                # An IP socket's own address: a (host, port, ...) tuple of a str and an int.
                name = tcp.server.getsockname()
                bound = Address(name[0], name[1])
            reply = handshake.succeeded(bound)
            if reply:
                # Sent here, not queued for a pump: a fresh socket's buffer takes it whole.
                try:
                    sent = tcp.client.send(reply)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    tcp._reset(True, _failure(exc))
                    return
                if sent < len(reply):
                    down.pending = memoryview(reply)[sent:]
                    down.writable = False
        early = prelude.early_data
        if early:
            up.pending = memoryview(early)
            up.count += len(early)
            bus = self.bus
            if bus.wants_data:
                up.wants_data = bus.emit_data(
                    FlowData(tcp.flow.id, Direction.UP, time.time(), early)
                )
        if up.pending is not None or up.readable or down.pending is not None or down.readable:
            tcp.progress(time.monotonic())

    def _fail_connect(self, tcp: _TcpFlow | TlsTcpFlow, err: int) -> None:
        if err in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            failure = Failure.NETWORK_UNREACHABLE
        else:
            failure = _CONNECT_FAILURES.get(connect_failure_reason(err), Failure.GENERAL)
        self.refuse_connect(
            tcp,
            connect_failure_reason(err),
            failure,
            f"connect to {tcp.flow.server}: {os.strerror(err)}",
        )

    def refuse_connect(
        self, tcp: _TcpFlow | TlsTcpFlow, reason: CloseReason, failure: Failure, error: str
    ) -> None:
        """Close a flow whose upstream did not connect: a reset for the client of a fixed
        upstream; the protocol's answer, then a clean close, for a proxy-mode client."""
        prelude = tcp.prelude
        if prelude is None or prelude.handshake is None:
            self.close_flow(tcp, reason, reset=True, error=error)
            return
        with contextlib.suppress(OSError):
            tcp.client.send(prelude.handshake.failed(failure))
        self.close_flow(tcp, reason, error=error)

    def close_flow(
        self,
        tcp: _TcpFlow | TlsTcpFlow,
        reason: CloseReason,
        *,
        reset: bool = False,
        error: str | None = None,
    ) -> None:
        """Close both sockets (with RST when `reset`) and emit the one `FlowClosed`."""
        if tcp.closed:
            return
        tcp.closed = True
        self._connects.discard(tcp)
        worker = self.worker
        for sock in (tcp.client, tcp.server):
            fd = sock.fileno()
            if fd >= 0:
                worker.forget(fd)
                if reset:
                    _reset_and_close(sock)
                else:
                    # What `sock.close()` does, without its two Python calls.
                    _close_socket(sock)
        del self.flows[tcp.flow.id]
        if self.bus.observed:
            worker.emit_closed(
                tcp.flow.closed(
                    ended_at=time.time(),
                    bytes_up=tcp.up.count,
                    bytes_down=tcp.down.count,
                    reason=reason,
                    error=error,
                    tls=tcp.tls_facts,
                )
            )
        if self._accept_resume_at is not None and not worker.stopping:
            # A descriptor is free: try accepting again now.
            self._accept_resume_at = time.monotonic()
            self._set_deadline()
        if worker.stopping:
            worker.check_empty()


_CONNECT_FAILURES = {
    CloseReason.UPSTREAM_REFUSED: Failure.REFUSED,
    CloseReason.UPSTREAM_TIMEOUT: Failure.TIMEOUT,
}


def connect_failure_reason(err: int) -> CloseReason:
    """How a flow ends whose upstream connect failed with `err`."""
    if err == errno.ECONNREFUSED or err == errno.ENOENT:
        return CloseReason.UPSTREAM_REFUSED
    if err == errno.ETIMEDOUT:
        return CloseReason.UPSTREAM_TIMEOUT
    return CloseReason.ERROR


class Relay:
    """Listeners and relay workers: bind at construction, relay after `start`, drain on `stop`.

    A relay thread that fails (a bug: an unexpected exception) closes its flows with reason
    error; the relay logs it once, keeps it in `failure` and calls `on_failure`, so that its
    owner stops it rather than listen on with no one behind the socket.
    """

    def __init__(
        self,
        specs: Sequence[ListenerSpec],
        bus: Bus,
        config: RelayConfig | None = None,
        *,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        if not specs:
            raise FlowtapError("nothing to relay: give --listen HOST:PORT --upstream HOST:PORT")
        self.bus = bus
        self.config = config or RelayConfig()
        self.listeners: list[BoundListener] = []
        # Names that proxy-mode clients ask for are resolved on its threads (started on use).
        self.resolver = Resolver()
        try:
            for spec in specs:
                if spec.transport is Transport.UDP and spec.mode is not Mode.TRANSPARENT:
                    check_spec(spec)
                upstream: Address | None = None
                family: int = socket.AF_UNSPEC
                sockaddr: object = None
                if spec.upstream is not None:
                    family, sockaddr = resolve(spec.upstream, spec.transport)
                    upstream = _sockaddr_address(family, sockaddr, spec.upstream)
                sock = bind(spec)
                if spec.transport is Transport.UDP and spec.mode is Mode.TRANSPARENT:
                    try:
                        prepare_listener(sock, spec.listen)
                    except FlowtapError:
                        sock.close()
                        raise
                self.listeners.append(
                    BoundListener(
                        spec=spec,
                        sock=sock,
                        address=bound_address(sock, spec),
                        upstream_family=family,
                        upstream_sockaddr=sockaddr,
                        upstream=upstream,
                    )
                )
        except BaseException:
            self._close_listeners()
            raise
        self._empty = threading.Event()
        self._empty_workers = 0
        self._empty_lock = threading.Lock()
        self.failure: BaseException | None = None
        self._on_failure = on_failure
        # Every worker accepts on every TCP listener; each UDP listener belongs to one worker.
        count = max(1, self.config.workers)
        tcp = [lst for lst in self.listeners if lst.spec.transport is Transport.TCP]
        udp = [lst for lst in self.listeners if lst.spec.transport is Transport.UDP]
        self._workers: list[Worker] = []
        self._tcp: list[_TcpFlows] = []
        self._udp: list[UdpListener | TransparentUdpListener] = []
        try:
            for i in range(count):
                worker = Worker(i, bus, self.config, self._worker_empty, self._failed)
                self._workers.append(worker)
                if tcp:
                    self._tcp.append(_TcpFlows(worker, tcp, self.resolver))
                for listener in udp[i::count]:
                    self._udp.append(
                        TransparentUdpListener(worker, listener)
                        if listener.spec.mode is Mode.TRANSPARENT
                        else UdpListener(worker, listener)
                    )
        except OSError as exc:
            self._discard_workers()
            self._close_listeners()
            raise FlowtapError(
                f"cannot set up {count} relay threads ({exc.strerror or exc}): lower --workers "
                "or raise the open-files limit (ulimit -n)"
            ) from None
        self._started = False

    def start(self) -> None:
        """Start the relay threads; FlowtapError (nothing left running) if the system refuses."""
        self._started = True
        for index, worker in enumerate(self._workers):
            try:
                worker.start()
            except RuntimeError as exc:
                for unstarted in self._workers[index:]:
                    unstarted.discard()
                self._workers = self._workers[:index]
                self.stop(0.0)
                raise FlowtapError(
                    f"cannot start relay thread {index + 1} ({exc}): lower --workers or raise "
                    "the process limits (ulimit -u, ulimit -v)"
                ) from None

    def _discard_workers(self) -> None:
        for worker in self._workers:
            worker.discard()
        self._workers = []

    def _failed(self, worker: Worker, exc: BaseException) -> None:
        log_failure(log, f"relay thread {worker.name}", exc)
        with self._empty_lock:
            first = self.failure is None
            if first:
                self.failure = exc
        if first and self._on_failure is not None:
            self._on_failure(exc)

    @property
    def open_flows(self) -> int:
        return sum(worker.open_count for worker in self._workers)

    def byte_counts(self, flow_id: int) -> tuple[int, int] | None:
        """Bytes a live flow has moved so far (up, down), or None if it is not live."""
        for service in (*self._tcp, *self._udp):
            counts = service.byte_counts(flow_id)
            if counts is not None:
                return counts
        return None

    def want_data(self, flow_id: int, then: Callable[[], None] | None = None) -> None:
        """Have a live flow hand its next chunks to observers again, both ways (one that
        stopped wanting them, past a display cap, wants to see the flow move), then call `then`
        on the flow's relay thread; any thread."""
        for service in (*self._tcp, *self._udp):
            if service.byte_counts(flow_id) is not None:  # a live flow of its
                service.worker.submit(functools.partial(service.want_data, flow_id, then))

    def kill(self, flow_id: int) -> None:
        """Reset both sides of a live flow; a flow that already ended is ignored."""
        for worker in self._workers:
            worker.submit(functools.partial(worker.kill, flow_id))

    def _worker_empty(self) -> None:
        with self._empty_lock:
            self._empty_workers += 1
            if self._empty_workers >= len(self._workers):
                self._empty.set()

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, let open flows finish for `grace_s`, close the rest as shutdown."""
        if not self._started:
            self._discard_workers()
            self._close_listeners()
            return
        for worker in self._workers:
            worker.submit(worker.stop_accepting)
        self._empty.wait(min(grace_s, threading.TIMEOUT_MAX))
        for worker in self._workers:
            worker.submit(functools.partial(worker.close_all, CloseReason.SHUTDOWN))
            worker.submit(worker.exit)
        for worker in self._workers:
            worker.join()
            worker.release()
        self.resolver.close()
        self._close_listeners()

    def _close_listeners(self) -> None:
        for listener in self.listeners:
            listener.sock.close()
            if listener.address.path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(listener.address.path)
