"""The relay: worker threads that each multiplex many flows with edge-triggered epoll.

Every flow lives on one worker from accept to close, so a flow's events are emitted in order
from one thread. Each worker owns one receive buffer; a chunk is copied at most once, for the
observers, and only when an observer wants data; when the only one that does is a
`ChunkSink` (the capture), chunks are received straight into its memory and sent from there.
A destination that cannot take more stops its source from being read (backpressure), so a
stalled peer costs at most one chunk.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import heapq
import itertools
import logging
import math
import os
import resource
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias, cast

from .errors import FlowtapError, describe_failure, log_failure
from .events import Bus, Loan
from .flow import (
    Address,
    CloseReason,
    Direction,
    Flow,
    FlowClosed,
    FlowData,
    FlowOpened,
    Transport,
    next_flow_id,
)
from .listener import ListenerSpec, bind, bound_address, resolve
from .udp import UdpListener, UdpSession, check_spec

if TYPE_CHECKING:
    # Imported when a flow first needs TLS: cryptography and ssl cost ~60 ms of start-up.
    from .tls_intercept import TlsSettings
    from .tls_relay import TlsTcpFlow

log = logging.getLogger(__name__)

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_ERR = select.EPOLLERR
_HUP = select.EPOLLHUP
_ET = select.EPOLLET
_RDHUP = select.EPOLLRDHUP
_FLOW_EVENTS = _IN | _OUT | _ERR | _RDHUP | _ET
_LINGER_RESET = struct.pack("ii", 1, 0)
# How many chunks one direction may move before other flows get a turn.
_CHUNKS_PER_TURN = 8
_RESET_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
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
    # them (see `Worker.run`); 0 turns it off.
    busy_poll_s: float = 200e-6
    # TLS interception or passthrough of TCP flows (`--tls`); None relays bytes untouched.
    tls: TlsSettings | None = None


@dataclass(slots=True)
class BoundListener:
    """A listening socket with where its flows go."""

    spec: ListenerSpec
    sock: socket.socket
    address: Address
    upstream_family: int
    upstream_sockaddr: object
    upstream: Address

    def describe(self) -> str:
        """The `listening ...` line the CLI prints once the listener is ready."""
        return f"listening {self.spec.transport} {self.address} -> {self.spec.upstream}"


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
        "src",
        "wants_data",
        "writable",
    )

    def __init__(self, src: socket.socket, dst: socket.socket, direction: Direction) -> None:
        self.src = src
        self.dst = dst
        self.direction = direction
        self.dst_is_client = direction is Direction.DOWN
        self.pending: memoryview | None = None
        self.readable = True
        self.writable = True
        self.eof = False
        self.peer_closed = False
        self.shut = False
        self.count = 0
        self.wants_data = True


def _send(pipe: _Pipe, data: memoryview | list[memoryview]) -> int:
    """Send what `pipe.dst` takes now (a list in one `sendmsg`); its failure is a _SideReset."""
    try:
        return pipe.dst.sendmsg(data) if isinstance(data, list) else pipe.dst.send(data)
    except BlockingIOError:
        return 0
    except _RESET_ERRORS as exc:
        raise _SideReset(pipe.dst_is_client, exc.strerror or "reset") from None
    except OSError as exc:
        raise _SideReset(pipe.dst_is_client, exc.strerror or str(exc)) from None


class _TcpFlow:
    """A TCP flow owned by one worker: connect upstream, relay both ways, close exactly once."""

    is_tls = False

    __slots__ = (
        "client",
        "closed",
        "connecting",
        "down",
        "first_eof",
        "flow",
        "last_active",
        "queued",
        "server",
        "up",
        "worker",
    )

    def __init__(
        self, worker: Worker, flow: Flow, client: socket.socket, server: socket.socket
    ) -> None:
        self.worker = worker
        self.flow = flow
        self.client = client
        self.server = server
        self.up = _Pipe(client, server, Direction.UP)
        self.down = _Pipe(server, client, Direction.DOWN)
        self.connecting = True
        self.closed = False
        self.queued = False
        self.first_eof: CloseReason | None = None
        self.last_active = time.monotonic()

    # -- events from the worker ------------------------------------------------------------

    def on_ready(self, fd: int, mask: int, now: float) -> None:
        if self.closed:
            return
        if self.connecting:
            if fd == self.server.fileno():
                self._finish_connect(mask)
            return
        is_client = fd == self.client.fileno()
        if mask & _ERR:
            sock = self.client if is_client else self.server
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._reset(is_client, os.strerror(err))
                return
        reading, writing = (self.up, self.down) if is_client else (self.down, self.up)
        if mask & (_IN | _HUP | _ERR | _RDHUP):
            reading.readable = True
            if mask & (_RDHUP | _HUP):
                reading.peer_closed = True
        if mask & _OUT:
            writing.writable = True
        self.progress(now)

    def progress(self, now: float) -> None:
        """Move whatever bytes can move now, in both directions."""
        self.queued = False
        try:
            again = self._pump(self.up, now)
            again = self._pump(self.down, now) or again
        except _SideReset as exc:
            self._reset(exc.is_client, str(exc))
            return
        if self.up.shut and self.down.shut:
            self.worker.close_flow(self, self.first_eof or CloseReason.CLIENT_CLOSED)
        elif again and not self.queued:
            self.queued = True
            self.worker.ready.append(self)

    def _pump(self, pipe: _Pipe, now: float) -> bool:
        """Relay one direction; return True if it stopped only to let other flows run."""
        if pipe.pending is not None:
            if not pipe.writable:
                return False
            self._flush(pipe)
            if pipe.pending is not None:
                return False
        worker = self.worker
        buf = worker.buffer
        view = worker.view
        size = len(buf)
        src = pipe.src
        dst = pipe.dst
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
            try:
                if copying and sink is not None:
                    # Received into the sink's memory (the capture's file buffer): no copy.
                    n, parts, loan, asked = sink.receive(self.flow.id, pipe.direction, src, size)
                elif copying:
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
            except _RESET_ERRORS as exc:
                raise _SideReset(not pipe.dst_is_client, exc.strerror or "reset") from None
            except OSError as exc:
                raise _SideReset(not pipe.dst_is_client, exc.strerror or str(exc)) from None
            if n == 0:
                pipe.eof = True
                if self.first_eof is None:
                    self.first_eof = (
                        CloseReason.SERVER_CLOSED
                        if pipe.dst_is_client
                        else CloseReason.CLIENT_CLOSED
                    )
                break
            if n < asked and not pipe.peer_closed:
                # Edge-triggered epoll reports any later arrival as a new event; a FIN that
                # came with this data was flagged by EPOLLRDHUP, so the loop reads on to it.
                pipe.readable = False
            self.last_active = now
            pipe.count += n
            if copying and sink is not None:
                try:
                    if not self._send_parts(pipe, parts, n):
                        return False
                finally:
                    if loan is not None:
                        loan.release()
                continue
            if copying:
                event = FlowData(self.flow.id, pipe.direction, time.time(), data)
                pipe.wants_data = bus.emit_data(event)
                chunk = memoryview(data)
            else:
                chunk = view[:n]
            sent = _send(pipe, chunk)
            if sent < n:
                pipe.pending = memoryview(bytes(chunk[sent:])) if chunk.obj is buf else chunk[sent:]
                pipe.writable = False
                return False
        if pipe.eof and pipe.pending is None and not pipe.shut:
            pipe.shut = True
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError as exc:
                raise _SideReset(pipe.dst_is_client, exc.strerror or str(exc)) from None
        return False

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

    def _finish_connect(self, mask: int) -> None:
        err = self.server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.worker.fail_connect(self, err)
            return
        try:
            self.server.getpeername()
        except OSError:
            return  # not connected yet: a stale event for a reused descriptor
        self.connecting = False
        self.worker.connected(self)

    def _reset(self, is_client: bool, text: str) -> None:
        reason = CloseReason.CLIENT_RESET if is_client else CloseReason.SERVER_RESET
        self.worker.close_flow(self, reason, reset=True, error=text)

    def snapshot(self, reason: CloseReason, error: str | None) -> Flow:
        return self.flow.closed(
            ended_at=time.time(),
            bytes_up=self.up.count,
            bytes_down=self.down.count,
            reason=reason,
            error=error,
        )


class _Accepter:
    """Accepts clients of one listener on behalf of one worker."""

    __slots__ = ("listener", "worker")

    def __init__(self, worker: Worker, listener: BoundListener) -> None:
        self.worker = worker
        self.listener = listener

    def on_ready(self, fd: int, mask: int, now: float) -> None:
        sock = self.listener.sock
        worker = self.worker
        for _ in range(64):
            try:
                client, addr = sock.accept()
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    worker.pause_accepting(exc)
                    return
                if not worker.stopping:
                    log.warning("accept on %s failed: %s", self.listener.address, exc.strerror)
                return
            worker.start_flow(self.listener, client, addr)


class _Waker:
    """Runs commands that other threads queue for a worker."""

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


_Handler: TypeAlias = "_TcpFlow | TlsTcpFlow | _Accepter | _Waker | UdpListener | UdpSession"


class Worker(threading.Thread):
    """One relay thread: an epoll loop over its listeners' accepts and its flows' sockets."""

    def __init__(
        self,
        index: int,
        listeners: Sequence[BoundListener],
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
        self.ready: collections.deque[_TcpFlow | TlsTcpFlow | UdpListener | UdpSession] = (
            collections.deque()
        )
        self.flows: dict[int, _TcpFlow | TlsTcpFlow] = {}
        self.stopping = False
        self._listeners = list(listeners)
        self._on_empty = on_empty
        self._on_failure = on_failure
        self.failure: BaseException | None = None
        self._ep = select.epoll()
        self._handlers: dict[int, _Handler] = {}
        self._deadlines: list[tuple[float, int, _TcpFlow | TlsTcpFlow]] = []
        self._seq = itertools.count()
        self._commands: collections.deque[tuple[str, object]] = collections.deque()
        self._exit = False
        self._reported_empty = False
        self._accept_resume_at: float | None = None
        self._next_idle_scan = time.monotonic() + self._idle_scan_interval()
        try:
            self._waker = _Waker(self)
        except BaseException:
            self._ep.close()
            raise
        self._register(self._waker.fd, _IN, self._waker)
        self._accepters = [
            _Accepter(self, listener)
            for listener in self._listeners
            if listener.spec.transport is Transport.TCP
        ]
        self._watch_listeners()
        # A UDP listener is owned by one worker (see Relay), which relays all its sessions.
        self.udp = [
            UdpListener(self, listener)
            for listener in self._listeners
            if listener.spec.transport is Transport.UDP
        ]
        for udp in self.udp:
            self._register(udp.sock.fileno(), _IN | _ET, udp)

    # -- cross-thread commands -------------------------------------------------------------

    def submit(self, command: str, argument: object = None) -> None:
        """Queue a command for this worker's thread: stop-accepting, kill, close-all, exit."""
        self._commands.append((command, argument))
        self._waker.wake()

    def run_commands(self) -> None:
        while self._commands:
            command, argument = self._commands.popleft()
            if command == "stop-accepting":
                self.stopping = True
                self._unwatch_listeners()
                for udp in self.udp:
                    udp.stop_accepting(time.monotonic())
            elif command == "kill":
                flow = self.flows.get(int(argument))  # type: ignore[call-overload]
                if flow is not None:
                    self.close_flow(flow, CloseReason.KILLED, reset=True)
                for udp in self.udp:
                    udp.kill(int(argument))  # type: ignore[call-overload]
            elif command == "close-all":
                for flow in list(self.flows.values()):
                    self.close_flow(flow, CloseReason(str(argument)))
                for udp in self.udp:
                    udp.close_all(CloseReason(str(argument)))
            elif command == "exit":
                self._exit = True
        self._check_empty()

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
        error = None
        if self.failure is not None:
            error = f"the relay thread failed: {describe_failure(self.failure)}"
        reason = CloseReason.SHUTDOWN if error is None else CloseReason.ERROR
        for flow in list(self.flows.values()):
            self.close_flow(flow, reason, reset=error is not None, error=error)
        for udp in self.udp:
            udp.close_all(reason, note=error)

    def _loop(self) -> None:
        poll = self._ep.poll
        handlers = self._handlers
        ready = self.ready
        udp_listeners = self.udp
        # Busy polling, like HAProxy's `busy-polling`: each time a thread sleeps in the poller
        # its CPU may halt, and on a virtual machine waking it again costs tens of
        # microseconds, more than relaying a datagram. So while events keep coming closer
        # together than `busy_poll_s` (a running average of the gaps), the worker polls
        # without sleeping, for at most `busy_poll_s` after the last event: sparse traffic
        # never spins, and an idle relay sleeps. Measured here against `--busy-poll 0`: UDP
        # ping-pong x1.7-1.8 and request/response with 16 in flight x1.6-1.9
        # (benchmarks/udp.py), TCP ping-pong p50 52 -> 40 us (benchmarks/relay.py).
        busy_poll_s = self.config.busy_poll_s
        cold_gap_s = 4 * busy_poll_s  # the gap counted for a sleep, however long it was
        average_gap_s = cold_gap_s
        last_event = 0.0
        while not self._exit:
            if ready:
                events = poll(0.0)
            elif average_gap_s < busy_poll_s and time.monotonic() - last_event < busy_poll_s:
                events = poll(0.0)
                if not events:
                    os.sched_yield()  # a peer on this CPU goes first
                    continue
            else:
                events = poll(self._poll_timeout())
            now = time.monotonic()
            if events:
                gap = min(now - last_event, cold_gap_s)
                average_gap_s += (gap - average_gap_s) / 8
                last_event = now
            for fd, mask in events:
                handler = handlers.get(fd)
                if handler is not None:
                    handler.on_ready(fd, mask, now)
            if ready:
                for _ in range(len(ready)):
                    flow = ready.popleft()
                    if not flow.closed:
                        flow.progress(now)
            if self._deadlines or self._accept_resume_at is not None:
                self._check_deadlines(now)
            if now >= self._next_idle_scan:
                self._scan_idle(now)
            for udp in udp_listeners:
                if now >= udp.deadline:
                    udp.on_deadline(now)
                    self._check_empty()

    def release(self) -> None:
        """Free the wake-up descriptor; only after the thread has ended, so no submit races it."""
        os.close(self._waker.fd)

    def discard(self) -> None:
        """Free the descriptors of a worker that never started."""
        self._ep.close()
        self.release()

    def _poll_timeout(self) -> float:
        now = time.monotonic()
        wake_at = self._next_idle_scan if self.config.idle_timeout_s else None
        if self._deadlines:
            first = self._deadlines[0][0]
            wake_at = first if wake_at is None else min(wake_at, first)
        if self._accept_resume_at is not None:
            resume = self._accept_resume_at
            wake_at = resume if wake_at is None else min(wake_at, resume)
        for udp in self.udp:
            if udp.deadline != math.inf:
                wake_at = udp.deadline if wake_at is None else min(wake_at, udp.deadline)
        if wake_at is None:
            return -1.0
        return min(max(0.0, wake_at - now), _MAX_SLEEP_S)

    def _idle_scan_interval(self) -> float:
        idle = self.config.idle_timeout_s
        return min(1.0, idle / 4) if idle else 3600.0

    def _scan_idle(self, now: float) -> None:
        self._next_idle_scan = now + self._idle_scan_interval()
        idle = self.config.idle_timeout_s
        if not idle:
            return
        limit = now - idle
        for flow in [f for f in self.flows.values() if f.last_active < limit]:
            self.close_flow(flow, CloseReason.IDLE_TIMEOUT)

    def _check_deadlines(self, now: float) -> None:
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, _, flow = heapq.heappop(deadlines)
            if not flow.connecting and flow.is_tls:
                cast("TlsTcpFlow", flow).on_deadline(now)
            elif flow.connecting and not flow.closed:
                self.close_flow(
                    flow,
                    CloseReason.UPSTREAM_TIMEOUT,
                    reset=True,
                    error=f"no answer from {flow.flow.server} within "
                    f"{self.config.connect_timeout_s:g} s",
                )
        if self._accept_resume_at is not None and now >= self._accept_resume_at:
            self._accept_resume_at = None
            if not self.stopping:
                self._watch_listeners()

    # -- registration -----------------------------------------------------------------------

    def _register(self, fd: int, mask: int, handler: _Handler) -> None:
        self._handlers[fd] = handler
        self._ep.register(fd, mask)

    def _unregister(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(fd)

    def watch(self, fd: int, mask: int, handler: UdpSession) -> None:
        """Deliver the epoll events of `fd` to `handler` on this worker's thread."""
        self._register(fd, mask, handler)

    def unwatch(self, fd: int) -> None:
        """Stop delivering the events of `fd`; call before closing it."""
        self._unregister(fd)

    def _watch_listeners(self) -> None:
        for accepter in self._accepters:
            fd = accepter.listener.sock.fileno()
            if fd >= 0 and fd not in self._handlers:
                self._register(fd, _IN | select.EPOLLEXCLUSIVE, accepter)

    def _unwatch_listeners(self) -> None:
        for accepter in self._accepters:
            fd = accepter.listener.sock.fileno()
            if fd >= 0:
                self._unregister(fd)

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
        self._accept_resume_at = time.monotonic() + 0.1

    # -- flow life cycle --------------------------------------------------------------------

    def start_flow(self, listener: BoundListener, client: socket.socket, addr: object) -> None:
        started = time.time()
        client.setblocking(False)
        if client.family != socket.AF_UNIX:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client_address = Address(host=str(addr[0]), port=int(addr[1]))  # type: ignore[index]
        else:
            client_address = Address(host="", path=str(addr) or listener.address.path or "")
        flow = Flow(
            id=next_flow_id(),
            transport=Transport.TCP,
            client=client_address,
            server=listener.upstream,
            listener=listener.address,
            started_at=started,
        )
        try:
            server = socket.socket(listener.upstream_family, socket.SOCK_STREAM)
        except OSError as exc:
            self.bus.emit(FlowOpened(flow))
            _reset_and_close(client)
            self.bus.emit(
                FlowClosed(
                    flow.closed(
                        ended_at=time.time(),
                        bytes_up=0,
                        bytes_down=0,
                        reason=CloseReason.ERROR,
                        error=exc.strerror,
                    )
                )
            )
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self.pause_accepting(exc)
            return
        server.setblocking(False)
        if listener.upstream_family != socket.AF_UNIX:
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = self.config.tls
        tcp: _TcpFlow | TlsTcpFlow
        if tls is not None and not listener.upstream.is_unix:
            from .tls_relay import TlsTcpFlow

            tcp = TlsTcpFlow(self, flow, client, server, tls)
        else:
            tcp = _TcpFlow(self, flow, client, server)
        self.flows[flow.id] = tcp
        self.bus.emit(FlowOpened(flow))
        err = server.connect_ex(listener.upstream_sockaddr)  # type: ignore[arg-type]
        if err in (0, errno.EINPROGRESS, errno.EAGAIN):
            self._register(server.fileno(), _FLOW_EVENTS, tcp)
            deadline = time.monotonic() + self.config.connect_timeout_s
            heapq.heappush(self._deadlines, (deadline, next(self._seq), tcp))
        else:
            self.fail_connect(tcp, err)

    def connected(self, tcp: _TcpFlow | TlsTcpFlow) -> None:
        self._register(tcp.client.fileno(), _FLOW_EVENTS, tcp)
        if tcp.is_tls:
            tcp = cast("TlsTcpFlow", tcp)
            now = time.monotonic()
            tcp.on_connected(now)
            if not tcp.closed:
                heapq.heappush(self._deadlines, (tcp.handshake_deadline, next(self._seq), tcp))

    def fail_connect(self, tcp: _TcpFlow | TlsTcpFlow, err: int) -> None:
        if err == errno.ECONNREFUSED or err == errno.ENOENT:
            reason = CloseReason.UPSTREAM_REFUSED
        elif err == errno.ETIMEDOUT:
            reason = CloseReason.UPSTREAM_TIMEOUT
        else:
            reason = CloseReason.ERROR
        self.close_flow(
            tcp, reason, reset=True, error=f"connect to {tcp.flow.server}: {os.strerror(err)}"
        )

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
        for sock in (tcp.client, tcp.server):
            fd = sock.fileno()
            if fd >= 0:
                self._unregister(fd)
                if reset:
                    _reset_and_close(sock)
                else:
                    sock.close()
        del self.flows[tcp.flow.id]
        self.emit_closed(tcp.snapshot(reason, error))
        if self._accept_resume_at is not None and not self.stopping:
            self._accept_resume_at = time.monotonic()
        self._check_empty()

    def emit_closed(self, flow: Flow) -> None:
        """Emit a flow's one `FlowClosed`; after a failure, to each observer whatever it raises."""
        if self.failure is None:
            self.bus.emit(FlowClosed(flow))
        else:
            self.bus.emit_each(FlowClosed(flow))

    def _check_empty(self) -> None:
        if any(udp.sessions for udp in self.udp):
            return
        if self.stopping and not self.flows and not self._reported_empty:
            self._reported_empty = True
            self._on_empty()


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
        try:
            for spec in specs:
                if spec.transport is Transport.UDP:
                    check_spec(spec)
                family, sockaddr = resolve(spec.upstream, spec.transport)
                sock = bind(spec)
                self.listeners.append(
                    BoundListener(
                        spec=spec,
                        sock=sock,
                        address=bound_address(sock, spec),
                        upstream_family=family,
                        upstream_sockaddr=sockaddr,
                        upstream=_sockaddr_address(family, sockaddr, spec.upstream),
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
        try:
            for i in range(count):
                self._workers.append(
                    Worker(
                        i, tcp + udp[i::count], bus, self.config, self._worker_empty, self._failed
                    )
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
        return sum(
            len(worker.flows) + sum(len(udp.sessions) for udp in worker.udp)
            for worker in self._workers
        )

    def byte_counts(self, flow_id: int) -> tuple[int, int] | None:
        """Bytes a live TCP flow has moved so far (up, down), or None if it is not live."""
        for worker in self._workers:
            flow = worker.flows.get(flow_id)
            if flow is not None:
                return flow.up.count, flow.down.count
        return None

    def kill(self, flow_id: int) -> None:
        """Reset both sides of a live flow; a flow that already ended is ignored."""
        for worker in self._workers:
            worker.submit("kill", flow_id)

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
            worker.submit("stop-accepting")
        self._empty.wait(min(grace_s, threading.TIMEOUT_MAX))
        for worker in self._workers:
            worker.submit("close-all", CloseReason.SHUTDOWN.value)
            worker.submit("exit")
        for worker in self._workers:
            worker.join()
            worker.release()
        self._close_listeners()

    def _close_listeners(self) -> None:
        for listener in self.listeners:
            listener.sock.close()
            if listener.address.path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(listener.address.path)
