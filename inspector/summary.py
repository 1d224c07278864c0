"""Protocol summaries: pure functions from the first bytes of each direction to a short story
(and, for HTTP/2, `Http2Summary`, which follows a whole connection fed as its bytes come).

Recognises HTTP/1.x, HTTP/2 (its streams, with the `hpack` and `hyperframe` libraries of the
`h2` project), TLS (ClientHello version, SNI, ALPN), DNS, Redis (RESP) and falls back
to a text or byte/entropy summary. Nothing here touches a socket; a summary never raises on
malformed input, it only recognises less.
"""

from __future__ import annotations

import math
import re
import struct
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hpack import Decoder

HEAD_BYTES = 4096
"""How many bytes of each direction a summary looks at (an HTTP/2 one follows the whole flow)."""


@dataclass(frozen=True, slots=True)
class Summary:
    """What a flow's bytes look like: a protocol name, a one-line headline and detail lines."""

    protocol: str
    headline: str
    details: tuple[str, ...] = ()


EMPTY = Summary(protocol="", headline="")

_METHODS = (
    b"GET",
    b"POST",
    b"PUT",
    b"DELETE",
    b"HEAD",
    b"OPTIONS",
    b"PATCH",
    b"CONNECT",
    b"TRACE",
)
_REQUEST_LINE = re.compile(rb"(" + b"|".join(_METHODS) + rb") (\S+) (HTTP/1\.[01])\r?\n", re.ASCII)
_STATUS_LINE = re.compile(rb"(HTTP/1\.[01]) (\d{3})(?: ([^\r\n]*))?\r?\n", re.ASCII)

_TLS_VERSIONS = {
    0x0300: "SSL 3.0",
    0x0301: "TLS 1.0",
    0x0302: "TLS 1.1",
    0x0303: "TLS 1.2",
    0x0304: "TLS 1.3",
}


def summarize(up: bytes, down: bytes, *, transport: str = "tcp", server_port: int = 0) -> Summary:
    """Summarise a flow from the first bytes the client sent (`up`) and the server sent; an
    HTTP/2 flow's from all the bytes given (see `Http2Summary`)."""
    if up.startswith(H2_PREFACE):
        return _http2(up, down)
    up = up[:HEAD_BYTES]
    down = down[:HEAD_BYTES]
    if not up and not down:
        return EMPTY
    for recognise in (_tls, _http, _redis):
        found = recognise(up, down)
        if found is not None:
            return found
    if transport == "udp" or server_port == 53:
        found = _dns(up, down, framed=transport != "udp")
        if found is not None:
            return found
    return _fallback(up, down)


# -- HTTP/1.x ------------------------------------------------------------------------------


def _headers(block: bytes) -> list[tuple[str, str]]:
    headers = []
    for line in block.split(b"\n"):
        name, sep, value = line.strip(b"\r").partition(b":")
        if sep and name and b" " not in name:
            headers.append((_text(name), _text(value.strip())))
    return headers


def _http_messages(
    data: bytes, start: re.Pattern[bytes]
) -> list[tuple[tuple[str, ...], list[tuple[str, str]]]]:
    """Start lines and headers of the HTTP messages that begin at a line start in `data`."""
    messages = []
    pos = 0
    while True:
        match = start.search(data, pos)
        if match is None:
            break
        if match.start() != 0 and data[match.start() - 1 : match.start()] != b"\n":
            pos = match.end()
            continue
        end = data.find(b"\r\n\r\n", match.end())
        if end < 0:
            end = data.find(b"\n\n", match.end())
        block = data[match.end() : end if end >= 0 else len(data)]
        groups = tuple(_text(g or b"") for g in match.groups())
        messages.append((groups, _headers(block)))
        pos = match.end()
    return messages


