"""flowtap's certificate authority: made on first use, and the leaf certificates it signs."""

from __future__ import annotations

import collections
import contextlib
import datetime
import hashlib
import ipaddress
import os
import secrets
import ssl
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import FlowtapError
from .tls_ciphers import prefer_aes128
from .tls_native import LeafSigner, NativeCertificate, binding

CA_FILE = "flowtap-ca.pem"
"""The CA's private key and certificate, mode 0600, in the CA directory."""
CA_CERT_FILE = "flowtap-ca-cert.pem"
"""The CA's certificate alone: the file a user trusts."""
CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(days=397)
"""The longest validity browsers accept for a server certificate (CA/Browser Forum)."""
LEAF_BACKDATE = datetime.timedelta(hours=1)
"""How far before now a leaf starts: a client whose clock is a little behind still accepts it."""
DEFAULT_CACHE_SIZE = 4096
READY_CONTEXTS = 8
"""Server contexts holding the leaf key, made ahead off the handshake path for new names'
contexts of their own (`server_context`; the relay's path without the native binding)."""
MAX_PENDING_NAMES = 256
"""Names whose contexts `prepare` makes ahead at most, the oldest forgotten first."""
# How long a handshake waits for the CA's thread to finish what it makes before making it.
_PREPARE_WAIT_S = 5.0
# A key file that can never be opened (nothing lives under a character device).
_NO_KEY_FILE = "/dev/null/flowtap-no-key"

_SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# The attribute type of a common name (2.5.4.3), as DER.
_COMMON_NAME_OID = b"\x06\x03\x55\x04\x03"


