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
- TCP checksums are left 0 unless `checksums=True` (Wireshark does not verify them by
  default, and computing them costs the relay about a millisecond a megabyte); IP and UDP
  checksums are always correct.

The files are written through staging buffers and an I/O thread of their own (see
`_StagedFile`) rather than through scapy's raw writers: scapy's pcapng writer has only
microsecond resolution and copies each packet several times.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import mmap
import os
import queue
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

from flowtap.proxy.errors import FlowtapError, describe_failure, log_failure
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
    Transport,
)

log = logging.getLogger(__name__)

LINKTYPE_ETHERNET = 1
SNAPLEN = 262144
FLOW_COMMENT_PREFIX = "flowtap "
"""pcapng comments that start with this carry a JSON object describing the flow."""

CLIENT_MAC = bytes.fromhex("020000000001")
SERVER_MAC = bytes.fromhex("020000000002")
UNIX_CLIENT_V4 = "127.1.0.1"
UNIX_SERVER_V4 = "127.1.0.2"
UNIX_CLIENT_V6 = "fd00:f10e::1"
UNIX_SERVER_V6 = "fd00:f10e::2"
UNIX_SERVER_PORT = 1

_FIN = 0x01
_SYN = 0x02
_RST = 0x04
_PSH = 0x08
_ACK = 0x10
_WINDOW = 0xFFFF
_WINDOW_SHIFT = 14  # the largest scale TCP allows: the window never fills in the capture
_TTL = 64
_ETHERTYPE_IPV4 = 0x0800
_ETHERTYPE_IPV6 = 0x86DD
_PROTO_TCP = 6
_PROTO_UDP = 17

_ETH = struct.Struct("!6s6sH")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")
_UDP = struct.Struct("!HHHH")
_TCP_V4_FIELDS = "6s6sHBBHHHBBH4s4sHHIIBBHHH"  # Ethernet, IPv4, TCP
_TCP_V6_FIELDS = "6s6sHIHBB16s16sHHIIBBHHH"  # Ethernet, IPv6, TCP
_ETH_IPV4_TCP = struct.Struct("!" + _TCP_V4_FIELDS)
_ETH_IPV6_TCP = struct.Struct("!" + _TCP_V6_FIELDS)
SegmentFields = tuple[bytes | int, ...]
"""The fields of a TCP segment's Ethernet, IP and TCP headers, in `_TCP_V4_FIELDS` or
`_TCP_V6_FIELDS` order (the Ethernet type, third, says which)."""

# The files are written in network byte order (both formats allow either order; readers
# follow the file's): a record's own header and its packet's headers are then packed by one
# struct, in one call, on the relay thread (see `frame_segment`).
_PCAP_HEADER = struct.Struct("!IHHiIII")
_PCAP_RECORD = struct.Struct("!IIII")
_PCAPNG_EPB = struct.Struct("!IIIIIII")
_U32 = struct.Struct("!I")
_OPT = struct.Struct("!HH")
_PCAPNG_TRAILERS = tuple(struct.Struct(f"!{pad}xI") for pad in range(4))  # padding, length
# A chunk of one IPv4 segment in pcapng, the common case of an interactive flow: its record up
# to the payload, then (by the payload's padding) the record's end and the receiver's whole
# ACK record (54 bytes of headers, 2 of padding: 88 in all), so two packs frame the chunk.
_PCAPNG_V4_SEGMENT = struct.Struct("!IIIIIII" + _TCP_V4_FIELDS)
_PCAPNG_V4_ACK_SIZE = 88
_PCAPNG_V4_END_AND_ACK = tuple(
    struct.Struct(f"!{pad}xIIIIIIII{_TCP_V4_FIELDS}2xI") for pad in range(4)
)


def _pad4(size: int) -> bytes:
    return b"\0" * (-size % 4)


_PADDING = tuple(_pad4(size) for size in range(4))  # by size % 4


def _fold(total: int) -> int:
    """The ones'-complement checksum of a sum of 16-bit words (never 0: 0 means none in UDP)."""
    return 0xFFFF - total % 0xFFFF


def _words(data: bytes | memoryview) -> int:
    """The sum of `data` as 16-bit big-endian words, modulo 0xFFFF (odd tails padded with 0)."""
    value = int.from_bytes(data, "big")
    if len(data) % 2:
        value <<= 8
    return value % 0xFFFF


