"""A TCP flow whose bytes go through `TlsInterception` on the relay worker's thread: the
worker's epoll loop drives its two non-blocking sockets, observers get the plaintext."""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import select
import socket
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from .events import Bus
from .flow import CloseReason, Direction, Flow, FlowData, FlowUpdated, FlowWire, TlsFacts
from .tls_intercept import Outgoing, Phase, TlsInterception, TlsSettings

if TYPE_CHECKING:
    from .modes import Prelude

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_ERR = select.EPOLLERR
_HUP = select.EPOLLHUP
_RDHUP = select.EPOLLRDHUP
# Reads per flow (of up to the worker's buffer, 256 KiB) before other flows get a turn (the
# plain relay's _CHUNKS_PER_TURN).
_READS_PER_TURN = 8
# Ciphertext waiting for one peer beyond which flowtap stops reading the other (backpressure).
_MAX_PENDING_BYTES = 256 * 1024
# Plaintext a flow has moved before OpenSSL writes its records to the sockets itself: a bulk
# flow saves two copies of each byte (a few per cent of its CPU per MB), a short one (a
# request and its answer) would spend more on the switch (about 1 % of a handshake's work).
_WRITE_DIRECTLY_AFTER_BYTES = 256 * 1024
_RESET_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
_TCP_CLOSE = 7  # tcp_states.h


class _Buffers(Protocol):
    """The receive buffer of the relay thread (reused by every flow on it)."""

    @property
    def view(self) -> memoryview: ...


class TlsWorker(Protocol):
    """What a TLS flow needs of the relay worker that owns it."""

    bus: Bus

    @property
    def worker(self) -> _Buffers: ...

    # The worker's queue of flows to progress again (it holds other kinds of handler too).
    ready: collections.deque[Any]

    def close_flow(
        self, tcp: TlsTcpFlow, reason: CloseReason, *, reset: bool = False, error: str | None = None
    ) -> None: ...

    def finish_connect(self, tcp: TlsTcpFlow, mask: int | None = None) -> None: ...


class _Count:
    """Plaintext bytes moved one way (what `Relay.byte_counts` reads), and whether observers
    still want them (they stop wanting a direction past a display cap)."""

    __slots__ = ("count", "wants_data")

    def __init__(self) -> None:
        self.count = 0
        self.wants_data = True


