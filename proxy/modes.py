"""Proxy-mode flows before they have an upstream: the client's handshake (SOCKS, HTTP proxy)
or its original destination (transparent), run inside a relay worker without blocking it.

A client of a proxy-mode listener is read by a `HandshakePhase` until its handshake decides
a destination. Names are resolved off the relay thread (`Resolver`) and the answer comes
back through the worker's command queue. The worker then connects upstream like any flow;
the handshake's reply and the bytes the client sent after its request (`Prelude`) are
delivered once the connection is up. The relay decides the common cases at accept without
a phase (a redirected client whose destination it has seen, a CONNECT whose head came whole
in the common form), with the same checks kept from a first time; every flow, decided
either way, reaches `connect_upstream` with its destination and first bytes, where what
wants to look at them (TLS interception) hooks.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from .events import Bus
from .flow import (
    Address,
    CloseReason,
    Flow,
    Requested,
    Transport,
    next_flow_id,
)
from .handshake import Command, Failure, Handshake, OpenUpstream, Reject, SendReply
from .http_proxy import HttpProxyServer
from .policy import Mode, ProxyPolicy
from .socks5 import SocksServer
from .socks_udp import UdpAssociation
from .udp_sessions import DatagramFlow

_IN = select.EPOLLIN
_RDHUP = select.EPOLLRDHUP
_HUP = select.EPOLLHUP
_ERR = select.EPOLLERR
_ET = select.EPOLLET
# What a TCP flow watches its sockets for. A proxy client is watched with it from accept on,
# so that its flow takes it over without another epoll call; its handshake ignores writability.
FLOW_EVENTS = _IN | select.EPOLLOUT | _ERR | _RDHUP | _ET
# Handshakes are short; what does not fit in this is not a handshake (HTTP heads stop at 64 KiB).
HANDSHAKE_READ_BYTES = 16 * 1024

# linux/netfilter_ipv4.h and linux/netfilter_ipv6/ip6_tables.h: both are option 80.
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
_SOL_IPV6 = 41
_SOL_IP = socket.SOL_IP
_SOCKADDR_IN_BYTES = 16
_SOCKADDR_IN6_BYTES = 28

# Enum members as module names for the per-connection path: looked up on its class, a
# member costs ~0.2 us in Python 3.11 (a Python-level descriptor), a module global a tenth.
_SOCKS5 = Mode.SOCKS5
_TRANSPARENT = Mode.TRANSPARENT
_UDP_ASSOCIATE = Command.UDP_ASSOCIATE
_TCP = Transport.TCP


class Prelude(NamedTuple):
    """What a proxy-mode flow owes once its upstream answers: the handshake's reply to the
    client, the bytes the client sent after its request, for the server, and a read of the
    client if it may have sent more that no event will announce again (`unread`).

    A named tuple rather than a frozen dataclass: one is built per proxy-mode connection,
    on the relay's thread, and a tuple is built in half the time.
    """

    handshake: Handshake | None
    early_data: bytes
    unread: bool


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a decided flow connects: its socket family and address, as resolved."""

    family: int
    sockaddr: tuple[str, int] | tuple[str, int, int, int]

    @property
    def address(self) -> Address:
        return Address(host=self.sockaddr[0], port=self.sockaddr[1])


class ProxyWorker(Protocol):
    """What a handshake phase needs of the TCP flows of the relay worker that owns it."""

    bus: Bus
    resolver: Resolver
    datagram_flows: dict[int, DatagramFlow]

    def watch_client(self, fd: int, mask: int, phase: HandshakePhase) -> None: ...

    def unwatch(self, fd: int) -> None: ...

    def add_deadline(self, phase: HandshakePhase) -> None: ...

    def call_soon(self, callback: Callable[[], None]) -> None: ...

    def proxy_ended(self, item: object) -> None: ...

    def add_association(self, association: UdpAssociation) -> None: ...

    def watch_association(self, fd: int, mask: int, association: UdpAssociation) -> None: ...

    def resolve(
        self, host: str, port: int, done: Callable[[list[tuple[int, object]] | str], None]
    ) -> None: ...

    def literal_target(
        self, policy: ProxyPolicy, host: str, port: int
    ) -> tuple[Destination, Address] | str | None: ...

    def connect_upstream(
        self,
        flow: Flow,
        client: socket.socket,
        family: int,
        sockaddr: object,
        prelude: Prelude | None = None,
    ) -> None: ...


