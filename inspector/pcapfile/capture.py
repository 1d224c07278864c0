"""The capture observer: every flow event written to pcap/pcapng, losslessly.

Each event becomes packets on the relay thread that emitted it, so a chunk is never queued:
a relayed TCP chunk is received straight into the file's staging buffer, and its records
are framed around it once the relay has sent it on (off the round trip's path); the disk
writes happen on the file's own I/O thread (see `staging.StagedFile`). When the disk
falls behind, every staging buffer is waiting to be written and the relay waits for one, so
nothing is ever dropped. A timer thread flushes the file twice a second (busy or idle), so
after a crash it reads up to the last flush. With a size limit the capture becomes a ring
of files, like dumpcap's `-b filesize:... -b files:...`.

A capture that fails (a full disk, a file-size limit, a pipe whose reader quit) stops with
one logged line and never costs the relay a byte: a chunk already received into the file's
buffer is handed back to the relay whatever the file does, and a ring starts its next file
before the record that goes there, not after the one that filled the last.

Writing on the relay thread rather than handing chunks to a writer thread is what makes the
capture cheap: a queued chunk costs an allocation that is still alive when the next one is
made (fresh, page-faulting memory), and two thread switches, which cost more than packing
a few headers (measured with `perf`; see `benchmarks/capture.py`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from flowtap.proxy.errors import FlowtapError
from flowtap.proxy.events import Chunk
from flowtap.proxy.flow import Direction, FlowEvent, FlowWire

from .frames import Payload, SegmentFields
from .pcap import PcapFile
from .pcapng import PcapNgFile
from .staging import capture_write_error
from .writer import CaptureWriter, open_packet_file

log = logging.getLogger(__name__)

DEFAULT_FOLDER = Path("captures")


def default_capture_path(folder: Path = DEFAULT_FOLDER, *, now: datetime | None = None) -> Path:
    """A timestamped pcapng path in `folder` (created with mode 0700 if missing)."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise FlowtapError(
            f"cannot create the capture folder {str(folder)!r}: {exc.strerror}; "
            "give --pcap FILE in a writable folder"
        ) from None
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    path = folder / f"flowtap-{stamp}.pcapng"
    counter = 1
    while path.exists():
        counter += 1
        path = folder / f"flowtap-{stamp}-{counter}.pcapng"
    return path


