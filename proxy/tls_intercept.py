"""TLS interception of one TCP flow without I/O: ciphertext from either peer in, ciphertext for
either peer and the plaintext each sent out, through two `ssl.SSLObject`s on memory BIOs.

The client's first bytes are peeked: a ClientHello opens TLS to the upstream with the
client's SNI and ALPN offer; once the upstream's handshake is done (its certificate verified
unless told not to), the client is answered with a leaf for the name it asked for and the
ALPN the upstream picked. Anything else passes untouched, as plain TCP.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import enum
import fnmatch
import functools
import os
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import FlowtapError
from .flow import TlsFacts
from .tls_ciphers import prefer_aes128
from .tls_hello import ClientHello, NotTls, peek_client_hello, version_name
from .tls_native import SocketWrites, binding

if TYPE_CHECKING:
    from .tls_ca import CertificateAuthority

# A fatal handshake_failure alert in a TLS 1.2 record: what a client is told when flowtap
# cannot reach a trusted upstream (before any ServerHello, a plaintext alert is the norm).
ALERT_HANDSHAKE_FAILURE = b"\x15\x03\x03\x00\x02\x02\x28"
# Plaintext decrypted (many records, each at most 16 KiB) before one write re-encrypts it: one
# SSLObject.write and one observer chunk per batch instead of per record.
_BATCH_BYTES = 256 * 1024
# What OpenSSL reads from a socket at once (read ahead), where it reads the sockets itself: a
# few records a call; past this, fewer calls gain little for the memory each side holds.
_READ_AHEAD_BYTES = 32 * 1024
# Each relay thread's batch buffer: emptied before the call that filled it returns.
_batches = threading.local()


class TlsMode(enum.StrEnum):
    """What `--tls` does with a TCP listener's flows."""

    OFF = "off"
    PASSTHROUGH = "passthrough"
    INTERCEPT = "intercept"


@dataclass
class TlsSettings:
    """How flows are intercepted: the CA, how the upstream is verified, the timeout."""

    mode: TlsMode
    ca: CertificateAuthority | None = None
    upstream_ca: Path | None = None
    upstream_insecure: bool = False
    handshake_timeout_s: float = 10.0
    keylog: Path | None = None
    """Where both sides' session secrets go, in the NSS key log format (SSLKEYLOGFILE)."""
    wire_capture: bool = False
    """Whether each connection's secrets are read back for a capture of the ciphertext."""
    passthrough_globs: tuple[str, ...] = ()
    """Host globs (`--tls-passthrough`) whose TLS is relayed untouched: pinned apps."""
    distrust_passthrough_s: float = 600.0
    """How long a host whose client rejected flowtap's certificate is passed through."""
    _distrusted: dict[str, float] = field(default_factory=dict, repr=False)
    _contexts: dict[tuple[str, ...], ssl.SSLContext] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    secrets: SessionSecrets | None = field(default=None, init=False, repr=False)
    """The key log read back per connection, with `wire_capture`."""

    def __post_init__(self) -> None:
        if self.mode is TlsMode.INTERCEPT and self.ca is None:
            raise ValueError("intercepting TLS needs a CA")
        if self.upstream_ca is not None:
            self._check_upstream_ca()
        if self.keylog is not None:
            _create_private_file(self.keylog)
        if self.wire_capture and self.mode is TlsMode.INTERCEPT:
            self.secrets = SessionSecrets(self.keylog)
        if self.ca is not None and self.keylog_path is not None:
            self.ca.keylog_file = Path(self.keylog_path)

    @property
    def keylog_path(self) -> str | None:
        """Where every intercepting context appends its secrets: `--keylog`'s file, else the
        private one a wire capture reads back."""
        if self.secrets is not None:
            return self.secrets.path
        return None if self.keylog is None else str(self.keylog)

    def passthrough_reason(self, host: str, now: float | None = None) -> str | None:
        """Why TLS to `host` is passed through rather than intercepted, or None."""
        host = host.lower()
        for pattern in self.passthrough_globs:
            if fnmatch.fnmatchcase(host, pattern.lower()):
                return f"--tls-passthrough {pattern}"
        with self._lock:
            until = self._distrusted.get(host)
            if until is None:
                return None
            now = time.monotonic() if now is None else now
            if now >= until:
                del self._distrusted[host]
                return None
        left_s = until - now
        return f"a client did not trust flowtap's CA for {host} ({left_s / 60:.0f} min left)"

    def mark_distrusted(self, host: str, now: float | None = None) -> float:
        """Pass `host` through for a while, as its client rejected flowtap's certificate; the
        while in minutes."""
        now = time.monotonic() if now is None else now
        with self._lock:
            # Bounded: the oldest marks go first once there are many hosts.
            if len(self._distrusted) >= 10_000:
                self._distrusted.pop(next(iter(self._distrusted)))
            self._distrusted[host.lower()] = now + self.distrust_passthrough_s
        return self.distrust_passthrough_s / 60

    @property
    def verification(self) -> str:
        """How the upstream's certificate is checked, as the flow's facts say it."""
        if self.upstream_insecure:
            return "off (--upstream-insecure)"
        return f"--upstream-ca {self.upstream_ca}" if self.upstream_ca else "system store"

    def upstream_context(self, alpn: tuple[str, ...]) -> ssl.SSLContext:
        """A client-side context that offers `alpn` and verifies as configured (cached)."""
        with self._lock:
            context = self._contexts.get(alpn)
        if context is not None:
            return context
        if self.upstream_insecure:
            # No CA certificates: OpenSSL builds the chain it will not check all the same, and
            # with the system's loaded it looks for an unknown issuer by listing /etc/ssl/certs
            # (a few hundred entries) twice a handshake, about 0.5 ms of CPU here.
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            # As create_default_context does, and so as the verifying contexts do.
            keylog = os.environ.get("SSLKEYLOGFILE")
            if keylog and not sys.flags.ignore_environment:
                context.keylog_filename = keylog
        else:
            context = ssl.create_default_context(
                cafile=None if self.upstream_ca is None else str(self.upstream_ca)
            )
        prefer_aes128(context)
        if alpn:
            context.set_alpn_protocols(list(alpn))
        if self.keylog_path is not None:
            context.keylog_filename = self.keylog_path
        with self._lock:
            self._contexts[alpn] = context
        return context

    def _check_upstream_ca(self) -> None:
        try:
            ssl.create_default_context(cafile=str(self.upstream_ca))
        except (OSError, ssl.SSLError) as exc:
            raise FlowtapError(
                f"--upstream-ca {self.upstream_ca}: cannot load it ({_ssl_text(exc)}); "
                "give a readable PEM file of CA certificates"
            ) from None


