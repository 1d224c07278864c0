"""The server side of a SOCKS handshake as a state machine over bytes (no sockets).

SOCKS5 (RFC 1928) with no authentication or username/password (RFC 1929), commands CONNECT
and UDP ASSOCIATE (BIND is refused with reply 0x07); SOCKS4 and SOCKS4a CONNECT when no
credentials are required (SOCKS4 has no password). Every bad input ends in a `Reject`
carrying the reply the protocol has for it.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import socket
import struct
from collections.abc import Mapping

from .flow import Address, CloseReason, Requested
from .handshake import Command, Failure, HandshakeEvent, OpenUpstream, Reject, SendReply

VERSION_5 = 0x05
VERSION_4 = 0x04
AUTH_VERSION = 0x01

METHOD_NO_AUTH = 0x00
METHOD_USER_PASS = 0x02
METHOD_NONE_ACCEPTABLE = 0xFF

CMD_CONNECT = 0x01
CMD_BIND = 0x02
CMD_UDP_ASSOCIATE = 0x03

ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04


class Reply(enum.IntEnum):
    """SOCKS5 reply codes (RFC 1928 section 6)."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


SOCKS4_GRANTED = 0x5A
SOCKS4_REJECTED = 0x5B

_FAILURE_REPLY = {
    Failure.NOT_ALLOWED: Reply.NOT_ALLOWED,
    Failure.NETWORK_UNREACHABLE: Reply.NETWORK_UNREACHABLE,
    Failure.HOST_UNREACHABLE: Reply.HOST_UNREACHABLE,
    Failure.REFUSED: Reply.CONNECTION_REFUSED,
    Failure.TIMEOUT: Reply.TTL_EXPIRED,
    Failure.GENERAL: Reply.GENERAL_FAILURE,
}

# A SOCKS4 user id or SOCKS4a host name longer than this is not a client speaking SOCKS.
_MAX_SOCKS4_FIELD_BYTES = 255


class _State(enum.Enum):
    GREETING = enum.auto()
    AUTH = enum.auto()
    REQUEST = enum.auto()
    DECIDED = enum.auto()
    DONE = enum.auto()


# Enum members as module names for the per-connection path: looked up on its class, a
# member costs ~0.2 us in Python 3.11 (a Python-level descriptor), a module global a tenth.
_GREETING = _State.GREETING
_AUTH = _State.AUTH
_REQUEST = _State.REQUEST
_DECIDED = _State.DECIDED
_DONE = _State.DONE
_SUCCEEDED = Reply.SUCCEEDED
_CONNECT = Command.CONNECT
_UDP_ASSOCIATE = Command.UDP_ASSOCIATE
_GREETING_NO_AUTH = bytes((VERSION_5, 1, METHOD_NO_AUTH))
_CONNECT_IPV4 = bytes((VERSION_5, CMD_CONNECT, 0, ATYP_IPV4))
_ntoa = socket.inet_ntoa
# The replies that never vary, made once (events are frozen: one instance serves every client).
_CHOSE_NO_AUTH = SendReply(bytes((VERSION_5, METHOD_NO_AUTH)))
_CHOSE_USER_PASS = SendReply(bytes((VERSION_5, METHOD_USER_PASS)))
_AUTH_SUCCEEDED = SendReply(bytes((AUTH_VERSION, 0x00)))


def reply5(code: int, bound: Address | None = None) -> bytes:
    """A SOCKS5 reply with `code` and the bound address (0.0.0.0:0 when there is none)."""
    if bound is None or bound.path is not None:
        return bytes((VERSION_5, code, 0, ATYP_IPV4, 0, 0, 0, 0, 0, 0))
    host = bound.host
    if ":" in host:
        packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
        return bytes((VERSION_5, code, 0, ATYP_IPV6)) + packed + bound.port.to_bytes(2, "big")
    packed = socket.inet_pton(socket.AF_INET, host)
    return bytes((VERSION_5, code, 0, ATYP_IPV4)) + packed + bound.port.to_bytes(2, "big")


def reply4(code: int) -> bytes:
    """A SOCKS4 reply (the version byte of a SOCKS4 reply is 0)."""
    return bytes((0, code, 0, 0, 0, 0, 0, 0))


def parse_address(data: bytes | bytearray, offset: int) -> tuple[str, int, int] | None:
    """The (host, port, end offset) of a SOCKS5 address at `offset`; None if it is not all
    there yet; ValueError for an address type SOCKS5 does not have or an empty name."""
    if len(data) <= offset:
        return None
    atyp = data[offset]
    start = offset + 1
    if atyp == ATYP_IPV4:
        end = start + 4
        if len(data) < end + 2:
            return None
        host = socket.inet_ntop(socket.AF_INET, bytes(data[start:end]))
    elif atyp == ATYP_IPV6:
        end = start + 16
        if len(data) < end + 2:
            return None
        host = socket.inet_ntop(socket.AF_INET6, bytes(data[start:end]))
    elif atyp == ATYP_DOMAIN:
        if len(data) <= start:
            return None
        size = data[start]
        end = start + 1 + size
        if len(data) < end + 2:
            return None
        if size == 0:
            raise ValueError("an empty host name")
        try:
            host = bytes(data[start + 1 : end]).decode("ascii")
        except UnicodeDecodeError:
            raise ValueError("a host name that is not ASCII") from None
    else:
        raise ValueError(f"address type {atyp:#04x}")
    (port,) = struct.unpack_from("!H", data, end)
    return host, port, end + 2