def _http(up: bytes, down: bytes) -> Summary | None:
    requests = _http_messages(up, _REQUEST_LINE) if up[:8].split(b" ")[0] in _METHODS else []
    responses = _http_messages(down, _STATUS_LINE) if down.startswith(b"HTTP/1.") else []
    if not requests and not responses:
        return None
    details: list[str] = []
    for (method, target, version), headers in requests:
        details.append(f"> {method} {target} {version}")
        details += [f">   {name}: {value}" for name, value in headers]
    for (version, status, reason), headers in responses:
        details.append(f"< {version} {status} {reason}".rstrip())
        details += [f"<   {name}: {value}" for name, value in headers]
    parts = []
    if requests:
        method, target, _ = requests[0][0]
        host = dict((k.lower(), v) for k, v in requests[0][1]).get("host")
        parts.append(f"{method} {target}" + (f" ({host})" if host else ""))
    if responses:
        _, status, reason = responses[0][0]
        parts.append(f"{status} {reason}".rstrip())
    headline = " → ".join(parts)
    extra = max(len(requests), len(responses)) - 1
    if extra > 0:
        headline += f" (+{extra} more)"
    return Summary("http", headline, tuple(details))


# -- HTTP/2 ----------------------------------------------------------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
"""What an HTTP/2 client sends first: over TLS with ALPN `h2` as much as in cleartext (h2c
with prior knowledge), so the bytes alone tell HTTP/2 whatever the ALPN was."""

_H2_FRAME_HEADER = struct.Struct("!HBBBI")  # length (24 bits), type, flags, stream id
_H2_HEADER_TABLE_SIZE = 0x1
_H2_HEADERS, _H2_RST_STREAM, _H2_SETTINGS, _H2_PUSH_PROMISE, _H2_CONTINUATION = 1, 3, 4, 5, 9
_H2_READ = frozenset(
    (_H2_HEADERS, _H2_RST_STREAM, _H2_SETTINGS, _H2_PUSH_PROMISE, _H2_CONTINUATION)
)
_H2_MAX_BLOCK_BYTES = 1 << 20
"""The largest frame or header block an HTTP/2 summary reads (the protocol's default frame
size limit is 16 KiB); past it the direction is followed no further."""
_H2_MAX_TABLE_BYTES = 1 << 16
H2_STREAMS_LISTED = 100
"""How many streams an HTTP/2 summary lists; later ones are only counted."""


@dataclass(slots=True)
class _H2Stream:
    """What an HTTP/2 summary tells of one stream."""

    method: str = ""
    path: str = ""
    authority: str = ""
    status: str = ""
    reset: bool = False


