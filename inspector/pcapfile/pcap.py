"""The classic pcap format, written through a staging file (see `staging.StagedFile`)."""

from __future__ import annotations

import struct
from pathlib import Path

from .frames import (
    ETHERTYPE_IPV6,
    LINKTYPE_ETHERNET,
    SNAPLEN,
    TCP_V4_FIELDS,
    TCP_V6_FIELDS,
    U32,
    Payload,
    SegmentFields,
)
from .staging import StagedFile

# A record's header: seconds, microseconds, captured length, original length.
_RECORD_FORMAT = "!IIII"
_PCAP_HEADER = struct.Struct("!IHHiIII")
_PCAP_RECORD = struct.Struct(_RECORD_FORMAT)


class PcapFile(StagedFile):
    """A classic pcap file (big-endian, microsecond timestamps, Ethernet)."""

    _SEGMENT = (
        struct.Struct(_RECORD_FORMAT + TCP_V4_FIELDS),
        struct.Struct(_RECORD_FORMAT + TCP_V6_FIELDS),
    )

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._start(_PCAP_HEADER.pack(0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET))

    @staticmethod
    def _record_size(head: bytes) -> int:
        return 16 + int(U32.unpack_from(head, 8)[0])

    @staticmethod
    def record_layout(header_size: int, payload_size: int) -> tuple[int, int]:
        """Bytes a record puts before its payload and after it."""
        return 16 + header_size, 0

    def frame_record(
        self, region: memoryview, at: int, timestamp_ns: int, header: bytes, payload_size: int
    ) -> int:
        """Write the record around a payload already at `at + record_layout(...)[0]` in
        `region`; return where the record ends."""
        size = len(header) + payload_size
        sec, ns = divmod(timestamp_ns, 1_000_000_000)
        _PCAP_RECORD.pack_into(region, at, sec, ns // 1000, size, size)
        region[at + 16 : at + 16 + len(header)] = header
        return at + 16 + size

    def frame_segment(
        self, region: memoryview, at: int, timestamp_ns: int, fields: SegmentFields, size: int
    ) -> int:
        is_v6 = fields[2] == ETHERTYPE_IPV6
        size += 74 if is_v6 else 54
        sec, ns = divmod(timestamp_ns, 1_000_000_000)
        self._SEGMENT[is_v6].pack_into(region, at, sec, ns // 1000, size, size, *fields)
        return at + 16 + size

    def write_packet(
        self, timestamp_ns: int, header: bytes, payload: Payload, comment: str | None = None
    ) -> None:
        size = len(header) + len(payload)
        sec, ns = divmod(timestamp_ns, 1_000_000_000)
        self.add_packet(_PCAP_RECORD.pack(sec, ns // 1000, size, size) + header, payload, b"")
