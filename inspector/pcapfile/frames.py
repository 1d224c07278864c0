"""The Ethernet, IP, TCP and UDP headers of the packets a capture holds: their layouts and
the per-endpoint state that numbers them (`Side`); no file format and no flow logic here.

Each layout is a `struct` in network byte order, so that a file format can pack a record's
own header and a packet's headers with one struct in one call, on the relay thread (see
`pcap.PcapFile.frame_segment`); pcap and pcapng files are written in that order too (both
formats allow either, and readers follow the file's).
"""

from __future__ import annotations

import struct

LINKTYPE_ETHERNET = 1
SNAPLEN = 262144

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_WINDOW = 0xFFFF
TCP_WINDOW_SHIFT = 14  # the largest scale TCP allows: the window never fills in the capture
IP_TTL = 64
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
PROTO_TCP = 6
PROTO_UDP = 17

ETH_HEADER = struct.Struct("!6s6sH")
IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
IPV6_HEADER = struct.Struct("!IHBB16s16s")
UDP_HEADER = struct.Struct("!HHHH")
U32 = struct.Struct("!I")
TCP_V4_FIELDS = "6s6sHBBHHHBBH4s4sHHIIBBHHH"  # Ethernet, IPv4, TCP
TCP_V6_FIELDS = "6s6sHIHBB16s16sHHIIBBHHH"  # Ethernet, IPv6, TCP
ETH_IPV4_TCP = struct.Struct("!" + TCP_V4_FIELDS)
ETH_IPV6_TCP = struct.Struct("!" + TCP_V6_FIELDS)
SegmentFields = tuple[bytes | int, ...]
"""The fields of a TCP segment's Ethernet, IP and TCP headers, in `TCP_V4_FIELDS` or
`TCP_V6_FIELDS` order (the Ethernet type, third, says which)."""
Payload = bytes | memoryview
"""A packet's payload: bytes of its own, or a view of the buffer it was received into."""


def fold(total: int) -> int:
    """The ones'-complement checksum of a sum of 16-bit words (never 0: 0 means none in UDP)."""
    return 0xFFFF - total % 0xFFFF


def words(data: bytes | memoryview) -> int:
    """The sum of `data` as 16-bit big-endian words, modulo 0xFFFF (odd tails padded with 0)."""
    value = int.from_bytes(data, "big")
    if len(data) % 2:
        value <<= 8
    return value % 0xFFFF


class Side:
    """One end of a conversation: its addresses and what it has sent so far."""

    __slots__ = ("checksum_base", "ident", "ip", "mac", "peer_ip", "peer_mac", "port", "seq")

    def __init__(self, mac: bytes, peer_mac: bytes, ip: bytes, peer_ip: bytes, port: int) -> None:
        self.mac = mac
        self.peer_mac = peer_mac
        self.ip = ip
        self.peer_ip = peer_ip
        self.port = port
        self.seq = 0
        self.ident = 0
        # The IPv4 header words that never change, for an incremental header checksum.
        self.checksum_base = 0x4500 + 0x4000 + (IP_TTL << 8) + words(ip) + words(peer_ip)