class RotatingCapture:
    """A `PacketFile` that starts a new file past `max_size_bytes`, keeping the newest `max_files`.

    Without a size limit it is one file at `path`; with one, files are named like dumpcap's
    ring buffer: `STEM_00001_YYYYmmddHHMMSS.SUFFIX`. The next file is started when a record
    is about to be added to a full one (`write_packet`, `reserve`), so a failure to start it
    comes before that record's bytes are received, never after.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_size_bytes: int | None = None,
        max_files: int | None = None,
    ) -> None:
        if max_files is not None and max_size_bytes is None:
            raise FlowtapError("--pcap-max-files needs --pcap-max-size MB to know when to rotate")
        if max_files is not None and max_files < 1:
            raise FlowtapError("--pcap-max-files must be at least 1")
        if max_size_bytes is not None and max_size_bytes < 1:
            raise FlowtapError("--pcap-max-size must be at least 1 MB")
        self._path = path
        self._max_size_bytes = max_size_bytes
        self._max_files = max_files
        self.generation = 0
        self.paths: deque[Path] = deque()
        self._closing: list[PcapFile | PcapNgFile] = []  # full files their I/O threads finish
        self._together = False  # records kept in the current file: see kept_together
        self._current = self._open_next()

    @property
    def size_bytes(self) -> int:
        return self._current.size_bytes

    @property
    def is_full(self) -> bool:
        """Whether the next record starts a new file."""
        return (
            self._max_size_bytes is not None
            and self.size_bytes >= self._max_size_bytes
            and not self._together
        )

    @property
    def next_generation(self) -> int:
        """The number of the file the next record goes to (1 for the first)."""
        return self.generation + 1 if self.is_full else self.generation

    @property
    def path(self) -> Path:
        """The file being written now."""
        return self.paths[-1]

    @property
    def current(self) -> PcapFile | PcapNgFile:
        """The file being written now (the only one, without a size limit)."""
        return self._current

    def _open_next(self) -> PcapFile | PcapNgFile:
        self.generation += 1
        if self._max_size_bytes is None:
            path = self._path
        else:
            stamp = datetime.now().strftime("%Y%m%d%H%M%S")
            path = self._path.with_name(
                f"{self._path.stem}_{self.generation:05d}_{stamp}{self._path.suffix}"
            )
        current = open_packet_file(path)
        self.paths.append(path)
        while self._max_files is not None and len(self.paths) > self._max_files:
            old = self.paths.popleft()
            try:
                old.unlink()
            except OSError as exc:
                log.warning("cannot remove old capture file %s: %s", old, exc.strerror)
        return current

    def write_packet(
        self, timestamp_ns: int, header: bytes, payload: Payload, comment: str | None = None
    ) -> None:
        self._file_for_next_record().write_packet(timestamp_ns, header, payload, comment)

    def write_secrets(self, key_log: bytes) -> None:
        """A Decryption Secrets Block in the current file (a pcapng one: see CaptureObserver)."""
        current = self._file_for_next_record()
        if isinstance(current, PcapNgFile):
            current.write_secrets(key_log)

    @contextmanager
    def kept_together(self) -> Iterator[None]:
        """Start the next file now if the current one is full, then add every record to the
        current file until the context ends (a TLS leg written again in a new file, then its
        next packets, are not split between two files)."""
        self._file_for_next_record()
        self._together = True
        try:
            yield
        finally:
            self._together = False

    def _file_for_next_record(self) -> PcapFile | PcapNgFile:
        """The current file, after starting the next one if it is full."""
        if not self.is_full:
            return self._current
        # A full file that failed as its I/O thread finished it stops the capture too.
        for finished in [f for f in self._closing if f.is_finished]:
            self._closing.remove(finished)
            finished.wait_closed()
        full = self._current
        full.close(wait=False)  # its I/O thread finishes it while the next one fills
        self._closing.append(full)
        self._current = self._open_next()
        return self._current

    def record_layout(self, header_size: int, payload_size: int) -> tuple[int, int]:
        return self._current.record_layout(header_size, payload_size)

    @property
    def room_bytes(self) -> int:
        if self._max_size_bytes is None:
            return self._current.room_bytes
        if self.is_full:  # the next reservation starts a new file
            return self._max_size_bytes
        return self._max_size_bytes - self._current.size_bytes

    def reserve(self, size: int) -> memoryview:
        return self._file_for_next_record().reserve(size)

    def frame_record(
        self, region: memoryview, at: int, timestamp_ns: int, header: bytes, payload_size: int
    ) -> int:
        return self._current.frame_record(region, at, timestamp_ns, header, payload_size)

    def frame_segment(
        self, region: memoryview, at: int, timestamp_ns: int, fields: SegmentFields, size: int
    ) -> int:
        return self._current.frame_segment(region, at, timestamp_ns, fields, size)

    def commit(self, size: int) -> None:
        self._current.commit(size)

    def flush(self, *, wait: bool = True) -> None:
        self._current.flush(wait=wait)

    def close(self, *, wait: bool = True) -> None:
        """Close the current file and, with `wait`, wait for the full ones still being finished."""
        try:
            self._current.close(wait=wait)
        finally:
            if wait:
                closing, self._closing = self._closing, []
                for full in closing:
                    full.wait_closed()


class CaptureObserver:
    """Captures every flow event to pcap/pcapng; the relay waits when the disk lags.

    The file (or first file of a ring) is created when the observer is, so a bad path fails
    at start-up; `close` writes what is left and closes the file. If writing fails (a full
    disk, say), the capture stops with one logged line and the relay goes on.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_size_bytes: int | None = None,
        max_files: int | None = None,
        checksums: bool = False,
        flush_interval_s: float = 0.5,
        tls_wire: bool = False,
    ) -> None:
        if tls_wire and path.suffix.lower() != ".pcapng":
            raise FlowtapError(
                f"--tls-capture wire needs a pcapng capture, not {str(path)!r} (classic pcap "
                "cannot hold TLS secrets); name the file .pcapng"
            )
        self._tls_wire = tls_wire
        self.files = RotatingCapture(path, max_size_bytes=max_size_bytes, max_files=max_files)
        # Without a ring, records go straight to the one file: no layer to cross per chunk.
        rotates = max_size_bytes is not None
        self._writer = CaptureWriter(
            self.files if rotates else self.files.current,
            checksums=checksums,
            file_generation=(lambda: self.files.next_generation) if rotates else None,
            after_chunk=self._chunk_done,
        )
        self._flush_interval_s = flush_interval_s
        self._lock = threading.Lock()  # one relay thread writes at a time
        self._dirty = False
        self._closed = False
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._flusher = threading.Thread(
            target=self._flush_periodically, name="flowtap-capture-flush", daemon=True
        )
        self._flusher.start()

    @property
    def wants_data(self) -> bool:
        return True

    @property
    def wants_wire(self) -> bool:
        """Whether intercepted TLS is captured as ciphertext with its secrets (a
        `WireObserver`), rather than as plaintext."""
        return self._tls_wire

    def handle_wire(self, event: FlowWire) -> None:
        self.handle(event)

    @property
    def error(self) -> BaseException | None:
        """Why the capture stopped writing, if it did (a full disk, say)."""
        return self._error

    def handle(self, event: FlowEvent | FlowWire) -> None:
        with self._lock:
            if self._error is not None or self._closed:
                return
            try:
                self._writer.write(event)
            except Exception as exc:  # the relay has the bytes: only the capture stops
                self._fail(exc)
            self._dirty = True

    def receive(self, flow_id: int, direction: Direction, sock: socket.socket, size: int) -> Chunk:
        """Receive a chunk straight into the capture file (the relay's `ChunkSink` path).

        A chunk received into the file's buffer keeps the capture to itself until the relay
        has sent it and released its loan: its records are then framed, off the round trip's
        path (see `CaptureWriter.receive`), and the lock released in `_chunk_done`.
        """
        self._lock.acquire()
        try:
            if self._error is None and not self._closed:
                chunk: Chunk | None = self._writer.receive(flow_id, direction, sock, size)
            else:
                chunk = None
        except BaseException:  # the socket's error: no chunk, nothing pending
            self._lock.release()
            raise
        if chunk is None:
            self._lock.release()
            data = sock.recv(size)  # the capture has stopped: relay only
            return Chunk(len(data), [memoryview(data)], None, size)
        if chunk.loan is None:  # nothing left to frame (an ordinary receive, or the end)
            self._chunk_done()
        return chunk

    def record(
        self, flow_id: int, direction: Direction, timestamp_ns: int, data: memoryview
    ) -> None:
        """Capture a chunk the relay received and sent itself (the `ChunkSink` path of flows
        moving small chunks)."""
        with self._lock:
            if self._error is not None or self._closed:
                return
            try:
                self._writer.record(flow_id, direction, timestamp_ns, data)
            except Exception as exc:  # the relay has sent the bytes: only the capture stops
                self._fail(exc)
            self._dirty = True

    def _chunk_done(self) -> None:
        """A chunk's records are in the file (or the file failed): the next may come."""
        failure = self._writer.failure
        if failure is not None and self._error is None:
            self._fail(failure)
        self._dirty = True
        self._lock.release()

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        if isinstance(exc, OSError):
            exc = capture_write_error(self.files.path, exc)
        if isinstance(exc, FlowtapError):
            log.error("the capture stopped: %s", exc)
        else:  # a bug: its traceback helps more than one line
            log.error("the capture stopped: %r", exc, exc_info=exc)

    def _flush_periodically(self) -> None:
        while not self._stop.wait(self._flush_interval_s):
            with self._lock:
                if not self._dirty or self._error is not None or self._closed:
                    continue
                self._dirty = False
                try:
                    self.files.flush(wait=False)
                except Exception as exc:
                    self._fail(exc)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._flusher.join()
        try:
            self.files.close()
        except Exception as exc:
            if self._error is None:
                self._fail(exc)


def capture_path_for(pcap: str | None, capture: bool) -> Path | None:
    """Where `--pcap FILE` / `--capture` ask the capture to go, or None for no capture."""
    if pcap:
        return Path(os.path.expanduser(pcap))
    if capture:
        return default_capture_path()
    return None
