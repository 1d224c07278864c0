"""Flows written as packets: pcap and pcapng files that Wireshark reads as ordinary conversations.

`CaptureWriter` turns flow events into Ethernet frames: a TCP flow becomes a three-way
handshake at open, data segments whose seq/ack numbers match the bytes relayed (each segment
at most one IP packet, a pure ACK from the receiver after each chunk) and, at close, FINs or
a RST as the flow really ended; a UDP flow becomes one datagram per relayed datagram.

Conventions a reader of the capture should know:

- The Ethernet addresses are placeholders: the client is 02:00:00:00:00:01, the server
  02:00:00:00:00:02.
- A unix-socket endpoint has no IP address, so it appears as a placeholder: a unix client is
  127.1.0.1 (fd00:f10e::1 when the other side is IPv6) with port 1024 + (flow id mod 64512),
  a unix server is 127.1.0.2 (fd00:f10e::2) port 1. pcapng files name the real endpoints in
  a packet comment (see `FLOW_COMMENT_PREFIX`); `flowtap show` prints them.
- A flow whose client and server differ in IP family is written in IPv6, the IPv4 side as
  an IPv4-mapped address (::ffff:a.b.c.d).
- With `--tls-capture wire` an intercepted TLS flow is two conversations of ciphertext:
  the client leg between the client and the listener's address and port, the upstream leg
  between the client's address and port and the upstream (where the plaintext would be), each
  preceded by a Decryption Secrets Block of its secrets so that Wireshark decrypts both.
  In a ring of files, a leg still open when a new file starts is written again in it from
  its start (secrets, handshake, the ciphertext so far) before its next packet there, so that
  each file decrypts on its own: Wireshark needs a TLS session's handshake and every record
  before the ones it decrypts. A leg past `REPLAY_BUDGET_BYTES` of ciphertext (a bulk
  transfer) is not repeated; it decrypts in the file where it began, or in the ring merged.
- TCP checksums are left 0 unless `checksums=True` (Wireshark does not verify them by
  default, and computing them costs the relay about a millisecond a megabyte); IP and UDP
  checksums are always correct.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from flowtap.proxy.errors import FlowtapError
from flowtap.proxy.events import Chunk
from flowtap.proxy.flow import (
    Address,
    CloseReason,
    Direction,
    Flow,
    FlowClosed,
    FlowData,
    FlowEvent,
    FlowOpened,
    FlowWire,
    Transport,
)

from .frames import (
    ETH_HEADER,
    ETH_IPV4_TCP,
    ETH_IPV6_TCP,
    ETHERTYPE_IPV4,
    ETHERTYPE_IPV6,
    IP_TTL,
    IPV4_HEADER,
    IPV6_HEADER,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    TCP_WINDOW,
    TCP_WINDOW_SHIFT,
    UDP_HEADER,
    Payload,
    SegmentFields,
    Side,
    fold,
    words,
)
from .pcap import PcapFile
from .pcapng import V4_ACK_RECORD_SIZE, PcapNgFile, frame_v4_chunk

log = logging.getLogger(__name__)

FLOW_COMMENT_PREFIX = "flowtap "
"""pcapng comments that start with this carry a JSON object describing the flow."""

CLIENT_MAC = bytes.fromhex("020000000001")
SERVER_MAC = bytes.fromhex("020000000002")
UNIX_CLIENT_V4 = "127.1.0.1"
UNIX_SERVER_V4 = "127.1.0.2"
UNIX_CLIENT_V6 = "fd00:f10e::1"
UNIX_SERVER_V6 = "fd00:f10e::2"
UNIX_SERVER_PORT = 1


REPLAY_BUDGET_BYTES = 64 * 1024
"""The most ciphertext of one TLS leg a ring keeps to write again in each new file."""


class PacketFile(Protocol):
    """A capture file taking Ethernet frames, each given as a header and a payload."""

    @property
    def size_bytes(self) -> int: ...

    def write_packet(
        self, timestamp_ns: int, header: bytes, payload: Payload, comment: str | None = None
    ) -> None: ...

    def flush(self, *, wait: bool = True) -> None: ...

    def close(self, *, wait: bool = True) -> None: ...


@runtime_checkable
class InPlaceFile(PacketFile, Protocol):
    """A `PacketFile` whose records can be built in place around a payload received there."""

    def record_layout(self, header_size: int, payload_size: int) -> tuple[int, int]: ...

    @property
    def room_bytes(self) -> int:
        """Bytes the file takes before it is full (a ring of files then starts the next)."""
        ...

    def reserve(self, size: int) -> memoryview: ...

    def frame_record(
        self, region: memoryview, at: int, timestamp_ns: int, header: bytes, payload_size: int
    ) -> int: ...

    def frame_segment(
        self, region: memoryview, at: int, timestamp_ns: int, fields: SegmentFields, size: int
    ) -> int:
        """`frame_record` of a TCP segment of `size` payload bytes whose headers are
        `_Conversation.segment_fields`, packed with the record's own header in one call."""
        ...

    def commit(self, size: int) -> None: ...


