"""Reading captures: pcap and pcapng records streamed from disk, decoded down to TCP/UDP segments.

Any tool's capture: pcap with microsecond or nanosecond timestamps in either byte order,
pcapng with several sections and interfaces (each with its own link type and timestamp
resolution), and the link types Ethernet (with VLAN tags), Linux cooked v1 and v2, raw IP
and BSD loopback. Headers are parsed with `struct`; nothing holds more than one record.

The container formats are parsed here rather than by scapy's `RawPcapReader` and
`RawPcapNgReader` because a user needs to know exactly where a damaged or truncated file
stops making sense (scapy raises a bare EOFError), and pcapng's per-interface nanosecond
resolutions and packet comments must survive into the flows.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, NamedTuple

from flowtap.proxy.errors import FlowtapError

log = logging.getLogger(__name__)

# Link types (https://www.tcpdump.org/linktypes.html)
LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276
_LINKTYPE_RAW_ALIASES = (12, 14)  # DLT_RAW as some systems number it

LINKTYPE_NAMES = {
    LINKTYPE_NULL: "BSD loopback",
    LINKTYPE_ETHERNET: "Ethernet",
    LINKTYPE_RAW: "raw IP",
    12: "raw IP",
    14: "raw IP",
    LINKTYPE_LOOP: "OpenBSD loopback",
    LINKTYPE_LINUX_SLL: "Linux cooked v1",
    LINKTYPE_IPV4: "raw IPv4",
    LINKTYPE_IPV6: "raw IPv6",
    LINKTYPE_LINUX_SLL2: "Linux cooked v2",
}
SUPPORTED_LINKTYPES = frozenset(LINKTYPE_NAMES)
_OTHER_LINKTYPE_NAMES = {
    105: "IEEE 802.11",
    127: "IEEE 802.11 radiotap",
    147: "user-defined",
    187: "Bluetooth HCI",
    189: "USB Linux",
    220: "USB Linux mmapped",
    249: "netlink",
    253: "netlink",
}

_MAX_RECORD_BYTES = 64 << 20
_PROTO_TCP = 6
_PROTO_UDP = 17
_TCP_RST = 0x04


def linktype_name(linktype: int) -> str:
    return LINKTYPE_NAMES.get(linktype) or _OTHER_LINKTYPE_NAMES.get(linktype) or "unknown"


class CaptureError(FlowtapError):
    """A capture that cannot be read from its start: missing, empty, or not a capture."""


class DamagedCaptureError(CaptureError):
    """A capture that stops making sense part-way; everything before `offset` was read."""

    def __init__(self, message: str, *, offset: int, packets_read: int) -> None:
        super().__init__(message)
        self.offset = offset
        self.packets_read = packets_read


_RawRecord = tuple[float, int, bytes, int, str | None]
_BLOCK_HEADER = {e: struct.Struct(e + "II") for e in "<>"}
_U32_AT = {e: struct.Struct(e + "I") for e in "<>"}
_EPB_FIELDS = {e: struct.Struct(e + "IIIII") for e in "<>"}


class Record(NamedTuple):
    """One captured frame as the container stores it."""

    timestamp: float
    linktype: int
    data: bytes
    wire_length: int
    comment: str | None


class Segment(NamedTuple):
    """A TCP segment or UDP datagram; a NamedTuple because one is built per packet.

    `length` is the payload length the IP header declares; `payload` may be shorter when
    the capture cut the packet (snap length). For UDP, `seq`, `ack` and `flags` are 0.
    """

    timestamp: float
    is_udp: bool
    src: bytes
    src_port: int
    dst: bytes
    dst_port: int
    seq: int
    ack: int
    flags: int
    payload: memoryview
    length: int
    comment: str | None


@dataclass(frozen=True, slots=True)
class Interface:
    linktype: int
    units_per_s: int
    offset_s: int


_PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1_000_000, 0, "pcap"),
    b"\xa1\xb2\xc3\xd4": (">", 1_000_000, 0, "pcap"),
    b"\x4d\x3c\xb2\xa1": ("<", 1_000_000_000, 0, "pcap (nanosecond)"),
    b"\xa1\xb2\x3c\x4d": (">", 1_000_000_000, 0, "pcap (nanosecond)"),
    b"\x34\xcd\xb2\xa1": ("<", 1_000_000, 8, "pcap (modified)"),
    b"\xa1\xb2\xcd\x34": (">", 1_000_000, 8, "pcap (modified)"),
}
_PCAPNG_SHB = b"\x0a\x0d\x0d\x0a"
_BYTE_ORDER_MAGIC = 0x1A2B3C4D


def address_text(raw: bytes) -> str:
    """An IP address in the usual notation."""
    return socket.inet_ntop(socket.AF_INET6 if len(raw) == 16 else socket.AF_INET, raw)


class CaptureReader:
    """Streams the records (`records`) or decoded segments (`segments`) of one capture file.

    Opening raises CaptureError when the file cannot be read at all. Iteration raises
    DamagedCaptureError after the last good record when the file is truncated or damaged.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.packets_read = 0
        self.offset = 0
        self.skipped: Counter[str] = Counter()
        self.linktypes: Counter[int] = Counter()
        try:
            self._file: BinaryIO = open(self.path, "rb", buffering=1 << 20)  # noqa: SIM115
        except OSError as exc:
            raise CaptureError(
                f"cannot read {str(self.path)!r}: {exc.strerror}; check the path"
            ) from None
        try:
            head = self._file.read(4)
        except OSError as exc:
            self._file.close()
            raise CaptureError(f"cannot read {str(self.path)!r}: {exc.strerror}") from None
        if not head:
            self._file.close()
            raise CaptureError(f"{str(self.path)!r} is empty: give a pcap or pcapng capture file")
        if head == _PCAPNG_SHB:
            self.format = "pcapng"
        elif head in _PCAP_MAGICS:
            self.format = _PCAP_MAGICS[head][3]
        else:
            self._file.close()
            raise CaptureError(
                f"{str(self.path)!r} is not a pcap or pcapng capture (it starts with "
                f"{head.hex(' ')}): give a file written by tcpdump, dumpcap, Wireshark or flowtap"
            )
        self._head = head

    def __enter__(self) -> CaptureReader:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def _damaged(self, what: str) -> DamagedCaptureError:
        return DamagedCaptureError(
            f"{str(self.path)!r} {what} at byte {self.offset}, after {self.packets_read} packets",
            offset=self.offset,
            packets_read=self.packets_read,
        )

    def records(self) -> Iterator[Record]:
        """Every record in file order."""
        for raw in self._raw_records():
            yield Record(*raw)

    def _raw_records(self) -> Iterator[_RawRecord]:
        if self.format == "pcapng":
            return self._pcapng_records()
        return self._pcap_records()

    # -- pcap ---------------------------------------------------------------------------------

    def _pcap_records(self) -> Iterator[_RawRecord]:
        endian, units, extra, _ = _PCAP_MAGICS[self._head]
        read = self._file.read
        rest = read(20)
        if len(rest) < 20:
            raise CaptureError(f"{str(self.path)!r} is cut short inside its pcap file header")
        _major, _minor, _zone, _sigfigs, _snaplen, linkfield = struct.unpack(
            endian + "HHiIII", rest
        )
        linktype = linkfield & 0x0FFFFFFF
        if linktype not in SUPPORTED_LINKTYPES:
            raise CaptureError(_unsupported_message(self.path, linktype))
        self.offset = 24
        record = struct.Struct(endian + "IIII")
        header_size = 16 + extra
        unpack = record.unpack_from
        while True:
            header = read(header_size)
            if len(header) < header_size:
                if header:
                    raise self._damaged("is cut short in the middle of a packet header")
                return
            sec, frac, caplen, wirelen = unpack(header)
            if caplen > _MAX_RECORD_BYTES:
                raise self._damaged(f"is damaged (a packet claims {caplen} bytes)")
            data = read(caplen)
            if len(data) < caplen:
                raise self._damaged("is cut short in the middle of a packet")
            self.offset += header_size + caplen
            self.packets_read += 1
            yield (sec + frac / units, linktype, data, wirelen, None)

    # -- pcapng -------------------------------------------------------------------------------

    def _pcapng_records(self) -> Iterator[_RawRecord]:
        read = self._file.read
        first = True
        endian = "<"
        block_header = _BLOCK_HEADER["<"].unpack
        u32_at = _U32_AT["<"].unpack_from
        epb_fields = _EPB_FIELDS["<"].unpack_from
        interfaces: list[tuple[int, int, int]] = []  # (link type, units per second, offset s)
        head: bytes = self._head
        last_timestamp = 0.0
        while True:
            header = head + read(4) if first else read(8)
            if len(header) < 8:
                if header:
                    raise self._damaged("is cut short in the middle of a block header")
                return
            if header[:4] == _PCAPNG_SHB:
                endian = self._section_header(header, first)
                block_header = _BLOCK_HEADER[endian].unpack
                u32_at = _U32_AT[endian].unpack_from
                epb_fields = _EPB_FIELDS[endian].unpack_from
                interfaces = []
                first = False
                continue
            if first:
                raise CaptureError(f"{str(self.path)!r} is not a pcapng capture")
            block_type, length = block_header(header)
            if length < 12 or length % 4 or length > _MAX_RECORD_BYTES:
                raise self._damaged(f"is damaged (a block claims {length} bytes)")
            body = read(length - 8)
            if len(body) < length - 8:
                raise self._damaged("is cut short in the middle of a block")
            if u32_at(body, length - 12)[0] != length:
                raise self._damaged("is damaged (a block's two lengths differ)")
            if block_type == 6:  # enhanced packet block
                if length < 32:
                    raise self._damaged("is damaged (a packet block is too short)")
                if_id, high, low, caplen, wirelen = epb_fields(body)
                end = 20 + caplen
                if if_id >= len(interfaces) or end > length - 12:
                    raise self._damaged("is damaged (a packet block does not fit its interface)")
                linktype, units, offset_s = interfaces[if_id]
                timestamp = ((high << 32) | low) / units + offset_s
                options_at = end + (-caplen & 3)
                comment = (
                    _comment(body, options_at, length - 12, endian)
                    if options_at < length - 12
                    else None
                )
                self.offset += length
                self.packets_read += 1
                last_timestamp = timestamp
                yield (timestamp, linktype, body[20:end], wirelen, comment)
            elif block_type == 1:  # interface description block
                if len(body) < 12:
                    raise self._damaged("is damaged (an interface block is too short)")
                linktype, _reserved, _snaplen = struct.unpack_from(endian + "HHI", body)
                units, offset_s = _interface_options(body, 8, length - 12, endian)
                interfaces.append((linktype, units, offset_s))
                self.linktypes[linktype] += 0
                self.offset += length
            elif block_type == 3:  # simple packet block: no timestamp, interface 0
                if not interfaces or len(body) < 8:
                    raise self._damaged("is damaged (a simple packet block without interface)")
                (wirelen,) = u32_at(body, 0)
                caplen = min(wirelen, length - 16)
                self.offset += length
                self.packets_read += 1
                yield (last_timestamp, interfaces[0][0], body[4 : 4 + caplen], wirelen, None)
            elif block_type == 2:  # obsolete packet block
                if len(body) < 24:
                    raise self._damaged("is damaged (a packet block is too short)")
                if_id, _drops, high, low, caplen, wirelen = struct.unpack_from(
                    endian + "HHIIII", body
                )
                if if_id >= len(interfaces) or 20 + caplen > length - 12:
                    raise self._damaged("is damaged (a packet block does not fit its interface)")
                linktype, units, offset_s = interfaces[if_id]
                timestamp = ((high << 32) | low) / units + offset_s
                self.offset += length
                self.packets_read += 1
                last_timestamp = timestamp
                yield (timestamp, linktype, body[20 : 20 + caplen], wirelen, None)
            else:
                self.offset += length

    def _section_header(self, header: bytes, first: bool) -> str:
        """Read the rest of a section header block; return its byte order ("<" or ">")."""
        read = self._file.read
        magic_raw = read(4)
        if len(magic_raw) < 4:
            if first:
                raise CaptureError(
                    f"{str(self.path)!r} is cut short inside its pcapng section header"
                )
            raise self._damaged("is cut short in the middle of a section header")
        if magic_raw == b"\x4d\x3c\x2b\x1a":
            endian = "<"
        elif magic_raw == b"\x1a\x2b\x3c\x4d":
            endian = ">"
        elif first:
            raise CaptureError(
                f"{str(self.path)!r} is not a pcapng capture (bad byte-order magic): give a "
                "file written by tcpdump, dumpcap or Wireshark"
            )
        else:
            raise self._damaged("is damaged (a section header has a bad byte-order magic)")
        (length,) = struct.unpack(endian + "I", header[4:8])
        if length < 28 or length % 4 or length > _MAX_RECORD_BYTES:
            if first:
                raise CaptureError(
                    f"{str(self.path)!r} is not a readable pcapng capture (its section "
                    f"header claims {length} bytes)"
                )
            raise self._damaged(f"is damaged (a section header claims {length} bytes)")
        body = read(length - 12)
        if len(body) < length - 12:
            if first:
                raise CaptureError(
                    f"{str(self.path)!r} is cut short inside its pcapng section header"
                )
            raise self._damaged("is cut short in the middle of a section header")
        self.offset += length
        return endian

    # -- decoding -----------------------------------------------------------------------------

    def segments(self) -> Iterator[Segment]:
        """Every TCP segment and UDP datagram; other packets are counted in `skipped`."""
        skipped = self.skipped
        linktypes = self.linktypes
        for timestamp, linktype, data, _, comment in self._raw_records():
            linktypes[linktype] += 1
            segment = _decode(timestamp, linktype, data, comment, skipped)
            if segment is not None:
                yield segment


