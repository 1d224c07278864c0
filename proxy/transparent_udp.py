"""UDP in transparent mode (Linux TPROXY): datagrams an iptables/nftables `TPROXY` rule steered
to the listener keep their original destination, which the kernel reports per datagram
(`IP_RECVORIGDSTADDR` / `IPV6_RECVORIGDSTADDR`). Each (client, original destination) pair is
a session relayed to that destination; replies leave from a socket bound, with
`IP_TRANSPARENT`, to the original destination, so the client sees the server it meant.

Simpler than the reverse-mode relay of `udp.py` (no segmentation offload): a transparent
listener serves many destinations, and every reply socket is the session's own.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import math
import select
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import FlowtapError
from .flow import (
    Address,
    CloseReason,
    Direction,
    Flow,
    FlowOpened,
    FlowState,
    Requested,
    Transport,
    next_flow_id,
)
from .udp_sessions import Session, UdpSessions

if TYPE_CHECKING:
    from .listener import BoundListener
    from .policy import ProxyPolicy
    from .worker import Worker

log = logging.getLogger(__name__)

# Linux constants the socket module lacks on some Pythons (linux/in.h, linux/in6.h).
_IP_TRANSPARENT = 19
_IP_RECVORIGDSTADDR = 20  # also the type of its control message (IP_ORIGDSTADDR)
_IPV6_TRANSPARENT = 75
_IPV6_RECVORIGDSTADDR = 74  # also IPV6_ORIGDSTADDR
_ANCBUF = socket.CMSG_SPACE(28)  # a sockaddr_in6, the larger of the two
_MAX_DATAGRAM_BYTES = 65_535
_DATAGRAMS_PER_TURN = 64
_SESSION_EVENTS = select.EPOLLIN | select.EPOLLET
_SAY_EVERY_S = 60.0

SessionKey = tuple[tuple[str, int], tuple[str, int]]
"""(client address, original destination), each as (host, port)."""


def original_destination(ancillary: list[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    """The original destination in a datagram's control messages (a `sockaddr_in` or
    `sockaddr_in6` from IP_ORIGDSTADDR / IPV6_ORIGDSTADDR), or None if there is none."""
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == _IP_RECVORIGDSTADDR and len(data) >= 8:
            return str(ipaddress.IPv4Address(data[4:8])), int.from_bytes(data[2:4], "big")
        if level == socket.IPPROTO_IPV6 and kind == _IPV6_RECVORIGDSTADDR and len(data) >= 24:
            host = ipaddress.IPv6Address(data[8:24])
            mapped = host.ipv4_mapped
            return str(mapped or host), int.from_bytes(data[2:4], "big")
    return None


def prepare_listener(sock: socket.socket, where: Address) -> None:
    """Make `sock` receive TPROXY-steered datagrams with their original destination; raise
    FlowtapError when the system refuses (IP_TRANSPARENT needs CAP_NET_ADMIN)."""
    v6 = sock.family == socket.AF_INET6
    level = socket.IPPROTO_IPV6 if v6 else socket.IPPROTO_IP
    try:
        sock.setsockopt(level, _IPV6_TRANSPARENT if v6 else _IP_TRANSPARENT, 1)
        sock.setsockopt(level, _IPV6_RECVORIGDSTADDR if v6 else _IP_RECVORIGDSTADDR, 1)
    except OSError as exc:
        raise FlowtapError(
            f"transparent:udp:{where} needs IP_TRANSPARENT ({exc.strerror or exc}): run as "
            "root or with the CAP_NET_ADMIN capability"
        ) from None


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


@dataclass(slots=True, eq=False, kw_only=True)
class TransparentUdpSession(Session):
    """One (client, original destination) pair: an upstream socket connected to the
    destination and a reply socket bound to it, connected to the client."""

    owner: TransparentUdpListener
    key: SessionKey
    upstream: socket.socket
    reply: socket.socket
    unsent: int = field(default=0, init=False)

    def on_ready(self, fd: int, mask: int, now: float) -> None:
        if not self.closed:
            self.owner.relay_down(self, now)

    def progress(self, now: float) -> None:
        """Continue relaying replies after giving other sockets a turn."""
        self.queued = False
        if not self.closed:
            self.owner.relay_down(self, now)


class TransparentUdpListener(UdpSessions[SessionKey, "TransparentUdpSession"]):
    """The sessions of one transparent UDP listener, owned by one worker."""

    __slots__ = (
        "_last_said",
        "listener",
        "policy",
        "refused",
        "unaddressed",
    )

    def __init__(self, worker: Worker, listener: BoundListener) -> None:
        assert listener.spec.policy is not None, "proxy-mode listeners carry a policy"
        super().__init__(worker, listener.sock)
        self.listener = listener
        self.policy: ProxyPolicy = listener.spec.policy
        # Pairs refused once (their flow told why), so that their later datagrams add no flows.
        self.refused: collections.OrderedDict[SessionKey, None] = collections.OrderedDict()
        self.unaddressed = 0
        self._last_said = -math.inf
        self.watch()

    # -- clients' datagrams up ----------------------------------------------------------------

    def _relay_up(self, now: float) -> None:
        for _ in range(_DATAGRAMS_PER_TURN):
            try:
                payload, ancillary, _flags, addr = self.sock.recvmsg(_MAX_DATAGRAM_BYTES, _ANCBUF)
            except BlockingIOError:
                return
            except OSError:
                continue  # e.g. an ICMP error queued on the socket: the next datagram goes on
            destination = original_destination(ancillary)
            if destination is None:
                self._count_unaddressed()
                continue
            client = (str(addr[0]), int(addr[1]))
            key = (client, destination)
            session = self.sessions.get(key)
            if session is None:
                if key in self.refused:
                    continue
                session = self._open(key, now)
                if session is None:
                    continue
            else:
                session.last_active = now
                self.sessions.move_to_end(key)
            self._send(session, Direction.UP, payload)
        if not self.queued:
            self.queued = True
            self.worker.ready.append(self)

    def _count_unaddressed(self) -> None:
        """Count a datagram that came without its original destination; say so once a minute."""
        self.unaddressed += 1
        now = time.monotonic()
        if now - self._last_said >= _SAY_EVERY_S:
            self._last_said = now
            log.warning(
                "udp transparent %s: dropped a datagram without an original destination (sent "
                "to the listener itself, not steered by a TPROXY rule; %d so far)",
                self.listener.address,
                self.unaddressed,
            )

    # -- replies down ---------------------------------------------------------------------------

    def relay_down(self, session: TransparentUdpSession, now: float) -> None:
        """Relay the destination's replies to the client, from the destination's address."""
        for _ in range(_DATAGRAMS_PER_TURN):
            try:
                payload = session.upstream.recv(_MAX_DATAGRAM_BYTES)
            except BlockingIOError:
                return
            except OSError:
                continue  # ICMP port unreachable for an earlier datagram: the session goes on
            session.last_active = now
            self.sessions.move_to_end(session.key)
            self._send(session, Direction.DOWN, payload)
        if not session.queued:
            session.queued = True
            self.worker.ready.append(session)

    def _send(self, session: TransparentUdpSession, direction: Direction, payload: bytes) -> None:
        up = direction is Direction.UP
        try:
            (session.upstream if up else session.reply).send(payload)
        except OSError:
            session.unsent += 1  # UDP: a datagram the system will not send is lost, as on the wire
            return
        if up:
            session.bytes_up += len(payload)
        else:
            session.bytes_down += len(payload)
        bus = self.worker.bus
        if session.wants(bus, direction):
            session.emit(bus, direction, time.time(), payload)

    # -- sessions ---------------------------------------------------------------------------

    def _open(self, key: SessionKey, now: float) -> TransparentUdpSession | None:
        """A new session for `key`, or None if it is refused or its sockets cannot be made."""
        client, destination = key
        requested = Requested(destination[0], destination[1])
        flow = Flow(
            id=next_flow_id(),
            transport=Transport.UDP,
            client=Address(host=client[0], port=client[1]),
            server=Address(host=destination[0], port=destination[1]),
            listener=self.listener.address,
            started_at=time.time(),
            state=FlowState.OPEN,
            requested=requested,
        )
        refusal = None
        if not self.policy.is_client_allowed(client[0]):
            self.policy.refuse_client(client[0])
            refusal = f"client {client[0]} is outside --allow-from"
        elif destination[1] == self.listener.address.port and (
            destination[0] == self.listener.address.host
        ):
            refusal = "the datagram was sent to the listener itself, not steered to it"
        else:
            refusal = self.policy.destination_refusal(destination[0], destination[1])
        if refusal is None:
            sockets = self._sockets(key)
            if isinstance(sockets, str):
                refusal = sockets
        if refusal is not None:
            self.refused[key] = None
            if len(self.refused) > self.max_sessions:
                self.refused.popitem(last=False)
            self.worker.bus.emit_unrelayed(flow, CloseReason.DENIED, refusal)
            return None
        assert not isinstance(sockets, str)
        upstream, reply = sockets
        if len(self.sessions) >= self.max_sessions:
            self.close_session(next(iter(self.sessions.values())), CloseReason.IDLE_TIMEOUT)
        session = TransparentUdpSession(
            flow=flow, last_active=now, owner=self, key=key, upstream=upstream, reply=reply
        )
        self.worker.bus.emit(FlowOpened(flow))
        if not self.sessions and self.idle_timeout_s:
            self.deadline = now + self.idle_timeout_s
        self.add_session(key, session)
        self.worker.watch(upstream.fileno(), _SESSION_EVENTS, session)
        return session

    def _sockets(self, key: SessionKey) -> tuple[socket.socket, socket.socket] | str:
        """The session's upstream and reply sockets, or why they cannot be made."""
        client, destination = key
        family = _family(destination[0])
        v6 = family == socket.AF_INET6
        upstream = socket.socket(family, socket.SOCK_DGRAM)
        reply = socket.socket(_family(client[0]), socket.SOCK_DGRAM)
        try:
            upstream.setblocking(False)
            upstream.connect(destination)
            reply.setblocking(False)
            # Bound to the destination the client meant (an address of no interface here:
            # IP_TRANSPARENT allows that), shared with the other sessions to it.
            reply.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            reply.setsockopt(
                socket.IPPROTO_IPV6 if v6 else socket.IPPROTO_IP,
                _IPV6_TRANSPARENT if v6 else _IP_TRANSPARENT,
                1,
            )
            reply.bind(destination)
            reply.connect(client)
        except OSError as exc:
            upstream.close()
            reply.close()
            return f"cannot relay to {Requested(*destination)}: {exc.strerror or exc}"
        return upstream, reply

    def _forget(self, session: TransparentUdpSession, note: str | None) -> str | None:
        del self.sessions[session.key]
        self.worker.unwatch(session.upstream.fileno())
        session.upstream.close()
        session.reply.close()
        unsent = f"{session.unsent} datagrams not sent" if session.unsent else None
        return "; ".join(part for part in (note, unsent) if part) or None