class TlsTcpFlow:
    """A TCP flow relayed through TLS interception (or passed through once it is not TLS)."""

    is_tls = True

    def __init__(
        self,
        worker: TlsWorker,
        flow: Flow,
        client: socket.socket,
        server: socket.socket,
        settings: TlsSettings,
    ) -> None:
        self.worker = worker
        self.flow = flow
        self.client = client
        self.server = server
        self.settings = settings
        # Without SNI, the leaf names what the client asked a proxy for, else the upstream.
        asked = flow.requested.host if flow.requested is not None else flow.server.host
        self.tls = TlsInterception(settings, asked)
        self.prelude: Prelude | None = None
        """A proxy-mode flow's handshake reply and early bytes, due once connected."""
        self.up = _Count()
        self.down = _Count()
        self.connecting = True
        self.closed = False
        self.queued = False
        self.last_active = time.monotonic()
        self.handshake_deadline = 0.0
        self._client_eof = False
        self._server_eof = False
        self._client_shut = False
        self._server_shut = False
        self._first_eof: CloseReason | None = None
        self._facts_told: TlsFacts | None = None
        # What edge-triggered epoll said of each socket since flowtap last found it empty or
        # full: a socket is read or written only while it may take the call, so a bulk
        # transfer one way does not ask the other way's socket for nothing at every turn.
        self._client_readable = self._server_readable = True
        self._client_writable = self._server_writable = True
        # The peer's FIN has come (EPOLLRDHUP): read on to it, even after a short read.
        self._client_peer_closed = self._server_peer_closed = False
        # With a wire capture: the ciphertext of each leg (by `upstream_leg`), held until
        # that leg's secrets are known so that they precede it in the capture; None once live.
        self._wire: dict[bool, list[FlowWire] | None] | None = None
        if settings.secrets is not None and worker.bus.wire_observers:
            self._wire = {False: [], True: []}

    # -- events from the worker --------------------------------------------------------------

    def on_connected(self, now: float, reply: bytes = b"", early_data: bytes = b"") -> None:
        """The upstream is connected: `reply` (a proxy handshake's answer) goes to the client
        before any TLS, and `early_data` (what the client sent after its request) is peeked."""
        self.connecting = False
        self.handshake_deadline = now + self.settings.handshake_timeout_s
        self.tls.to_client += reply
        self.tls.server_connected()
        if early_data:
            self.tls.feed_client(early_data)
        self.progress(now)

    def on_ready(self, fd: int, mask: int, now: float) -> None:
        if self.closed:
            return
        is_client = fd == self.client.fileno()
        # Noted even while connecting: the client is watched from accept, and an edge (its
        # FIN after its first bytes, say) is reported once.
        if mask & (_IN | _HUP | _ERR | _RDHUP):
            closed = bool(mask & (_RDHUP | _HUP))
            if is_client:
                self._client_readable = True
                self._client_peer_closed |= closed
            else:
                self._server_readable = True
                self._server_peer_closed |= closed
        if mask & (_OUT | _ERR | _HUP):
            if is_client:
                self._client_writable = True
            else:
                self._server_writable = True
        if self.connecting:
            if not is_client:
                # The mask says whether it connected: no getsockopt and getpeername to ask.
                self.worker.finish_connect(self, mask)
            return
        # While a side has bytes to read, reading reports its error after them (an alert that
        # came before a reset is read first); only a side read to its end is asked directly.
        if mask & _ERR and (self._client_eof if is_client else self._server_eof):
            sock = self.client if is_client else self.server
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err and self._is_owed_only_close_notify(is_client):
                # It reset after its FIN with nothing owed to it: nothing was lost, and
                # nothing more can reach it, so the flow ends as that side closed it.
                self.worker.close_flow(self, self._first_eof or CloseReason.CLIENT_CLOSED)
                return
            if err:
                self._reset(is_client, os.strerror(err))
                return
        self.progress(now)

    def _is_owed_only_close_notify(self, is_client: bool) -> bool:
        """Whether a peer that has sent its FIN is owed nothing but flowtap's close_notify:
        then a reset from it (it closed both ways, as redis-cli does) ends the flow normally."""
        tls = self.tls
        if tls.writes_directly and tls.is_held(to_client=is_client):
            return False
        if is_client:
            pending, alert = len(tls.to_client), tls.close_notify_bytes_to_client
            return self._client_eof and pending <= alert
        pending, alert = len(tls.to_server), tls.close_notify_bytes_to_server
        return self._server_eof and pending <= alert

    def _end_side(self, is_client: bool) -> None:
        if is_client:
            self.tls.to_client.clear()
            self._client_shut = True
        else:
            self.tls.to_server.clear()
            self._server_shut = True

    def on_deadline(self, now: float) -> None:
        """The handshake deadline passed: a flow still handshaking closes with the reason."""
        if not self.closed and self.tls.is_handshaking:
            self.tls.handshake_timed_out(self.settings.handshake_timeout_s)
            self._flush_and_fail()

    def deadline_callback(self) -> Callable[[float], None]:
        """`on_deadline` for the worker's timer, holding this flow weakly: a flow that closes
        before its deadline is freed then, not the handshake timeout later (a timer holding
        every flow of the last 10 s kept their TLS objects, about 100 KB each, and the heap
        grew and was touched afresh for each new flow)."""
        flow = weakref.ref(self)

        def on_deadline(now: float) -> None:
            alive = flow()
            if alive is not None:
                alive.on_deadline(now)

        return on_deadline

    def progress(self, now: float) -> None:
        """Read what both sockets have, run it through TLS, send what is due."""
        self.queued = False
        tls = self.tls
        tls.keeps_plaintext = self.worker.bus.wants_data and (
            self.up.wants_data or self.down.wants_data
        )
        try:
            for _ in range(_READS_PER_TURN):
                moved = False
                read = self._pull if tls.reads_directly else self._read
                if (
                    self._client_readable
                    and not self._client_eof
                    and len(tls.to_server) < _MAX_PENDING_BYTES
                    and not (tls.writes_directly and tls.is_held(to_client=False))
                ):
                    moved |= read(self.client, is_client=True, now=now)
                if (
                    self._server_readable
                    and not self._server_eof
                    and len(tls.to_client) < _MAX_PENDING_BYTES
                    and not (tls.writes_directly and tls.is_held(to_client=True))
                ):
                    moved |= read(self.server, is_client=False, now=now)
                if (
                    tls.phase is Phase.OPEN
                    and not tls.reads_directly
                    and self._wire is None
                    and not self._client_eof
                    and not self._server_eof
                ):
                    tls.read_directly(self.client.fileno(), self.server.fileno())
                if self._wire is not None:
                    self._emit_wire()
                if tls.facts is not self._facts_told:
                    self._tell_facts()
                self._emit_plaintext()
                if tls.error is not None:
                    self._flush_and_fail()
                    return
                moved |= self._send(self.server, tls.to_server, is_client=False)
                moved |= self._send(self.client, tls.to_client, is_client=True)
                if (
                    tls.reads_directly
                    and not tls.writes_directly
                    and tls.bytes_up + tls.bytes_down >= _WRITE_DIRECTLY_AFTER_BYTES
                ):
                    tls.write_directly(self.client.fileno(), self.server.fileno())
                if not moved:
                    break
            else:
                # Still moving: let other flows run, then come back.
                if not self.queued:
                    self.queued = True
                    self.worker.ready.append(self)
        except _SideFailed as exc:
            self._reset(exc.is_client, str(exc))
            return
        self._shut_finished_sides()
        if tls.leaf_due is not None:
            tls.prepare_leaf()  # the ClientHello is sent: the upstream takes a while to answer

    # -- socket work --------------------------------------------------------------------------

    def _read(self, sock: socket.socket, *, is_client: bool, now: float) -> bool:
        view = self.worker.worker.view
        try:
            n = sock.recv_into(view)
        except BlockingIOError:
            self._set_readable(is_client, False)
            return False
        except OSError as exc:
            raise _SideFailed(is_client, exc.strerror or str(exc)) from None
        self.last_active = now
        if not n:
            self._side_ended(is_client)
            if is_client:
                self.tls.client_eof()
            else:
                self.tls.server_eof()
            return True
        if n < len(view) and not (
            self._client_peer_closed if is_client else self._server_peer_closed
        ):
            # Emptied: edge-triggered epoll reports any later arrival as a new event.
            self._set_readable(is_client, False)
        data = view[:n]
        if self._wire is not None:
            direction = Direction.UP if is_client else Direction.DOWN
            self._record_wire(not is_client, direction, bytes(data))
        if is_client:
            self.tls.feed_client(data)
        else:
            self.tls.feed_server(data)
        return True

    def _pull(self, sock: socket.socket, *, is_client: bool, now: float) -> bool:
        """Relay a batch of what `sock` has, read by OpenSSL itself (`read_directly`)."""
        tls = self.tls
        try:
            moved, ended, drained, abrupt = tls.pull(from_client=is_client)
        except OSError as exc:  # writing to the other peer's socket
            raise _SideFailed(not is_client, exc.strerror or str(exc)) from None
        if tls.writes_directly and tls.is_held(to_client=not is_client):
            self._set_writable(not is_client, False)  # full: epoll reports when it has room
        if drained and not ended:
            self._set_readable(is_client, False)  # EAGAIN: epoll reports what comes next
        if moved:
            self.last_active = now
        if not ended:
            return moved > 0
        if abrupt and _was_reset(sock):
            raise _SideFailed(is_client, os.strerror(errno.ECONNRESET))
        # Read to its end: as a FIN read by the relay would be (OpenSSL reads no further).
        self.last_active = now
        self._side_ended(is_client)
        return True

    def _side_ended(self, is_client: bool) -> None:
        """That side was read to its end (the first to end says how the flow closed)."""
        if is_client:
            self._client_eof = True
            self._first_eof = self._first_eof or CloseReason.CLIENT_CLOSED
        else:
            self._server_eof = True
            self._first_eof = self._first_eof or CloseReason.SERVER_CLOSED

    def _set_readable(self, is_client: bool, readable: bool) -> None:
        if is_client:
            self._client_readable = readable
        else:
            self._server_readable = readable

    def _set_writable(self, is_client: bool, writable: bool) -> None:
        if is_client:
            self._client_writable = writable
        else:
            self._server_writable = writable

    def _send(self, sock: socket.socket, pending: Outgoing, *, is_client: bool) -> bool:
        if not (self._client_writable if is_client else self._server_writable):
            return False
        tls = self.tls
        if tls.writes_directly and tls.is_held(to_client=is_client):
            try:
                flushed = tls.flush_held(to_client=is_client)
            except OSError as exc:
                raise _SideFailed(is_client, exc.strerror or str(exc)) from None
            if not flushed:
                self._set_writable(is_client, False)
                return False
            return True  # and flowtap's close_notify, if one is due now, at the next turn
        if not pending:
            return False
        try:
            sent = pending.send_to(sock)
        except BlockingIOError:
            sent = 0  # the socket is full: handled as a short send is, below
        except OSError as exc:
            if self._is_owed_only_close_notify(is_client):
                self._end_side(is_client)
                return True
            raise _SideFailed(is_client, exc.strerror or str(exc)) from None
        if sent < len(pending):
            # Full: epoll reports EPOLLOUT once it has room again.
            self._set_writable(is_client, False)
        if self._wire is not None and sent:
            direction = Direction.DOWN if is_client else Direction.UP
            self._record_wire(not is_client, direction, pending.take(sent))
        else:
            pending.drop(sent)
        return sent > 0

    def _record_wire(self, upstream_leg: bool, direction: Direction, data: bytes) -> None:
        assert self._wire is not None
        event = FlowWire(self.flow.id, upstream_leg, direction, time.time(), data)
        held = self._wire[upstream_leg]
        if held is None:
            self.worker.bus.emit_wire(event)
        else:
            held.append(event)

    def _emit_wire(self) -> None:
        """Hand each leg whose secrets are known (or that failed before) to the wire
        observers: its secrets first, then the ciphertext held."""
        wire = self._wire
        assert wire is not None
        tls = self.tls
        if tls.phase is Phase.PLAIN:
            self._wire = None  # not TLS, or passed through: captured as the bytes it is
            return
        failed = tls.phase is Phase.FAILED
        for upstream_leg, secrets in ((True, tls.upstream_secrets), (False, tls.client_secrets)):
            held = wire[upstream_leg]
            if held is None or (secrets is None and not failed):
                continue
            bus = self.worker.bus
            if secrets:
                bus.emit_wire(
                    FlowWire(self.flow.id, upstream_leg, Direction.UP, time.time(), secrets, True)
                )
            for event in held:
                bus.emit_wire(event)
            wire[upstream_leg] = None

    def _tell_facts(self) -> None:
        """Observers hear of the TLS facts once known (the handshake done, or the flow found
        not to be TLS), before the plaintext that follows; a failure tells them on close."""
        facts = self.tls.facts
        self._facts_told = facts
        bus = self.worker.bus
        # With no observer, no event is built (a dataclass replace, about 10 us a flow).
        if facts is not None and self.tls.error is None and bus.observed:
            bus.emit(FlowUpdated(self.flow.with_tls(facts)))

    def _emit_plaintext(self) -> None:
        tls = self.tls
        self.up.count = tls.bytes_up
        self.down.count = tls.bytes_down
        bus = self.worker.bus
        for chunks, side, direction in (
            (tls.plaintext_up, self.up, Direction.UP),
            (tls.plaintext_down, self.down, Direction.DOWN),
        ):
            if not chunks:
                continue
            if side.wants_data and bus.wants_data:
                for chunk in chunks:
                    if not bus.emit_data(FlowData(self.flow.id, direction, time.time(), chunk)):
                        side.wants_data = False  # until `Relay.want_data` asks again
                        break
            chunks.clear()

    def _shut_finished_sides(self) -> None:
        tls = self.tls
        if (
            tls.client_done
            and not tls.to_server
            and not self._server_shut
            and not (tls.writes_directly and tls.is_held(to_client=False))
        ):
            self._server_shut = True
            self._shutdown(self.server, is_client=False)
        if (
            tls.server_done
            and not tls.to_client
            and not self._client_shut
            and not (tls.writes_directly and tls.is_held(to_client=True))
        ):
            self._client_shut = True
            self._shutdown(self.client, is_client=True)
        if self._client_shut and self._server_shut and not self.closed:
            self.worker.close_flow(self, self._first_eof or CloseReason.CLIENT_CLOSED)

    def _shutdown(self, sock: socket.socket, *, is_client: bool) -> None:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if not self._is_owed_only_close_notify(is_client):
                self._reset(is_client, exc.strerror or str(exc))

    def _flush_and_fail(self) -> None:
        # Best effort: an alert for the client (a few bytes) goes out before the close.
        for sock, pending in ((self.client, self.tls.to_client), (self.server, self.tls.to_server)):
            if pending:
                with contextlib.suppress(OSError):
                    pending.send_to(sock)
        if self._wire is not None:
            self._emit_wire()
        self._emit_plaintext()
        self.worker.close_flow(self, CloseReason.ERROR, error=self.tls.error)

    def _reset(self, is_client: bool, text: str) -> None:
        reason = CloseReason.CLIENT_RESET if is_client else CloseReason.SERVER_RESET
        if self.tls.is_handshaking:
            who = "client" if is_client else "upstream"
            text = f"tls: the {who} reset the connection during the handshake ({text})"
        self.worker.close_flow(self, reason, reset=True, error=text)

    @property
    def tls_facts(self) -> TlsFacts | None:
        """What the flow's TLS has shown (None until it is known)."""
        return self.tls.facts


def _was_reset(sock: socket.socket) -> bool:
    """Whether the peer of `sock`, a TCP socket read to its end, reset it (rather than sent a
    FIN): its state is then CLOSE rather than CLOSE_WAIT."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_CLOSE
    except OSError:
        return False  # not TCP (a unix socket): its end is an end


class _SideFailed(Exception):
    """A socket of the flow failed; `is_client` says which side."""

    def __init__(self, is_client: bool, text: str) -> None:
        super().__init__(text)
        self.is_client = is_client