class Resolver:
    """Resolves host names on a few threads of its own, never on a relay thread."""

    def __init__(self, threads: int = 4) -> None:
        self._threads = threads
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def resolve(
        self, host: str, port: int, done: Callable[[list[Destination] | str], None]
    ) -> None:
        """Call `done` (on a resolver thread) with the addresses of `host`, or why none."""

        def work() -> None:
            done(resolve_now(host, port))

        with self._lock:
            # Started on first use: a relay without proxy listeners never has the threads.
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self._threads, thread_name_prefix="flowtap-resolve"
                )
            self._pool.submit(work)

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)


def resolve_now(host: str, port: int) -> list[Destination] | str:
    """The addresses of `host` (blocking: call off the relay thread), or why there are none."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        return f"cannot resolve {host!r}: {getattr(exc, 'strerror', None) or exc}"
    found = [
        Destination(family, sockaddr)  # type: ignore[arg-type]
        for family, _, _, _, sockaddr in infos
        if family in (socket.AF_INET, socket.AF_INET6)
    ]
    return found or f"cannot resolve {host!r}: no IPv4 or IPv6 address"


def literal_destination(host: str, port: int) -> Destination | None:
    """The destination of an address literal, or None if `host` is a name."""
    try:
        return Destination(
            socket.AF_INET,
            (socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, host)), port),
        )
    except OSError:
        pass
    try:
        packed = socket.inet_pton(socket.AF_INET6, host)
    except OSError:
        return None
    return Destination(socket.AF_INET6, (socket.inet_ntop(socket.AF_INET6, packed), port, 0, 0))


def read_original_destination(sock: socket.socket, is_ipv6: bool) -> bytes:
    """The socket address a redirected connection (an IPv6 socket if `is_ipv6`: the caller
    knows, where `sock.family` makes an enum for each connection) was made to, as netfilter's
    SO_ORIGINAL_DST gives it (a sockaddr_in6 or sockaddr_in); OSError if it was not
    redirected."""
    if is_ipv6:
        return sock.getsockopt(_SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6_BYTES)
    return sock.getsockopt(_SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN_BYTES)


def destination_of(raw: bytes) -> Destination:
    """The destination that a socket address `read_original_destination` read names."""
    port = raw[2] << 8 | raw[3]
    if len(raw) == _SOCKADDR_IN6_BYTES:
        return Destination(
            socket.AF_INET6, (socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, 0, 0)
        )
    return Destination(socket.AF_INET, (socket.inet_ntoa(raw[4:8]), port))


def original_destination(sock: socket.socket, is_ipv6: bool) -> Destination:
    """The address a redirected connection was made to (see `read_original_destination`)."""
    return destination_of(read_original_destination(sock, is_ipv6))


def literal_target(
    policy: ProxyPolicy, host: str, port: int
) -> tuple[Destination, Address] | str | None:
    """Where a client that asked for `host` and `port` connects, if `host` is an address
    and allowed there (the destination and its server address); why it may not go there;
    or None for a name, which is checked again once resolved. Depends on nothing but its
    arguments: the relay keeps the answers for the destinations it sees again."""
    refusal = policy.destination_refusal(host, port)
    if refusal is not None:
        return refusal
    destination = literal_destination(host, port)
    return None if destination is None else (destination, destination.address)


def transparent_target(
    listener: Address, policy: ProxyPolicy, host: str, port: int
) -> tuple[Address, Requested] | None:
    """The server address and the asked-for destination of a client redirected to `host`
    and `port`, if it may go there at once; None for a client that must be refused (a
    `HandshakePhase` then says why). Depends on nothing but its arguments: the relay keeps
    the answers for the destinations it sees again."""
    if port == listener.port and host == listener.host:
        return None  # made to the listener itself
    if policy.destination_refusal(host, port) is not None:
        return None
    return Address(host, port), Requested(host, port)


def _close_gently(sock: socket.socket) -> None:
    """Close after a reply so that it reaches the client: a close with unread bytes waiting
    would send a reset, which may destroy the reply before the client reads it."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        for _ in range(16):
            if not sock.recv(HANDSHAKE_READ_BYTES):
                break
    sock.close()


