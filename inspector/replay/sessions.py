"""Sockets that play recorded flows: one epoll loop drives many `Session`s and their timers.

A session owns one socket and one `Player`; it turns socket readiness into player events
and player commands into socket calls, keeps what the peer sent for comparison, and
reports the flow on a `Bus` (so `--pcap` can capture a replay like any relayed flow).
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import os
import select
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from flowtap.proxy.events import Bus
from flowtap.proxy.flow import (
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

from .playback import Close, Command, HalfClose, Player, Reset, Send
from .turns import Script

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_RDHUP = select.EPOLLRDHUP
_HUP = select.EPOLLHUP
_ERR = select.EPOLLERR
_LINGER_RESET = struct.pack("ii", 1, 0)
_RESET_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
_READS_PER_EVENT = 16


class Handler(Protocol):
    def on_ready(self, mask: int, now: float) -> None: ...

    def on_timer(self, now: float) -> None: ...


class Loop:
    """An epoll loop with one timer per handler; single-threaded."""

    def __init__(self, buffer_size_bytes: int = 256 * 1024) -> None:
        self._ep = select.epoll()
        self._handlers: dict[int, Handler] = {}
        self._timers: list[tuple[float, int, Handler]] = []
        self._deadlines: dict[int, float] = {}
        self._seq = itertools.count()
        self.buffer = bytearray(buffer_size_bytes)
        self.view = memoryview(self.buffer)

    def register(self, fd: int, mask: int, handler: Handler) -> None:
        self._handlers[fd] = handler
        self._ep.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        self._ep.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(fd)

    def set_timer(self, handler: Handler, deadline: float | None) -> None:
        """Call `handler.on_timer` at `deadline` (monotonic), replacing its earlier timer."""
        key = id(handler)
        if deadline is None:
            self._deadlines.pop(key, None)
            return
        current = self._deadlines.get(key)
        self._deadlines[key] = deadline
        if current is None or deadline < current:
            heapq.heappush(self._timers, (deadline, next(self._seq), handler))

    def poll(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` (or the next timer) and dispatch what is ready."""
        timers = self._timers
        if timers:
            timeout_s = min(timeout_s, max(0.0, timers[0][0] - time.monotonic()))
        events = self._ep.poll(timeout_s)
        now = time.monotonic()
        handlers = self._handlers
        for fd, mask in events:
            handler = handlers.get(fd)
            if handler is not None:
                handler.on_ready(mask, now)
        deadlines = self._deadlines
        while timers and timers[0][0] <= now:
            deadline, _, handler = heapq.heappop(timers)
            key = id(handler)
            wanted = deadlines.get(key)
            if wanted is None:
                continue
            if wanted > deadline:
                heapq.heappush(timers, (wanted, next(self._seq), handler))
                continue
            del deadlines[key]
            handler.on_timer(now)

    def close(self) -> None:
        self._ep.close()


@dataclass(frozen=True, slots=True)
class SessionResult:
    """What one played connection did; `received` is what the peer sent, up to the cap."""

    script: Script | None
    side: Direction
    started_at: float
    duration_s: float
    turns_sent: int
    turns_total: int
    bytes_sent: int
    peer_bytes: int
    peer_bytes_expected: int
    waits_timed_out: int
    received: bytes
    is_received_truncated: bool
    error: str | None
    peer: Address