class _H2Reader:
    """One direction of an HTTP/2 connection, read frame by frame as its bytes come: only the
    frames a summary needs are kept (a DATA frame's body is skipped, never held)."""

    __slots__ = ("block", "decoder", "frame", "is_followed", "length", "partial", "skip")

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder
        self.partial = bytearray()  # a frame header, or a read frame's body, not whole yet
        self.frame: bytes | None = None  # the header of the frame whose body is in `partial`
        self.length = _H2_FRAME_HEADER.size  # bytes `partial` must reach
        self.skip = 0  # body bytes of an unread frame still to come
        self.block: tuple[int, bytearray] | None = None  # a header block awaiting CONTINUATION
        self.is_followed = True

    def feed(self, data: bytes | memoryview, summary: Http2Summary, peer: Decoder) -> None:
        from hpack import HPACKError
        from hyperframe.exceptions import HyperframeError

        view = memoryview(data)
        pos = 0
        size = len(view)
        try:
            while pos < size and self.is_followed:
                if self.skip:
                    step = min(self.skip, size - pos)
                    self.skip -= step
                    pos += step
                    continue
                step = min(self.length - len(self.partial), size - pos)
                self.partial += view[pos : pos + step]
                pos += step
                if len(self.partial) < self.length:
                    break
                if self.frame is None:
                    self._header(bytes(self.partial))
                    if self.frame is None or self.length:
                        continue
                self._body(summary, peer)
        except (HyperframeError, HPACKError, ValueError):
            self.is_followed = False  # malformed: what was decoded before stands

    def _header(self, header: bytes) -> None:
        high, low, kind, _, _ = _H2_FRAME_HEADER.unpack(header)
        length = high << 8 | low
        self.partial.clear()
        if kind not in _H2_READ:
            self.skip = length
            self.length = _H2_FRAME_HEADER.size
            return
        if length > _H2_MAX_BLOCK_BYTES:
            self.is_followed = False
            return
        self.frame = header
        self.length = length

    def _body(self, summary: Http2Summary, peer: Decoder) -> None:
        from hyperframe.frame import (
            ContinuationFrame,
            Frame,
            HeadersFrame,
            PushPromiseFrame,
            RstStreamFrame,
            SettingsFrame,
        )

        assert self.frame is not None
        frame, _ = Frame.parse_frame_header(memoryview(self.frame))
        frame.parse_body(memoryview(self.partial))
        self.frame = None
        self.partial.clear()
        self.length = _H2_FRAME_HEADER.size
        fragment: bytes | None = None
        if isinstance(frame, HeadersFrame | PushPromiseFrame):
            # A pushed request's headers come from the server's encoder: decoding them keeps
            # this direction's table in step.
            stream = frame.promised_stream_id if isinstance(frame, PushPromiseFrame) else 0
            self.block = (stream or frame.stream_id, bytearray())
            fragment = frame.data
        elif isinstance(frame, ContinuationFrame) and self.block is not None:
            fragment = frame.data
        elif isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
            size = frame.settings.get(_H2_HEADER_TABLE_SIZE)
            if size is not None:
                # It bounds the other direction's encoder; past 64 KiB (a table that large
                # is not worth its memory here) that direction is followed no further.
                peer.max_allowed_table_size = min(size, _H2_MAX_TABLE_BYTES)
        elif isinstance(frame, RstStreamFrame):
            summary.add(frame.stream_id, {":reset": str(frame.error_code)})
        if fragment is not None and self.block is not None:
            stream_id, block = self.block
            block += fragment
            if len(block) > _H2_MAX_BLOCK_BYTES:
                self.is_followed = False
            elif "END_HEADERS" in frame.flags:
                self.block = None
                headers = self.decoder.decode(bytes(block), raw=True)
                summary.add(stream_id, {_text(k): _text(v) for k, v in headers})


class Http2Summary:
    """The streams of an HTTP/2 connection, followed over the whole flow as its bytes come
    (`feed`), in bounded memory: each header block is decoded in order (HPACK's tables need
    every one), and the first `H2_STREAMS_LISTED` streams are kept, later ones counted."""

    def __init__(self) -> None:
        from hpack import Decoder  # only for HTTP/2 flows: most summaries never need it

        self._up = _H2Reader(Decoder())
        self._down = _H2Reader(Decoder())
        self._preface_left = len(H2_PREFACE)
        self._streams: dict[int, _H2Stream] = {}
        self._unlisted = 0
        self._stopped = False

    def feed(self, is_up: bool, data: bytes | memoryview) -> None:
        """Take the next bytes the client (`is_up`) or the server sent."""
        if is_up:
            if self._preface_left:
                skipped = min(self._preface_left, len(data))
                self._preface_left -= skipped
                data = memoryview(data)[skipped:]
            self._up.feed(data, self, self._down.decoder)
        else:
            self._down.feed(data, self, self._up.decoder)

    def stop(self) -> None:
        """Bytes are missing (a viewer fell behind, the capture has a gap): follow no further."""
        if self._up.is_followed or self._down.is_followed:
            self._up.is_followed = self._down.is_followed = False
            self._stopped = True

    def add(self, stream_id: int, fields: dict[str, str]) -> None:
        """Note a header block (or a reset, as `:reset`) of a stream."""
        stream = self._streams.get(stream_id)
        if stream is None:
            if len(self._streams) >= H2_STREAMS_LISTED:
                self._unlisted += ":method" in fields
                return
            stream = self._streams[stream_id] = _H2Stream()
        stream.method = stream.method or fields.get(":method", "")
        stream.path = stream.path or fields.get(":path", "")
        stream.authority = stream.authority or fields.get(":authority", "")
        status = fields.get(":status", "")
        if status and (not stream.status or stream.status.startswith("1")):
            stream.status = status  # a final status wins over an informational one
        stream.reset = stream.reset or ":reset" in fields

    def summary(self) -> Summary:
        asked = [(i, s) for i, s in sorted(self._streams.items()) if s.method]
        total = len(asked) + self._unlisted
        details = [f"HTTP/2: {total} stream{'s' if total != 1 else ''}"]
        for stream_id, stream in asked:
            line = f"> [{stream_id}] {stream.method} {stream.path}"
            if stream.authority:
                line += f" ({stream.authority})"
            details.append(line)
            if stream.status or stream.reset:
                outcome = stream.status + (" reset" if stream.reset else "")
                details.append(f"< [{stream_id}] {outcome.strip()}")
        if self._unlisted:
            details.append(f"… +{self._unlisted} more streams")
        if self._stopped:
            details.append("… bytes missing: later streams not followed")
        if not asked:
            return Summary("http", "HTTP/2 connection", tuple(details))
        _, first = asked[0]
        headline = f"h2 {first.method} {first.path}"
        if first.authority:
            headline += f" ({first.authority})"
        if first.status:
            headline += f" → {first.status}"
        if total > 1:
            headline += f" (+{total - 1} more)"
        return Summary("http", headline, tuple(details))