@dataclass(slots=True, eq=False)
class HandshakePhase:
    """One proxy-mode client from accept until its flow has a destination (or is refused)."""

    worker: ProxyWorker
    mode: Mode
    policy: ProxyPolicy
    client: socket.socket
    client_address: Address
    listener_address: Address
    started_at: float
    closed: bool = field(default=False, init=False)
    deciding: bool = field(default=False, init=False)
    # Whether the client may have sent bytes that no event will announce again (read by its
    # flow once connected).
    unread: bool = field(default=False, init=False)
    handshake: Handshake | None = field(default=None, init=False)

    def start(self, first: bytes = b"") -> None:
        """Begin: read the client's handshake (after `first`, bytes of it the relay read
        already), or find a transparent flow's destination."""
        worker = self.worker
        if self.mode is _TRANSPARENT:
            self._start_transparent()
            return
        credentials = self.policy.credentials
        self.handshake = (
            SocksServer(credentials) if self.mode is _SOCKS5 else HttpProxyServer(credentials)
        )
        fd = self.client.fileno()
        # Clients send their greeting as soon as they are connected: it is often here already,
        # and read now it costs no wait for the poll, nor a deadline, nor a watch of its own if
        # it was all there (the flow watches the client from its connect on). Watched once
        # read, the client's descriptor reports at once what came meanwhile (edge-triggered
        # epoll reports the state a descriptor is in when it is added).
        self.on_ready(fd, _IN, 0.0, first)
        if not self.closed and not self.deciding:
            worker.watch_client(fd, FLOW_EVENTS, self)
            worker.add_deadline(self)

    # -- events from the worker ------------------------------------------------------------

    def on_ready(self, fd: int, mask: int, now: float, first: bytes = b"") -> None:
        """Read the client (after `first`, bytes of it read already) and act on what its
        handshake says of them."""
        if self.closed or not mask & (_IN | _RDHUP | _HUP | _ERR):
            return
        if self.deciding:
            self.unread = True
            return
        handshake = self.handshake
        assert handshake is not None
        data = first
        while True:
            if not data:
                try:
                    data = self.client.recv(HANDSHAKE_READ_BYTES)
                except BlockingIOError:
                    return
                except OSError as exc:
                    self.close(
                        CloseReason.CLIENT_RESET, f"during the handshake: {exc.strerror or exc}"
                    )
                    return
                if not data:
                    self.close(
                        CloseReason.HANDSHAKE_ERROR, "the client closed during the handshake"
                    )
                    return
            for event in handshake.receive(data):
                if isinstance(event, SendReply):
                    if not self._send(event.data):
                        return
                elif isinstance(event, Reject):
                    self._send(event.reply)
                    self.close(event.reason, event.error)
                    return
                else:
                    # A full read may have left more behind; a short one drained the socket.
                    self.unread = len(data) == HANDSHAKE_READ_BYTES
                    self.decide(event)
                    return
            if len(data) < HANDSHAKE_READ_BYTES and not mask & (_RDHUP | _HUP | _ERR):
                # Drained: what the client sends next (a SOCKS request after its greeting's
                # reply, a few tens of microseconds later) has an event of its own, so no
                # read (and no exception) is spent to be told it is not there yet. An end or
                # error that came with this event is read on to.
                return
            data = b""

    def on_deadline(self, now: float = 0.0) -> None:
        """The handshake timeout: answer what the protocol has for it and close."""
        if self.closed or self.deciding:
            return
        handshake = self.handshake
        if handshake is not None:
            self._send(handshake.timed_out())
        self.close(
            CloseReason.HANDSHAKE_TIMEOUT,
            f"no complete handshake within {self.policy.handshake_timeout_s:g} s",
        )

    # -- deciding ---------------------------------------------------------------------------

    def decide(self, request: OpenUpstream) -> None:
        """The client asked for `request.requested`: check it, resolve it, connect."""
        self.deciding = True
        requested = request.requested
        if request.command is _UDP_ASSOCIATE:
            self.worker.unwatch(self.client.fileno())
            self._associate(requested)
            return
        target = self.worker.literal_target(self.policy, requested.host, requested.port)
        if isinstance(target, str):
            self.refuse(requested, Failure.NOT_ALLOWED, CloseReason.DENIED, target)
            return
        if target is not None:
            self._open(requested, target[0], target[1], request.early_data)
            return

        def resolved(found: list[Destination] | str) -> None:
            # On a resolver thread: hand the answer to the worker's thread.
            self.worker.call_soon(lambda: self._resolved(requested, found, request.early_data))

        self.worker.resolver.resolve(requested.host, requested.port, resolved)

    def _resolved(self, requested: Requested, found: list[Destination] | str, early: bytes) -> None:
        if self.closed:
            return
        if isinstance(found, str):
            self.refuse(requested, Failure.HOST_UNREACHABLE, CloseReason.UNRESOLVABLE, found)
            return
        refusal = ""
        for destination in found:
            # Checked again on the address: a name may resolve to a denied one.
            why = self.policy.destination_refusal(destination.sockaddr[0], requested.port)
            if why is None:
                self._open(requested, destination, destination.address, early)
                return
            refusal = refusal or f"{requested.host} resolves to {destination.address}: {why}"
        self.refuse(requested, Failure.NOT_ALLOWED, CloseReason.DENIED, refusal)

    def _open(
        self, requested: Requested, destination: Destination, server: Address, early: bytes
    ) -> None:
        self.closed = True
        worker = self.worker
        worker.proxy_ended(self)
        prelude = Prelude(self.handshake, early, self.unread)
        worker.connect_upstream(
            self._flow(server, requested),
            self.client,
            destination.family,
            destination.sockaddr,
            prelude,
        )

    def _associate(self, requested: Requested) -> None:
        """Open a UDP association for the client; the TCP connection keeps it alive."""
        handshake = self.handshake
        assert handshake is not None
        try:
            association = UdpAssociation(
                self.worker,
                self.client,
                self.client_address,
                self.listener_address,
                self.policy,
                (requested.host, requested.port),
                requested.user,
            )
        except OSError as exc:
            self.refuse(
                requested,
                Failure.GENERAL,
                CloseReason.ERROR,
                f"cannot open a UDP relay socket: {exc.strerror or exc}",
            )
            return
        self.closed = True
        self.worker.proxy_ended(self)
        try:
            self.client.send(handshake.succeeded(association.bound))
        except OSError:
            association.close(CloseReason.CLIENT_RESET, "the client left before the reply")
            return
        self.worker.add_association(association)
        association.start()

    def _start_transparent(self) -> None:
        try:
            destination = original_destination(self.client, self.client_address.is_ipv6)
        except OSError as exc:
            self.close(
                CloseReason.ERROR,
                f"no original destination ({exc.strerror or exc}): is the traffic redirected "
                "by iptables/nftables?",
            )
            return
        requested = Requested(destination.sockaddr[0], destination.sockaddr[1])
        if (
            destination.sockaddr[1] == self.listener_address.port
            and destination.sockaddr[0] == self.listener_address.host
        ):
            # Not redirected: a client that connected to the listener itself; relaying it
            # would connect flowtap to itself.
            self.close(
                CloseReason.DENIED,
                "the connection was made to the listener itself, not redirected to it",
                requested,
            )
            return
        refusal = self.policy.destination_refusal(requested.host, requested.port)
        if refusal is not None:
            self.close(CloseReason.DENIED, refusal, requested)
            return
        self._open(requested, destination, destination.address, b"")

    # -- ending -----------------------------------------------------------------------------

    def refuse(
        self, requested: Requested, failure: Failure, reason: CloseReason, error: str
    ) -> None:
        """Tell the client its destination is refused (the protocol's reply), then close."""
        if self.handshake is not None:
            self._send(self.handshake.failed(failure))
        self.close(reason, error, requested)

    def close(
        self, reason: CloseReason, error: str | None, requested: Requested | None = None
    ) -> None:
        """End the client before it had an upstream: one opened and one closed event."""
        if self.closed:
            return
        self.closed = True
        fd = self.client.fileno()
        if fd >= 0:
            self.worker.unwatch(fd)
        _close_gently(self.client)
        self.worker.proxy_ended(self)
        flow = self._flow(self.client_address.unspecified(), requested)
        self.worker.bus.emit_unrelayed(flow, reason, error)

    def _flow(self, server: Address, requested: Requested | None) -> Flow:
        return Flow.opening(
            next_flow_id(),
            _TCP,
            self.client_address,
            server,
            self.listener_address,
            self.started_at,
            requested,
        )

    def _send(self, data: bytes) -> bool:
        """Send a handshake reply (a few bytes: a fresh socket's buffer takes them whole);
        False, with the flow closed, if the client is gone or will not take it."""
        if not data:
            return True
        try:
            sent = self.client.send(data)
        except OSError as exc:
            self.close(CloseReason.CLIENT_RESET, f"during the handshake: {exc.strerror or exc}")
            return False
        if sent < len(data):
            self.close(CloseReason.HANDSHAKE_ERROR, "the client does not read the handshake")
            return False
        return True
