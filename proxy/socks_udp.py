"""SOCKS5 UDP ASSOCIATE (RFC 1928 section 7): a client's datagrams, each wrapped in a header
naming its destination, relayed as UDP flows (one per destination) while the client's TCP
connection lives; answers go back wrapped in a header naming their source."""

from __future__ import annotations

import contextlib
import ipaddress
import select
import socket
import time
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from typing import Protocol

from .events import Bus
from .flow import (
    Address,
    CloseReason,
    Direction,
    Flow,
    FlowClosed,
    FlowOpened,
    FlowState,
    Requested,
    Transport,
    next_flow_id,
)
from .policy import ProxyPolicy
from .socks5 import pack_address, parse_address
from .udp_sessions import DatagramFlow

_IN = select.EPOLLIN
_RDHUP = select.EPOLLRDHUP
# The largest UDP payload, so that no datagram is cut short on receipt.
_MAX_DATAGRAM_BYTES = 65_535


def unwrap(datagram: bytes) -> tuple[str, int, bytes] | None:
    """The destination and payload of a client's datagram; None for a fragment (FRAG != 0,
    which flowtap, like most servers, drops) or a malformed header."""
    if len(datagram) < 4 or datagram[2] != 0:
        return None
    try:
        parsed = parse_address(datagram, 3)
    except ValueError:
        return None
    if parsed is None:
        return None
    host, port, end = parsed
    return host, port, datagram[end:]


def _is_specific_address(host: str) -> bool:
    try:
        return not ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def wrap(host: str, port: int, payload: bytes) -> bytes:
    """A datagram for the client: the header naming where `payload` came from, then it."""
    return b"\0\0\0" + pack_address(host, port) + payload


class AssociationWorker(Protocol):
    """What a UDP association needs of the relay worker that owns it."""

    bus: Bus
    datagram_flows: dict[int, DatagramFlow]
    """The open flows of its associations, by flow id (for `Relay.byte_counts`)."""

    def watch_association(self, fd: int, mask: int, association: UdpAssociation) -> None: ...

    def unwatch(self, fd: int) -> None: ...

    def resolve(
        self, host: str, port: int, done: Callable[[list[tuple[int, object]] | str], None]
    ) -> None: ...

    def proxy_ended(self, item: object) -> None: ...


@dataclass(slots=True, eq=False)
class _Destination(DatagramFlow):
    """One UDP flow of an association: the datagrams to one destination and back."""

    sockaddr: tuple[str, int] | tuple[str, int, int, int] | None