def pack_address(host: str, port: int) -> bytes:
    """A SOCKS5 address (an IP literal as such, anything else as a name)."""
    try:
        packed = ipaddress.ip_address(host).packed
    except ValueError:
        name = host.encode("idna")
        return bytes((ATYP_DOMAIN, len(name))) + name + struct.pack("!H", port)
    atyp = ATYP_IPV4 if len(packed) == 4 else ATYP_IPV6
    return bytes((atyp,)) + packed + struct.pack("!H", port)


class SocksServer:
    """The server side of one client's SOCKS5 or SOCKS4(a) handshake."""

    names_bound = True

    def __init__(
        self, credentials: Mapping[str, str] | None = None, *, allow_socks4: bool = True
    ) -> None:
        # None or empty: no authentication; else user -> password, and SOCKS4 is refused.
        # Kept, not copied (one client's handshake reads it, the listener's owner does not
        # change it): a copy a client cost a dict.
        self._credentials: Mapping[str, str] = credentials or {}
        self._allow_socks4 = allow_socks4
        self._buffer = bytearray()
        self._state = _GREETING
        self._user: str | None = None
        self.version = 0

    def receive(self, data: bytes) -> list[HandshakeEvent]:
        """Take bytes the client sent; what to do about them, in order."""
        state = self._state
        if state is _DECIDED or state is _DONE:
            raise RuntimeError("the SOCKS handshake has already decided")
        if not self._buffer:
            # The common steps of a SOCKS5 client, each in a read of its own: the greeting
            # that offers no authentication alone, and a CONNECT to an IPv4 address. What the
            # general parse makes of them (tests/test_handshake_fuzz.py compares), without
            # its calls (a third of what a SOCKS5 handshake costs the relay otherwise).
            if state is _GREETING:
                if data == _GREETING_NO_AUTH and not self._credentials:
                    self.version = VERSION_5
                    self._state = _REQUEST
                    return [_CHOSE_NO_AUTH]
            elif state is _REQUEST and len(data) == 10 and data.startswith(_CONNECT_IPV4):
                self._state = _DECIDED
                requested = Requested(_ntoa(data[4:8]), data[8] << 8 | data[9], self._user)
                return [OpenUpstream(requested, _CONNECT, b"")]
        self._buffer += data
        events: list[HandshakeEvent] = []
        while True:
            if state is _GREETING:
                event = self._greeting()
            elif state is _AUTH:
                event = self._auth()
            else:
                event = self._request()
            if event is None:
                return events
            events.append(event)
            if isinstance(event, Reject):
                self._state = _DONE
                return events
            state = self._state
            if state is _DECIDED:
                return events

    def succeeded(self, bound: Address | None) -> bytes:
        """The reply for a client whose upstream is open (`bound`: flowtap's end of it)."""
        self._state = _DONE
        if self.version == VERSION_4:
            return reply4(SOCKS4_GRANTED)
        return reply5(_SUCCEEDED, bound)

    def failed(self, failure: Failure) -> bytes:
        """The reply for a client whose destination could not be reached."""
        self._state = _DONE
        if self.version == VERSION_4:
            return reply4(SOCKS4_REJECTED)
        return reply5(_FAILURE_REPLY[failure])

    def timed_out(self) -> bytes:
        """Nothing: SOCKS has no reply for a client that stopped half-way; it is closed."""
        self._state = _DONE
        return b""

    def upstream_rewriter(self) -> None:
        """Nothing: after a SOCKS handshake the client's bytes go as they are."""
        return None

    # -- the states -----------------------------------------------------------------------

    def _reject(self, reply: bytes, error: str) -> Reject:
        return Reject(reply, CloseReason.HANDSHAKE_ERROR, error)

    def _greeting(self) -> HandshakeEvent | None:
        buf = self._buffer
        if not buf:
            return None
        version = buf[0]
        if version == VERSION_4:
            self.version = VERSION_4
            return self._socks4()
        if version != VERSION_5:
            return self._reject(
                bytes((VERSION_5, METHOD_NONE_ACCEPTABLE)),
                f"not a SOCKS greeting (version byte {version:#04x})",
            )
        self.version = VERSION_5
        if len(buf) < 2 or len(buf) < 2 + buf[1]:
            return None
        methods = bytes(buf[2 : 2 + buf[1]])
        del buf[: 2 + len(methods)]
        wanted = METHOD_USER_PASS if self._credentials else METHOD_NO_AUTH
        if wanted not in methods:
            offered = ", ".join(f"{m:#04x}" for m in methods) or "none"
            need = "username/password" if self._credentials else "no authentication"
            return self._reject(
                bytes((VERSION_5, METHOD_NONE_ACCEPTABLE)),
                f"the client offers methods {offered}, not {need}",
            )
        self._state = _AUTH if self._credentials else _REQUEST
        return _CHOSE_USER_PASS if self._credentials else _CHOSE_NO_AUTH

    def _auth(self) -> HandshakeEvent | None:
        buf = self._buffer
        if not buf:
            return None
        if buf[0] != AUTH_VERSION:
            return self._reject(
                bytes((AUTH_VERSION, 0x01)),
                f"username/password sub-negotiation version {buf[0]:#04x}, not 0x01",
            )
        if len(buf) < 2:
            return None
        user_end = 2 + buf[1]
        if len(buf) < user_end + 1:
            return None
        pass_end = user_end + 1 + buf[user_end]
        if len(buf) < pass_end:
            return None
        user = bytes(buf[2:user_end]).decode("utf-8", "replace")
        password = bytes(buf[user_end + 1 : pass_end]).decode("utf-8", "replace")
        del buf[:pass_end]
        expected = self._credentials.get(user)
        # Compared in constant time, so that the reply's timing says nothing of the password.
        if expected is None or not hmac.compare_digest(expected.encode(), password.encode()):
            return self._reject(bytes((AUTH_VERSION, 0x01)), f"wrong credentials for {user!r}")
        self._user = user
        self._state = _REQUEST
        return _AUTH_SUCCEEDED

    def _request(self) -> HandshakeEvent | None:
        buf = self._buffer
        if len(buf) < 4:
            return None
        if buf[0] != VERSION_5:
            return self._reject(
                reply5(Reply.GENERAL_FAILURE), f"request of SOCKS version {buf[0]:#04x}, not 5"
            )
        command = buf[1]
        try:
            parsed = parse_address(buf, 3)
        except ValueError as exc:
            return self._reject(
                reply5(Reply.ADDRESS_TYPE_NOT_SUPPORTED), f"unsupported address: {exc}"
            )
        if parsed is None:
            return None
        host, port, end = parsed
        early = bytes(buf[end:])
        del buf[:]
        if command == CMD_BIND:
            return self._reject(reply5(Reply.COMMAND_NOT_SUPPORTED), "BIND is not supported")
        if command not in (CMD_CONNECT, CMD_UDP_ASSOCIATE):
            return self._reject(
                reply5(Reply.COMMAND_NOT_SUPPORTED), f"unknown SOCKS command {command:#04x}"
            )
        self._state = _DECIDED
        kind = _CONNECT if command == CMD_CONNECT else _UDP_ASSOCIATE
        return OpenUpstream(Requested(host, port, self._user), kind, early)

    def _socks4(self) -> HandshakeEvent | None:
        buf = self._buffer
        if not self._allow_socks4 or self._credentials:
            why = "credentials are required" if self._credentials else "SOCKS4 is off"
            return self._reject(reply4(SOCKS4_REJECTED), f"a SOCKS4 request, refused: {why}")
        if len(buf) < 9:
            return None
        command = buf[1]
        (port,) = struct.unpack_from("!H", buf, 2)
        ip = bytes(buf[4:8])
        user_end = buf.find(b"\0", 8)
        if user_end < 0:
            if len(buf) > 8 + _MAX_SOCKS4_FIELD_BYTES:
                return self._reject(reply4(SOCKS4_REJECTED), "a SOCKS4 user id that never ends")
            return None
        user = bytes(buf[8:user_end]).decode("utf-8", "replace") or None
        end = user_end + 1
        # SOCKS4a: an address 0.0.0.x (x != 0) means a host name follows the user id.
        if ip[:3] == b"\0\0\0" and ip[3] != 0:
            name_end = buf.find(b"\0", end)
            if name_end < 0:
                if len(buf) > end + _MAX_SOCKS4_FIELD_BYTES:
                    return self._reject(
                        reply4(SOCKS4_REJECTED), "a SOCKS4a host name that never ends"
                    )
                return None
            try:
                host = bytes(buf[end:name_end]).decode("ascii")
            except UnicodeDecodeError:
                return self._reject(reply4(SOCKS4_REJECTED), "a host name that is not ASCII")
            if not host:
                return self._reject(reply4(SOCKS4_REJECTED), "an empty SOCKS4a host name")
            end = name_end + 1
        else:
            host = socket.inet_ntop(socket.AF_INET, ip)
        early = bytes(buf[end:])
        del buf[:]
        if command != CMD_CONNECT:
            return self._reject(
                reply4(SOCKS4_REJECTED), f"SOCKS4 command {command:#04x} is not supported"
            )
        self._state = _DECIDED
        return OpenUpstream(Requested(host, port, user), _CONNECT, early)