def _http2(up: bytes, down: bytes) -> Summary:
    follower = Http2Summary()
    follower.feed(True, up)
    follower.feed(False, down)
    return follower.summary()


# -- TLS -------------------------------------------------------------------------------------


def _tls_record(data: bytes, handshake_type: int) -> bytes | None:
    """The body of the first handshake message of `handshake_type` in `data`, if it starts so."""
    if len(data) < 9 or data[0] != 0x16 or data[1] != 0x03 or data[5] != handshake_type:
        return None
    (record_length,) = struct.unpack_from("!H", data, 3)
    body_length = int.from_bytes(data[6:9], "big")
    body = data[9 : 9 + min(body_length, record_length - 4)]
    return body


def _tls_extensions(body: bytes, pos: int) -> dict[int, bytes]:
    extensions: dict[int, bytes] = {}
    if pos + 2 > len(body):
        return extensions
    (total,) = struct.unpack_from("!H", body, pos)
    pos += 2
    end = min(len(body), pos + total)
    while pos + 4 <= end:
        kind, length = struct.unpack_from("!HH", body, pos)
        pos += 4
        extensions[kind] = body[pos : pos + length]
        pos += length
    return extensions


def _client_hello(body: bytes) -> tuple[int, dict[int, bytes]] | None:
    if len(body) < 38:
        return None
    (version,) = struct.unpack_from("!H", body, 0)
    pos = 34
    pos += 1 + body[pos]  # session id
    if pos + 2 > len(body):
        return None
    (suites,) = struct.unpack_from("!H", body, pos)
    pos += 2 + suites
    if pos >= len(body):
        return None
    pos += 1 + body[pos]  # compression methods
    return version, _tls_extensions(body, pos)


def _server_hello(body: bytes) -> tuple[int, dict[int, bytes]] | None:
    if len(body) < 38:
        return None
    (version,) = struct.unpack_from("!H", body, 0)
    pos = 34
    pos += 1 + body[pos]
    pos += 3  # cipher suite, compression method
    return version, _tls_extensions(body, pos)


def _sni(extension: bytes) -> str | None:
    if len(extension) < 5:
        return None
    pos = 2
    while pos + 3 <= len(extension):
        kind = extension[pos]
        (length,) = struct.unpack_from("!H", extension, pos + 1)
        if kind == 0:
            return _text(extension[pos + 3 : pos + 3 + length])
        pos += 3 + length
    return None


def _alpn(extension: bytes) -> list[str]:
    protocols = []
    pos = 2
    while pos < len(extension):
        length = extension[pos]
        protocols.append(_text(extension[pos + 1 : pos + 1 + length]))
        pos += 1 + length
    return protocols