@dataclass(slots=True, eq=False)
class UdpAssociation:
    """One client's UDP ASSOCIATE, from the success reply until its TCP connection ends."""

    worker: AssociationWorker
    control: socket.socket
    client_address: Address
    listener_address: Address
    policy: ProxyPolicy
    expected_client: InitVar[tuple[str, int]]
    user: str | None
    closed: bool = field(default=False, init=False)
    relay: socket.socket = field(init=False)
    client_udp: tuple[str, int] = field(init=False)
    upstream: dict[int, socket.socket] = field(default_factory=dict, init=False)
    destinations: dict[tuple[str, int], _Destination] = field(default_factory=dict, init=False)
    by_sockaddr: dict[tuple[str, int], _Destination] = field(default_factory=dict, init=False)
    pending: dict[tuple[str, int], list[bytes]] = field(default_factory=dict, init=False)

    def __post_init__(self, expected_client: tuple[str, int]) -> None:
        listener_address = self.listener_address
        family = socket.AF_INET6 if listener_address.is_ipv6 else socket.AF_INET
        self.relay = socket.socket(family, socket.SOCK_DGRAM)
        self.relay.bind((listener_address.host, 0))
        self.relay.setblocking(False)
        # Only the client's address may use the association (RFC 1928 section 7); a port of
        # 0 in its request means the first datagram from its host names the port.
        host, port = expected_client
        if not _is_specific_address(host):
            # 0.0.0.0, or a name (PySocks sends "0"): the host of the TCP connection.
            host = self.client_address.host
        self.client_udp = (host, port)

    @property
    def bound(self) -> Address:
        """Where the client sends its datagrams (the success reply names it)."""
        name = self.relay.getsockname()
        return Address(host=self.listener_address.host, port=int(name[1]))

    def start(self) -> None:
        worker = self.worker
        worker.watch_association(self.relay.fileno(), _IN, self)
        worker.watch_association(self.control.fileno(), _IN | _RDHUP, self)

    # -- events ----------------------------------------------------------------------------

    def on_ready(self, fd: int, mask: int, now: float) -> None:
        if self.closed:
            return
        if fd == self.control.fileno():
            self._on_control()
        elif fd == self.relay.fileno():
            self._from_client()
        else:
            for sock in self.upstream.values():
                if sock.fileno() == fd:
                    self._from_upstream(sock)

    def _on_control(self) -> None:
        try:
            data = self.control.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close(CloseReason.CLIENT_CLOSED, None)
        # Anything else the client sends on its TCP connection means nothing: ignored.

    def _from_client(self) -> None:
        while True:
            try:
                datagram, source = self.relay.recvfrom(_MAX_DATAGRAM_BYTES)
            except BlockingIOError:
                return
            except OSError:
                continue
            host, port = str(source[0]), int(source[1])
            expected_host, expected_port = self.client_udp
            if host != expected_host or (expected_port and port != expected_port):
                continue  # not the associated client: dropped, as RFC 1928 asks
            if not expected_port:
                self.client_udp = (host, port)
            request = unwrap(datagram)
            if request is None:
                continue
            self._to_destination(request[0], request[1], request[2])

    def _to_destination(self, host: str, port: int, payload: bytes) -> None:
        key = (host.lower(), port)
        destination = self.destinations.get(key)
        if destination is None:
            if key in self.pending:
                self.pending[key].append(payload)
                return
            refusal = self.policy.destination_refusal(host, port)
            if refusal is not None:
                self._refuse(Requested(host, port, self.user), CloseReason.DENIED, refusal)
                return
            self.pending[key] = [payload]
            self.worker.resolve(host, port, lambda found: self._resolved(key, host, port, found))
            return
        if destination.sockaddr is not None:
            self._send_up(destination, payload)

    def _resolved(
        self, key: tuple[str, int], host: str, port: int, found: list[tuple[int, object]] | str
    ) -> None:
        if self.closed:
            return
        payloads = self.pending.pop(key, [])
        requested = Requested(host, port, self.user)
        if isinstance(found, str):
            self._refuse(requested, CloseReason.UNRESOLVABLE, found)
            return
        for family, sockaddr in found:
            assert isinstance(sockaddr, tuple)
            refusal = self.policy.destination_refusal(str(sockaddr[0]), port)
            if refusal is not None:
                continue
            flow = Flow(
                id=next_flow_id(),
                transport=Transport.UDP,
                client=Address(host=self.client_udp[0], port=self.client_udp[1]),
                server=Address(host=str(sockaddr[0]), port=int(sockaddr[1])),
                listener=self.listener_address,
                started_at=time.time(),
                state=FlowState.OPEN,
                requested=requested,
            )
            destination = _Destination(flow, sockaddr)
            self.destinations[key] = destination
            self.worker.datagram_flows[flow.id] = destination
            self.by_sockaddr[(str(sockaddr[0]), int(sockaddr[1]))] = destination
            self._upstream_socket(family)
            self.worker.bus.emit(FlowOpened(flow))
            for payload in payloads:
                self._send_up(destination, payload)
            return
        self._refuse(requested, CloseReason.DENIED, f"{host} resolves only to denied addresses")

    def _upstream_socket(self, family: int) -> socket.socket:
        sock = self.upstream.get(family)
        if sock is None:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            self.upstream[family] = sock
            self.worker.watch_association(sock.fileno(), _IN, self)
        return sock

    def _send_up(self, destination: _Destination, payload: bytes) -> None:
        sockaddr = destination.sockaddr
        assert sockaddr is not None
        family = socket.AF_INET6 if len(sockaddr) == 4 else socket.AF_INET
        try:
            self._upstream_socket(family).sendto(payload, sockaddr)
        except OSError:
            return  # UDP: a datagram the system will not send is lost, as on the wire
        destination.bytes_up += len(payload)
        bus = self.worker.bus
        if destination.wants(bus, Direction.UP):
            destination.emit(bus, Direction.UP, time.time(), payload)

    def _from_upstream(self, sock: socket.socket) -> None:
        while True:
            try:
                payload, source = sock.recvfrom(_MAX_DATAGRAM_BYTES)
            except BlockingIOError:
                return
            except OSError:
                continue
            destination = self.by_sockaddr.get((str(source[0]), int(source[1])))
            if destination is None or not self.client_udp[1]:
                continue  # from no destination the client asked for: dropped
            try:
                self.relay.sendto(wrap(str(source[0]), int(source[1]), payload), self.client_udp)
            except OSError:
                continue
            destination.bytes_down += len(payload)
            bus = self.worker.bus
            if destination.wants(bus, Direction.DOWN):
                destination.emit(bus, Direction.DOWN, time.time(), payload)

    # -- ending -----------------------------------------------------------------------------

    def _refuse(self, requested: Requested, reason: CloseReason, error: str) -> None:
        """A destination the association will not reach: one flow, opened and closed."""
        key = (requested.host.lower(), requested.port)
        self.pending.pop(key, None)
        flow = Flow(
            id=next_flow_id(),
            transport=Transport.UDP,
            client=Address(host=self.client_udp[0], port=self.client_udp[1]),
            server=self.client_address.unspecified(),
            listener=self.listener_address,
            started_at=time.time(),
            requested=requested,
        )
        self.destinations[key] = _Destination(flow, None)
        self.worker.bus.emit_unrelayed(flow, reason, error)

    def close(self, reason: CloseReason, error: str | None) -> None:
        """End the association: its sockets closed, each of its open flows closed once."""
        if self.closed:
            return
        self.closed = True
        for sock in (self.control, self.relay, *self.upstream.values()):
            fd = sock.fileno()
            if fd >= 0:
                self.worker.unwatch(fd)
            with contextlib.suppress(OSError):
                sock.close()
        now = time.time()
        bus = self.worker.bus
        for destination in self.destinations.values():
            if destination.sockaddr is None:
                continue  # refused: already closed
            flow = destination.flow
            self.worker.datagram_flows.pop(flow.id, None)
            bus.emit(
                FlowClosed(
                    flow.closed(
                        ended_at=now,
                        bytes_up=destination.bytes_up,
                        bytes_down=destination.bytes_down,
                        reason=reason,
                        error=error,
                    )
                )
            )
        self.worker.proxy_ended(self)