def _unsupported_message(path: Path, linktype: int) -> str:
    return (
        f"{str(path)!r} has link type {linktype} ({linktype_name(linktype)}), which flowtap "
        "cannot decode: capture with tcpdump or dumpcap on an Ethernet or loopback interface "
        "(or -i any for Linux cooked)"
    )


def unsupported_message(path: Path, linktype: int) -> str:
    """The one-line error for a capture whose packets all have an unsupported link type."""
    return _unsupported_message(path, linktype)


def _comment(body: bytes, at: int, end: int, endian: str) -> str | None:
    """The first opt_comment among the options in body[at:end]."""
    while at + 4 <= end:
        code, size = struct.unpack_from(endian + "HH", body, at)
        if code == 0:
            return None
        if code == 1:
            return body[at + 4 : at + 4 + size].decode("utf-8", "replace")
        at += 4 + size + (-size % 4)
    return None


def _interface_options(body: bytes, at: int, end: int, endian: str) -> tuple[int, int]:
    """(timestamp units per second, timestamp offset in seconds) from an IDB's options."""
    units = 1_000_000
    offset_s = 0
    while at + 4 <= end:
        code, size = struct.unpack_from(endian + "HH", body, at)
        if code == 0:
            break
        value = body[at + 4 : at + 4 + size]
        if code == 9 and size >= 1:
            resolution = value[0]
            exponent = resolution & 0x7F
            if exponent <= 30:
                units = 2**exponent if resolution & 0x80 else 10**exponent
        elif code == 14 and size == 8:
            (offset_s,) = struct.unpack(endian + "q", value)
        at += 4 + size + (-size % 4)
    return units, offset_s