class TlsLink:
    """The TLS end of one session (client, or server with `server_side`): an `ssl.SSLObject`
    over memory BIOs, so that the session's epoll loop drives it like its socket (no thread,
    no blocking call)."""

    __slots__ = ("incoming", "is_closing", "is_up", "obj", "outgoing")

    def __init__(
        self,
        context: ssl.SSLContext,
        server_hostname: str | None = None,
        *,
        server_side: bool = False,
    ) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(
            self.incoming, self.outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self.is_up = False
        self.is_closing = False


def tls_error(exc: ssl.SSLError) -> str:
    """One line for a TLS failure: the verification error when there is one."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"tls: server certificate not trusted: {exc.verify_message}"
    return f"tls: {exc.reason or exc}"


class Session:
    """One socket playing one side of a flow; calls `on_done` once with its result."""

    def __init__(
        self,
        loop: Loop,
        sock: socket.socket,
        *,
        transport: Transport,
        side: Direction,
        peer: Address,
        on_done: Callable[[Session, SessionResult], None],
        player: Player | None = None,
        bus: Bus | None = None,
        connect_timeout_s: float | None = None,
        max_received_bytes: int = 64 << 20,
        tls: TlsLink | None = None,
    ) -> None:
        self.loop = loop
        self._tls = tls
        self.sock = sock
        self.fd = sock.fileno()
        self.transport = transport
        self.side = side
        self.peer = peer
        self.player = player
        self._on_done = on_done
        self._bus = bus if bus is not None and bus.observers else None
        self._max_received = max_received_bytes
        self.received = bytearray()
        self.is_received_truncated = False
        self._out: list[memoryview] = []
        self._out_bytes = 0
        self._half_close_pending = False
        self._close_pending = False
        self._is_reading = True
        self._mask = 0
        self.is_connecting = connect_timeout_s is not None
        self.is_finished = False
        self.peer_closed = False
        self._we_closed_first = False
        self.started_at = time.monotonic()
        self._wall_started = time.time()
        self._connect_deadline = (
            self.started_at + connect_timeout_s if connect_timeout_s is not None else None
        )
        self.flow_id = next_flow_id()
        self._flow: Flow | None = None

    # -- wiring ------------------------------------------------------------------------------

    def begin(self, now: float) -> None:
        """Register with the loop; start playing at once unless still connecting."""
        if self.is_connecting:
            self._mask = _OUT
            self.loop.register(self.fd, _OUT, self)
            self.loop.set_timer(self, self._connect_deadline)
            return
        self._mask = self._wanted_mask()
        self.loop.register(self.fd, self._mask, self)
        self._connected(now)

    def _connected(self, now: float) -> None:
        """The socket is up: play at once, or once the TLS handshake is done."""
        if self._tls is not None and not self._tls.is_up:
            self._tls_handshake(now)
            return
        self._opened()
        self.on_connected(now)

    def _tls_handshake(self, now: float) -> None:
        tls = self._tls
        assert tls is not None
        try:
            tls.obj.do_handshake()
        except ssl.SSLWantReadError:
            self._tls_flush(now)
            return
        except ssl.SSLError as exc:
            self._tls_flush(now)
            self.fail(tls_error(exc))
            return
        tls.is_up = True
        self._tls_flush(now)
        if not self.is_finished:
            self._opened()
            self.on_connected(now)

    def _tls_flush(self, now: float) -> None:
        """Send the TLS records the SSLObject wrote (handshake, alerts, close_notify)."""
        assert self._tls is not None
        records = self._tls.outgoing.read()
        if records:
            self._send_raw(records, now)

    def on_connected(self, now: float) -> None:
        """Hook for subclasses: the socket is up (a player, if any, starts here)."""
        if self.player is not None:
            self.apply(self.player.start(now), now)

    def _opened(self) -> None:
        if self._bus is None:
            return
        local = self.sock.getsockname()
        here = Address(str(local[0]), int(local[1]))
        client, server = (here, self.peer) if self.side is Direction.UP else (self.peer, here)
        self._flow = Flow(
            id=self.flow_id,
            transport=self.transport,
            client=client,
            server=server,
            listener=server,
            started_at=self._wall_started,
            state=FlowState.OPEN,
        )
        self._bus.emit(FlowOpened(self._flow))

    def _wanted_mask(self) -> int:
        mask = _IN | _RDHUP if self._is_reading else 0
        if self._out:
            mask |= _OUT
        return mask

    def _update_mask(self) -> None:
        mask = self._wanted_mask()
        if self._mask == -1:  # parked: the socket is closed both ways
            return
        if mask != self._mask:
            self._mask = mask
            self.loop.modify(self.fd, mask)

    # -- events ------------------------------------------------------------------------------

    def on_ready(self, mask: int, now: float) -> None:
        if self.is_finished:
            return
        if self.is_connecting:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail(f"cannot connect to {self.peer}: {os.strerror(err)}", refused=True)
                return
            self.is_connecting = False
            self.loop.set_timer(self, None)
            self._update_mask()
            self._connected(now)
            if self.is_finished:
                return
        if mask & _OUT and self._out:
            self._flush(now)
            if self.is_finished:
                return
        if self._is_reading and mask & ~_OUT:
            self._read(now)
        elif mask & (_HUP | _ERR) and not self._out:
            # Not reading any more, yet epoll reports these regardless of the mask.
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.on_peer_reset(now)
            elif self._mask == 0:
                self.loop.unregister(self.fd)
                self._mask = -1

    def on_timer(self, now: float) -> None:
        if self.is_finished:
            return
        if self.is_connecting:
            self.fail(f"cannot connect to {self.peer}: no answer", refused=True)
            return
        self.timer(now)

    def timer(self, now: float) -> None:
        """Hook for subclasses: the deadline the session set has come."""
        if self.player is not None:
            self.apply(self.player.on_timer(now), now)

    def _read(self, now: float) -> None:
        sock = self.sock
        buf = self.loop.buffer
        view = self.loop.view
        for _ in range(_READS_PER_EVENT):
            try:
                n = sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionRefusedError:
                self.fail(f"{self.peer} refused the datagram (port unreachable)")
                return
            except _RESET_ERRORS:
                self.on_peer_reset(now)
                return
            except OSError as exc:
                self.fail(f"reading from {self.peer}: {exc.strerror or exc}")
                return
            if n == 0 and self.transport is Transport.TCP:
                self._peer_ended(now)
                return
            if self._tls is not None:
                self._tls_received(view[:n], now)
            else:
                self.deliver(view[:n], now)
            if self.is_finished or not self._is_reading:
                return

    def _peer_ended(self, now: float) -> None:
        if self._tls is not None and not self._tls.is_up:
            self.fail(f"tls: {self.peer} closed the connection during the handshake")
            return
        self.peer_closed = True
        self._is_reading = False
        self._update_mask()
        self.on_peer_closed(now)

    def _tls_received(self, records: memoryview, now: float) -> None:
        """Feed TLS records read from the socket; deliver the plaintext they carry."""
        tls = self._tls
        assert tls is not None
        tls.incoming.write(records)
        if not tls.is_up:
            self._tls_handshake(now)
            if not tls.is_up or self.is_finished:
                return
        while not self.is_finished:
            try:
                plain = tls.obj.read(len(self.loop.buffer))
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify: the peer's end of the stream
                self._tls_flush(now)
                self._peer_ended(now)
                return
            except ssl.SSLError as exc:
                self.fail(tls_error(exc))
                return
            if not plain:
                break
            self.deliver(memoryview(plain), now)
        if not self.is_finished:
            self._tls_flush(now)  # post-handshake messages (key updates) want an answer

    def deliver(self, data: memoryview, now: float) -> None:
        """Take bytes (a datagram) from the peer, whether read here or handed over."""
        if self._bus is not None:
            self._emit_data(bytes(data), self._peer_direction())
        if len(self.received) + len(data) <= self._max_received:
            self.received += data
        else:
            self.is_received_truncated = True
        self.on_data(data, now)

    def on_data(self, data: memoryview, now: float) -> None:
        """Hook for subclasses: the peer sent `data` (a view into the loop's buffer)."""
        if self.player is not None:
            self.apply(self.player.on_data(len(data), now), now)

    def on_peer_closed(self, now: float) -> None:
        if self.player is not None:
            self.apply(self.player.on_peer_closed(now), now)
        elif not self.is_finished:
            self.finish()

    def on_peer_reset(self, now: float) -> None:
        """The peer reset the connection: expected if the recording ended that way."""
        player = self.player
        if player is not None and player.is_expecting_peer_reset:
            self.finish()
        else:
            self.fail(f"{self.peer} reset the connection")

    def _peer_direction(self) -> Direction:
        return Direction.DOWN if self.side is Direction.UP else Direction.UP

    def _emit_data(self, data: bytes, direction: Direction) -> None:
        assert self._bus is not None
        if self._bus.wants_data:
            self._bus.emit(FlowData(self.flow_id, direction, time.time(), data))

    # -- commands ----------------------------------------------------------------------------

    def apply(self, commands: list[Command], now: float) -> None:
        for command in commands:
            if self.is_finished:
                return
            if isinstance(command, Send):
                self._send(command.data, now)
            elif isinstance(command, HalfClose):
                self._half_close_pending = True
                self._we_closed_first = not self.peer_closed
                if not self._out:
                    self._shutdown_write()
            elif isinstance(command, Reset):
                self.finish(reset=True)
            elif isinstance(command, Close):
                if not self.peer_closed:
                    self._we_closed_first = True
                if self._out:
                    self._close_pending = True
                else:
                    self.finish()
        self._arm_timer()

    def _arm_timer(self) -> None:
        if self.is_finished or self.player is None:
            return
        deadline = self.player.next_deadline
        self.loop.set_timer(self, deadline)

    def _send(self, data: bytes, now: float) -> None:
        if self._bus is not None:
            self._emit_data(data, self.side)
        if self.transport is Transport.UDP:
            try:
                self.sock.send(data)
            except BlockingIOError:
                return  # a full socket buffer drops the datagram, as the network would
            except ConnectionRefusedError:
                self.fail(f"{self.peer} refused the datagram (port unreachable)")
            except OSError as exc:
                self.fail(f"sending to {self.peer}: {exc.strerror or exc}")
            return
        if self._tls is not None:
            self._tls.obj.write(data)
            data = self._tls.outgoing.read()
        self._send_raw(data, now)

    def _send_raw(self, data: bytes, now: float) -> None:
        """Send bytes as they go on the wire (ciphertext under TLS), queueing what waits."""
        if self._out:
            self._out.append(memoryview(data))
            return
        sent = self._send_some(data, now)
        if sent is None:
            return
        if sent < len(data):
            self._out.append(memoryview(data)[sent:])
            self._update_mask()

    def _send_some(self, data: bytes | memoryview, now: float) -> int | None:
        """Bytes of `data` the socket took (0 when full), or None when the peer reset or the
        send failed (the session then ends as it says)."""
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0
        except _RESET_ERRORS:
            self.on_peer_reset(now)
        except OSError as exc:
            self.fail(f"sending to {self.peer}: {exc.strerror or exc}")
        return None

    def _flush(self, now: float) -> None:
        out = self._out
        while out:
            sent = self._send_some(out[0], now)
            if sent is None:
                return
            if sent < len(out[0]):
                out[0] = out[0][sent:]
                return
            out.pop(0)
        self._update_mask()
        if self._close_pending:
            self.finish()
        elif self._half_close_pending:
            self._shutdown_write()

    def _shutdown_write(self) -> None:
        tls = self._tls
        if tls is not None and tls.is_up and not tls.is_closing:
            # TLS has no half-close of its own: close_notify first, then the TCP FIN.
            tls.is_closing = True
            with contextlib.suppress(ssl.SSLError):
                tls.obj.unwrap()
            records = tls.outgoing.read()
            if records:
                self._half_close_pending = True
                self._send_raw(records, time.monotonic())
                if self._out or self.is_finished:
                    return
        self._half_close_pending = False
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno not in (errno.ENOTCONN, errno.EPIPE):
                self.fail(f"closing towards {self.peer}: {exc.strerror or exc}")

    # -- the end -----------------------------------------------------------------------------

    def fail(self, error: str, *, refused: bool = False) -> None:
        if self.player is not None:
            self.player.abort()
        self._finish(error=error, reset=not refused, refused=refused)

    def finish(self, *, reset: bool = False) -> None:
        self._finish(error=None, reset=reset, refused=False)

    def _finish(self, *, error: str | None, reset: bool, refused: bool) -> None:
        if self.is_finished:
            return
        self.is_finished = True
        self.loop.set_timer(self, None)
        self.loop.unregister(self.fd)
        if reset and self.transport is Transport.TCP:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self.sock.close()
        now = time.monotonic()
        if self._bus is not None:
            self._closed_event(error, reset=reset, refused=refused)
        player = self.player
        result = SessionResult(
            script=None if player is None else player.script,
            side=self.side,
            started_at=self._wall_started,
            duration_s=now - self.started_at,
            turns_sent=0 if player is None else player.turns_sent,
            turns_total=0 if player is None else player.turns_total,
            bytes_sent=0 if player is None else player.bytes_sent,
            peer_bytes=len(self.received) if player is None else player.peer_bytes,
            peer_bytes_expected=0 if player is None else player.peer_bytes_expected,
            waits_timed_out=0 if player is None else player.waits_timed_out,
            received=bytes(self.received),
            is_received_truncated=self.is_received_truncated,
            error=error,
            peer=self.peer,
        )
        self._on_done(self, result)

    def _closed_event(self, error: str | None, *, reset: bool, refused: bool) -> None:
        assert self._bus is not None
        ours_closed, ours_reset, peer_closed, peer_reset = (
            (
                CloseReason.CLIENT_CLOSED,
                CloseReason.CLIENT_RESET,
                CloseReason.SERVER_CLOSED,
                CloseReason.SERVER_RESET,
            )
            if self.side is Direction.UP
            else (
                CloseReason.SERVER_CLOSED,
                CloseReason.SERVER_RESET,
                CloseReason.CLIENT_CLOSED,
                CloseReason.CLIENT_RESET,
            )
        )
        if refused:
            reason = CloseReason.UPSTREAM_REFUSED
        elif error is not None:
            reason = peer_reset if "reset" in error else CloseReason.ERROR
        elif reset:
            reason = ours_reset
        elif self._we_closed_first:
            reason = ours_closed
        else:
            reason = peer_closed
        flow = self._flow or Flow(
            id=self.flow_id,
            transport=self.transport,
            client=self.peer,
            server=self.peer,
            listener=self.peer,
            started_at=self._wall_started,
        )
        if self._flow is None:
            self._bus.emit(FlowOpened(flow))
        player = self.player
        sent = 0 if player is None else player.bytes_sent
        got = len(self.received) if player is None else player.peer_bytes
        up, down = (sent, got) if self.side is Direction.UP else (got, sent)
        self._bus.emit(
            FlowClosed(
                flow.closed(
                    ended_at=time.time(),
                    bytes_up=up,
                    bytes_down=down,
                    reason=reason,
                    error=error,
                )
            )
        )
