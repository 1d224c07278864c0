"""The I/O under a capture file: staging buffers that an I/O thread of the file's own writes out.

The capture formats (`pcap.PcapFile`, `pcapng.PcapNgFile`) are written through these rather
than through scapy's raw writers: scapy's pcapng writer has only microsecond resolution and
copies each packet several times.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
import queue
import stat
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from flowtap.proxy.errors import FlowtapError, describe_failure, log_failure

from .frames import Payload

log = logging.getLogger(__name__)


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


class StagedFile:
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

    def add_packet(self, head: bytes, payload: Payload, tail: bytes) -> None:
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