_ETHER_IPV4 = 0x0800
_ETHER_IPV6 = 0x86DD
_ETHER_VLAN = (0x8100, 0x88A8, 0x9100)
_IPV6_EXTENSIONS = (0, 43, 60)
_U16 = struct.Struct("!H")
_TCP_HEADER = struct.Struct("!HHIIBB")
_UDP_HEADER = struct.Struct("!HHH")


def _network_offset(linktype: int, data: bytes) -> int:
    """Where the IP header starts in a frame of `linktype`, or -1 if it is not IP."""
    if linktype == LINKTYPE_ETHERNET:
        if len(data) < 14:
            return -1
        at = 12
        (ethertype,) = _U16.unpack_from(data, at)
        while ethertype in _ETHER_VLAN and len(data) >= at + 6:
            at += 4
            (ethertype,) = _U16.unpack_from(data, at)
        if ethertype not in (_ETHER_IPV4, _ETHER_IPV6):
            return -1
        return at + 2
    if linktype == LINKTYPE_LINUX_SLL:
        if len(data) < 16 or _U16.unpack_from(data, 14)[0] not in (_ETHER_IPV4, _ETHER_IPV6):
            return -1
        return 16
    if linktype == LINKTYPE_LINUX_SLL2:
        if len(data) < 20 or _U16.unpack_from(data, 0)[0] not in (_ETHER_IPV4, _ETHER_IPV6):
            return -1
        return 20
    if linktype in (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6, *_LINKTYPE_RAW_ALIASES):
        return 0
    if linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        return 4
    return -1