@runtime_checkable
class SecretsFile(Protocol):
    """A packet file that can hold TLS secrets (pcapng's Decryption Secrets Block)."""

    def write_secrets(self, key_log: bytes) -> None: ...


@runtime_checkable
class FileRing(Protocol):
    """A ring of capture files (see `capture.RotatingCapture`)."""

    def kept_together(self) -> AbstractContextManager[None]:
        """Start the next file now if the current one is full, then add every record to the
        current file until the context ends."""
        ...


def open_packet_file(path: Path) -> PcapFile | PcapNgFile:
    """A new capture file whose format follows the extension: `.pcap` or `.pcapng`."""
    suffix = path.suffix.lower()
    if suffix == ".pcap":
        return PcapFile(path)
    if suffix == ".pcapng":
        return PcapNgFile(path)
    raise FlowtapError(
        f"cannot tell the capture format of {str(path)!r}: name the file .pcap or .pcapng"
    )


class _SentChunk:
    """The chunk `CaptureWriter.receive` lent the relay (its `Loan`): releasing it adds the
    chunk's records to the file. One at a time, so one object serves every chunk."""

    __slots__ = ("conversation", "direction", "received", "region", "timestamp_ns", "writer")

    def __init__(self, writer: CaptureWriter) -> None:
        self.writer = writer
        self.conversation: _Conversation | None = None
        self.direction = Direction.UP
        self.region: memoryview | None = None
        self.received = 0
        self.timestamp_ns = 0

    def release(self) -> None:
        self.writer.finish_chunk()


@dataclass(slots=True)
class _LegHistory:
    """What a TLS leg put in a ring of files so far, to write again at the start of the next."""

    generation: int
    """The file the leg's packets are in now."""
    secrets: list[bytes] = field(default_factory=list)
    chunks: list[FlowWire] = field(default_factory=list)
    size_bytes: int = 0


def _plain_chunk(data: bytes, asked: int) -> Chunk:
    """A chunk received the ordinary way, in memory of its own."""
    return Chunk(len(data), [memoryview(data)], None, asked)


def _copy_v4_chunk(
    out: InPlaceFile, timestamp_ns: int, src: Side, dst: Side, data: bytes | memoryview
) -> None:
    """Add a one-segment IPv4 chunk to a pcapng file: copied into the file's buffer and
    framed there by `frame_v4_chunk`, as a chunk received in place is."""
    size = len(data)
    region = out.reserve(82 + size + 3 + 4 + V4_ACK_RECORD_SIZE)
    region[82 : 82 + size] = data
    out.commit(frame_v4_chunk(region, timestamp_ns, src, dst, size))


def _timestamp_ns(timestamp: float) -> int:
    seconds = int(timestamp)
    return seconds * 1_000_000_000 + round((timestamp - seconds) * 1e9)


def _ip_bytes(host: str, family: int) -> bytes | None:
    host = host.split("%", 1)[0]
    try:
        return socket.inet_pton(family, host)
    except OSError:
        return None


def _endpoints(flow: Flow, server: Address) -> tuple[bool, bytes, int, bytes, int]:
    """(is IPv6, client IP, client port, server IP, server port) as written in the capture."""
    client = flow.client
    is_v6 = (not client.is_unix and client.is_ipv6) or (not server.is_unix and server.is_ipv6)
    family = socket.AF_INET6 if is_v6 else socket.AF_INET

    def ip_of(address: Address, placeholder_v4: str, placeholder_v6: str) -> bytes:
        if not address.is_unix:
            if is_v6 and not address.is_ipv6:
                raw = _ip_bytes(address.host, socket.AF_INET)
                if raw is not None:
                    return b"\0" * 10 + b"\xff\xff" + raw
            else:
                raw = _ip_bytes(address.host, family)
                if raw is not None:
                    return raw
        return socket.inet_pton(family, placeholder_v6 if is_v6 else placeholder_v4)

    client_port = 1024 + flow.id % 64512 if client.is_unix else client.port
    server_port = UNIX_SERVER_PORT if server.is_unix else server.port
    return (
        is_v6,
        ip_of(client, UNIX_CLIENT_V4, UNIX_CLIENT_V6),
        client_port,
        ip_of(server, UNIX_SERVER_V4, UNIX_SERVER_V6),
        server_port,
    )


