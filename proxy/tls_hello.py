"""A sans-IO peek at a client's first bytes: a TLS ClientHello (its SNI, ALPN offer and
versions), not TLS, or not enough bytes yet to tell."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, TypeVar

CONTENT_HANDSHAKE: Final = 0x16
HANDSHAKE_CLIENT_HELLO: Final = 0x01
MAX_RECORD_BYTES: Final = 1 << 14
"""RFC 8446 5.1: a plaintext record carries at most 2^14 bytes."""
MAX_HELLO_BYTES: Final = 1 << 16
"""A ClientHello longer than this is not one a real client sends (post-quantum key shares
make them about 1.9 KiB): stop buffering and call it not TLS."""

EXT_SERVER_NAME: Final = 0x0000
EXT_ALPN: Final = 0x0010
EXT_SUPPORTED_VERSIONS: Final = 0x002B

VERSION_NAMES: Final = {
    0x0300: "SSLv3",
    0x0301: "TLSv1",
    0x0302: "TLSv1.1",
    0x0303: "TLSv1.2",
    0x0304: "TLSv1.3",
}


@dataclass(frozen=True)
class ClientHello:
    """What a ClientHello asks for: the server name (None without SNI), the ALPN protocols
    offered in order, and the versions offered (supported_versions, else the legacy one)."""

    sni: str | None
    alpn: tuple[str, ...]
    versions: tuple[int, ...]
    size_bytes: int
    """How many bytes of the stream the records holding the ClientHello took."""
    random: bytes = field(default=b"", compare=False)
    """The client random: what names the connection's secrets in a key log."""


@dataclass(frozen=True)
class NeedMore:
    """The bytes so far are a valid beginning of a ClientHello: peek again with more."""


@dataclass(frozen=True)
class NotTls:
    """The bytes are not a TLS ClientHello; `reason` says where they stopped looking like one."""

    reason: str


NEED_MORE: Final = NeedMore()

Peek = ClientHello | NeedMore | NotTls


class _Malformed(Exception):
    """A ClientHello whose inner lengths or fields do not add up."""


def peek_client_hello(data: bytes | bytearray | memoryview) -> Peek:
    """Decide from a client's first bytes whether they open TLS, without consuming them."""
    view = memoryview(data)
    handshake = bytearray()
    offset = 0
    message_bytes: int | None = None
    while message_bytes is None or len(handshake) < message_bytes:
        if len(view) - offset < 5:
            problem = _check_record_header_prefix(view[offset:], first=offset == 0)
            return NotTls(problem) if problem else NEED_MORE
        problem = _check_record_header_prefix(view[offset : offset + 5], first=offset == 0)
        if problem:
            return NotTls(problem)
        length = int.from_bytes(view[offset + 3 : offset + 5], "big")
        if length == 0 or length > MAX_RECORD_BYTES:
            return NotTls(f"a TLS record of {length} bytes")
        end = offset + 5 + length
        if len(view) < end:
            # Check what has come of the handshake header already, so that garbage is called
            # out at once rather than after a whole bogus record length of waiting.
            early = _check_handshake_header(handshake + view[offset + 5 :])
            return NotTls(early) if early else NEED_MORE
        handshake += view[offset + 5 : end]
        offset = end
        problem = _check_handshake_header(handshake)
        if problem:
            return NotTls(problem)
        if len(handshake) >= 4:
            message_bytes = 4 + int.from_bytes(handshake[1:4], "big")
    try:
        return _parse_client_hello(bytes(handshake[4:message_bytes]), offset)
    except _Malformed as exc:
        return NotTls(f"a malformed ClientHello: {exc}")


def _check_record_header_prefix(header: memoryview, first: bool) -> str | None:
    """What is wrong with the first up-to-5 bytes of a record, or None if nothing yet."""
    if len(header) >= 1 and header[0] != CONTENT_HANDSHAKE:
        if first:
            return f"first byte 0x{header[0]:02x} is not a TLS handshake record"
        return f"a record of type 0x{header[0]:02x} inside the ClientHello"
    if len(header) >= 2 and header[1] != 0x03:
        return f"record version 0x{header[1]:02x}.. is not TLS"
    if len(header) >= 3 and header[2] > 0x04:
        return f"record version 0x03{header[2]:02x} is not TLS"
    if len(header) >= 5 and int.from_bytes(header[3:5], "big") == 0:
        return "an empty TLS record"
    return None


