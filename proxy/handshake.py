"""What a proxy-mode handshake tells the relay, whatever the protocol (SOCKS, HTTP proxy).

A handshake is a state machine over the bytes a client sends before its flow has an
upstream: bytes in, events out, no sockets (like h11). The relay feeds it what the client
sent; it answers with `SendReply` (the handshake goes on), `OpenUpstream` (the client asked
for a destination: the relay checks it, connects, then asks the handshake for the reply that
says how that went) or `Reject` (send the reply, close the flow with the reason).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from .flow import Address, CloseReason, Requested


@dataclass(frozen=True, slots=True)
class SendReply:
    """Bytes to send to the client; the handshake goes on."""

    data: bytes


class Command(enum.StrEnum):
    """What the client wants done with its destination."""

    CONNECT = "connect"
    UDP_ASSOCIATE = "udp-associate"


@dataclass(frozen=True, slots=True)
class OpenUpstream:
    """The client asked for `requested`; `early_data` goes upstream once it is connected."""

    requested: Requested
    command: Command = Command.CONNECT
    early_data: bytes = b""


@dataclass(frozen=True, slots=True)
class Reject:
    """The handshake failed: send `reply` (perhaps empty) and close the flow with `reason`."""

    reply: bytes
    reason: CloseReason
    error: str


HandshakeEvent = SendReply | OpenUpstream | Reject


class Failure(enum.Enum):
    """Why the relay could not give the client its destination; each protocol has a reply."""

    NOT_ALLOWED = "not allowed by the listener's rules"
    NETWORK_UNREACHABLE = "network unreachable"
    HOST_UNREACHABLE = "the name does not resolve"
    REFUSED = "connection refused"
    TIMEOUT = "no answer in time"
    GENERAL = "failed"


class UpstreamRewriter(Protocol):
    """Rewrites what a client sends after its handshake, before it goes upstream."""

    stop_reason: str | None

    def feed(self, data: bytes) -> bytes:
        """The bytes to send upstream for `data`; none once `stop_reason` is set."""
        ...


class Handshake(Protocol):
    """A proxy protocol's server side up to the point where the flow is a plain relay."""

    def receive(self, data: bytes) -> list[HandshakeEvent]:
        """Take bytes the client sent; what to do about them, in order."""
        ...

    # Whether the reply of `succeeded` names flowtap's end of the upstream; if not, it is
    # given None (finding the address costs a system call).
    names_bound: bool

    def succeeded(self, bound: Address | None) -> bytes:
        """The reply for a client whose upstream is now open (`bound`: flowtap's end of it)."""
        ...

    def failed(self, failure: Failure) -> bytes:
        """The reply for a client whose destination could not be reached."""
        ...

    def timed_out(self) -> bytes:
        """The reply for a client whose handshake did not complete in time."""
        ...

    def upstream_rewriter(self) -> UpstreamRewriter | None:
        """What must rewrite the client's later bytes, or None if they go as they are."""
        ...
