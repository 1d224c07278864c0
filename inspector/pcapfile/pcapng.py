"""The pcapng format, written through a staging file (see `staging.StagedFile`), and its
fast path for the commonest chunk: one IPv4 segment and the receiver's ACK in two packs."""

from __future__ import annotations

import struct
from pathlib import Path

from .frames import (
    ETHERTYPE_IPV4,
    ETHERTYPE_IPV6,
    IP_TTL,
    LINKTYPE_ETHERNET,
    PROTO_TCP,
    SNAPLEN,
    TCP_ACK,
    TCP_PSH,
    TCP_V4_FIELDS,
    TCP_V6_FIELDS,
    TCP_WINDOW,
    U32,
    Payload,
    SegmentFields,
    Side,
)
from .staging import StagedFile

_PCAPNG_EPB = struct.Struct("!IIIIIII")
_OPT = struct.Struct("!HH")
_DSB_TYPE = 0x0000000A  # Decryption Secrets Block
_SECRETS_TLS_KEY_LOG = 0x544C534B  # 'TLSK': NSS key log lines
_PCAPNG_TRAILERS = tuple(struct.Struct(f"!{pad}xI") for pad in range(4))  # padding, length
# A chunk of one IPv4 segment in pcapng, the common case of an interactive flow: its record up
# to the payload, then (by the payload's padding) the record's end and the receiver's whole
# ACK record (54 bytes of headers, 2 of padding: 88 in all), so two packs frame the chunk.
_PCAPNG_V4_SEGMENT = struct.Struct("!IIIIIII" + TCP_V4_FIELDS)
V4_ACK_RECORD_SIZE = 88
_PCAPNG_V4_END_AND_ACK = tuple(
    struct.Struct(f"!{pad}xIIIIIIII{TCP_V4_FIELDS}2xI") for pad in range(4)
)


def _pad4(size: int) -> bytes:
    return b"\0" * (-size % 4)


_PADDING = tuple(_pad4(size) for size in range(4))  # by size % 4


class PcapNgFile(StagedFile):
    """A pcapng file: one big-endian section, one Ethernet interface with nanosecond timestamps."""

    _SEGMENT = (
        struct.Struct("!IIIIIII" + TCP_V4_FIELDS),
        struct.Struct("!IIIIIII" + TCP_V6_FIELDS),
    )

    def __init__(self, path: Path, *, application: str = "flowtap") -> None:
        super().__init__(path)
        app = application.encode()
        shb_options = _OPT.pack(4, len(app)) + app + _pad4(len(app)) + _OPT.pack(0, 0)
        shb_length = 28 + len(shb_options)
        shb = (
            U32.pack(0x0A0D0D0A)
            + U32.pack(shb_length)
            + struct.pack("!IHHq", 0x1A2B3C4D, 1, 0, -1)
            + shb_options
            + U32.pack(shb_length)
        )
        name = b"flowtap"
        idb_options = (
            _OPT.pack(2, len(name))
            + name
            + _pad4(len(name))
            + _OPT.pack(9, 1)
            + bytes((9, 0, 0, 0))  # if_tsresol: 10^-9 s
            + _OPT.pack(0, 0)
        )
        idb_length = 20 + len(idb_options)
        idb = (
            struct.pack("!IIHHI", 1, idb_length, LINKTYPE_ETHERNET, 0, SNAPLEN)
            + idb_options
            + U32.pack(idb_length)
        )
        self._start(shb + idb)

    @staticmethod
    def _record_size(head: bytes) -> int:
        return int(U32.unpack_from(head, 4)[0])  # every block's total length

    @staticmethod
    def record_layout(header_size: int, payload_size: int) -> tuple[int, int]:
        """Bytes a record (without comment) puts before its payload and after it."""
        return 28 + header_size, (-(header_size + payload_size) & 3) + 4

    def frame_record(
        self, region: memoryview, at: int, timestamp_ns: int, header: bytes, payload_size: int
    ) -> int:
        """Write the record around a payload already at `at + record_layout(...)[0]` in
        `region`; return where the record ends."""
        size = len(header) + payload_size
        pad = -size & 3
        total = 32 + size + pad
        _PCAPNG_EPB.pack_into(
            region, at, 6, total, 0, timestamp_ns >> 32, timestamp_ns & 0xFFFFFFFF, size, size
        )
        region[at + 28 : at + 28 + len(header)] = header
        end = at + 28 + size
        region[end : end + pad] = _PADDING[size & 3]
        U32.pack_into(region, end + pad, total)
        return end + pad + 4

    def frame_segment(
        self, region: memoryview, at: int, timestamp_ns: int, fields: SegmentFields, size: int
    ) -> int:
        is_v6 = fields[2] == ETHERTYPE_IPV6
        size += 74 if is_v6 else 54
        pad = -size & 3
        total = 32 + size + pad
        self._SEGMENT[is_v6].pack_into(
            region, at, 6, total, 0, timestamp_ns >> 32, timestamp_ns & 0xFFFFFFFF, size, size,
            *fields,
        )  # fmt: skip
        _PCAPNG_TRAILERS[pad].pack_into(region, at + 28 + size, total)
        return at + total

    def write_secrets(self, key_log: bytes) -> None:
        """Add a Decryption Secrets Block of TLS secrets (NSS key log lines): packets after
        it that they decrypt are decrypted by Wireshark with no settings."""
        pad = _PADDING[len(key_log) & 3]
        total = 20 + len(key_log) + len(pad)
        head = struct.pack("!IIII", _DSB_TYPE, total, _SECRETS_TLS_KEY_LOG, len(key_log))
        self.add_packet(head, key_log, pad + U32.pack(total))

    def write_packet(
        self, timestamp_ns: int, header: bytes, payload: Payload, comment: str | None = None
    ) -> None:
        size = len(header) + len(payload)
        tail = _PADDING[size & 3]
        if comment:
            text = comment.encode()
            tail += _OPT.pack(1, len(text)) + text + _pad4(len(text)) + _OPT.pack(0, 0)
        total = 32 + size + len(tail)
        epb = _PCAPNG_EPB.pack(
            6, total, 0, timestamp_ns >> 32, timestamp_ns & 0xFFFFFFFF, size, size
        )
        self.add_packet(epb + header, payload, tail + U32.pack(total))