def _highest_supported_version(extension: bytes, version: int) -> int:
    if not extension:
        return version
    versions = [
        v
        for (v,) in struct.iter_unpack("!H", extension[1 : 1 + (extension[0] & ~1)])
        if v in _TLS_VERSIONS
    ]
    return max(versions, default=version)


def _tls(up: bytes, down: bytes) -> Summary | None:
    hello_body = _tls_record(up, 1)
    hello = _client_hello(hello_body) if hello_body is not None else None
    if hello is None:
        return None
    legacy_version, extensions = hello
    version = _highest_supported_version(extensions.get(43, b""), legacy_version)
    sni = _sni(extensions[0]) if 0 in extensions else None
    alpn = _alpn(extensions[16]) if 16 in extensions else []
    name = _TLS_VERSIONS.get(version, f"0x{version:04x}")
    details = [f"> ClientHello {name}"]
    if sni:
        details.append(f">   server name: {sni}")
    if alpn:
        details.append(f">   ALPN: {', '.join(alpn)}")
    server_body = _tls_record(down, 2)
    server = _server_hello(server_body) if server_body is not None else None
    if server is not None:
        chosen = server[1].get(43, b"")
        chosen_version = struct.unpack("!H", chosen[:2])[0] if len(chosen) >= 2 else server[0]
        details.append(f"< ServerHello {_TLS_VERSIONS.get(chosen_version, hex(chosen_version))}")
        if 16 in server[1]:
            details.append(f"<   ALPN: {', '.join(_alpn(server[1][16]))}")
    headline = f"{name} ClientHello" + (f" SNI {sni}" if sni else "")
    if alpn:
        headline += f" ALPN {','.join(alpn)}"
    return Summary("tls", headline, tuple(details))


# -- Redis (RESP) ----------------------------------------------------------------------------

_INLINE_COMMANDS = frozenset(
    {b"PING", b"GET", b"SET", b"DEL", b"INFO", b"KEYS", b"QUIT", b"INCR", b"EXISTS", b"AUTH"}
)


def _resp_commands(data: bytes) -> list[list[str]]:
    """The commands in a RESP request stream (arrays of bulk strings, or inline commands)."""
    commands: list[list[str]] = []
    lines = data.split(b"\r\n")
    i = 0
    while i < len(lines) - 1:
        line = lines[i]
        if line.startswith(b"*") and line[1:].isdigit():
            count = int(line[1:])
            args: list[str] = []
            i += 1
            while len(args) < count and i + 1 < len(lines):
                if not lines[i].startswith(b"$"):
                    return commands
                args.append(_text(lines[i + 1]))
                i += 2
            if len(args) < count:
                break
            commands.append(args)
        elif line.split(b" ")[0].upper() in _INLINE_COMMANDS:
            commands.append([_text(part) for part in line.split()])
            i += 1
        else:
            break
    return commands


def _resp_replies(data: bytes) -> list[str]:
    replies = []
    for line in data.split(b"\r\n")[:20]:
        if line[:1] in (b"+", b"-", b":"):
            replies.append(_text(line))
        elif line.startswith(b"$") and line[1:].lstrip(b"-").isdigit():
            replies.append("(nil)" if line == b"$-1" else f"bulk {int(line[1:])} B")
    return replies


def _redis(up: bytes, down: bytes) -> Summary | None:
    if not (up.startswith(b"*") or up.split(b" ")[0].split(b"\r")[0].upper() in _INLINE_COMMANDS):
        return None
    commands = _resp_commands(up)
    if not commands:
        return None
    if not up.startswith(b"*") and not (down[:1] in (b"+", b"-", b":", b"$", b"*") or not down):
        return None
    shown = [" ".join(args[:3]) + (" …" if len(args) > 3 else "") for args in commands]
    headline = "; ".join(shown[:3])
    if len(commands) > 3:
        headline += f" (+{len(commands) - 3} more)"
    details = [f"> {' '.join(args)}" for args in commands[:50]]
    details += [f"< {reply}" for reply in _resp_replies(down)]
    return Summary("redis", headline, tuple(details))


# -- DNS -------------------------------------------------------------------------------------


