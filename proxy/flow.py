"""The flow model: what a relayed conversation is, and the events the relay emits about it.

Pure data, no I/O. Every flow emits exactly one `FlowOpened`, any number of `FlowData`, and
exactly one `FlowClosed`, in that order, all from the relay thread that owns the flow.
TCP chunk boundaries in `FlowData` are an artefact of `recv` and carry no meaning.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from .errors import FlowtapError


def is_decimal(text: str) -> bool:
    """ASCII digits only (str.isdigit also takes superscripts and other scripts' digits,
    which int() refuses)."""
    return text.isascii() and text.isdigit()


class Transport(enum.StrEnum):
    TCP = "tcp"
    UDP = "udp"


class Direction(enum.StrEnum):
    """Which way bytes went: `UP` is client to server, `DOWN` is server to client."""

    UP = "up"
    DOWN = "down"


class FlowState(enum.StrEnum):
    CONNECTING = "connecting"
    OPEN = "open"
    HALF_CLOSED = "half-closed"
    CLOSED = "closed"


class CloseReason(enum.StrEnum):
    """Why a flow ended; exactly one per flow."""

    CLIENT_CLOSED = "client-closed"
    SERVER_CLOSED = "server-closed"
    CLIENT_RESET = "client-reset"
    SERVER_RESET = "server-reset"
    UPSTREAM_REFUSED = "upstream-refused"
    UPSTREAM_TIMEOUT = "upstream-timeout"
    IDLE_TIMEOUT = "idle-timeout"
    SHUTDOWN = "shutdown"
    KILLED = "killed"
    ERROR = "error"
    # Proxy modes: the client's handshake decided the flow's end before any upstream.
    HANDSHAKE_ERROR = "handshake-error"
    HANDSHAKE_TIMEOUT = "handshake-timeout"
    DENIED = "denied"
    UNRESOLVABLE = "unresolvable"


@dataclass(frozen=True, slots=True)
class Address:
    """An IP endpoint (`host`, `port`) or a unix socket (`path`, with `host` empty)."""

    host: str
    port: int = 0
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        if self.is_ipv6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def unspecified(self) -> Address:
        """The unspecified address of this one's family (port 0): the server of a flow that
        never got one."""
        return Address(host="::" if self.is_ipv6 else "0.0.0.0", port=0)

    @classmethod
    def parse(cls, text: str, *, default_host: str = "127.0.0.1") -> Address:
        """Parse `HOST:PORT`, `[V6]:PORT`, `PORT` or `unix:PATH`; FlowtapError if malformed."""
        text = text.strip()
        if text.startswith("unix:"):
            path = text[5:]
            if not path:
                raise FlowtapError(
                    f"malformed address {text!r}: give a path, e.g. unix:/tmp/a.sock"
                )
            return cls(host="", port=0, path=path)
        host: str
        port_text: str
        if text.startswith("["):
            end = text.find("]")
            if end < 0 or not text[end + 1 :].startswith(":"):
                raise FlowtapError(f"malformed address {text!r}: write IPv6 as [::1]:PORT")
            host, port_text = text[1:end], text[end + 2 :]
        elif is_decimal(text):
            host, port_text = default_host, text
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep or not host or ":" in host:
                raise FlowtapError(
                    f"malformed address {text!r}: use HOST:PORT, [IPv6]:PORT or a bare PORT"
                )
        if not is_decimal(port_text) or not 0 <= int(port_text) <= 65535:
            raise FlowtapError(f"malformed address {text!r}: the port must be a number 0-65535")
        return cls(host=host, port=int(port_text))


@dataclass(frozen=True, slots=True)
class TlsFacts:
    """What flowtap learnt of a flow's TLS: how it handled it (`intercept`, `passthrough`,
    `not-tls`), what the client offered, what the upstream chose and who it said it was."""

    mode: str
    sni: str | None = None
    offered_alpn: tuple[str, ...] = ()
    offered_versions: tuple[str, ...] = ()
    alpn: str | None = None
    version: str | None = None
    cipher: str | None = None
    upstream_subject: str | None = None
    upstream_issuer: str | None = None
    upstream_not_after: str | None = None
    verification: str | None = None
    note: str | None = None
    client_version: str | None = None
    """The TLS version of the client's leg, once flowtap's handshake with it is done
    (`version` and `cipher` are the upstream leg's)."""
    client_cipher: str | None = None
    """The cipher suite of the client's leg, once done."""

    def as_dict(self) -> dict[str, Any]:
        """The facts as a JSON-ready dict (`--json`'s and the control socket's `tls` field)."""
        return {
            name: list(value) if isinstance(value, tuple) else value
            for name in self.__slots__
            if (value := getattr(self, name)) is not None or name == "mode"
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TlsFacts:
        """The facts `as_dict` wrote (unknown keys ignored); TypeError/ValueError if malformed."""
        known = {name: data[name] for name in cls.__slots__ if name in data}
        for name in ("offered_alpn", "offered_versions"):
            if name in known:
                known[name] = tuple(str(item) for item in known[name])
        for name, value in known.items():
            if not isinstance(value, str | tuple):
                raise ValueError(f"tls field {name} is {type(value).__name__}")
        return cls(**known)

    def client_leg(self) -> str | None:
        """The client leg's version and cipher, as `client TLSv1.2 ECDHE-...`, where either
        differs from the upstream leg's (`version` and `cipher`); None where both agree."""
        if (self.client_version, self.client_cipher) in ((None, None), (self.version, self.cipher)):
            return None
        return " ".join(
            ["client", *(part for part in (self.client_version, self.client_cipher) if part)]
        )

    def summary(self) -> str:
        """The facts as one short phrase for a log line."""
        if self.mode == "not-tls":
            return "tls: not TLS"
        parts = [f"tls {self.mode}"]
        if self.sni:
            parts.append(f"sni={self.sni}")
        if self.version:
            parts.append(self.version)
        if self.alpn:
            parts.append(f"alpn={self.alpn}")
        if self.cipher:
            parts.append(self.cipher)
        client_leg = self.client_leg()
        if client_leg:
            parts.append(client_leg)
        if self.upstream_subject:
            parts.append(f"upstream cert {self.upstream_subject!r} by {self.upstream_issuer!r}")
        if self.verification and self.verification != "system store":
            parts.append(f"verify {self.verification}")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class Requested:
    """What a proxy client asked to reach (a host name or an address literal, and a port),
    and the user it authenticated as, if any."""

    host: str
    port: int
    user: str | None = None

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def label(self) -> str:
        """`host:port`, with `user@` before it when the client authenticated."""
        return f"{self.user}@{self}" if self.user else str(self)

    @classmethod
    def from_text(cls, text: str, user: str | None = None) -> Requested | None:
        """Parse what `str()` wrote (`host:port`, `[v6]:port`); None if it is not that."""
        host, colon, port = text.rpartition(":")
        if not colon or not is_decimal(port) or not host:
            return None
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return cls(host, int(port), user)


class _Keep(enum.Enum):
    """The value of a field that `Flow.changed` leaves as it is."""

    KEEP = enum.auto()


_KEEP: Final = _Keep.KEEP

_flow_ids = itertools.count(1)


def next_flow_id() -> int:
    """A process-wide unique, increasing flow id."""
    return next(_flow_ids)


@dataclass(frozen=True, slots=True)
class Flow:
    """A snapshot of one relayed conversation."""

    id: int
    transport: Transport
    client: Address
    server: Address
    listener: Address
    started_at: float
    ended_at: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    state: FlowState = FlowState.CONNECTING
    reason: CloseReason | None = None
    error: str | None = None
    tls: TlsFacts | None = None
    # Set in proxy modes (SOCKS, HTTP proxy, transparent); None when the listener fixed it.
    requested: Requested | None = None

    @property
    def duration_s(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.started_at

    @staticmethod
    def opening(
        id: int,
        transport: Transport,
        client: Address,
        server: Address,
        listener: Address,
        started_at: float,
        requested: Requested | None = None,
    ) -> Flow:
        """A flow that has just begun: what `Flow(...)` makes of these fields (the others
        left at their defaults), in about half its time (its slots are set directly)."""
        s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13 = _FLOW_SLOT_SETTERS
        new = _new_flow(Flow)
        s0(new, id)
        s1(new, transport)
        s2(new, client)
        s3(new, server)
        s4(new, listener)
        s5(new, started_at)
        s6(new, None)
        s7(new, 0)
        s8(new, 0)
        s9(new, _CONNECTING)
        s10(new, None)
        s11(new, None)
        s12(new, None)
        s13(new, requested)
        return new

    def with_tls(self, tls: TlsFacts) -> Flow:
        """This flow, as it stands, with its TLS facts."""
        return self.changed(tls=tls)

    def closed(
        self,
        *,
        ended_at: float,
        bytes_up: int,
        bytes_down: int,
        reason: CloseReason,
        error: str | None = None,
        tls: TlsFacts | None = None,
    ) -> Flow:
        """This flow as it stands once closed."""
        return self.changed(
            ended_at=ended_at,
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            state=_CLOSED,
            reason=reason,
            error=error,
            tls=tls or self.tls,
        )

    def changed(
        self,
        *,
        id: int | _Keep = _KEEP,
        transport: Transport | _Keep = _KEEP,
        client: Address | _Keep = _KEEP,
        server: Address | _Keep = _KEEP,
        listener: Address | _Keep = _KEEP,
        started_at: float | _Keep = _KEEP,
        ended_at: float | _Keep | None = _KEEP,
        bytes_up: int | _Keep = _KEEP,
        bytes_down: int | _Keep = _KEEP,
        state: FlowState | _Keep = _KEEP,
        reason: CloseReason | _Keep | None = _KEEP,
        error: str | _Keep | None = _KEEP,
        tls: TlsFacts | _Keep | None = _KEEP,
        requested: Requested | _Keep | None = _KEEP,
    ) -> Flow:
        """This flow with the fields given changed: what `dataclasses.replace` makes, in
        about a third of its time (it sets the new flow's slots from this one's directly)."""
        s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13 = _FLOW_SLOT_SETTERS
        new = _new_flow(Flow)
        s0(new, self.id if id is _KEEP else id)
        s1(new, self.transport if transport is _KEEP else transport)
        s2(new, self.client if client is _KEEP else client)
        s3(new, self.server if server is _KEEP else server)
        s4(new, self.listener if listener is _KEEP else listener)
        s5(new, self.started_at if started_at is _KEEP else started_at)
        s6(new, self.ended_at if ended_at is _KEEP else ended_at)
        s7(new, self.bytes_up if bytes_up is _KEEP else bytes_up)
        s8(new, self.bytes_down if bytes_down is _KEEP else bytes_down)
        s9(new, self.state if state is _KEEP else state)
        s10(new, self.reason if reason is _KEEP else reason)
        s11(new, self.error if error is _KEEP else error)
        s12(new, self.tls if tls is _KEEP else tls)
        s13(new, self.requested if requested is _KEEP else requested)
        return new


_CLOSED = FlowState.CLOSED
_CONNECTING = FlowState.CONNECTING
# Each field's slot descriptor sets it on a new flow directly: the frozen dataclass's
# __init__ goes through object.__setattr__ and a lookup of the name for each field, which
# costs about twice as much (once per flow event, on the relay's thread).
_FLOW_SLOT_SETTERS = tuple(getattr(Flow, field.name).__set__ for field in dataclasses.fields(Flow))
_new_flow = object.__new__


@dataclass(frozen=True, slots=True)
class FlowOpened:
    """A client was accepted; emitted before any data of the flow."""

    flow: Flow


class FlowData(NamedTuple):
    """Bytes that flowtap delivered in one direction of a flow (for UDP: one datagram).

    A named tuple rather than a frozen dataclass: one is built per chunk, on the relay's
    path and again in each viewer, and a tuple is built in half the time.
    """

    flow_id: int
    direction: Direction
    timestamp: float
    data: bytes


@dataclass(frozen=True, slots=True)
class FlowClosed:
    """The flow ended; emitted exactly once per flow, after all its data."""

    flow: Flow


@dataclass(frozen=True, slots=True)
class FlowUpdated:
    """What is known of an open flow grew (its TLS facts, once its handshake is done):
    emitted after its opened event and before its closed one, at most a few times a flow."""

    flow: Flow


FlowEvent = FlowOpened | FlowData | FlowClosed | FlowUpdated

EVENT_NAMES: dict[type[FlowOpened | FlowUpdated | FlowClosed], str] = {
    FlowOpened: "opened",
    FlowUpdated: "updated",
    FlowClosed: "closed",
}
"""What `run --json` and the control socket call each event of a flow's life (data aside)."""


@dataclass(frozen=True, slots=True)
class FlowWire:
    """Ciphertext of an intercepted TLS flow as it crossed one leg (`--tls-capture wire`), or
    that leg's session secrets as NSS key log lines when `secrets`; only for `WireObserver`s."""

    flow_id: int
    upstream_leg: bool
    direction: Direction
    timestamp: float
    data: bytes
    secrets: bool = False