class SessionSecrets:
    """The key log the intercepting contexts append to, read back so that each connection's
    lines (named by its client random) go into a capture: `--keylog`'s file, or else a
    memfd that only this process can open (through /proc/self/fd)."""

    _MAX_UNCLAIMED = 10_000
    # The memfd's lines already read are given back to the kernel once this much has piled
    # up: it would otherwise hold about 1 KB of secrets per flow for the relay's life.
    _FREE_EVERY_BYTES = 64 * 1024

    def __init__(self, keylog: Path | None) -> None:
        self._freed = 0
        self._private = keylog is None
        if keylog is None:
            fd = os.memfd_create("flowtap-keylog", os.MFD_CLOEXEC)
            self.path = f"/proc/self/fd/{fd}"
            self._file = os.fdopen(fd, "rb", buffering=0)
        else:
            self.path = str(keylog)
            self._file = open(keylog, "rb", buffering=0)  # noqa: SIM115 (kept for the relay's life)
            self._file.seek(0, os.SEEK_END)  # earlier runs' lines are not this run's
        self._partial = b""
        self._lines: dict[bytes, list[bytes]] = {}
        self._lock = threading.Lock()

    def take(self, client_random: bytes) -> bytes:
        """The key log lines of the connection with `client_random` written so far (each
        line once)."""
        key = client_random.hex().encode()
        with self._lock:
            self._read_new()
            return b"".join(self._lines.pop(key, ()))

    def _read_new(self) -> None:
        data = self._partial + (self._file.read() or b"")
        if self._private:
            self._free_read_lines()
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            parts = line.split()
            if len(parts) != 3:
                continue  # a comment or blank line
            if len(self._lines) >= self._MAX_UNCLAIMED and parts[1] not in self._lines:
                self._lines.pop(next(iter(self._lines)))  # a connection nobody claimed
            self._lines.setdefault(parts[1].lower(), []).append(line + b"\n")

    def _free_read_lines(self) -> None:
        """Punch the whole pages already read out of the memfd (its size, and so where ssl
        appends and where the next read starts, stays); never the user's --keylog file."""
        upto = self._file.tell() & ~(_PAGE_BYTES - 1)
        if upto - self._freed < self._FREE_EVERY_BYTES:
            return
        if _fallocate(self._file.fileno(), _PUNCH_HOLE_KEEP_SIZE, 0, upto) == 0:
            self._freed = upto


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
_PUNCH_HOLE_KEEP_SIZE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
_fallocate = ctypes.CDLL(None, use_errno=True).fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def _create_private_file(path: Path) -> None:
    """Make `path` (or keep it) with mode 0600 before ssl appends secrets to it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
    except OSError as exc:
        raise FlowtapError(
            f"--keylog {path}: cannot write it ({exc.strerror or exc}); "
            "give a file in a directory you can write to"
        ) from None


class Outgoing:
    """Bytes due to one peer, kept as the chunks they came in: a large chunk (a whole batch of
    records from an SSLObject's outgoing BIO) goes to the socket as it is, never copied again
    to join the others; small ones are joined, so that many of them (a plain flow's bytes
    trickling towards a peer that does not read) cost neither a call each nor memory."""

    __slots__ = ("_chunks", "_offset", "_size")

    def __init__(self) -> None:
        self._chunks: list[bytes | bytearray] = []
        self._size = 0
        self._offset = 0
        """The bytes of the first chunk already sent."""

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __bytes__(self) -> bytes:
        return b"".join(self._chunks)[self._offset :]

    def __iadd__(self, data: bytes | bytearray | memoryview) -> Outgoing:
        self.append(data if type(data) is bytes else bytes(data))
        return self

    def append(self, chunk: bytes) -> None:
        """Queue `chunk` after what is due (kept as it is unless small)."""
        size = len(chunk)
        if not size:
            return
        self._size += size
        chunks = self._chunks
        if size >= _SMALL_CHUNK_BYTES or not chunks:
            chunks.append(chunk)
            return
        last = chunks[-1]
        # A bytearray here is one this queue made to join small chunks (nothing else holds it).
        if type(last) is bytearray and len(last) < _JOINED_CHUNK_BYTES:
            last += chunk
        else:
            chunks.append(bytearray(chunk))

    def clear(self) -> None:
        self._chunks.clear()
        self._size = self._offset = 0

    def send_to(self, sock: socket.socket) -> int:
        """Send what `sock` takes now, from the start (raising what `send` raises); the byte
        count, still held here until `drop` or `take`."""
        # Several chunks (the handshake's flights, or batches queued while the socket was
        # full) go in one call.
        views = [memoryview(chunk) for chunk in self._chunks[:_IOV_CHUNKS]]
        try:
            if self._offset:
                views[0] = views[0][self._offset :]
            return sock.send(views[0]) if len(views) == 1 else sock.sendmsg(views)
        finally:
            # A joined chunk grows in place: no view of it may outlive the call (the frame
            # of a raised error would keep them).
            for view in views:
                view.release()

    def drop(self, size: int) -> None:
        """Forget the first `size` bytes (sent)."""
        self._size -= size
        chunks = self._chunks
        offset = self._offset + size
        while chunks and offset >= len(chunks[0]):
            offset -= len(chunks.pop(0))
        self._offset = offset

    def take(self, size: int) -> bytes:
        """The first `size` bytes, forgotten here."""
        first = self._chunks[0]
        if self._offset + size <= len(first):
            data = bytes(first[self._offset : self._offset + size])
        else:
            data = bytes(self)[:size]
        self.drop(size)
        return data


# Chunks given to one sendmsg: far below IOV_MAX (1024), and more than a socket takes at once.
_IOV_CHUNKS = 64
# Chunks smaller than this are copied into a joined one (until it holds the second size)
# rather than queued on their own: a queue then holds about one chunk per 8 KiB at most, and
# TLS batches (up to 256 KiB) still go out as they came.
_SMALL_CHUNK_BYTES = 16 * 1024
_JOINED_CHUNK_BYTES = 64 * 1024


class Phase(enum.Enum):
    PEEKING = "peeking"
    UPSTREAM_HANDSHAKE = "upstream-handshake"
    CLIENT_HANDSHAKE = "client-handshake"
    OPEN = "open"
    PLAIN = "plain"
    FAILED = "failed"


class TlsInterception:
    """The TLS state of one flow; the caller moves bytes between it and the sockets."""

    def __init__(self, settings: TlsSettings, upstream_host: str) -> None:
        self.settings = settings
        self.upstream_host = upstream_host
        self.phase = Phase.PEEKING
        self.to_client = Outgoing()
        self.to_server = Outgoing()
        self.keeps_plaintext = True
        """Whether the plaintext goes into `plaintext_up`/`plaintext_down` (else it is only
        counted): the caller says so when no observer wants data."""
        self.plaintext_up: list[bytes] = []
        """What the client sent (decrypted), for observers; the caller empties it."""
        self.plaintext_down: list[bytes] = []
        self.bytes_up = 0
        """Plaintext bytes the client sent (relayed or due), kept or not."""
        self.bytes_down = 0
        self.error: str | None = None
        """Why the flow must close, once it must (a one-line reason starting `tls:`)."""
        self.client_done = False
        """The client has sent all it will: shut the server's write side once flushed."""
        self.server_done = False
        self.facts: TlsFacts | None = None
        self.close_notify_bytes_to_client = 0
        """How many bytes at the end of `to_client` are flowtap's close_notify alone."""
        self.close_notify_bytes_to_server = 0
        self._peeked = bytearray()
        self._hello: ClientHello | None = None
        self._server_connected = False
        self._upstream: ssl.SSLObject | None = None
        self._up_in = ssl.MemoryBIO()
        self._up_out = ssl.MemoryBIO()
        self._client: ssl.SSLObject | None = None
        self._client_in = ssl.MemoryBIO()
        self._client_out = ssl.MemoryBIO()
        self._upstream_random = b""
        self.upstream_secrets: bytes | None = None
        """With a wire capture: the upstream leg's key log lines, once its handshake is done."""
        self.client_secrets: bytes | None = None
        self.reads_directly = False
        """Whether OpenSSL reads the peers' sockets itself (`read_directly`)."""
        self.writes_directly = False
        """Whether OpenSSL writes to the peers' sockets itself (`write_directly`)."""
        self._client_writes: SocketWrites | None = None
        self._upstream_writes: SocketWrites | None = None
        self._leg_facts: TlsFacts | None = None
        """The upstream leg's facts, from its handshake until the client's is done."""
        self.leaf_due: str | None = None
        """The name whose leaf `prepare_leaf` has the CA make, once a ClientHello is peeked."""

    @property
    def is_handshaking(self) -> bool:
        return self.phase in (Phase.PEEKING, Phase.UPSTREAM_HANDSHAKE, Phase.CLIENT_HANDSHAKE)

    # -- input ---------------------------------------------------------------------------------

    def server_connected(self) -> None:
        """The upstream TCP connection is up: a ClientHello already peeked may go on."""
        self._server_connected = True
        if self.phase is Phase.UPSTREAM_HANDSHAKE and self._upstream is None:
            self._start_upstream()

    def feed_client(self, data: bytes | memoryview) -> None:
        """Bytes the client sent (copied before this returns: the caller may reuse `data`)."""
        phase = self.phase
        if phase is Phase.OPEN or phase is Phase.PLAIN:
            self._relay_fed(data, from_client=True)
        elif phase is Phase.PEEKING:
            self._peeked += data
            self._peek()
        elif phase is Phase.UPSTREAM_HANDSHAKE:
            self._peeked += data  # more of the client's handshake: it waits for our answer
        elif phase is Phase.CLIENT_HANDSHAKE:
            self._client_in.write(data)
            self._advance()

    def feed_server(self, data: bytes | memoryview) -> None:
        """Bytes the upstream sent (copied before this returns: the caller may reuse `data`)."""
        phase = self.phase
        if phase is Phase.OPEN or phase is Phase.PLAIN:
            self._relay_fed(data, from_client=False)
        elif phase is not Phase.FAILED:
            self._up_in.write(data)
            self._advance()

    def _relay_fed(self, data: bytes | memoryview, *, from_client: bool) -> None:
        """Relay what one peer sent once the flow is open (only that direction has new
        records) or plain."""
        if self.phase is Phase.OPEN:
            (self._client_in if from_client else self._up_in).write(data)
            self._advance(up=from_client, down=not from_client)
            return
        chunk = bytes(data)  # one copy, both for the peer and for observers
        if from_client:
            self.to_server.append(chunk)
            self.bytes_up += len(chunk)
        else:
            self.to_client.append(chunk)
            self.bytes_down += len(chunk)
        if self.keeps_plaintext:
            (self.plaintext_up if from_client else self.plaintext_down).append(chunk)

    def client_eof(self) -> None:
        """The client closed its side (TCP FIN)."""
        if self.phase is Phase.PLAIN or self.phase is Phase.OPEN:
            # No write_eof into the client's BIO: OpenSSL takes an EOF without close_notify
            # as fatal and alerts, while a half-closing client still reads the answer.
            self._finish_client()
        elif self.is_handshaking:
            self._fail("tls: the client closed during the handshake")

    def server_eof(self) -> None:
        """The upstream closed its side (TCP FIN)."""
        if self.phase is Phase.PLAIN or self.phase is Phase.OPEN:
            self._finish_server()
        elif self.is_handshaking:
            self._fail("tls: the upstream closed during the handshake")

    def handshake_timed_out(self, timeout_s: float) -> None:
        """The handshake did not complete in time."""
        if self.is_handshaking:
            where = {
                Phase.PEEKING: "waiting for the client's ClientHello",
                Phase.UPSTREAM_HANDSHAKE: "in the handshake with the upstream",
                Phase.CLIENT_HANDSHAKE: "in the handshake with the client",
            }[self.phase]
            self._fail(f"tls: handshake not complete within {timeout_s:g} s ({where})")

    # -- the state machine -----------------------------------------------------------------------

    def _peek(self) -> None:
        result = peek_client_hello(self._peeked)
        if isinstance(result, NotTls):
            self.facts = TlsFacts(mode="not-tls", note=result.reason)
            self._go_plain()
        elif isinstance(result, ClientHello):
            self._hello = result
            why = self.settings.passthrough_reason(result.sni or self.upstream_host)
            if self.settings.mode is TlsMode.PASSTHROUGH or why is not None:
                self.facts = TlsFacts(
                    mode="passthrough",
                    sni=result.sni,
                    offered_alpn=result.alpn,
                    offered_versions=tuple(version_name(v) for v in result.versions),
                    note=why,
                )
                self._go_plain()
                return
            self.phase = Phase.UPSTREAM_HANDSHAKE
            if self._server_connected:
                self._start_upstream()
            if self.phase is Phase.UPSTREAM_HANDSHAKE:
                self.leaf_due = result.sni or self.upstream_host

    def prepare_leaf(self) -> None:
        """Have the CA make the leaf the client will be answered with, if it is new: for the
        caller to call once what is due to the upstream is sent, while the upstream answers."""
        name, self.leaf_due = self.leaf_due, None
        ca = self.settings.ca
        if name is not None and ca is not None and self.phase is Phase.UPSTREAM_HANDSHAKE:
            ca.prepare(name)

    def _go_plain(self) -> None:
        self.phase = Phase.PLAIN
        data = bytes(self._peeked)
        self._peeked.clear()
        self.to_server.append(data)
        self.bytes_up += len(data)
        if self.keeps_plaintext:
            self.plaintext_up.append(data)

    def _start_upstream(self) -> None:
        hello = self._hello
        assert hello is not None
        context = self.settings.upstream_context(hello.alpn)
        # Verify the name the client asked for; without SNI, the upstream's own name or address.
        self._upstream = context.wrap_bio(
            self._up_in, self._up_out, server_hostname=hello.sni or self.upstream_host
        )
        self._read_ahead(self._upstream)
        self._advance()

    def _advance(self, *, up: bool = True, down: bool = True) -> None:
        """Take the handshakes as far as they go, then relay the records of the directions
        asked (`up`: the client's, `down`: the upstream's)."""
        try:
            if self.phase is Phase.UPSTREAM_HANDSHAKE and self._upstream is not None:
                if not self._handshake(self._upstream):
                    return
                if self.settings.secrets is not None:
                    self.upstream_secrets = self.settings.secrets.take(self._upstream_random)
                self._start_client()
            if self.phase is Phase.CLIENT_HANDSHAKE:
                assert self._client is not None
                if not self._handshake(self._client):
                    return
                if self.settings.secrets is not None and self._hello is not None:
                    self.client_secrets = self.settings.secrets.take(self._hello.random)
                self.facts = self._with_client_leg(self._client)
                self.phase = Phase.OPEN
            if self.phase is Phase.OPEN:
                self._relay(up, down)
        except ssl.SSLError as exc:
            self._fail(self._describe_failure(exc))
        finally:
            self._drain_outgoing()

    def _handshake(self, obj: ssl.SSLObject) -> bool:
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def _start_client(self) -> None:
        upstream = self._upstream
        hello = self._hello
        assert upstream is not None and hello is not None
        # Told once the client's handshake is done too, with its leg (or if that fails).
        self._leg_facts = self._upstream_facts(upstream, hello)
        ca = self.settings.ca
        assert ca is not None
        name = hello.sni or self.upstream_host
        chosen = upstream.selected_alpn_protocol()
        self._client = ca.server_object(name, chosen, self._client_in, self._client_out)
        self._read_ahead(self._client)
        self._client_in.write(bytes(self._peeked))
        self._peeked.clear()
        self.phase = Phase.CLIENT_HANDSHAKE

    def _read_ahead(self, obj: ssl.SSLObject) -> None:
        """Before its handshake: have `obj` read its socket in large reads once the flow is
        open (`read_directly`), where it may."""
        native = binding()
        if native is not None and self.settings.secrets is None:
            native.read_ahead(obj, _READ_AHEAD_BYTES)

    def read_directly(self, client_fd: int, server_fd: int) -> bool:
        """Have OpenSSL read each peer's records from its socket (`pull`) from now on, rather
        than from what `feed_client`/`feed_server` give it, once the flow is open with nothing
        left in its incoming memory BIOs; whether it does. Each byte then skips a copy into a
        memory BIO (which OpenSSL zeroes first) and one out of it."""
        native = binding()
        if (
            native is None
            or self.settings.secrets is not None  # a wire capture takes the ciphertext
            or self.phase is not Phase.OPEN
            or self._client_in.pending
            or self._up_in.pending
        ):
            return False
        assert self._client is not None and self._upstream is not None
        native.read_socket(self._client, client_fd)
        native.read_socket(self._upstream, server_fd)
        self.reads_directly = True
        return True

    def write_directly(self, client_fd: int, server_fd: int) -> bool:
        """Once reading directly, with nothing due to either peer: have OpenSSL write the
        records for each peer to its socket itself from now on (`pull`), rather than to the
        outgoing memory BIO that `to_client`/`to_server` are filled from; whether it does.
        Each byte then skips a copy into that BIO (which OpenSSL zeroes first) and one out
        of it. A write the socket does not take whole is held (`is_held`) and retried by
        `flush_held`; flowtap reads no more from the other peer meanwhile."""
        native = binding()
        if (
            native is None
            or not self.reads_directly
            or self.writes_directly
            or self.client_done
            or self.server_done
            or self.to_client
            or self.to_server
            or self._client_out.pending
            or self._up_out.pending
        ):
            return False
        assert self._client is not None and self._upstream is not None
        self._client_writes = native.write_socket(self._client, client_fd)
        self._upstream_writes = native.write_socket(self._upstream, server_fd)
        self.writes_directly = True
        return True

    def is_held(self, *, to_client: bool) -> bool:
        """Whether records for that peer wait for its socket to have room (`flush_held`)."""
        writes = self._client_writes if to_client else self._upstream_writes
        return writes is not None and writes.held is not None

    def flush_held(self, *, to_client: bool) -> bool:
        """Send the records held for that peer (its socket has room again); whether none are
        held now (OSError if the socket failed). Once they are all sent after that side's
        other peer ended, flowtap's close_notify is due in `to_client`/`to_server`."""
        writes = self._client_writes if to_client else self._upstream_writes
        if writes is None:
            return True
        if not writes.flush():
            return False
        if self.server_done if to_client else self.client_done:
            self._notify_close(to_client=to_client)
        return True

    def pull(self, *, from_client: bool) -> tuple[int, bool, bool, bool]:
        """Once `read_directly`: relay a batch of what that peer's socket has; the plaintext
        bytes moved, whether the peer has ended, whether its socket has no more for now, and
        whether it ended without close_notify (a FIN or a reset: the caller tells which).
        Writing directly, OSError if the other peer's socket failed."""
        client, upstream = self._client, self._upstream
        assert client is not None and upstream is not None
        source, sink = (client, upstream) if from_client else (upstream, client)
        writes = self._upstream_writes if from_client else self._client_writes
        if self.client_done if from_client else self.server_done:
            return 0, True, True, False
        plaintext = None
        if self.keeps_plaintext:
            plaintext = self.plaintext_up if from_client else self.plaintext_down
        try:
            moved, ended, short, abrupt = _relay_batch(source, sink, plaintext, writes)
            if from_client:
                self.bytes_up += moved
            else:
                self.bytes_down += moved
            if ended:
                (self._finish_client if from_client else self._finish_server)()
        except ssl.SSLError as exc:
            self._fail(self._describe_failure(exc))
            return 0, False, True, False
        finally:
            self._drain_outgoing()
        return moved, ended, short, abrupt

    def _relay(self, up: bool, down: bool) -> None:
        client, upstream = self._client, self._upstream
        assert client is not None and upstream is not None
        keeps = self.keeps_plaintext
        if up and not self.client_done:
            moved, done = _relay_records(client, upstream, self.plaintext_up if keeps else None)
            self.bytes_up += moved
            if done:
                self._finish_client()
        if down and not self.server_done:
            moved, done = _relay_records(upstream, client, self.plaintext_down if keeps else None)
            self.bytes_down += moved
            if done:
                self._finish_server()

    def _finish_client(self) -> None:
        if not self.client_done:
            self.client_done = True
            self._notify_close(to_client=False)

    def _finish_server(self) -> None:
        if not self.server_done:
            self.server_done = True
            self._notify_close(to_client=True)

    def _notify_close(self, *, to_client: bool) -> None:
        """Send flowtap's close_notify to that peer, after any records held for it."""
        writes = self._client_writes if to_client else self._upstream_writes
        if writes is not None:
            if writes.held is not None:
                return  # once they are sent (`flush_held`)
            # Into the memory BIO again, so that the caller sends the alert and then shuts
            # the socket down, as it does without direct writes.
            writes.write_memory()
            if to_client:
                self._client_writes = None
            else:
                self._upstream_writes = None
        if to_client:
            self.close_notify_bytes_to_client = self._close_notify(self._client, self._client_out)
        else:
            self.close_notify_bytes_to_server = self._close_notify(self._upstream, self._up_out)

    def _close_notify(self, end: ssl.SSLObject | None, out: ssl.MemoryBIO) -> int:
        """Send flowtap's close_notify through `end` (writing to `out`) if its TLS is open; the
        size of the alert, now at the end of the outgoing bytes (0 if none was sent)."""
        if end is None or self.phase is not Phase.OPEN:
            return 0
        self._drain_outgoing()
        native = binding()
        if self.reads_directly and native is not None:
            # Sent alone: Python's unwrap goes on to read the peer's close_notify, and from
            # its socket it would take (and OpenSSL drop) the records still due to flowtap.
            native.send_close_notify(end)
        else:
            _send_close_notify(end)
        alert_bytes = out.pending
        self._drain_outgoing()
        return alert_bytes

    def _drain_outgoing(self) -> None:
        if self._up_out.pending:
            data = self._up_out.read()
            if not self._upstream_random:
                # flowtap's own ClientHello, whole in one record: its random names the secrets.
                self._upstream_random = data[11:43]
            self.to_server.append(data)
        if self._client_out.pending:
            self.to_client.append(self._client_out.read())

    def _fail(self, reason: str) -> None:
        if self.phase is Phase.FAILED:
            return
        was = self.phase
        self.phase = Phase.FAILED
        self.error = reason
        if was is Phase.UPSTREAM_HANDSHAKE:
            # The client waits for a ServerHello: tell it the handshake failed.
            self.to_client += ALERT_HANDSHAKE_FAILURE
        if self.facts is None and self._leg_facts is not None:
            self.facts = self._leg_facts
        elif self.facts is None and self._hello is not None:
            self.facts = TlsFacts(
                mode="intercept",
                sni=self._hello.sni,
                offered_alpn=self._hello.alpn,
                verification=self.settings.verification,
            )

    def _describe_failure(self, exc: ssl.SSLError) -> str:
        text = _ssl_text(exc)
        if self.phase is Phase.UPSTREAM_HANDSHAKE:
            if isinstance(exc, ssl.SSLCertVerificationError):
                return f"tls: upstream certificate not trusted: {exc.verify_message}"
            return f"tls: handshake with the upstream failed: {text}"
        if self.phase is Phase.CLIENT_HANDSHAKE:
            reason = (exc.reason or "").lower()
            if (
                "unknown_ca" in reason
                or "bad_certificate" in reason
                or "certificate_unknown" in reason
            ):
                hello = self._hello
                assert hello is not None
                minutes = self.settings.mark_distrusted(hello.sni or self.upstream_host)
                return (
                    f"tls: client does not trust flowtap's CA (passthrough for {minutes:g} min; "
                    f"{text})"
                )
            return f"tls: handshake with the client failed: {text}"
        return f"tls: {text}"

    def _with_client_leg(self, client: ssl.SSLObject) -> TlsFacts:
        """The upstream leg's facts with what the client's handshake chose."""
        facts = self._leg_facts
        assert facts is not None
        cipher = client.cipher()
        return dataclasses.replace(
            facts,
            client_version=client.version(),
            client_cipher=None if cipher is None else cipher[0],
        )

    def _upstream_facts(self, upstream: ssl.SSLObject, hello: ClientHello) -> TlsFacts:
        cipher = upstream.cipher()
        der = upstream.getpeercert(binary_form=True)
        subject, issuer, not_after = _certificate_facts(der) if der else (None, None, None)
        return TlsFacts(
            mode="intercept",
            sni=hello.sni,
            offered_alpn=hello.alpn,
            alpn=upstream.selected_alpn_protocol(),
            version=upstream.version(),
            cipher=None if cipher is None else cipher[0],
            upstream_subject=subject,
            upstream_issuer=issuer,
            upstream_not_after=not_after,
            verification=self.settings.verification,
        )


@functools.lru_cache(maxsize=1024)
def _certificate_facts(der: bytes) -> tuple[str, str, str]:
    """A certificate's subject, issuer and expiry as the flow's facts give them (remembered:
    an upstream shows the same certificate to every connection)."""
    from cryptography import x509  # only once a flow is intercepted

    cert = x509.load_der_x509_certificate(der)
    not_after = f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
    return cert.subject.rfc4514_string(), cert.issuer.rfc4514_string(), not_after


def _batch_view() -> memoryview:
    """This thread's batch buffer (made on first use)."""
    try:
        view: memoryview = _batches.view
    except AttributeError:
        view = _batches.view = memoryview(bytearray(_BATCH_BYTES))
    return view


def _relay_records(
    source: ssl.SSLObject, sink: ssl.SSLObject, plaintext: list[bytes] | None
) -> tuple[int, bool]:
    """Decrypt what `source` has and re-encrypt it into `sink`, a batch of records at a time
    (each batch appended to `plaintext` unless None); the plaintext bytes moved, and whether
    `source` has ended."""
    moved = 0
    while True:
        filled, ended, short, _ = _relay_batch(source, sink, plaintext)
        moved += filled
        if short:
            return moved, ended


def _relay_batch(
    source: ssl.SSLObject,
    sink: ssl.SSLObject,
    plaintext: list[bytes] | None,
    writes: SocketWrites | None = None,
) -> tuple[int, bool, bool, bool]:
    """Decrypt at most a batch of what `source` has and re-encrypt it into `sink` (appended to
    `plaintext` unless None), through `writes` where `sink` writes its socket itself; the
    plaintext bytes moved, whether `source` has ended, whether it has no more for now (it
    ended, or wants more bytes to read), and whether it ended without a close_notify."""
    view = _batch_view()
    size = len(view)
    filled = 0
    ended = abrupt = False
    # The C object's read, called once a record (16 KiB): SSLObject.read adds a Python call.
    read: Callable[[int, memoryview], int] = source._sslobj.read  # type: ignore[attr-defined]
    while filled < size:
        try:
            # Into the reused buffer (read(n) would allocate n bytes for each record); with
            # a buffer, read returns a count.
            n = read(size - filled, view[filled:])
        except ssl.SSLWantReadError:
            break
        except ssl.SSLZeroReturnError:
            ended = True  # close_notify
            break
        except ssl.SSLEOFError:
            # A TCP FIN (or reset) without close_notify: relayed as an end all the same.
            ended = abrupt = True
            break
        if not n:
            ended = True  # close_notify (read returns 0 rather than raising)
            break
        filled += n
    if filled:
        batch = view[:filled]
        if writes is None:
            sink.write(batch)
        else:
            writes.write(batch)  # what the socket does not take now is held
        if plaintext is not None:
            plaintext.append(bytes(batch))
    return filled, ended, filled < size, abrupt


def _send_close_notify(obj: ssl.SSLObject) -> None:
    # The alert lands in the outgoing BIO; the peer's own close_notify is not waited for.
    with contextlib.suppress(ssl.SSLError):
        obj.unwrap()


def _ssl_text(exc: BaseException) -> str:
    """An ssl error as one short line (its reason, without the C source location)."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