def _check_handshake_header(handshake: bytes | bytearray) -> str | None:
    if len(handshake) >= 1 and handshake[0] != HANDSHAKE_CLIENT_HELLO:
        return f"handshake message type {handshake[0]} is not a ClientHello"
    if len(handshake) >= 4:
        length = int.from_bytes(handshake[1:4], "big")
        if length + 4 > MAX_HELLO_BYTES:
            return f"a ClientHello of {length} bytes (more than {MAX_HELLO_BYTES})"
        if length < 38:  # version, random, session id length, one cipher suite, ...
            return f"a ClientHello of {length} bytes is too short"
    return None


class _Reader:
    """Reads big-endian fields from a byte string, raising _Malformed past its end."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._offset = 0
        self._what = what

    def take(self, count: int) -> bytes:
        end = self._offset + count
        if end > len(self._data):
            raise _Malformed(f"{self._what} ends inside a field")
        chunk = self._data[self._offset : end]
        self._offset = end
        return chunk

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int, what: str) -> _Reader:
        return _Reader(self.take(self.uint(length_size)), what)

    def rest(self) -> bytes:
        return self.take(len(self._data) - self._offset)

    def is_done(self) -> bool:
        return self._offset == len(self._data)


def _parse_client_hello(body: bytes, size_bytes: int) -> ClientHello:
    # The fields before the extensions are read by offset: through a _Reader they took about
    # twenty calls a hello, most of the time it takes to parse.
    end = len(body)
    if end < 35:
        raise _Malformed(_ENDS_INSIDE)
    legacy_version = body[0] << 8 | body[1]
    random = body[2:34]
    session_id_bytes = body[34]
    at = 35 + session_id_bytes
    if at > end:
        raise _Malformed(_ENDS_INSIDE)
    if session_id_bytes > 32:
        raise _Malformed(f"a session id of {session_id_bytes} bytes")
    if at + 2 > end:
        raise _Malformed(_ENDS_INSIDE)
    suites_bytes = body[at] << 8 | body[at + 1]
    at += 2 + suites_bytes
    if at > end:
        raise _Malformed(_ENDS_INSIDE)
    if not suites_bytes or suites_bytes % 2:
        raise _Malformed(f"{suites_bytes} bytes of cipher suites")
    if at + 1 > end:
        raise _Malformed(_ENDS_INSIDE)
    compression_bytes = body[at]
    at += 1 + compression_bytes
    if at > end:
        raise _Malformed(_ENDS_INSIDE)
    if not compression_bytes:
        raise _Malformed("no compression method")
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = (legacy_version,)
    if at == end:  # a ClientHello without extensions (SSLv3, old TLS)
        return ClientHello(sni, alpn, versions, size_bytes, random)
    if at + 2 > end:
        raise _Malformed(_ENDS_INSIDE)
    offset = at + 2
    extensions_end = offset + (body[at] << 8 | body[at + 1])
    if extensions_end > end:
        raise _Malformed(_ENDS_INSIDE)
    if extensions_end != end:
        raise _Malformed("bytes after the extensions")
    seen: set[int] = set()
    # A browser sends a dozen or more extensions, three of which matter here: their headers
    # are read in one call each, and only those three become readers.
    while offset < extensions_end:
        if offset + 4 > extensions_end:
            raise _Malformed("extensions ends inside a field")
        kind, size = _EXTENSION_HEADER.unpack_from(body, offset)
        start, offset = offset + 4, offset + 4 + size
        if offset > extensions_end:
            raise _Malformed("extensions ends inside a field")
        if kind in seen:
            raise _Malformed(f"extension 0x{kind:04x} twice")
        seen.add(kind)
        if kind in _PARSED_EXTENSIONS:
            if kind == EXT_SERVER_NAME and (name := _one_host_name(body[start:offset])):
                sni = name
                continue
            data = _Reader(body[start:offset], f"extension 0x{kind:04x}")
            if kind == EXT_SERVER_NAME:
                sni = _server_name(data)
            elif kind == EXT_ALPN:
                alpn = _alpn(data)
            else:
                versions = _supported_versions(data)
    return ClientHello(sni, alpn, versions, size_bytes, random)


def _one_host_name(extension: bytes) -> str | None:
    """The host name of a server_name extension that is one well-formed host_name entry (what
    clients send), else None (then `_server_name` reads it, or says what is wrong)."""
    size = len(extension)
    if (
        size > 5
        and extension[2] == 0
        and extension[0] << 8 | extension[1] == size - 2
        and extension[3] << 8 | extension[4] == size - 5
    ):
        name = extension[5:]
        if not name.translate(None, _HOST_NAME_BYTES):  # every byte printable ASCII
            return name.decode("ascii")
    return None


_HOST_NAME_BYTES = bytes(range(0x21, 0x7F))


_ENDS_INSIDE = "the ClientHello ends inside a field"
_EXTENSION_HEADER = struct.Struct(">HH")
_PARSED_EXTENSIONS = frozenset((EXT_SERVER_NAME, EXT_ALPN, EXT_SUPPORTED_VERSIONS))


def _server_name(data: _Reader) -> str | None:
    if data.is_done():  # a server echoes it empty; a client should not, but may
        return None
    names = data.vector(2, "the server name list")
    if not data.is_done():
        raise _Malformed("bytes after the server name list")
    host_name: str | None = None
    while not names.is_done():
        name_type = names.uint(1)
        name = names.vector(2, "a server name")
        raw = name.rest()
        if name_type != 0 or host_name is not None:
            continue  # RFC 6066: one host_name; other types are unknown, skipped
        if not raw or not all(0x21 <= byte <= 0x7E for byte in raw):
            raise _Malformed(f"server name {raw[:64]!r} is not a host name")
        host_name = raw.decode("ascii")
    return host_name


def _alpn(data: _Reader) -> tuple[str, ...]:
    return _listed(data, 2, "the ALPN list", _alpn_protocol, "an empty ALPN list")


def _alpn_protocol(listed: _Reader) -> str:
    raw = listed.vector(1, "an ALPN protocol").rest()
    if not raw:
        raise _Malformed("an empty ALPN protocol name")
    # Protocol ids are bytes; latin-1 keeps each byte one character, as ssl expects back.
    return raw.decode("latin-1")


def _supported_versions(data: _Reader) -> tuple[int, ...]:
    return _listed(data, 1, "the supported versions", _version, "no supported version")


def _version(listed: _Reader) -> int | None:
    version = listed.uint(2)
    return None if _is_grease(version) else version


T = TypeVar("T")


def _listed(
    data: _Reader,
    length_size: int,
    what: str,
    read: Callable[[_Reader], T | None],
    if_empty: str,
) -> tuple[T, ...]:
    """The items of an extension that is one list, each read by `read` (None: skipped);
    _Malformed, saying `if_empty`, when none is left."""
    listed = data.vector(length_size, what)
    if not data.is_done():
        raise _Malformed(f"bytes after {what}")
    items = []
    while not listed.is_done():
        item = read(listed)
        if item is not None:
            items.append(item)
    if not items:
        raise _Malformed(if_empty)
    return tuple(items)


def _is_grease(value: int) -> bool:
    """RFC 8701: 0x0A0A, 0x1A1A, ... 0xFAFA are values a client sends to keep servers honest."""
    return value & 0x0F0F == 0x0A0A and value >> 8 == value & 0xFF


def version_name(version: int) -> str:
    """A TLS version's usual name (`TLSv1.3`), or its hex value when it has none."""
    return VERSION_NAMES.get(version, f"0x{version:04x}")