def _dns(up: bytes, down: bytes, *, framed: bool) -> Summary | None:
    query = _dns_message(up, framed=framed)
    if query is None or query.qr != 0 or not query.qdcount:
        return None
    answer = _dns_message(down, framed=framed)
    details = []
    questions = []
    for question in query.qd or []:
        qname = _name(question.qname)
        qtype = question.sprintf("%qtype%")
        questions.append(f"{qname} {qtype}")
        details.append(f"> query {qname} {qtype}")
    answers = []
    if answer is not None and answer.qr == 1:
        rcode = answer.sprintf("%rcode%")
        details.append(f"< {rcode}")
        for record in answer.an or []:
            value = record.rdata
            text = _name(value) if isinstance(value, bytes) else str(value)
            answers.append(text)
            details.append(f"<   {_name(record.rrname)} {record.sprintf('%type%')} {text}")
        if not answers and rcode != "ok":
            answers.append(rcode)
    headline = "query " + ", ".join(questions)
    if answers:
        headline += " → " + ", ".join(answers[:3])
    return Summary("dns", headline, tuple(details))


def _dns_message(data: bytes, *, framed: bool) -> Any:
    """A scapy DNS packet parsed from `data` (length-prefixed over TCP), or None."""
    if framed:
        if len(data) < 2:
            return None
        (length,) = struct.unpack_from("!H", data)
        data = data[2 : 2 + length]
    if len(data) < 12:
        return None
    from scapy.layers.dns import DNS  # lazily: scapy is slow to import and off the hot path

    try:
        message = DNS(data)
    except Exception:
        return None
    if message.opcode != 0 or message.qdcount > 16 or message.ancount > 64:
        return None
    return message


def _name(value: object) -> str:
    if isinstance(value, bytes):
        return _text(value).rstrip(".") + "."
    return str(value)


# -- fallback --------------------------------------------------------------------------------


def entropy_bits_per_byte(data: bytes) -> float:
    """The Shannon entropy of `data` in bits per byte (0 for empty input)."""
    if not data:
        return 0.0
    total = len(data)
    return -sum(n / total * math.log2(n / total) for n in Counter(data).values())


def is_mostly_text(data: bytes) -> bool:
    if not data:
        return False
    printable = sum(1 for b in data if 32 <= b < 127 or b in (9, 10, 13))
    return printable >= 0.9 * len(data)


def _first_line(data: bytes) -> bytes:
    return data.split(b"\n", 1)[0].strip()


def _fallback(up: bytes, down: bytes) -> Summary:
    first = up or down
    arrow = ">" if up else "<"
    if is_mostly_text(first):
        line = _first_line(first)
        headline = f"{arrow} {escape_bytes(line[:80])}"
        details = tuple(
            f"{mark} {escape_bytes(_first_line(chunk)[:120])}"
            for mark, chunk in ((">", up), ("<", down))
            if chunk
        )
        return Summary("text", headline, details)
    details = tuple(
        f"{mark} {len(chunk)} B, entropy {entropy_bits_per_byte(chunk):.2f} bits/byte"
        for mark, chunk in ((">", up), ("<", down))
        if chunk
    )
    headline = f"{arrow} {len(first)} B binary, entropy {entropy_bits_per_byte(first):.2f}"
    return Summary("binary", headline, details)


_ESCAPES = {9: "\\t", 13: "\\r", 10: "\\n", 92: "\\\\"}
_ESCAPE_TABLE = {b: _ESCAPES.get(b, chr(b) if 32 <= b < 127 else f"\\x{b:02x}") for b in range(256)}
_ESCAPE_TABLE_LINES = {**_ESCAPE_TABLE, 10: "\\n\n"}


def escape_bytes(data: bytes, *, keep_newlines: bool = False) -> str:
    """Printable ASCII as is, other bytes as escapes (`\\r`, `\\xNN`); newlines kept if asked."""
    table = _ESCAPE_TABLE_LINES if keep_newlines else _ESCAPE_TABLE
    return data.decode("latin-1").translate(table)


def _text(data: bytes) -> str:
    return escape_bytes(data)