def flow_comment(flow: Flow, *, closing: bool = False) -> str:
    """The pcapng comment naming a flow's real endpoints, or how it ended when `closing`."""
    record: dict[str, object] = {"flow": flow.id}
    if closing:
        record["reason"] = None if flow.reason is None else str(flow.reason)
        if flow.error:
            record["error"] = flow.error
        if flow.tls is not None:
            # What TLS the flow had: the capture holds the plaintext, this says how it came.
            record["tls"] = flow.tls.as_dict()
    else:
        record.update(client=str(flow.client), server=str(flow.server))
        record["listener"] = str(flow.listener)
        if flow.requested is not None:
            record["requested"] = str(flow.requested)
            if flow.requested.user:
                record["user"] = flow.requested.user
    return FLOW_COMMENT_PREFIX + json.dumps(record, separators=(",", ":"))


class _Conversation:
    """The packets of one flow: the state needed to number them, and their construction."""

    __slots__ = (
        "client",
        "comment_generation",
        "down_sides",
        "flow",
        "header_size",
        "is_udp",
        "is_v6",
        "last_ns",
        "layout",
        "max_payload",
        "proto",
        "server",
        "up_sides",
    )

    def __init__(self, flow: Flow, *, client_leg: bool = False) -> None:
        self.flow = flow
        self.is_udp = flow.transport is Transport.UDP
        self.proto = PROTO_UDP if self.is_udp else PROTO_TCP
        # A wire capture's client leg reaches the listener; every other conversation the server.
        server = flow.listener if client_leg else flow.server
        is_v6, client_ip, client_port, server_ip, server_port = _endpoints(flow, server)
        self.is_v6 = is_v6
        self.client = Side(CLIENT_MAC, SERVER_MAC, client_ip, server_ip, client_port)
        self.server = Side(SERVER_MAC, CLIENT_MAC, server_ip, client_ip, server_port)
        # (sender, receiver) of bytes going up and down.
        self.up_sides = (self.client, self.server)
        self.down_sides = (self.server, self.client)
        # Initial sequence numbers: arbitrary but reproducible for a given flow.
        salt = 0x5BD1E995 if client_leg else 0
        self.client.seq = (flow.id * 0x9E3779B1 ^ salt) & 0xFFFFFFFF
        self.server.seq = (flow.id * 0x85EBCA77 + 0x1234567 ^ salt) & 0xFFFFFFFF
        self.client.ident = flow.id & 0xFFFF
        self.server.ident = (flow.id * 7) & 0xFFFF
        ip_header = 40 if is_v6 else 20
        transport_header = 8 if self.is_udp else 20
        self.max_payload = 65535 - transport_header - (0 if is_v6 else ip_header)
        self.header_size = 14 + ip_header + transport_header  # Ethernet, IP, TCP or UDP
        self.last_ns = 0
        self.comment_generation = -1
        # For records received in place: see CaptureWriter._layout.
        self.layout: tuple[int, int, int] | None = None

    def tcp_header(
        self,
        src: Side,
        dst: Side,
        flags: int,
        payload: Payload,
        *,
        options: bytes = b"",
        checksums: bool,
    ) -> bytes:
        """Ethernet, IP and TCP headers for one segment from `src` carrying `payload`."""
        fields = self.segment_fields(src, dst, flags, len(payload), options=len(options))
        if self.is_v6:
            header = ETH_IPV6_TCP.pack(*fields)
            ip_end = 54
        else:
            header = ETH_IPV4_TCP.pack(*fields)
            ip_end = 34
        tcp_length = 20 + len(options) + len(payload)
        if options:
            header += options
        if checksums:
            pseudo = words(src.ip) + words(dst.ip) + PROTO_TCP + tcp_length
            tcp_sum = fold(pseudo + words(header[ip_end:]) + words(payload))
            header = header[: ip_end + 16] + tcp_sum.to_bytes(2, "big") + header[ip_end + 18 :]
        return header

    def segment_fields(
        self, src: Side, dst: Side, flags: int, payload_size: int, *, options: int = 0
    ) -> SegmentFields:
        """The fields of the Ethernet, IP and TCP headers (`ETH_IPV4_TCP` or `ETH_IPV6_TCP`)
        of one segment from `src`, with `options` bytes of TCP options."""
        tcp_length = 20 + options + payload_size
        offset = (5 + options // 4) << 4
        if self.is_v6:
            return (
                src.peer_mac, src.mac, ETHERTYPE_IPV6,
                0x60000000, tcp_length, PROTO_TCP, IP_TTL, src.ip, dst.ip,
                src.port, dst.port, src.seq, dst.seq if flags & TCP_ACK else 0,
                offset, flags, TCP_WINDOW, 0, 0,
            )  # fmt: skip
        total = 20 + tcp_length
        ident = src.ident
        src.ident = (ident + 1) & 0xFFFF
        ip_sum = fold(src.checksum_base + PROTO_TCP + total + ident)
        return (
            src.peer_mac, src.mac, ETHERTYPE_IPV4,
            0x45, 0, total, ident, 0x4000, IP_TTL, PROTO_TCP, ip_sum, src.ip, dst.ip,
            src.port, dst.port, src.seq, dst.seq if flags & TCP_ACK else 0,
            offset, flags, TCP_WINDOW, 0, 0,
        )  # fmt: skip

    def udp_header(self, src: Side, dst: Side, payload: Payload) -> bytes:
        """Ethernet, IP and UDP headers (with a correct UDP checksum) for one datagram."""
        udp_length = 8 + len(payload)
        pseudo = words(src.ip) + words(dst.ip) + PROTO_UDP + udp_length
        udp_sum = fold(
            pseudo + words(UDP_HEADER.pack(src.port, dst.port, udp_length, 0)) + words(payload)
        )
        udp = UDP_HEADER.pack(src.port, dst.port, udp_length, udp_sum)
        if self.is_v6:
            ip = IPV6_HEADER.pack(0x60000000, udp_length, PROTO_UDP, IP_TTL, src.ip, dst.ip)
            ethertype = ETHERTYPE_IPV6
        else:
            total = 20 + udp_length
            ident = src.ident
            src.ident = (ident + 1) & 0xFFFF
            ip_sum = fold(src.checksum_base + PROTO_UDP + total + ident)
            ip = IPV4_HEADER.pack(
                0x45, 0, total, ident, 0x4000, IP_TTL, PROTO_UDP, ip_sum, src.ip, dst.ip
            )
            ethertype = ETHERTYPE_IPV4
        return ETH_HEADER.pack(src.peer_mac, src.mac, ethertype) + ip + udp


# How each close reason ends the conversation: who sends FIN (or RST) first.
_CLOSE_BY_FIN = {
    CloseReason.CLIENT_CLOSED: (True,),
    CloseReason.SERVER_CLOSED: (False,),
    # flowtap closed both sockets itself: each peer saw flowtap's FIN.
    CloseReason.IDLE_TIMEOUT: (False,),
    CloseReason.SHUTDOWN: (False,),
}
_CLOSE_BY_RST = {
    CloseReason.CLIENT_RESET: (True,),
    CloseReason.SERVER_RESET: (False,),
    CloseReason.UPSTREAM_REFUSED: (False,),
    CloseReason.UPSTREAM_TIMEOUT: (False,),
    CloseReason.ERROR: (False,),
    CloseReason.KILLED: (False, True),
}


class CaptureWriter:
    """Writes flow events as packets to a `PacketFile`; one writer thread calls `write`.

    `file_generation` (when given) says which file of a rotation the next record goes to, so
    that the first packet of a flow in each new pcapng file names the flow's endpoints again.
    `after_chunk` is called once the records of a chunk from `receive` are in the file (or
    the file failed): until then the writer takes nothing else.
    """

    def __init__(
        self,
        out: PacketFile,
        *,
        checksums: bool = False,
        file_generation: Callable[[], int] | None = None,
        after_chunk: Callable[[], None] = lambda: None,
    ) -> None:
        self._out = out
        self._in_place = out if isinstance(out, InPlaceFile) else None
        self._checksums = checksums
        self._conversations: dict[int, _Conversation] = {}
        # Intercepted TLS flows captured as ciphertext: their plaintext is not written, and
        # their client leg is a conversation of its own (the upstream leg is the flow's).
        self._wire_flows: set[int] = set()
        self._client_legs: dict[int, _Conversation] = {}
        # In a ring: what each TLS leg (flow id, upstream leg) wrote, while within the budget.
        self._ring = out if isinstance(out, FileRing) else None
        self._histories: dict[tuple[int, bool], _LegHistory | None] = {}
        # Without rotation every record goes to the one file: nothing to ask per chunk.
        self._rotates = file_generation is not None
        self._generation = file_generation or (lambda: 0)
        self.failure: Exception | None = None
        """Why the file stopped taking records in `receive`, if it did; it then takes none."""
        self._after_chunk = after_chunk
        self._sent = _SentChunk(self)
        # Whether a one-segment IPv4 chunk is framed by `frame_v4_chunk`.
        self._frames_v4_in_one = isinstance(out, PcapNgFile) and not checksums

    def write(self, event: FlowEvent | FlowWire) -> None:
        if type(event) is FlowData:
            conversation = self._conversations.get(event.flow_id)
            if conversation is None:
                log.debug("data for unknown flow %d not captured", event.flow_id)
                return
            if self._wire_flows and event.flow_id in self._wire_flows:
                return  # plaintext of a flow captured as ciphertext
            self._data(conversation, event)
        elif isinstance(event, FlowOpened):
            conversation = _Conversation(event.flow)
            self._conversations[event.flow.id] = conversation
            if not conversation.is_udp:
                self._handshake(conversation, _timestamp_ns(event.flow.started_at))
        elif isinstance(event, FlowClosed):
            found = self._conversations.pop(event.flow.id, None)
            if found is not None:
                self._close(found, event.flow)
            if self._wire_flows:
                self._wire_flows.discard(event.flow.id)
                self._histories.pop((event.flow.id, True), None)
                self._histories.pop((event.flow.id, False), None)
                client_leg = self._client_legs.pop(event.flow.id, None)
                if client_leg is not None:
                    self._close(client_leg, event.flow)
        elif type(event) is FlowWire:
            self._wire(event)

    def _wire(self, event: FlowWire) -> None:
        """Write an intercepted flow's ciphertext on one leg, or that leg's secrets."""
        flow_id = event.flow_id
        if flow_id not in self._conversations:
            log.debug("ciphertext of unknown flow %d not captured", flow_id)
            return
        self._wire_flows.add(flow_id)
        if self._ring is None:
            self._write_wire(event)
            return
        key = (flow_id, event.upstream_leg)
        with self._ring.kept_together():
            generation = self._generation()
            history = self._histories[key] if key in self._histories else _LegHistory(generation)
            if history is not None and history.generation != generation:
                history.generation = generation
                self._replay(event, history)
            self._write_wire(event)
            if history is not None:
                history.size_bytes += len(event.data)
                if history.size_bytes > REPLAY_BUDGET_BYTES:
                    history = None  # too long to repeat in each file: kept no more
                elif event.secrets:
                    history.secrets.append(event.data)
                else:
                    history.chunks.append(event)
            self._histories[key] = history

    def _write_wire(self, event: FlowWire) -> None:
        if event.secrets:
            if isinstance(self._out, SecretsFile):
                self._out.write_secrets(event.data)
            return
        self._data(
            self._leg(event), FlowData(event.flow_id, event.direction, event.timestamp, event.data)
        )

    def _leg(self, event: FlowWire) -> _Conversation:
        """The conversation of the event's leg, the client leg's started at its first packet."""
        upstream_leg = self._conversations[event.flow_id]
        if event.upstream_leg:
            return upstream_leg
        found = self._client_legs.get(event.flow_id)
        if found is None:
            found = _Conversation(upstream_leg.flow, client_leg=True)
            self._client_legs[event.flow_id] = found
            self._handshake(found, _timestamp_ns(upstream_leg.flow.started_at))
        return found

    def _replay(self, event: FlowWire, history: _LegHistory) -> None:
        """Write a leg again from its start in a new file of the ring: its secrets, its TCP
        handshake and its ciphertext so far, numbered as before so that its packets go on."""
        flow_id = event.flow_id
        flow = self._conversations[flow_id].flow
        if isinstance(self._out, SecretsFile):
            for secrets in history.secrets:
                self._out.write_secrets(secrets)
        leg = _Conversation(flow, client_leg=not event.upstream_leg)
        if event.upstream_leg:
            self._conversations[flow_id] = leg
        elif flow_id in self._client_legs:
            self._client_legs[flow_id] = leg
        else:
            return  # the client leg's first packet is still to come: it starts it
        self._handshake(leg, _timestamp_ns(flow.started_at))
        for chunk in history.chunks:
            self._data(leg, FlowData(flow_id, chunk.direction, chunk.timestamp, chunk.data))

    def receive(self, flow_id: int, direction: Direction, sock: socket.socket, size: int) -> Chunk:
        """Receive up to `size` bytes of a TCP flow straight into the file's records.

        The payload slots of the records a full chunk needs are reserved in the file and the
        chunk is received into them; the records are framed around it once the relay has
        sent it, when it releases the chunk's loan (framing is then off the round trip's
        path), and `after_chunk` follows. A flow whose next packet carries a comment, or a
        file that cannot frame in place, takes the ordinary path (`recv`, then `write`).
        Raises only what the socket raises: once bytes are received they are handed back
        whatever the file does, and a file that fails is noted in `failure` (the bytes then
        go on uncaptured, as every later chunk does).
        """
        out = self._in_place
        conversation = self._conversations.get(flow_id)
        if (
            out is None
            or conversation is None
            or conversation.is_udp
            or self.failure is not None
            or (self._rotates and conversation.comment_generation != self._generation())
        ):
            return self._receive_copy(flow_id, direction, sock, size)
        step = conversation.max_payload
        if size > step:
            size -= size % step  # whole segments: 256 KiB would leave a 164-byte fifth one
        layout = conversation.layout
        if layout is None:
            layout = conversation.layout = self._layout(out, conversation.header_size, step)
        prefix, slot, ack_room = layout
        try:
            count = -(-size // step)
            if self._rotates:
                # No more records than the file has room for: a ring of files rotates after
                # the record that fills one, as it would packet by packet.
                count = min(count, max(1, -(-out.room_bytes // slot)))
            region = out.reserve(count * slot + ack_room)
        except Exception as exc:  # the file's failure, before a byte is received
            self.failure = exc
            return self._receive_copy(flow_id, direction, sock, size)
        size = min(size, count * step)
        # The first segment's slot alone first: most chunks of an interactive flow fit in
        # it, and one slot costs less to set up than a list of them.
        first = region[prefix : prefix + min(size, step)]
        received = sock.recv_into(first)
        if not received:
            return Chunk(0, [], None, size)
        if received < step:
            parts = [first[:received]]
        else:
            parts = [first]
            if count > 1:
                starts = range(slot + prefix, count * slot, slot)
                rest = [region[start : start + step] for start in starts]
                rest[-1] = rest[-1][: size - (count - 1) * step]
                try:
                    more = sock.recvmsg_into(rest)[0]
                except BlockingIOError:  # drained: fewer bytes than asked say so
                    more = 0
                except OSError:
                    # The first segment is relayed; asking for no more than it says the
                    # socket may hold more, and the next read raises what this one did.
                    size = received
                    more = 0
                for part in rest:
                    if more <= 0:
                        break
                    parts.append(part[:more] if more < step else part)
                    received += min(more, step)
                    more -= step
        sent = self._sent
        sent.conversation = conversation
        sent.direction = direction
        sent.region = region
        sent.received = received
        sent.timestamp_ns = max(time.time_ns(), conversation.last_ns)
        return tuple.__new__(Chunk, (received, parts, sent, size))  # Chunk(...), without a call

    def record(
        self, flow_id: int, direction: Direction, timestamp_ns: int, data: memoryview
    ) -> None:
        """Add the records of a TCP chunk the relay received into its own memory and has
        sent: copied into the file's buffer and framed there, as `receive` frames in place."""
        out = self._in_place
        conversation = self._conversations.get(flow_id)
        size = len(data)
        if (
            out is None
            or conversation is None
            or conversation.is_udp
            or (self._wire_flows and flow_id in self._wire_flows)
            # A ring of files: a chunk of several segments may not fit in what is left of
            # the file, and a new file's first packet names the flow; packet by packet then.
            or (
                self._rotates
                and (
                    size > conversation.max_payload
                    or conversation.comment_generation != self._generation()
                )
            )
        ):
            self.write(FlowData(flow_id, direction, timestamp_ns / 1e9, bytes(data)))
            return
        step = conversation.max_payload
        timestamp_ns = max(timestamp_ns, conversation.last_ns)
        if size <= step and self._frames_v4_in_one and not conversation.is_v6:
            conversation.last_ns = timestamp_ns
            src, dst = (
                conversation.up_sides if direction is Direction.UP else conversation.down_sides
            )
            _copy_v4_chunk(out, timestamp_ns, src, dst, data)
            return
        layout = conversation.layout
        if layout is None:
            layout = conversation.layout = self._layout(out, conversation.header_size, step)
        prefix, slot, ack_room = layout
        region = out.reserve(-(-size // step) * slot + ack_room)
        for index, start in enumerate(range(0, size, step)):
            end = min(start + step, size)
            at = index * slot + prefix
            region[at : at + end - start] = data[start:end]
        sent = self._sent
        sent.conversation = conversation
        sent.direction = direction
        sent.region = region
        sent.received = size
        sent.timestamp_ns = timestamp_ns
        try:
            self._frame(sent)
        finally:
            sent.region = None

    def _receive_copy(
        self, flow_id: int, direction: Direction, sock: socket.socket, size: int
    ) -> Chunk:
        """The ordinary path: receive into fresh memory, then write; a file that fails then
        costs the chunk nothing."""
        data = sock.recv(size)
        if data and self.failure is None:
            try:
                self.write(FlowData(flow_id, direction, time.time(), data))
            except Exception as exc:
                self.failure = exc
        return _plain_chunk(data, size)

    def _layout(self, out: InPlaceFile, header_size: int, step: int) -> tuple[int, int, int]:
        """Where a full segment's payload starts in its record, the record's size, and the
        room an ACK record after the segments needs."""
        prefix, suffix = out.record_layout(header_size, step)
        ack_prefix, ack_suffix = out.record_layout(header_size, 0)
        # A short last record may need up to 3 bytes more padding than a full one.
        return (prefix, prefix + step + suffix, 4 + ack_prefix + ack_suffix)

    def finish_chunk(self) -> None:
        """Frame and add the records of the chunk `receive` gave the relay, now sent."""
        try:
            self._frame(self._sent)
        except Exception as exc:  # the relay has sent the chunk: only the capture stops
            self.failure = exc
        finally:
            self._sent.region = None
            self._after_chunk()

    def _frame(self, sent: _SentChunk) -> None:
        out = self._in_place
        region = sent.region
        conversation = sent.conversation
        assert out is not None and region is not None and conversation is not None
        step = conversation.max_payload
        assert conversation.layout is not None
        prefix = conversation.layout[0]
        timestamp_ns = sent.timestamp_ns
        conversation.last_ns = timestamp_ns
        src, dst = (
            conversation.up_sides if sent.direction is Direction.UP else conversation.down_sides
        )
        at = 0
        left = sent.received
        if self._checksums:  # a checksum over each payload: the general path
            tcp_header = conversation.tcp_header
            while left:
                length = min(step, left)
                left -= length
                payload = region[at + prefix : at + prefix + length]
                flags = TCP_ACK if left else TCP_PSH | TCP_ACK
                header = tcp_header(src, dst, flags, payload, checksums=True)
                at = out.frame_record(region, at, timestamp_ns, header, length)
                src.seq = (src.seq + length) & 0xFFFFFFFF
            header = tcp_header(dst, src, TCP_ACK, b"", checksums=True)
            at = out.frame_record(region, at, timestamp_ns, header, 0)
            out.commit(at)
            return
        if left <= step and self._frames_v4_in_one and not conversation.is_v6:
            out.commit(frame_v4_chunk(region, timestamp_ns, src, dst, left))
            return
        fields = conversation.segment_fields
        frame = out.frame_segment
        while left:
            length = min(step, left)
            left -= length
            flags = TCP_ACK if left else TCP_PSH | TCP_ACK
            at = frame(region, at, timestamp_ns, fields(src, dst, flags, length), length)
            src.seq = (src.seq + length) & 0xFFFFFFFF
        # The receiver's ACK, in the same reservation.
        at = frame(region, at, timestamp_ns, fields(dst, src, TCP_ACK, 0), 0)
        out.commit(at)

    def _comment(self, conversation: _Conversation) -> str | None:
        generation = self._generation()
        if conversation.comment_generation == generation:
            return None
        conversation.comment_generation = generation
        return flow_comment(conversation.flow)

    def _emit(
        self,
        conversation: _Conversation,
        src: Side,
        dst: Side,
        flags: int,
        timestamp_ns: int,
        payload: Payload = b"",
        *,
        options: bytes = b"",
        comment: str | None = None,
    ) -> None:
        header = conversation.tcp_header(
            src, dst, flags, payload, options=options, checksums=self._checksums
        )
        self._out.write_packet(
            timestamp_ns, header, payload, comment or self._comment(conversation)
        )

    def _handshake(self, conversation: _Conversation, timestamp_ns: int) -> None:
        client, server = conversation.client, conversation.server
        conversation.last_ns = timestamp_ns
        # MSS (the largest segment this capture uses), NOP, window scale.
        options = struct.pack("!BBHBBBB", 2, 4, conversation.max_payload, 1, 3, 3, TCP_WINDOW_SHIFT)
        self._emit(conversation, client, server, TCP_SYN, timestamp_ns, options=options)
        client.seq = (client.seq + 1) & 0xFFFFFFFF
        self._emit(conversation, server, client, TCP_SYN | TCP_ACK, timestamp_ns, options=options)
        server.seq = (server.seq + 1) & 0xFFFFFFFF
        self._emit(conversation, client, server, TCP_ACK, timestamp_ns)

    def _data(self, conversation: _Conversation, event: FlowData) -> None:
        timestamp_ns = _timestamp_ns(event.timestamp)
        if timestamp_ns < conversation.last_ns:
            timestamp_ns = conversation.last_ns
        conversation.last_ns = timestamp_ns
        src, dst = (
            conversation.up_sides if event.direction is Direction.UP else conversation.down_sides
        )
        data = event.data
        step = conversation.max_payload
        if conversation.is_udp:
            if len(data) > step:
                log.warning("flow %d: datagram of %d bytes cut to fit IP", event.flow_id, step)
                data = data[:step]
            header = conversation.udp_header(src, dst, data)
            self._out.write_packet(timestamp_ns, header, data, self._comment(conversation))
            return
        if not data:
            return
        view = memoryview(data)
        size = len(data)
        write_packet = self._out.write_packet
        tcp_header = conversation.tcp_header
        checksums = self._checksums
        comment = self._comment(conversation)
        out = self._in_place
        if (
            out is not None
            and self._frames_v4_in_one
            and comment is None
            and size <= step
            and not conversation.is_v6
        ):
            # One segment (a copied chunk, with a viewer attached say): copied into the file's
            # buffer and framed there like a chunk received in place, not packet by packet.
            _copy_v4_chunk(out, timestamp_ns, src, dst, data)
            return
        for start in range(0, size, step):
            chunk = view[start : start + step]
            flags = TCP_PSH | TCP_ACK if start + step >= size else TCP_ACK
            header = tcp_header(src, dst, flags, chunk, checksums=checksums)
            write_packet(timestamp_ns, header, chunk, comment)
            comment = None
            src.seq = (src.seq + len(chunk)) & 0xFFFFFFFF
        self._emit(conversation, dst, src, TCP_ACK, timestamp_ns)

    def _close(self, conversation: _Conversation, flow: Flow) -> None:
        timestamp_ns = max(
            _timestamp_ns(flow.ended_at if flow.ended_at is not None else flow.started_at),
            conversation.last_ns,
        )
        conversation.flow = flow
        comment = flow_comment(flow, closing=True)
        if conversation.is_udp:
            return
        client, server = conversation.client, conversation.server
        reason = flow.reason or CloseReason.SHUTDOWN
        if reason in _CLOSE_BY_RST:
            for from_client in _CLOSE_BY_RST[reason]:
                src, dst = (client, server) if from_client else (server, client)
                self._emit(conversation, src, dst, TCP_RST | TCP_ACK, timestamp_ns, comment=comment)
                comment = ""
            return
        first_is_client = _CLOSE_BY_FIN.get(reason, (False,))[0]
        first, second = (client, server) if first_is_client else (server, client)
        self._emit(conversation, first, second, TCP_FIN | TCP_ACK, timestamp_ns, comment=comment)
        first.seq = (first.seq + 1) & 0xFFFFFFFF
        self._emit(conversation, second, first, TCP_FIN | TCP_ACK, timestamp_ns)
        second.seq = (second.seq + 1) & 0xFFFFFFFF
        self._emit(conversation, first, second, TCP_ACK, timestamp_ns)