def decode(record: Record, skipped: Counter[str]) -> Segment | None:
    """The TCP or UDP segment in `record`, or None (counting why in `skipped`)."""
    return _decode(record.timestamp, record.linktype, record.data, record.comment, skipped)


_IPV4_FIELDS = struct.Struct("!BxHxxHxB2x4s4s")  # version/IHL, length, flags/offset, proto, addrs
_IPV6_FIELDS = struct.Struct("!4xHBx16s16s")  # payload length, next header, addresses


def _decode(
    timestamp: float, linktype: int, data: bytes, comment: str | None, skipped: Counter[str]
) -> Segment | None:
    size = len(data)
    if linktype == LINKTYPE_ETHERNET and size >= 14 and data[12:14] == b"\x08\x00":
        at = 14  # the common case, without a detour
    else:
        at = _network_offset(linktype, data)
        if at < 0:
            why = "unsupported link type" if linktype not in SUPPORTED_LINKTYPES else "not IP"
            skipped[why] += 1
            return None
    if size < at + 20:
        skipped["not IP"] += 1
        return None
    version = data[at] >> 4
    if version == 4:
        version_ihl, total, fragment, proto, src, dst = _IPV4_FIELDS.unpack_from(data, at)
        ihl = (version_ihl & 0x0F) * 4
        if ihl < 20 or size < at + ihl:
            skipped["malformed IP"] += 1
            return None
        if fragment & 0x3FFF:
            skipped["IP fragment"] += 1
            return None
        # A zero total length is what TCP segmentation offload leaves behind.
        end = at + total if total >= ihl else size if total == 0 else -1
        if end < 0:
            skipped["malformed IP"] += 1
            return None
        at += ihl
    elif version == 6:
        if size < at + 40:
            skipped["malformed IP"] += 1
            return None
        payload_length, proto, src, dst = _IPV6_FIELDS.unpack_from(data, at)
        end = at + 40 + payload_length if payload_length else size
        at += 40
        while proto in _IPV6_EXTENSIONS or proto == 44:
            if size < at + 8:
                skipped["malformed IP"] += 1
                return None
            if proto == 44:
                if _U16.unpack_from(data, at + 2)[0] & 0xFFF9:
                    skipped["IP fragment"] += 1
                    return None
                proto = data[at]
                at += 8
            else:
                proto, at = data[at], at + (data[at + 1] + 1) * 8
    else:
        skipped["not IP"] += 1
        return None
    if proto == _PROTO_TCP:
        if size < at + 20:
            skipped["truncated TCP header"] += 1
            return None
        src_port, dst_port, seq, ack, offset, flags = _TCP_HEADER.unpack_from(data, at)
        start = at + (offset >> 4) * 4
        if start < at + 20 or (start > end and not flags & _TCP_RST):
            skipped["malformed TCP"] += 1
            return None
        length = end - start if end > start else 0
        payload = memoryview(data)[start : min(end, size)] if length else _EMPTY
        return Segment(
            timestamp, False, src, src_port, dst, dst_port, seq, ack, flags, payload, length,
            comment,
        )  # fmt: skip
    if proto == _PROTO_UDP:
        if size < at + 8:
            skipped["truncated UDP header"] += 1
            return None
        src_port, dst_port, udp_length = _UDP_HEADER.unpack_from(data, at)
        start = at + 8
        stop = at + udp_length if udp_length >= 8 else end
        length = max(0, stop - start)
        return Segment(
            timestamp, True, src, src_port, dst, dst_port, 0, 0, 0,
            memoryview(data)[start : min(stop, size)], length, comment,
        )  # fmt: skip
    skipped["not TCP or UDP"] += 1
    return None


_EMPTY = memoryview(b"")


def parse_flow_comment(comment: str | None) -> dict[str, object] | None:
    """The JSON object of a flowtap packet comment (`flowtap {...}`), or None."""
    if not comment or not comment.startswith("flowtap {"):
        return None
    try:
        value = json.loads(comment[len("flowtap ") :])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