class PacketFile(Protocol):
    """A capture file taking Ethernet frames, each given as a header and a payload."""

    @property
    def size_bytes(self) -> int: ...

    def write_packet(
        self,
        timestamp_ns: int,
        header: bytes,
        payload: bytes | memoryview,
        comment: str | None = None,
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


def _fix_for(exc: OSError) -> str | None:
    """What a user does about a capture write failing with `exc`, when its errno says."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space or pick another folder"
    if exc.errno == errno.EFBIG:
        return (
            "the file size limit (ulimit -f) is reached: raise it, or keep each file "
            "smaller with --pcap-max-size MB"
        )
    return None


def capture_write_error(path: Path, exc: OSError, *, is_pipe: bool = False) -> FlowtapError:
    """The one-line error for a capture file (or pipe) that cannot be written: its cause and fix."""
    if exc.errno == errno.EPIPE:
        return FlowtapError(
            f"the program reading the capture pipe {str(path)!r} went away; start the reader "
            "first and keep it running while flowtap captures"
        )
    kind = "pipe" if is_pipe else "file"
    fix = _fix_for(exc) or "check the device, or pick another folder"
    return FlowtapError(f"cannot write capture {kind} {str(path)!r}: {exc.strerror}; {fix}")


def _create_private(path: Path) -> int:
    """Open `path` for writing with mode 0600 (captures hold secrets); FlowtapError on failure."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        fix = _fix_for(exc) or "pick a writable path whose folder exists"
        raise FlowtapError(
            f"cannot create capture file {str(path)!r}: {exc.strerror}; {fix}"
        ) from None
    with contextlib.suppress(OSError):  # not ours to change on some filesystems
        os.fchmod(fd, 0o600)
    return fd


def _open_direct(path: Path) -> int:
    """A second descriptor on `path` for O_DIRECT writes, or -1 where the file system refuses."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    try:
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC | flag)
    except OSError as exc:
        log.debug("no O_DIRECT for %s (%s); writing through the page cache", path, exc)
        return -1


def _libc_function(name: str, *argtypes: type) -> Callable[..., int] | None:
    """A C library function for the file-system calls Python's `os` lacks, or None."""
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_sync_file_range = _libc_function(
    "sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint
)
_fallocate = _libc_function("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_FALLOC_FL_KEEP_SIZE = 1
_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4


def _sync_range(fd: int, offset: int, size: int, flags: int) -> None:
    if _sync_file_range is None:
        if flags & _SYNC_FILE_RANGE_WAIT_AFTER:
            os.fdatasync(fd)
        return
    if _sync_file_range(fd, offset, size, flags) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def _preallocate(fd: int, offset: int, size: int) -> None:
    """Reserve disk blocks past the end of the file without changing its size."""
    if _fallocate is None or _fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, size) != 0:
        error = ctypes.get_errno() if _fallocate is not None else 0
        raise OSError(error, os.strerror(error) if error else "fallocate is not available")


def _start_writeback(fd: int, offset: int, size: int) -> None:
    """Ask the kernel to start writing a range to disk, without waiting."""
    _sync_range(fd, offset, size, _SYNC_FILE_RANGE_WRITE)


def _finish_writeback(fd: int, offset: int, size: int) -> None:
    """Wait until a range is on disk (its pages then clean, so they can be dropped)."""
    _sync_range(
        fd,
        offset,
        size,
        _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER,
    )


def _staging_buffer(size: int) -> mmap.mmap:
    """Private anonymous memory for a staging buffer, in huge pages where the kernel has them.

    Direct I/O pins the buffer's pages for each write, and the relay copies chunks into it:
    2 MiB pages make both cheaper than 4 KiB ones (transparent huge pages on `madvise` need
    a private mapping; `mmap(-1, size)` alone is shared memory, which gets none).
    """
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return buffer


class _StagedFile:
    """A capture file filled through staging buffers that its own I/O thread writes out.

    `add` copies a part into the current staging buffer, on the caller's thread; a full
    buffer goes to the I/O thread, and the caller waits only when every buffer is still
    being written (backpressure: nothing is dropped). One thread adds at a time.

    The I/O thread writes whole blocks with `O_DIRECT` where the file system allows it,
    bypassing the page cache. Filling page-cache pages is what writing a capture costs most
    here (the kernel's copy into fresh pages, buffer heads and writeback took about half of
    the relay process's CPU time while capturing, measured with `perf`), and a long capture
    must not evict every other file's pages either. At each `flush` the partial last block
    is written through an ordinary descriptor, so the file is complete up to the last flush;
    the next direct write covers that block again. Where `O_DIRECT` is refused, everything
    goes through the page cache, and written windows are pushed to disk and dropped from it
    as the capture goes on.
    """

    # Direct writes: offsets, lengths and the buffer's address are multiples of this (a page,
    # which covers every logical block size Linux file systems use for O_DIRECT).
    _ALIGN = 4096
    _STAGING_BYTES = 4 << 20
    _BUFFERS = 3  # one being filled, two being written or waiting to be
    # Without O_DIRECT, written bytes go to disk in windows of this size, and the previous
    # window's pages then leave the page cache: a long capture reuses a few warm pages instead
    # of filling memory with new ones, which costs the kernel several times more per byte
    # (measured here: 0.3 s of system time per GiB instead of 1.3-2 s).
    _WINDOW_BYTES = 16 << 20
    # Blocks are reserved ahead in steps of this size: ext4 then maps pages to blocks it
    # already has instead of allocating block by block (a third less system time per GiB).
    _PREALLOCATE_BYTES = 32 << 20

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = _create_private(path)
        # A pipe or a device (`--pcap` to a FIFO that Wireshark reads, say) is written in
        # order with plain writes; a regular file with positioned ones, so that the partial
        # block a flush wrote can be written again whole.
        self._seekable = stat.S_ISREG(os.fstat(self._fd).st_mode)
        self._direct_fd = _open_direct(path) if self._seekable else -1
        self._align = self._ALIGN if self._direct_fd >= 0 else 1
        self.size_bytes = 0
        # The caller's side: the buffer being filled, and where it starts in the file.
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        self._buffers = 1
        self._buffer = _staging_buffer(self._STAGING_BYTES)
        self._view = memoryview(self._buffer)
        self._fill = 0
        self._staged_at = 0
        self._flushed_to = 0
        # The I/O thread's side.
        self._jobs: queue.SimpleQueue[_WriteJob | threading.Event | None] = queue.SimpleQueue()
        self._error: OSError | None = None
        self._end = 0  # the furthest byte written
        self._record_end = 0  # where a record of the file is known to end, written
        self._allocated = 0
        self._preallocates = True
        self._window_start = 0
        self._previous_window: tuple[int, int] | None = None
        self._drops_pages = self._direct_fd < 0
        self._closed = False
        self._thread = threading.Thread(
            target=self._write_jobs, name="flowtap-capture-io", daemon=True
        )
        self._thread.start()

    def add(self, part: bytes | memoryview) -> None:
        size = len(part)
        self.size_bytes += size
        fill = self._fill
        if size < self._STAGING_BYTES - fill:
            self._view[fill : fill + size] = part
            self._fill = fill + size
            return
        whole = memoryview(part)
        start = 0
        while start < size:
            fill = self._fill
            step = min(size - start, self._STAGING_BYTES - fill)
            self._view[fill : fill + step] = whole[start : start + step]
            self._fill = fill + step
            start += step
            if self._fill == self._STAGING_BYTES:
                self._hand_over()

    def add_packet(self, head: bytes, payload: bytes | memoryview, tail: bytes) -> None:
        """`add` of the three parts of one record, in one call (the per-packet path)."""
        middle = len(head) + len(payload)
        end = self._fill + middle + len(tail)
        if end >= self._STAGING_BYTES:
            self.add(head)
            self.add(payload)
            self.add(tail)
            return
        fill = self._fill
        view = self._view
        view[fill : fill + len(head)] = head
        view[fill + len(head) : fill + middle] = payload
        view[fill + middle : end] = tail
        self._fill = end
        self.size_bytes += end - fill

    @property
    def room_bytes(self) -> int:
        return sys.maxsize  # one file never fills; see capture.RotatingCapture

    def reserve(self, size: int) -> memoryview:
        """The next `size` bytes of the file, to fill in place; only `commit` makes them part
        of it, and nothing may be added in between."""
        if self._fill + size > self._STAGING_BYTES:
            self._hand_over()
        return self._view[self._fill : self._fill + size]

    def commit(self, size: int) -> None:
        """Add the first `size` bytes of the reservation to the file."""
        self._fill += size
        self.size_bytes += size

    def _hand_over(self) -> None:
        """Give the buffer's whole blocks to the I/O thread; go on in a free buffer."""
        self._raise_if_failed()
        whole = self._fill - self._fill % self._align
        if not whole:
            return
        try:
            fresh = self._free.get_nowait()
        except queue.Empty:
            if self._buffers < self._BUFFERS:
                self._buffers += 1
                fresh = _staging_buffer(self._STAGING_BYTES)
            else:
                fresh = self._free.get()  # every buffer is being written: wait for one
        tail = self._fill - whole
        view = memoryview(fresh)
        view[:tail] = self._view[whole : self._fill]
        self._jobs.put(_WriteJob(self._buffer, self._staged_at, whole, direct=True))
        self._buffer, self._view = fresh, view
        self._staged_at += whole
        self._fill = tail

    def flush(self, *, wait: bool = True) -> None:
        """Hand everything added so far to the I/O thread; with `wait`, until it is written.

        Called between records: where a flush ends, a record ends.
        """
        if self._flushed_to < self._staged_at + self._fill:
            self._hand_over()
            if self._fill:
                # The partial last block, through the page cache: complete up to here.
                tail = bytes(self._view[: self._fill])
                self._jobs.put(
                    _WriteJob(tail, self._staged_at, self._fill, direct=False, ends_record=True)
                )
            self._flushed_to = self._staged_at + self._fill
        if wait:
            done = threading.Event()
            self._jobs.put(done)
            done.wait()
            self._raise_if_failed()

    def close(self, *, wait: bool = True) -> None:
        """Flush and close; without `wait` the I/O thread finishes the file on its own."""
        if self._closed:
            return
        self._closed = True
        try:
            self.flush(wait=False)
        finally:
            self._jobs.put(None)
            if wait:
                self._thread.join()
        if wait:
            self._raise_if_failed()

    def wait_closed(self) -> None:
        """Wait until a file closed without `wait` is finished; FlowtapError if writing failed."""
        self._thread.join()
        self._raise_if_failed()

    @property
    def is_finished(self) -> bool:
        """Whether the I/O thread is done with the file (closed, and everything written)."""
        return not self._thread.is_alive()

    def _start(self, head: bytes) -> None:
        """Write the file's header, so that it is a valid, empty capture from the start; a file
        that cannot take even that is closed and removed."""
        try:
            self.add(head)
            self.flush()
        except BaseException:
            with contextlib.suppress(FlowtapError):
                self.close()
            if self._seekable:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            raise

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise capture_write_error(self.path, self._error, is_pipe=not self._seekable)

    @staticmethod
    def _record_size(head: bytes) -> int:
        """The size of the record whose first 16 bytes are `head` (0: this file cannot tell)."""
        return 0

    def _write_jobs(self) -> None:
        jobs = self._jobs
        try:
            while (job := jobs.get()) is not None:
                if isinstance(job, threading.Event):
                    job.set()
                    continue
                if self._error is None:
                    try:
                        self._write(job)
                    except OSError as exc:
                        log.debug("capture file %s: %s", self.path, exc)
                        self._error = exc
                        self._cut_to_last_record()
                    except Exception as exc:
                        # A bug: stop writing as on a write error, but keep taking jobs and
                        # giving buffers back, so that no relay thread waits for one forever.
                        log_failure(log, f"the I/O thread of capture file {self.path}", exc)
                        self._error = OSError(errno.EIO, describe_failure(exc))
                        self._cut_to_last_record()
                if isinstance(job.data, mmap.mmap):
                    self._free.put(job.data)
        finally:
            self._finish()

    def _write(self, job: _WriteJob) -> None:
        end = job.offset + job.size
        if not self._seekable:
            _write_all(self._fd, job.data, job.size)
            self._end = end
            return
        if self._preallocates and end > self._allocated:
            step = max(self._PREALLOCATE_BYTES, end - self._allocated)
            try:
                _preallocate(self._fd, self._allocated, step)
                self._allocated += step
            except OSError:
                self._preallocates = False  # a file system that cannot: allocate as we go
        data = memoryview(job.data)[: job.size]
        done = 0
        try:
            if job.direct and self._direct_fd >= 0:
                try:
                    while done < job.size:
                        done += os.pwrite(self._direct_fd, data[done:], job.offset + done)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    # O_DIRECT taken at open but not these alignments: use the page cache.
                    log.debug("O_DIRECT refused for %s (%s); using the page cache", self.path, exc)
                    os.close(self._direct_fd)
                    self._direct_fd = -1
                    self._drops_pages = True
            while done < job.size:
                done += os.pwrite(self._fd, data[done:], job.offset + done)
        finally:
            data.release()
            self._end = max(self._end, job.offset + done)
        if job.ends_record:
            self._record_end = end
        if self._drops_pages and self._end - self._window_start >= self._WINDOW_BYTES:
            self._next_window()

    def _cut_to_last_record(self) -> None:
        """After a failed write, end the file after its last whole record, so that it reads
        clean up to there (a pipe's reader has what it has)."""
        if not self._seekable:
            return
        at = self._record_end
        with contextlib.suppress(OSError):
            # The file as it is now (its descriptors only write), even if renamed since.
            reading = os.open(f"/proc/self/fd/{self._fd}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                # Only the records written since the last flush are walked: one ended there.
                while len(head := os.pread(reading, 16, at)) == 16:
                    size = self._record_size(head)
                    if size <= 0 or at + size > self._end:
                        break
                    at += size
            finally:
                os.close(reading)
            os.ftruncate(self._fd, at)
            self._end = at

    def _next_window(self) -> None:
        """Start writing out the window just filled; wait for the one before and drop it."""
        start, end = self._window_start, self._end
        try:
            _start_writeback(self._fd, start, end - start)
            if self._previous_window is not None:
                old_start, old_end = self._previous_window
                _finish_writeback(self._fd, old_start, old_end - old_start)
                os.posix_fadvise(self._fd, old_start, old_end - old_start, os.POSIX_FADV_DONTNEED)
        except OSError:
            self._drops_pages = False  # a file system that cannot: leave it to the kernel
        self._previous_window = (start, end)
        self._window_start = end

    def _finish(self) -> None:
        if self._seekable and self._allocated > self._end:
            with contextlib.suppress(OSError):  # give back the blocks reserved ahead
                os.ftruncate(self._fd, self._end)
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1
        os.close(self._fd)


def _write_all(fd: int, data: mmap.mmap | bytes, size: int) -> None:
    with memoryview(data) as view:
        done = 0
        while done < size:
            done += os.write(fd, view[done:size])


class _WriteJob:
    """`size` bytes of `data` for the I/O thread to write at `offset` (`ends_record`: a record
    of the file ends where they do)."""

    __slots__ = ("data", "direct", "ends_record", "offset", "size")

    def __init__(
        self,
        data: mmap.mmap | bytes,
        offset: int,
        size: int,
        *,
        direct: bool,
        ends_record: bool = False,
    ) -> None:
        self.data = data
        self.offset = offset
        self.size = size
        self.direct = direct
        self.ends_record = ends_record


class PcapFile(_StagedFile):
    """A classic pcap file (big-endian, microsecond timestamps, Ethernet)."""

    _SEGMENT = (
        struct.Struct("!IIII" + _TCP_V4_FIELDS),
        struct.Struct("!IIII" + _TCP_V6_FIELDS),
    )

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._start(_PCAP_HEADER.pack(0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET))

    @staticmethod
    def _record_size(head: bytes) -> int:
        return 16 + int(_U32.unpack_from(head, 8)[0])

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
        is_v6 = fields[2] == _ETHERTYPE_IPV6
        size += 74 if is_v6 else 54
        sec, ns = divmod(timestamp_ns, 1_000_000_000)
        self._SEGMENT[is_v6].pack_into(region, at, sec, ns // 1000, size, size, *fields)
        return at + 16 + size

    def write_packet(
        self,
        timestamp_ns: int,
        header: bytes,
        payload: bytes | memoryview,
        comment: str | None = None,
    ) -> None:
        size = len(header) + len(payload)
        sec, ns = divmod(timestamp_ns, 1_000_000_000)
        self.add_packet(_PCAP_RECORD.pack(sec, ns // 1000, size, size) + header, payload, b"")


class PcapNgFile(_StagedFile):
    """A pcapng file: one big-endian section, one Ethernet interface with nanosecond timestamps."""

    _SEGMENT = (
        struct.Struct("!IIIIIII" + _TCP_V4_FIELDS),
        struct.Struct("!IIIIIII" + _TCP_V6_FIELDS),
    )

    def __init__(self, path: Path, *, application: str = "flowtap") -> None:
        super().__init__(path)
        app = application.encode()
        shb_options = _OPT.pack(4, len(app)) + app + _pad4(len(app)) + _OPT.pack(0, 0)
        shb_length = 28 + len(shb_options)
        shb = (
            _U32.pack(0x0A0D0D0A)
            + _U32.pack(shb_length)
            + struct.pack("!IHHq", 0x1A2B3C4D, 1, 0, -1)
            + shb_options
            + _U32.pack(shb_length)
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
            + _U32.pack(idb_length)
        )
        self._start(shb + idb)

    @staticmethod
    def _record_size(head: bytes) -> int:
        return int(_U32.unpack_from(head, 4)[0])  # every block's total length

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
        _U32.pack_into(region, end + pad, total)
        return end + pad + 4

    def frame_segment(
        self, region: memoryview, at: int, timestamp_ns: int, fields: SegmentFields, size: int
    ) -> int:
        is_v6 = fields[2] == _ETHERTYPE_IPV6
        size += 74 if is_v6 else 54
        pad = -size & 3
        total = 32 + size + pad
        self._SEGMENT[is_v6].pack_into(
            region, at, 6, total, 0, timestamp_ns >> 32, timestamp_ns & 0xFFFFFFFF, size, size,
            *fields,
        )  # fmt: skip
        _PCAPNG_TRAILERS[pad].pack_into(region, at + 28 + size, total)
        return at + total

    def write_packet(
        self,
        timestamp_ns: int,
        header: bytes,
        payload: bytes | memoryview,
        comment: str | None = None,
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
        self.add_packet(epb + header, payload, tail + _U32.pack(total))


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


def _plain_chunk(data: bytes, asked: int) -> Chunk:
    """A chunk received the ordinary way, in memory of its own."""
    return Chunk(len(data), [memoryview(data)], None, asked)


def _timestamp_ns(timestamp: float) -> int:
    seconds = int(timestamp)
    return seconds * 1_000_000_000 + round((timestamp - seconds) * 1e9)


def _ip_bytes(host: str, family: int) -> bytes | None:
    host = host.split("%", 1)[0]
    try:
        return socket.inet_pton(family, host)
    except OSError:
        return None


def _endpoints(flow: Flow) -> tuple[bool, bytes, int, bytes, int]:
    """(is IPv6, client IP, client port, server IP, server port) as written in the capture."""
    client, server = flow.client, flow.server
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


class _Side:
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
        self.checksum_base = 0x4500 + 0x4000 + (_TTL << 8) + _words(ip) + _words(peer_ip)


class _Conversation:
    """The packets of one flow: the state needed to number them, and their construction."""

    __slots__ = (
        "client",
        "comment_generation",
        "flow",
        "header_size",
        "is_udp",
        "is_v6",
        "last_ns",
        "layout",
        "max_payload",
        "proto",
        "server",
    )

    def __init__(self, flow: Flow) -> None:
        self.flow = flow
        self.is_udp = flow.transport is Transport.UDP
        self.proto = _PROTO_UDP if self.is_udp else _PROTO_TCP
        is_v6, client_ip, client_port, server_ip, server_port = _endpoints(flow)
        self.is_v6 = is_v6
        self.client = _Side(CLIENT_MAC, SERVER_MAC, client_ip, server_ip, client_port)
        self.server = _Side(SERVER_MAC, CLIENT_MAC, server_ip, client_ip, server_port)
        # Initial sequence numbers: arbitrary but reproducible for a given flow.
        self.client.seq = (flow.id * 0x9E3779B1) & 0xFFFFFFFF
        self.server.seq = (flow.id * 0x85EBCA77 + 0x1234567) & 0xFFFFFFFF
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
        src: _Side,
        dst: _Side,
        flags: int,
        payload: bytes | memoryview,
        *,
        options: bytes = b"",
        checksums: bool,
    ) -> bytes:
        """Ethernet, IP and TCP headers for one segment from `src` carrying `payload`."""
        fields = self.segment_fields(src, dst, flags, len(payload), options=len(options))
        if self.is_v6:
            header = _ETH_IPV6_TCP.pack(*fields)
            ip_end = 54
        else:
            header = _ETH_IPV4_TCP.pack(*fields)
            ip_end = 34
        tcp_length = 20 + len(options) + len(payload)
        if options:
            header += options
        if checksums:
            pseudo = _words(src.ip) + _words(dst.ip) + _PROTO_TCP + tcp_length
            tcp_sum = _fold(pseudo + _words(header[ip_end:]) + _words(payload))
            header = header[: ip_end + 16] + tcp_sum.to_bytes(2, "big") + header[ip_end + 18 :]
        return header

    def segment_fields(
        self, src: _Side, dst: _Side, flags: int, payload_size: int, *, options: int = 0
    ) -> SegmentFields:
        """The fields of the Ethernet, IP and TCP headers (`_ETH_IPV4_TCP` or `_ETH_IPV6_TCP`)
        of one segment from `src`, with `options` bytes of TCP options."""
        tcp_length = 20 + options + payload_size
        offset = (5 + options // 4) << 4
        if self.is_v6:
            return (
                src.peer_mac, src.mac, _ETHERTYPE_IPV6,
                0x60000000, tcp_length, _PROTO_TCP, _TTL, src.ip, dst.ip,
                src.port, dst.port, src.seq, dst.seq if flags & _ACK else 0,
                offset, flags, _WINDOW, 0, 0,
            )  # fmt: skip
        total = 20 + tcp_length
        ident = src.ident
        src.ident = (ident + 1) & 0xFFFF
        ip_sum = _fold(src.checksum_base + _PROTO_TCP + total + ident)
        return (
            src.peer_mac, src.mac, _ETHERTYPE_IPV4,
            0x45, 0, total, ident, 0x4000, _TTL, _PROTO_TCP, ip_sum, src.ip, dst.ip,
            src.port, dst.port, src.seq, dst.seq if flags & _ACK else 0,
            offset, flags, _WINDOW, 0, 0,
        )  # fmt: skip

    def udp_header(self, src: _Side, dst: _Side, payload: bytes | memoryview) -> bytes:
        """Ethernet, IP and UDP headers (with a correct UDP checksum) for one datagram."""
        udp_length = 8 + len(payload)
        pseudo = _words(src.ip) + _words(dst.ip) + _PROTO_UDP + udp_length
        udp_sum = _fold(
            pseudo + _words(_UDP.pack(src.port, dst.port, udp_length, 0)) + _words(payload)
        )
        udp = _UDP.pack(src.port, dst.port, udp_length, udp_sum)
        if self.is_v6:
            ip = _IPV6.pack(0x60000000, udp_length, _PROTO_UDP, _TTL, src.ip, dst.ip)
            ethertype = _ETHERTYPE_IPV6
        else:
            total = 20 + udp_length
            ident = src.ident
            src.ident = (ident + 1) & 0xFFFF
            ip_sum = _fold(src.checksum_base + _PROTO_UDP + total + ident)
            ip = _IPV4.pack(0x45, 0, total, ident, 0x4000, _TTL, _PROTO_UDP, ip_sum, src.ip, dst.ip)
            ethertype = _ETHERTYPE_IPV4
        return _ETH.pack(src.peer_mac, src.mac, ethertype) + ip + udp


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


def _frame_pcapng_v4_chunk(
    region: memoryview, timestamp_ns: int, src: _Side, dst: _Side, size: int
) -> int:
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
        src.peer_mac, src.mac, _ETHERTYPE_IPV4,
        0x45, 0, ip_total, ident, 0x4000, _TTL, _PROTO_TCP,
        0xFFFF - (src.checksum_base + _PROTO_TCP + ip_total + ident) % 0xFFFF, src.ip, dst.ip,
        src.port, dst.port, seq, ack, 0x50, _PSH | _ACK, _WINDOW, 0, 0,
    )  # fmt: skip
    seq = src.seq = (seq + size) & 0xFFFFFFFF
    ident = dst.ident
    dst.ident = (ident + 1) & 0xFFFF
    _PCAPNG_V4_END_AND_ACK[pad].pack_into(
        region, 28 + length, total, 6, _PCAPNG_V4_ACK_SIZE, 0, high, low, 54, 54,
        dst.peer_mac, dst.mac, _ETHERTYPE_IPV4,
        0x45, 0, 40, ident, 0x4000, _TTL, _PROTO_TCP,
        0xFFFF - (dst.checksum_base + _PROTO_TCP + 40 + ident) % 0xFFFF, dst.ip, src.ip,
        dst.port, src.port, ack, seq, 0x50, _ACK, _WINDOW, 0, 0, _PCAPNG_V4_ACK_SIZE,
    )  # fmt: skip
    return total + _PCAPNG_V4_ACK_SIZE


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
        # Without rotation every record goes to the one file: nothing to ask per chunk.
        self._rotates = file_generation is not None
        self._generation = file_generation or (lambda: 0)
        self.failure: Exception | None = None
        """Why the file stopped taking records in `receive`, if it did; it then takes none."""
        self._after_chunk = after_chunk
        self._sent = _SentChunk(self)
        # Whether a one-segment IPv4 chunk is framed by `_frame_pcapng_v4_chunk`.
        self._frames_v4_in_one = isinstance(out, PcapNgFile) and not checksums

    def write(self, event: FlowEvent) -> None:
        if type(event) is FlowData:
            conversation = self._conversations.get(event.flow_id)
            if conversation is None:
                log.debug("data for unknown flow %d not captured", event.flow_id)
                return
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
        if sent.direction is Direction.UP:
            src, dst = conversation.client, conversation.server
        else:
            src, dst = conversation.server, conversation.client
        at = 0
        left = sent.received
        if self._checksums:  # a checksum over each payload: the general path
            tcp_header = conversation.tcp_header
            while left:
                length = min(step, left)
                left -= length
                payload = region[at + prefix : at + prefix + length]
                flags = _ACK if left else _PSH | _ACK
                header = tcp_header(src, dst, flags, payload, checksums=True)
                at = out.frame_record(region, at, timestamp_ns, header, length)
                src.seq = (src.seq + length) & 0xFFFFFFFF
            header = tcp_header(dst, src, _ACK, b"", checksums=True)
            at = out.frame_record(region, at, timestamp_ns, header, 0)
            out.commit(at)
            return
        if left <= step and self._frames_v4_in_one and not conversation.is_v6:
            out.commit(_frame_pcapng_v4_chunk(region, timestamp_ns, src, dst, left))
            return
        fields = conversation.segment_fields
        frame = out.frame_segment
        while left:
            length = min(step, left)
            left -= length
            flags = _ACK if left else _PSH | _ACK
            at = frame(region, at, timestamp_ns, fields(src, dst, flags, length), length)
            src.seq = (src.seq + length) & 0xFFFFFFFF
        # The receiver's ACK, in the same reservation.
        at = frame(region, at, timestamp_ns, fields(dst, src, _ACK, 0), 0)
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
        src: _Side,
        dst: _Side,
        flags: int,
        timestamp_ns: int,
        payload: bytes | memoryview = b"",
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
        options = struct.pack("!BBHBBBB", 2, 4, conversation.max_payload, 1, 3, 3, _WINDOW_SHIFT)
        self._emit(conversation, client, server, _SYN, timestamp_ns, options=options)
        client.seq = (client.seq + 1) & 0xFFFFFFFF
        self._emit(conversation, server, client, _SYN | _ACK, timestamp_ns, options=options)
        server.seq = (server.seq + 1) & 0xFFFFFFFF
        self._emit(conversation, client, server, _ACK, timestamp_ns)

    def _data(self, conversation: _Conversation, event: FlowData) -> None:
        timestamp_ns = _timestamp_ns(event.timestamp)
        if timestamp_ns < conversation.last_ns:
            timestamp_ns = conversation.last_ns
        conversation.last_ns = timestamp_ns
        if event.direction is Direction.UP:
            src, dst = conversation.client, conversation.server
        else:
            src, dst = conversation.server, conversation.client
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
            region = out.reserve(82 + size + 3 + 4 + _PCAPNG_V4_ACK_SIZE)
            region[82 : 82 + size] = data
            out.commit(_frame_pcapng_v4_chunk(region, timestamp_ns, src, dst, size))
            return
        for start in range(0, size, step):
            chunk = view[start : start + step]
            flags = _PSH | _ACK if start + step >= size else _ACK
            header = tcp_header(src, dst, flags, chunk, checksums=checksums)
            write_packet(timestamp_ns, header, chunk, comment)
            comment = None
            src.seq = (src.seq + len(chunk)) & 0xFFFFFFFF
        self._emit(conversation, dst, src, _ACK, timestamp_ns)

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
                self._emit(conversation, src, dst, _RST | _ACK, timestamp_ns, comment=comment)
                comment = ""
            return
        first_is_client = _CLOSE_BY_FIN.get(reason, (False,))[0]
        first, second = (client, server) if first_is_client else (server, client)
        self._emit(conversation, first, second, _FIN | _ACK, timestamp_ns, comment=comment)
        first.seq = (first.seq + 1) & 0xFFFFFFFF
        self._emit(conversation, second, first, _FIN | _ACK, timestamp_ns)
        second.seq = (second.seq + 1) & 0xFFFFFFFF
        self._emit(conversation, first, second, _ACK, timestamp_ns)