def default_ca_dir() -> Path:
    """The per-user data directory that holds flowtap's CA: `$XDG_DATA_HOME/flowtap`, else
    `~/.local/share/flowtap`."""
    data_home = os.environ.get("XDG_DATA_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    base = Path(data_home) if os.path.isabs(data_home) else Path.home() / ".local" / "share"
    return base / "flowtap"


@dataclass(frozen=True)
class Leaf:
    """A certificate for one name or address, signed by the CA for the process's leaf key."""

    name: str
    cert: x509.Certificate
    cert_pem: bytes


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Recent(Generic[K, V]):
    """The `size` values last put or got, the least recently used one dropped first; safe to
    share between relay worker threads (what makes a value happens outside its lock)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)

    def keys(self) -> list[K]:
        """The keys, least recently used first."""
        with self._lock:
            return list(self._items)


Alpn = str | tuple[str, ...] | None
"""The ALPN protocol a server context selects, or those it selects from (its preference
first), or None for no ALPN."""


class CertificateAuthority:
    """A CA certificate and key that sign leaf certificates, cached per name (LRU)."""

    def __init__(
        self,
        cert: x509.Certificate,
        key: _SigningKey,
        path: Path,
        cert_file: Path | None,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self.cert = cert
        self.path = path
        """The file the CA's key and certificate were loaded from."""
        self.cert_file = cert_file
        """A file holding the CA certificate alone (flowtap's own CA), for clients to trust."""
        self.keylog_file: Path | None = None
        """Where the contexts made from now on append their session secrets (NSS key log)."""
        self._key = key
        self._cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        self._authority_key_identifier = (
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        )
        self._leaves: _Recent[str, Leaf] = _Recent(cache_size)
        self._contexts: _Recent[tuple[str, Alpn], ssl.SSLContext] = _Recent(cache_size)
        # One leaf key for the process's life, as mitmproxy has: it never leaves memory, no new
        # name waits for a key, and a context that holds it takes a new leaf's certificate
        # alone (see server_object, and _use_certificate without the native binding).
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_public_key = leaf_key.public_key()
        self._leaf_key_identifier = x509.SubjectKeyIdentifier.from_public_key(self._leaf_public_key)
        # SEC1 ("EC PRIVATE KEY"): OpenSSL 3 loads it in about half the time of PKCS#8.
        self._leaf_key_pem = leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        placeholder, key_pem = _self_signed(leaf_key), self._leaf_key_pem
        # The factory holds no reference to the CA: the thread that fills the pool must not
        # keep it alive.
        self._background = _Background(lambda: _keyed_context(placeholder, key_pem), READY_CONTEXTS)
        weakref.finalize(self, self._background.close)
        self._pending: dict[str, _Pending] = {}
        self._pending_lock = threading.Lock()
        # With the binding, OpenSSL signs each name's leaf and keeps it (cached), and one
        # context per ALPN choice holds the leaf key for every name's connections.
        self._native = binding()
        self._signer: LeafSigner | None = None
        if self._native is not None:
            try:
                self._signer = self._native.leaf_signer(
                    self._sign_leaf("flowtap.invalid").cert.public_bytes(
                        serialization.Encoding.DER
                    ),
                    key.private_bytes(
                        serialization.Encoding.DER,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    ),
                    leaf_key.private_bytes(
                        serialization.Encoding.DER,
                        serialization.PrivateFormat.TraditionalOpenSSL,
                        serialization.NoEncryption(),
                    ),
                )
            except ValueError:
                self._native = None  # a key OpenSSL will not take: cryptography signs
        self._native_leaves: _Recent[str, NativeCertificate] = _Recent(cache_size)
        self._keyed: _Recent[Alpn, ssl.SSLContext] = _Recent(64)
        self._placeholder = placeholder

    @property
    def cert_pem(self) -> bytes:
        return self._cert_pem

    @property
    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def fingerprint_sha256(self) -> str:
        """The certificate's SHA-256 fingerprint as `openssl x509 -fingerprint` prints it."""
        return self.cert.fingerprint(hashes.SHA256()).hex(":").upper()

    def leaf(self, name: str) -> Leaf:
        """The leaf certificate for a host name or an IP address, signed now or from the cache."""
        if self._signer is not None:
            native = self._native_leaves.get(name) or self._native_leaf(name)
            cert = x509.load_der_x509_certificate(native.der())
            return Leaf(name, cert, cert.public_bytes(serialization.Encoding.PEM))
        cached = self._leaves.get(name)
        if cached is not None:
            return cached
        leaf = self._sign_leaf(name)
        self._leaves.put(name, leaf)
        return leaf

    def prepare(self, name: str) -> None:
        """Make what a handshake for `name` needs ahead, unless it is made or under way: its
        leaf signed by OpenSSL, here and now (about 0.15 ms, which the relay spends once its
        ClientHello is sent, while the upstream answers); without the native binding, its
        server context, started on the CA's thread (the handshake that needs it,
        `server_object`, then waits only for what is left, if anything)."""
        if self._made().get(name) is not None:
            return
        if self._signer is not None:
            # The thread would hold the GIL for most of it, which the relay then waits for:
            # made on the relay's thread, in a moment it has nothing else to do, it costs less.
            with contextlib.suppress(ValueError):  # raised again where the leaf is needed
                self._native_leaf(name)
            return
        with self._pending_lock:
            if name in self._pending:
                return
            if len(self._pending) >= MAX_PENDING_NAMES:
                # Names asked for whose handshake never came (an upstream that failed, say).
                self._pending.pop(next(iter(self._pending)))
            pending = self._pending[name] = _Pending()
        self._background.run(lambda: self._make_pending(name, pending))

    def server_object(
        self, name: str, alpn: Alpn, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO
    ) -> ssl.SSLObject:
        """A server-side SSLObject on the BIOs that presents the leaf for `name` and selects
        `alpn` as `server_context` does: one context holds the leaf key for every name and the
        object gets its name's certificate alone, where OpenSSL lets flowtap set it."""
        native = self._native
        if native is None or self._signer is None:
            context = self.server_context(name, alpn)
            return context.wrap_bio(incoming, outgoing, server_side=True)
        cert = self._native_leaves.get(name) or self._native_leaf(name)
        obj = self._keyed_for(alpn).wrap_bio(incoming, outgoing, server_side=True)
        # A TLS 1.2 session (by its id or a ticket) resumes for the name it began with only:
        # every name shares the context, and RFC 6066 (3) has a server that is asked to
        # resume a session for another name make a full handshake instead.
        native.use_certificate(obj, cert, hashlib.sha256(name.encode()).digest())
        return obj

    def _native_leaf(self, name: str) -> NativeCertificate:
        """The leaf for `name` signed by OpenSSL (cached)."""
        signer = self._signer
        assert signer is not None
        common_name, san, not_before, not_after = self._leaf_fields(name)
        # DER built here: cryptography's objects took three times as long (20 against 7 us
        # here, the CPU's caches warm; 130 against 40 cold).
        subject = _der(
            0x30, _der(0x31, _der(0x30, _COMMON_NAME_OID + _der(0x0C, common_name.encode())))
        )
        general_name = _der(0x82, san.encode()) if isinstance(san, str) else _der(0x87, san.packed)
        cert = signer.sign(
            subject,
            _der(0x30, general_name),
            _serial_number(),
            int(not_before.timestamp()),
            int(not_after.timestamp()),
        )
        self._native_leaves.put(name, cert)
        return cert

    def _made(self) -> _Recent[str, NativeCertificate] | _Recent[str, Leaf]:
        """The cache of the leaves as the handshakes use them."""
        return self._leaves if self._signer is None else self._native_leaves

    def _keyed_for(self, alpn: Alpn) -> ssl.SSLContext:
        """The context holding the leaf key that selects `alpn`, shared by every name."""
        context = self._keyed.get(alpn)
        if context is None:
            context = _keyed_context(self._placeholder, self._leaf_key_pem)
            assert self._signer is not None
            self._signer.hold_key(context)
            self._configure(context, alpn)
            self._keyed.put(alpn, context)
        return context

    def _configure(self, context: ssl.SSLContext, alpn: Alpn) -> None:
        if alpn:
            context.set_alpn_protocols([alpn] if isinstance(alpn, str) else list(alpn))
        if self.keylog_file is not None:
            context.keylog_filename = str(self.keylog_file)

    def server_context(self, name: str, alpn: Alpn = None) -> ssl.SSLContext:
        """A server-side SSL context that presents the leaf for `name` and, when `alpn` is
        given, selects that protocol (the first of those) the client offers, if any (cached
        per name and ALPN)."""
        key = (name, alpn)
        cached = self._contexts.get(key)
        if cached is not None:
            return cached
        context = (self._claim(name) if self._signer is None else None) or self._new_context(name)
        self._configure(context, alpn)
        self._contexts.put(key, context)
        return context

    def _new_context(self, name: str) -> ssl.SSLContext:
        """A server context, without ALPN, that presents the leaf for `name`."""
        leaf = self.leaf(name)
        # The CA's certificate is not sent: clients trust it as an anchor, which TLS lets a
        # server leave out of the chain (RFC 8446, 4.4.2), and each certificate loaded costs
        # OpenSSL 3.0 about 0.1 ms.
        context = self._background.take()
        if context is not None:
            _use_certificate(context, leaf.cert_pem)
        else:
            context = _server_context()
            _load_chain_from_memory(context, leaf.cert_pem, self._leaf_key_pem)
        return context

    def _make_pending(self, name: str, pending: _Pending) -> None:
        """Make the context `prepare` asked for (on the CA's thread), unless a handshake
        that needed it first has made it itself."""
        with self._pending_lock:
            if pending.started:
                return
            pending.started = True
        try:
            pending.value = self._new_context(name)
        except (ValueError, OSError, ssl.SSLError):
            pass  # made again, and the error raised, by the handshake that needs it
        finally:
            pending.done.set()

    def _claim(self, name: str) -> ssl.SSLContext | None:
        """The context `prepare` made or is making for `name` (waiting for it), or None."""
        with self._pending_lock:
            pending = self._pending.pop(name, None)
            if pending is None:
                return None
            if not pending.started:
                # Still queued: making it here is sooner than waiting for those before it.
                pending.started = True
                return None
        pending.done.wait(_PREPARE_WAIT_S)
        return pending.value

    def cached_names(self) -> list[str]:
        """The names whose leaves are cached, least recently used first."""
        return self._made().keys()

    def _leaf_fields(
        self, name: str
    ) -> tuple[str, _Address | str, datetime.datetime, datetime.datetime]:
        """A leaf's common name, subject alternative name (an address, or a host name) and
        validity for `name` (ValueError if it is neither a host name nor an IP address)."""
        san: _Address | str
        try:
            san = ipaddress.ip_address(name)
        except ValueError:
            if not name or not name.isascii() or len(name) > 253:
                raise ValueError(f"{name!r} is not a host name or an IP address") from None
            san = name.lower()
        not_before = datetime.datetime.now(datetime.UTC) - LEAF_BACKDATE
        not_after = min(not_before + LEAF_VALIDITY, self.cert.not_valid_after_utc)
        # A common name is limited to 64 characters; the SAN is what clients check anyway.
        return name[:64], san, not_before, not_after

    def _sign_leaf(self, name: str) -> Leaf:
        """The leaf for `name` signed by cryptography: without the binding, and the template
        OpenSSL's leaves copy."""
        common_name, san, not_before, not_after = self._leaf_fields(name)
        general_name = x509.DNSName(san) if isinstance(san, str) else x509.IPAddress(san)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(self._leaf_public_key)
            .serial_number(_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([general_name]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True, key_cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(self._leaf_key_identifier, False)
            .add_extension(self._authority_key_identifier, False)
            .sign(self._key, _signature_hash(self._key))
        )
        return Leaf(name, cert, cert.public_bytes(serialization.Encoding.PEM))


class _Pending:
    """A name's server context being made on the CA's thread (without the native binding)."""

    __slots__ = ("done", "started", "value")

    def __init__(self) -> None:
        self.started = False
        """Whether a thread has begun making it (guarded by the CA's lock)."""
        self.value: ssl.SSLContext | None = None
        """The context, once `done`; None if it could not be made."""
        self.done = threading.Event()


class _Background:
    """The CA's own thread: it runs the jobs it is given (a name's server context, asked for
    at the ClientHello, without the native binding) and, once one was taken, keeps
    `size` contexts that hold the leaf key made ahead (OpenSSL does most of that work with
    the GIL released)."""

    def __init__(self, make: Callable[[], ssl.SSLContext], size: int) -> None:
        self._make = make
        self._size = size
        self._ready: collections.deque[ssl.SSLContext] = collections.deque()
        self._jobs: collections.deque[Callable[[], None]] = collections.deque()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        # The contexts are made ahead once one was taken: a CA whose connections get their
        # certificates through the native binding never needs them.
        self._taken = False

    def take(self) -> ssl.SSLContext | None:
        """A context made ahead, or None when none is ready (the thread makes another)."""
        with self._changed:
            self._start()
            self._taken = True
            context = self._ready.popleft() if self._ready else None
            self._changed.notify()
        return context

    def run(self, job: Callable[[], None]) -> None:
        """Run `job` on the thread, after the jobs given before it."""
        with self._changed:
            self._start()
            self._jobs.append(job)
            self._changed.notify()

    def close(self) -> None:
        """Stop the thread (the CA is gone)."""
        with self._changed:
            self._closed = True
            self._ready.clear()
            self._jobs.clear()
            self._changed.notify()

    def _start(self) -> None:
        if self._thread is None and not self._closed:
            # Started on first use: a CA that never serves a client makes no thread.
            self._thread = threading.Thread(target=self._loop, name="flowtap-leaves", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._changed:
                while (
                    not self._closed
                    and not self._jobs
                    and (not self._taken or len(self._ready) >= self._size)
                ):
                    self._changed.wait()
                if self._closed:
                    return
                job = self._jobs.popleft() if self._jobs else None
            if job is not None:
                job()
                del job  # it holds the CA, which the thread must not keep alive
                continue
            context = self._make()
            with self._changed:
                self._ready.append(context)


def _server_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    prefer_aes128(context)
    # No TLS 1.3 session tickets: a client that never reads them (redis-cli closes right
    # after its reply) would reset the connection on close, as unread data makes the
    # kernel do; resuming clients fall back to a full handshake, and each costs less.
    context.num_tickets = 0
    return context


def _keyed_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A server context holding the leaf key, with `cert_pem` (a certificate for that key)
    until a leaf's replaces it."""
    context = _server_context()
    _load_chain_from_memory(context, cert_pem, key_pem)
    return context


def _use_certificate(context: ssl.SSLContext, cert_pem: bytes) -> None:
    """Make a context that holds the leaf key present `cert_pem`, a certificate for that key,
    without loading the key again."""
    # Python's ssl has no call that sets a certificate alone: load_cert_chain loads the chain,
    # then the key file. OpenSSL keeps a context's key when a new certificate is for the same
    # key (SSL_CTX_use_certificate), so a key file that cannot be opened leaves the context
    # with the new certificate and its key, and skips OpenSSL 3.0's key decoder, about half a
    # millisecond a name (openssl/openssl#15199, #18814).
    # NotADirectoryError is the key file's, as meant; a certificate that does not load raises
    # ssl.SSLError.
    with contextlib.suppress(NotADirectoryError):
        _load_pem(context, cert_pem, _NO_KEY_FILE)


def _self_signed(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A certificate for `key`, signed by itself, that only carries the key into a context
    (a leaf's certificate replaces it before any client sees it)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flowtap leaf key")])
    cert = _self_issued(key, name, LEAF_VALIDITY).sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM)


def _self_issued(
    key: ec.EllipticCurvePrivateKey, name: x509.Name, validity: datetime.timedelta
) -> x509.CertificateBuilder:
    """A certificate of `name` for `key`, issued by `name` itself, valid from a little before
    now (as leaves are) for `validity`: for its caller to extend and sign with `key`."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial_number())
        .not_valid_before(now - LEAF_BACKDATE)
        .not_valid_after(now + validity)
    )


def load_or_create_ca(directory: Path | None = None) -> CertificateAuthority:
    """flowtap's own CA from `directory` (default: the per-user data dir), made there on first
    use with the directory 0700 and the key file 0600."""
    directory = default_ca_dir() if directory is None else directory
    key_path = directory / CA_FILE
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not key_path.exists():
            _create_ca_file(key_path)
        _check_private(directory, key_path)
        ca = _parse_ca_file(key_path, key_path.read_bytes(), cert_file=directory / CA_CERT_FILE)
        cert_path = directory / CA_CERT_FILE
        if not cert_path.exists() or cert_path.read_bytes() != ca.cert_pem:
            _write_atomically(cert_path, ca.cert_pem, 0o644)
    except OSError as exc:
        raise FlowtapError(
            f"cannot use the CA in {directory}: {exc.strerror or exc}; "
            "make the directory writable by you, or set XDG_DATA_HOME, or give --ca FILE"
        ) from None
    return ca


def load_ca_file(path: Path) -> CertificateAuthority:
    """A CA given by the user: one PEM file with its certificate and its private key."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FlowtapError(
            f"--ca {path}: cannot read it ({exc.strerror or exc}); "
            "give a readable PEM file holding the CA certificate and its private key"
        ) from None
    return _parse_ca_file(path, data, cert_file=None)


def _parse_ca_file(path: Path, data: bytes, cert_file: Path | None) -> CertificateAuthority:
    if cert_file is None:
        fix = "give a PEM file holding the CA certificate and its unencrypted private key"
        label = f"--ca {path}"
    else:
        fix = f"remove {path} and flowtap makes a new CA (to be trusted again)"
        label = f"the CA file {path}"
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise FlowtapError(f"{label}: no PEM certificate in it; {fix}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise FlowtapError(f"{label}: its private key is encrypted; {fix}") from None
    except (ValueError, UnsupportedAlgorithm):
        raise FlowtapError(f"{label}: no usable PEM private key in it; {fix}") from None
    if not isinstance(
        key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise FlowtapError(f"{label}: its key is {type(key).__name__}; use an RSA or EC key")
    if key.public_key() != cert.public_key():
        raise FlowtapError(f"{label}: the private key does not match the certificate; {fix}")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = constraints.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise FlowtapError(
            f"{label}: the certificate is not a CA (basicConstraints CA:TRUE); "
            "give a CA certificate"
        )
    try:
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        # Leaves name their issuer's key identifier; derive one for a CA made without it.
        cert = _with_subject_key_identifier(cert, key)
    return CertificateAuthority(cert, key, path, cert_file)


def _with_subject_key_identifier(cert: x509.Certificate, key: _SigningKey) -> x509.Certificate:
    """The same CA certificate re-signed with a subject key identifier (same key and name)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for extension in cert.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    builder = builder.add_extension(
        x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False
    )
    return builder.sign(key, _signature_hash(key))


def _create_ca_file(key_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    user = os.environ.get("USER") or str(os.getuid())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "flowtap"),
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"flowtap CA ({user}@{os.uname().nodename})"[:64]
            ),
        ]
    )
    cert = (
        _self_issued(key, name, CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(digital_signature=True, key_cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Another flowtap may make it at the same moment: the first file wins, both use it.
    with contextlib.suppress(FileExistsError):
        _write_atomically(
            key_path, key_pem + cert.public_bytes(serialization.Encoding.PEM), 0o600, replace=False
        )


def _write_atomically(path: Path, data: bytes, mode: int, replace: bool = True) -> None:
    """Write `data` to `path` with `mode` so that no reader ever sees it half written."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            os.fchmod(file.fileno(), mode)  # the umask may have taken bits from `mode`
        if replace:
            os.replace(temp, path)
        else:
            os.link(temp, path)  # fails if the file exists: the first writer wins
    finally:
        temp.unlink(missing_ok=True)


def _check_private(directory: Path, key_path: Path) -> None:
    """Refuse a CA key that others can read: it would let them impersonate every site."""
    key_mode = key_path.stat().st_mode & 0o777
    if key_mode & 0o077:
        raise FlowtapError(
            f"the CA key {key_path} is readable by others (mode {key_mode:04o}); "
            f"chmod 600 {key_path}"
        )
    dir_stat = directory.stat()
    if dir_stat.st_mode & 0o022:
        raise FlowtapError(
            f"the CA directory {directory} is writable by others; chmod 700 {directory}"
        )


def _load_chain_from_memory(context: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """Load a certificate chain and key into `context` without writing the key to a disk."""
    _load_pem(context, key_pem + chain_pem)


def _load_pem(context: ssl.SSLContext, pem: bytes, keyfile: str | None = None) -> None:
    """`context.load_cert_chain` of `pem` (and `keyfile`): Python's ssl reads certificates
    and keys only from paths, so `pem` goes through an anonymous memory file."""
    fd = os.memfd_create("flowtap-leaf", os.MFD_CLOEXEC)
    try:
        os.write(fd, pem)
        context.load_cert_chain(f"/proc/self/fd/{fd}", keyfile)
    finally:
        os.close(fd)


def _der(tag: int, body: bytes) -> bytes:
    """A DER element: `tag`, the length of `body` (under 64 KiB), then `body`."""
    size = len(body)
    if size < 0x80:
        return bytes((tag, size)) + body
    if size < 0x100:
        return bytes((tag, 0x81, size)) + body
    return bytes((tag, 0x82)) + size.to_bytes(2, "big") + body


def _key_usage(digital_signature: bool, key_cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _signature_hash(key: _SigningKey) -> hashes.SHA256 | None:
    # Ed25519 signs without a separate hash; RSA and ECDSA sign a SHA-256 digest.
    return (
        None
        if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
        else hashes.SHA256()
    )


def _serial_number() -> int:
    # RFC 5280: positive, at most 20 octets; 159 random bits keep it both.
    return secrets.randbits(159) | 1
