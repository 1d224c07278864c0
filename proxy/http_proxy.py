"""The server side of an HTTP/1.1 proxy's first request as a state machine over bytes.

`CONNECT host:port` opens a tunnel (the reply is `200 Connection established`, then any
protocol flows); an absolute-URI request (`GET http://host/path HTTP/1.1`) opens a flow to
that host and goes upstream in origin form with the `Proxy-*` headers removed. With
credentials, `Proxy-Authorization: Basic` is required (407 otherwise). Every bad input ends
in a `Reject` carrying the HTTP answer for it.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

from .flow import Address, CloseReason, Requested, is_decimal
from .handshake import Command, Failure, HandshakeEvent, OpenUpstream, Reject

# Enum members as module names for the per-connection path: looked up on its class, a
# member costs ~0.2 us in Python 3.11 (a Python-level descriptor), a module global a tenth.
_CONNECT = Command.CONNECT

# Characters a host in a request target cannot have.
_NOT_IN_HOST = re.compile("[ /@?#]")
# A request head larger than this is refused with 431, as servers refuse huge headers.
MAX_HEAD_BYTES = 64 * 1024
# The common CONNECT, as most clients send it: a host name or IPv4 address and a port, then
# header lines of a token-like name and a value, each ending in CRLF, then the blank line.
# Every head it matches whose port is 1-65535 is one the general parse takes to the same
# host, port and early bytes (tests/test_handshake_fuzz.py checks it), in a fifth of its
# time (its steps cost some 20 Python calls a connection); anything else goes the general
# way. Groups: the host and the port (bytes); the client's early bytes start at its end.
match_plain_connect = re.compile(
    rb"CONNECT ([-.0-9A-Z_a-z]+):([0-9]{1,5}) HTTP/1\.[01]\r\n(?:[!-9;-~]+:[^\r\n]*\r\n)*\r\n"
).match
_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"

_FAILURE_STATUS = {
    Failure.NOT_ALLOWED: (403, "Forbidden"),
    Failure.NETWORK_UNREACHABLE: (502, "Bad Gateway"),
    Failure.HOST_UNREACHABLE: (502, "Bad Gateway"),
    Failure.REFUSED: (502, "Bad Gateway"),
    Failure.TIMEOUT: (504, "Gateway Timeout"),
    Failure.GENERAL: (502, "Bad Gateway"),
}


def response(status: int, phrase: str, body: str, extra_headers: str = "") -> bytes:
    """A complete HTTP/1.1 response with a one-line text body, closing the connection."""
    payload = (body + "\n").encode()
    return (
        f"HTTP/1.1 {status} {phrase}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(payload)}\r\n"
        f"{extra_headers}"
        f"Connection: close\r\n\r\n"
    ).encode() + payload


# Not frozen: a head never leaves this module, and a frozen dataclass's constructor costs
# several times more (object.__setattr__ for each field), once per request.
@dataclass(slots=True)
class RequestHead:
    """A parsed request line and its header fields, in order, as sent."""

    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None


class BadRequest(Exception):
    """A request head that is not HTTP/1.x; the message says what is wrong."""


def parse_head(head: bytes) -> RequestHead:
    """Parse a request head (without its blank line); BadRequest if it is not HTTP/1.x."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise BadRequest("undecodable request head") from None
    lines = text.replace("\r\n", "\n").split("\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not all(parts):
        raise BadRequest(f"malformed request line {lines[0][:80]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequest(f"unsupported protocol {version[:20]!r}")
    if not method.isascii() or not method.isalpha():
        raise BadRequest(f"malformed method {method[:20]!r}")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            raise BadRequest("folded header lines are not allowed")
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise BadRequest(f"malformed header line {line[:80]!r}")
        headers.append((name, value.strip()))
    return RequestHead(method, target, version, tuple(headers))


def parse_authority(text: str, default_port: int | None) -> tuple[str, int]:
    """`host:port` or `[v6]:port` (the port optional when `default_port` is given)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise BadRequest(f"malformed address {text[:80]!r}")
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise BadRequest(f"malformed IPv6 address {host[:80]!r}") from None
        if rest and not rest.startswith(":"):
            raise BadRequest(f"malformed address {text[:80]!r}")
        port_text = rest[1:] if rest else ""
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            host, port_text = text, ""
    if not host or _NOT_IN_HOST.search(host):
        raise BadRequest(f"malformed host {host[:80]!r}")
    if not port_text:
        if default_port is None:
            raise BadRequest(f"no port in {text[:80]!r}: CONNECT needs host:port")
        return host, default_port
    if not is_decimal(port_text) or not 0 < int(port_text) <= 65535:
        raise BadRequest(f"malformed port {port_text[:20]!r}")
    return host, int(port_text)


def _body_framing(head: RequestHead) -> tuple[bool, int]:
    """(chunked, content length) of a request's body; BadRequest for a framing HTTP/1.1
    forbids (several lengths, a length beside chunked)."""
    encoding = head.header("Transfer-Encoding")
    length_text = head.header("Content-Length")
    if encoding is not None:
        if encoding.lower().replace(" ", "").split(",")[-1] != "chunked" or length_text:
            raise BadRequest(f"unsupported request framing: Transfer-Encoding {encoding!r}")
        return True, 0
    if length_text is None:
        return False, 0
    if not is_decimal(length_text):
        raise BadRequest(f"malformed Content-Length {length_text[:20]!r}")
    return False, int(length_text)


class ForwardedRequests:
    """The client's side of a forwarded (absolute-URI) HTTP connection after its first head:
    each later request head rewritten to origin form, bodies passed through as they are,
    until a request for another server (which this connection cannot reach) or a bad head."""

    def __init__(self, authority: tuple[str, int], first: RequestHead) -> None:
        self._authority = authority
        self._buffer = bytearray()
        self._chunked = False
        self._remaining = 0
        self._state = "head"
        self.stop_reason: str | None = None
        self._start_body(first)

    def _start_body(self, head: RequestHead) -> None:
        self._chunked, self._remaining = _body_framing(head)
        self._state = "chunk-size" if self._chunked else ("body" if self._remaining else "head")

    def feed(self, data: bytes) -> bytes:
        """The bytes to send upstream for `data` the client sent; once `stop_reason` is set,
        nothing more goes (the rest of the client's bytes are dropped)."""
        if self.stop_reason is not None:
            return b""
        self._buffer += data
        out = bytearray()
        buf = self._buffer
        while buf and self.stop_reason is None:
            if self._state == "body":
                take = min(self._remaining, len(buf))
                out += buf[:take]
                del buf[:take]
                self._remaining -= take
                if not self._remaining:
                    self._state = "chunk-crlf" if self._chunked else "head"
                continue
            if self._state == "head":
                end = _end_of_head(buf)
                if end is None:
                    if len(buf) > MAX_HEAD_BYTES:
                        self.stop_reason = f"a request head over {MAX_HEAD_BYTES} bytes"
                    break
                head_end, rest_start = end
                raw = bytes(buf[:head_end]).lstrip(b"\r\n")
                del buf[:rest_start]
                if not raw:
                    continue
                out += self._rewrite(raw)
                continue
            newline = buf.find(b"\n")
            if newline < 0:
                if len(buf) > 4096:
                    self.stop_reason = "a malformed chunked body"
                break
            line = bytes(buf[:newline]).strip()
            out += buf[: newline + 1]
            del buf[: newline + 1]
            if self._state == "chunk-crlf":
                self._state = "chunk-size"
            elif self._state == "chunk-size":
                try:
                    size = int(line.split(b";", 1)[0], 16)
                except ValueError:
                    self.stop_reason = "a malformed chunk size"
                    break
                self._remaining = size
                self._state = "body" if size else "trailer"
            elif not line:  # the blank line that ends the trailers
                self._state = "head"
        return bytes(out)

    def _rewrite(self, raw: bytes) -> bytes:
        try:
            head = parse_head(raw)
            host, port, rewritten = origin_form(head)
            if (host.lower(), port) != self._authority:
                self.stop_reason = (
                    f"a request for {host}:{port} on a connection to "
                    f"{self._authority[0]}:{self._authority[1]}"
                )
                return b""
            self._start_body(head)
        except BadRequest as exc:
            self.stop_reason = str(exc)
            return b""
        return rewritten


def origin_form(head: RequestHead) -> tuple[str, int, bytes]:
    """The destination of an absolute-URI request and its head rewritten for that server:
    origin-form target, `Proxy-*` headers removed, a Host header present."""
    target = head.target
    scheme, sep, rest = target.partition("://")
    if not sep:
        raise BadRequest(
            f"{target[:80]!r} is not an absolute URI: this is a proxy, ask for http://host/path"
        )
    if scheme.lower() != "http":
        raise BadRequest(f"scheme {scheme[:20]!r}: use CONNECT host:port for anything but http")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    if "@" in authority:
        raise BadRequest("credentials in the URI are not forwarded: remove them")
    host, port = parse_authority(authority, 80)
    if not path.startswith("/"):
        path = "/" + path
    lines = [f"{head.method} {path} {head.version}"]
    has_host = False
    for name, value in head.headers:
        lowered = name.lower()
        if lowered.startswith("proxy-"):
            continue
        has_host = has_host or lowered == "host"
        lines.append(f"{name}: {value}")
    if not has_host:
        lines.insert(1, f"Host: {authority}")
    return host, port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _end_of_head(buffer: bytes | bytearray) -> tuple[int, int] | None:
    """Where the head ends and where what follows starts; None if the blank line is not in."""
    crlf = buffer.find(b"\r\n\r\n")
    lf = buffer.find(b"\n\n")
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return lf, lf + 2
    if crlf >= 0:
        return crlf, crlf + 4
    return None


def failure_response(failure: Failure) -> bytes:
    """A 403, 502 or 504 response with a one-line body saying why."""
    status, phrase = _FAILURE_STATUS[failure]
    return response(status, phrase, f"flowtap: {failure.value}")


_TIMED_OUT = response(408, "Request Timeout", "flowtap: the request did not arrive in time")


class DecidedTunnel:
    """The handshake of a CONNECT that the relay decided from its first read (a head that
    `match_plain_connect` matched whole): what it owes the client once its upstream answers
    or fails. It keeps no state, so one serves every such client."""

    names_bound = False

    def receive(self, data: bytes) -> list[HandshakeEvent]:
        raise RuntimeError("the proxy request has already been decided")

    def succeeded(self, bound: Address | None) -> bytes:
        """`200 Connection established`."""
        return _ESTABLISHED

    def failed(self, failure: Failure) -> bytes:
        """A 403, 502 or 504 response with a one-line body saying why."""
        return failure_response(failure)

    def timed_out(self) -> bytes:
        """A 408 response."""
        return _TIMED_OUT

    def upstream_rewriter(self) -> None:
        """None: a tunnel's bytes go as they are."""
        return None


class HttpProxyServer:
    """The server side of one client's first request to an HTTP proxy."""

    names_bound = False

    def __init__(self, credentials: Mapping[str, str] | None = None) -> None:
        # Kept, not copied: a copy a client cost a dict.
        self._credentials: Mapping[str, str] = credentials or {}
        self._buffer = bytearray()
        self._decided = False
        self.is_tunnel = False
        self._forwarded: ForwardedRequests | None = None

    def receive(self, data: bytes) -> list[HandshakeEvent]:
        """Take bytes the client sent; what to do about them (nothing until a whole head)."""
        if self._decided:
            raise RuntimeError("the proxy request has already been decided")
        buffer = self._buffer
        if not buffer and not self._credentials:
            plain = match_plain_connect(data)
            if plain is not None:
                host, port_text = plain.groups()
                port = int(port_text)
                if 0 < port <= 65535:
                    self._decided = self.is_tunnel = True
                    requested = Requested(host.decode("ascii"), port, None)
                    return [OpenUpstream(requested, _CONNECT, data[plain.end() :])]
        if buffer:
            buffer += data
            end = _end_of_head(buffer)
        else:
            # Most clients send their head in one piece: it is parsed from `data` as it came.
            end = _end_of_head(data)
            if end is None:
                buffer += data
        if end is None:
            if len(buffer) > MAX_HEAD_BYTES:
                self._decided = True
                return [
                    self._reject(
                        431,
                        "Request Header Fields Too Large",
                        f"the request head exceeds {MAX_HEAD_BYTES} bytes",
                    )
                ]
            return []
        self._decided = True
        head_end, rest_start = end
        if head_end > MAX_HEAD_BYTES:
            return [
                self._reject(
                    431,
                    "Request Header Fields Too Large",
                    f"the request head exceeds {MAX_HEAD_BYTES} bytes",
                )
            ]
        if buffer:
            data = bytes(buffer)
            del buffer[:]
        early = data[rest_start:]
        try:
            head = parse_head(data[:head_end].lstrip(b"\r\n"))
        except BadRequest as exc:
            return [self._reject(400, "Bad Request", str(exc))]
        user, refusal = self._authenticate(head)
        if refusal is not None:
            return [refusal]
        try:
            if head.method.upper() == "CONNECT":
                self.is_tunnel = True
                host, port = parse_authority(head.target, None)
                return [OpenUpstream(Requested(host, port, user), _CONNECT, early)]
            host, port, rewritten = origin_form(head)
            self._forwarded = ForwardedRequests((host.lower(), port), head)
        except BadRequest as exc:
            return [self._reject(400, "Bad Request", str(exc))]
        early = self._forwarded.feed(early)
        return [OpenUpstream(Requested(host, port, user), _CONNECT, rewritten + early)]

    def upstream_rewriter(self) -> ForwardedRequests | None:
        """What rewrites the client's later requests (forwarded requests, not tunnels)."""
        return self._forwarded

    def succeeded(self, bound: Address | None) -> bytes:
        """`200 Connection established` for a tunnel; nothing for a forwarded request, which
        the server answers itself."""
        return _ESTABLISHED if self.is_tunnel else b""

    def failed(self, failure: Failure) -> bytes:
        """A 403, 502 or 504 response with a one-line body saying why."""
        return failure_response(failure)

    def timed_out(self) -> bytes:
        """A 408 response."""
        return _TIMED_OUT

    def _reject(self, status: int, phrase: str, why: str, extra_headers: str = "") -> Reject:
        return Reject(
            response(status, phrase, f"flowtap: {why}", extra_headers),
            CloseReason.HANDSHAKE_ERROR,
            why,
        )

    def _authenticate(self, head: RequestHead) -> tuple[str | None, Reject | None]:
        if not self._credentials:
            return None, None
        challenge = 'Proxy-Authenticate: Basic realm="flowtap"\r\n'
        value = head.header("Proxy-Authorization")
        if value is None:
            return None, self._reject(
                407, "Proxy Authentication Required", "no Proxy-Authorization given", challenge
            )
        scheme, _, token = value.partition(" ")
        try:
            decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            decoded = ""
        user, colon, password = decoded.partition(":")
        expected = self._credentials.get(user)
        if (
            scheme.lower() != "basic"
            or not colon
            or expected is None
            or not hmac.compare_digest(expected.encode(), password.encode())
        ):
            return None, self._reject(
                407, "Proxy Authentication Required", f"wrong credentials for {user!r}", challenge
            )
        return user, None