def frame_v4_chunk(region: memoryview, timestamp_ns: int, src: Side, dst: Side, size: int) -> int:
    """Frame, around a payload of `size` bytes (at most one segment) at offset 82 of `region`,
    its pcapng record and the receiver's ACK record; return where they end.

    The same bytes as `PcapNgFile.frame_segment` of `segment_fields` twice, packed by two
    structs in one call: an interactive flow pays this per chunk (a third of the time).
    """
    high = timestamp_ns >> 32
    low = timestamp_ns & 0xFFFFFFFF
    length = 54 + size
    pad = -length & 3
    total = 32 + length + pad
    ip_total = 20 + 20 + size
    ident = src.ident
    src.ident = (ident + 1) & 0xFFFF
    seq = src.seq
    ack = dst.seq
    _PCAPNG_V4_SEGMENT.pack_into(
        region, 0, 6, total, 0, high, low, length, length,
        src.peer_mac, src.mac, ETHERTYPE_IPV4,
        0x45, 0, ip_total, ident, 0x4000, IP_TTL, PROTO_TCP,
        0xFFFF - (src.checksum_base + PROTO_TCP + ip_total + ident) % 0xFFFF, src.ip, dst.ip,
        src.port, dst.port, seq, ack, 0x50, TCP_PSH | TCP_ACK, TCP_WINDOW, 0, 0,
    )  # fmt: skip
    seq = src.seq = (seq + size) & 0xFFFFFFFF
    ident = dst.ident
    dst.ident = (ident + 1) & 0xFFFF
    _PCAPNG_V4_END_AND_ACK[pad].pack_into(
        region, 28 + length, total, 6, V4_ACK_RECORD_SIZE, 0, high, low, 54, 54,
        dst.peer_mac, dst.mac, ETHERTYPE_IPV4,
        0x45, 0, 40, ident, 0x4000, IP_TTL, PROTO_TCP,
        0xFFFF - (dst.checksum_base + PROTO_TCP + 40 + ident) % 0xFFFF, dst.ip, src.ip,
        dst.port, src.port, ack, seq, 0x50, TCP_ACK, TCP_WINDOW, 0, 0, V4_ACK_RECORD_SIZE,
    )  # fmt: skip
    return total + V4_ACK_RECORD_SIZE
