"""Leaf certificates made and served inside the libssl that Python's ssl module runs on, and
TLS 1.3 cipher suites set, through OpenSSL calls Python's ssl does not offer
(SSL_use_certificate, X509_sign, SSL_CTX_set_ciphersuites).

With them, one server context holding the leaf key serves every name: OpenSSL signs a new
name's leaf in about 0.15 ms and a connection takes it in microseconds.
Without them, each name needs a context of its own, which OpenSSL 3.0 makes in about a
millisecond and a half (a new SSL_CTX, then the key through its decoders), and a leaf that
cryptography signed, which OpenSSL 3.0 takes a third of a millisecond to parse.
`binding()` is None where the library or the objects' layout cannot be confirmed (another
Python, an OpenSSL linked into `_ssl` statically): callers fall back.
"""

from __future__ import annotations

import ctypes
import functools
import os
import ssl
import sys
from collections.abc import Callable

# Where CPython keeps the OpenSSL pointers: PySSLContext is {PyObject_HEAD; SSL_CTX *ctx; ...}
# and PySSLSocket is {PyObject_HEAD; PyObject *Socket; SSL *ssl; PySSLContext *ctx; ...}
# (Modules/_ssl.c, unchanged since 3.7). Each read is checked before the pointer is used.
_HEAD_BYTES = object.__basicsize__
_POINTER_BYTES = ctypes.sizeof(ctypes.c_void_p)
_CONTEXT_CTX = _HEAD_BYTES
_SOCKET_SSL = _HEAD_BYTES + _POINTER_BYTES
_SOCKET_CONTEXT = _HEAD_BYTES + 2 * _POINTER_BYTES


_Bytes = ctypes.POINTER(ctypes.c_char_p)
# OpenSSL's numbers for what the signer names (stable ABI: obj_mac.h).
_EVP_PKEY_EC = 408
_EVP_PKEY_ED25519 = 1087
_NID_SUBJECT_ALT_NAME = 85
_BIO_NOCLOSE = 0
_SSL_OP_IGNORE_UNEXPECTED_EOF = 1 << 7
_SSL_CTRL_MODE = 33
_SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER = 0x2
_SSL_ERROR_WANT_WRITE = 3
_SSL_ERROR_SYSCALL = 5


class NativeCertificate:
    """A certificate in OpenSSL's memory (an X509), freed when this object goes."""

    __slots__ = ("_binding", "pointer")

    def __init__(self, pointer: int, binding: Binding) -> None:
        self.pointer = pointer
        self._binding = binding

    def der(self) -> bytes:
        """The certificate's DER encoding."""
        return self._binding.der(self)

    def __del__(self) -> None:
        # Connections that use it hold their own reference (SSL_use_certificate takes one).
        self._binding.x509_free(self.pointer)


class LeafSigner:
    """Signs leaf certificates inside OpenSSL after a template leaf (the CA's issuer name and
    the extensions every leaf carries but the subject alternative name), for the one leaf
    key: a new name then costs OpenSSL a signature and this setting up, about 0.15 ms, where
    signing with cryptography and then parsing in OpenSSL took about 0.45."""

    def __init__(
        self, binding: Binding, template_der: bytes, ca_key_der: bytes, leaf_key_der: bytes
    ) -> None:
        self._binding = binding
        self._template = self._ca_key = self._leaf_key = 0
        lib = binding.lib
        self._template = _parse(lib.d2i_X509, template_der)
        self._ca_key = _parse(lib.d2i_AutoPrivateKey, ca_key_der)
        # The leaf key as a legacy EC key: X509_set_pubkey encodes such a key directly, where
        # a provider's key takes OpenSSL 3.0 an encoder and a decoder per certificate.
        ec_key = _parse(lib.d2i_ECPrivateKey, leaf_key_der)
        self._leaf_key = lib.EVP_PKEY_new()
        if not self._leaf_key or lib.EVP_PKEY_assign(self._leaf_key, _EVP_PKEY_EC, ec_key) != 1:
            lib.EC_KEY_free(ec_key)
            raise ValueError("OpenSSL could not hold the leaf key")
        # Ed25519 signs without a separate digest; RSA and ECDSA sign a SHA-256 one.
        self._digest = (
            0 if lib.EVP_PKEY_get_id(self._ca_key) == _EVP_PKEY_ED25519 else lib.EVP_sha256()
        )
        self._extensions = [
            extension
            for index in range(lib.X509_get_ext_count(self._template))
            if lib.OBJ_obj2nid(
                lib.X509_EXTENSION_get_object(extension := lib.X509_get_ext(self._template, index))
            )
            != _NID_SUBJECT_ALT_NAME
        ]

    def sign(
        self, subject_der: bytes, san_der: bytes, serial: int, not_before_s: int, not_after_s: int
    ) -> NativeCertificate:
        """A leaf for the subject name and subjectAltName value given in DER, with `serial`
        and valid between the two times (seconds since the epoch), signed by the CA."""
        lib = self._binding.lib
        x509 = lib.X509_new()
        if not x509:
            raise MemoryError
        cert = NativeCertificate(x509, self._binding)  # frees it if a step below fails
        serial_bytes = serial.to_bytes((serial.bit_length() + 7) // 8, "big")
        subject = _parse(lib.d2i_X509_NAME, subject_der)
        try:
            ok = (
                lib.X509_set_version(x509, 2)
                and lib.ASN1_STRING_set(
                    lib.X509_get_serialNumber(x509), serial_bytes, len(serial_bytes)
                )
                and lib.X509_set_issuer_name(x509, lib.X509_get_issuer_name(self._template))
                and lib.X509_set_subject_name(x509, subject)
                and lib.ASN1_TIME_set(lib.X509_getm_notBefore(x509), not_before_s)
                and lib.ASN1_TIME_set(lib.X509_getm_notAfter(x509), not_after_s)
                and lib.X509_set_pubkey(x509, self._leaf_key)
            )
        finally:
            lib.X509_NAME_free(subject)
        octets = lib.ASN1_OCTET_STRING_new()
        san = 0
        try:
            ok = (
                ok
                and octets
                and lib.ASN1_OCTET_STRING_set(octets, san_der, len(san_der))
                and (
                    san := lib.X509_EXTENSION_create_by_NID(None, _NID_SUBJECT_ALT_NAME, 0, octets)
                )
                and lib.X509_add_ext(x509, san, -1)
                and all(lib.X509_add_ext(x509, ext, -1) for ext in self._extensions)
            )
        finally:
            lib.ASN1_OCTET_STRING_free(octets)
            lib.X509_EXTENSION_free(san)
        if not ok or self._binding.sign(x509, self._ca_key, self._digest) <= 0:
            raise ValueError("OpenSSL could not sign the leaf certificate")
        # OpenSSL decodes a certificate's extensions on its first use: here, off the relay's
        # thread when the name was prepared, rather than in its first handshake (about 20 us).
        lib.X509_get_extension_flags(x509)
        return cert

    def hold_key(self, context: ssl.SSLContext) -> None:
        """Make `context`, which holds the leaf key, hold it as the leaves carry it (a legacy
        EC key): OpenSSL then matches each leaf with it in a few microseconds, where a key of
        its providers' took about 60 more on every connection."""
        binding = self._binding
        ctx = binding.context_pointer(context)
        if binding.lib.SSL_CTX_use_PrivateKey(ctx, self._leaf_key) != 1:
            raise ssl.SSLError("the context's certificate is not for the leaf key")

    def __del__(self) -> None:
        lib = self._binding.lib
        lib.X509_free(self._template)
        lib.EVP_PKEY_free(self._ca_key)
        lib.EVP_PKEY_free(self._leaf_key)


class SocketWrites:
    """An SSL writing its records to its socket itself (`Binding.write_socket`): the bytes
    the socket has not taken yet, and the way back to its outgoing memory BIO."""

    __slots__ = ("_binding", "_memory", "_ssl", "held")

    def __init__(self, binding: Binding, ssl_pointer: int, memory_bio: int) -> None:
        self._binding = binding
        self._ssl = ssl_pointer
        self._memory = memory_bio
        self.held: bytearray | None = None
        """Plaintext whose records the socket has not all taken: written again by `flush`."""

    def write(self, data: memoryview) -> bool:
        """Encrypt `data` (writable) and send its records; whether the socket took them all
        (else a copy of `data` is held until `flush` sends the rest)."""
        if self._binding.write(self._ssl, data):
            return True
        self.held = bytearray(data)
        return False

    def flush(self) -> bool:
        """Send what is held (the socket has room again); whether nothing is held now."""
        held = self.held
        if held is None or self._binding.write(self._ssl, held):
            self.held = None
            return True
        return False

    def write_memory(self) -> None:
        """Write to the outgoing memory BIO again (nothing held), as before `write_socket`."""
        if self._memory:
            self._binding.lib.SSL_set0_wbio(self._ssl, self._memory)
            self._memory = 0

    def __del__(self) -> None:
        if self._memory:
            self._binding.lib.BIO_free(self._memory)


def _parse(function: Callable[..., int], der: bytes) -> int:
    """What an OpenSSL d2i_ function makes of `der` (ValueError if nothing)."""
    cursor = ctypes.c_char_p(der)
    pointer = function(None, ctypes.byref(cursor), len(der))
    if not pointer:
        raise ValueError(f"OpenSSL could not parse it ({function.__name__})")
    return pointer


_P = ctypes.c_void_p
_INT = ctypes.c_int
# The libssl and libcrypto calls used, with their result and argument types.
_SIGNATURES: dict[str, tuple[type | None, tuple[type, ...]]] = {
    "SSL_use_certificate": (_INT, (_P, _P)),
    "SSL_set_session_id_context": (_INT, (_P, ctypes.c_char_p, ctypes.c_uint)),
    "SSL_CTX_use_PrivateKey": (_INT, (_P, _P)),
    "SSL_get_SSL_CTX": (_P, (_P,)),
    "SSL_CTX_get_ssl_method": (_P, (_P,)),
    "SSL_CTX_set_ciphersuites": (_INT, (_P, ctypes.c_char_p)),
    "SSL_set_read_ahead": (None, (_P, _INT)),
    "SSL_set_default_read_buffer_len": (None, (_P, ctypes.c_size_t)),
    "SSL_set0_rbio": (None, (_P, _P)),
    "SSL_set0_wbio": (None, (_P, _P)),
    "SSL_get_wbio": (_P, (_P,)),
    "SSL_ctrl": (ctypes.c_long, (_P, _INT, ctypes.c_long, _P)),
    "SSL_write_ex": (_INT, (_P, _P, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t))),
    "SSL_get_error": (_INT, (_P, _INT)),
    "BIO_up_ref": (_INT, (_P,)),
    "BIO_free": (_INT, (_P,)),
    "SSL_shutdown": (_INT, (_P,)),
    "SSL_set_options": (ctypes.c_uint64, (_P, ctypes.c_uint64)),
    "ERR_clear_error": (None, ()),
    "BIO_new_socket": (_P, (_INT, _INT)),
    "TLS_server_method": (_P, ()),
    "TLS_client_method": (_P, ()),
    "d2i_X509": (_P, (_P, _Bytes, ctypes.c_long)),
    "i2d_X509": (_INT, (_P, _Bytes)),
    "X509_free": (None, (_P,)),
    "X509_new": (_P, ()),
    "X509_set_version": (_INT, (_P, ctypes.c_long)),
    "X509_get_serialNumber": (_P, (_P,)),
    "ASN1_STRING_set": (_INT, (_P, ctypes.c_char_p, _INT)),
    "X509_get_issuer_name": (_P, (_P,)),
    "X509_set_issuer_name": (_INT, (_P, _P)),
    "X509_set_subject_name": (_INT, (_P, _P)),
    "d2i_X509_NAME": (_P, (_P, _Bytes, ctypes.c_long)),
    "X509_NAME_free": (None, (_P,)),
    "X509_getm_notBefore": (_P, (_P,)),
    "X509_getm_notAfter": (_P, (_P,)),
    "ASN1_TIME_set": (_P, (_P, ctypes.c_int64)),
    "X509_set_pubkey": (_INT, (_P, _P)),
    "X509_get_ext_count": (_INT, (_P,)),
    "X509_get_ext": (_P, (_P, _INT)),
    "X509_EXTENSION_get_object": (_P, (_P,)),
    "OBJ_obj2nid": (_INT, (_P,)),
    "ASN1_OCTET_STRING_new": (_P, ()),
    "ASN1_OCTET_STRING_set": (_INT, (_P, ctypes.c_char_p, _INT)),
    "ASN1_OCTET_STRING_free": (None, (_P,)),
    "X509_EXTENSION_create_by_NID": (_P, (_P, _INT, _INT, _P)),
    "X509_EXTENSION_free": (None, (_P,)),
    "X509_add_ext": (_INT, (_P, _P, _INT)),
    "X509_get_extension_flags": (ctypes.c_uint32, (_P,)),
    "X509_sign": (_INT, (_P, _P, _P)),
    "EVP_sha256": (_P, ()),
    "d2i_AutoPrivateKey": (_P, (_P, _Bytes, ctypes.c_long)),
    "d2i_ECPrivateKey": (_P, (_P, _Bytes, ctypes.c_long)),
    "EC_KEY_free": (None, (_P,)),
    "EVP_PKEY_new": (_P, ()),
    "EVP_PKEY_assign": (_INT, (_P, _INT, _P)),
    "EVP_PKEY_get_id": (_INT, (_P,)),
    "EVP_PKEY_free": (None, (_P,)),
}


class Binding:
    """libssl's calls that Python's ssl lacks, from the very library its `_ssl` module uses."""

    def __init__(self, path: str) -> None:
        # Calls keep the GIL (PyDLL): each takes microseconds, and a thread that lets the GIL
        # go waits for it to come back. Signing lets it go (CDLL): an RSA CA key takes
        # a millisecond or more.
        self.lib = ctypes.PyDLL(path)
        unlocked = ctypes.CDLL(path)
        for name, (result, arguments) in _SIGNATURES.items():
            for library in (self.lib, unlocked):
                function = getattr(library, name)
                function.restype = result
                function.argtypes = arguments
        self.sign = unlocked.X509_sign
        self.x509_free = self.lib.X509_free
        # Writing records encrypts them and sends them: the GIL goes meanwhile, as it does in
        # SSLObject.write; errno says why a socket failed.
        self._write_ex = ctypes.CDLL(path, use_errno=True).SSL_write_ex
        self._write_ex.restype, self._write_ex.argtypes = _SIGNATURES["SSL_write_ex"]

    def certificate(self, der: bytes) -> NativeCertificate:
        """OpenSSL's parse of a DER certificate (ValueError if it is not one)."""
        return NativeCertificate(_parse(self.lib.d2i_X509, der), self)

    def der(self, cert: NativeCertificate) -> bytes:
        """The DER encoding of a certificate in OpenSSL's memory."""
        size = self.lib.i2d_X509(cert.pointer, None)
        if size <= 0:
            raise ValueError("OpenSSL could not encode the certificate")
        buffer = ctypes.create_string_buffer(size)
        cursor = ctypes.cast(ctypes.pointer(ctypes.c_void_p(ctypes.addressof(buffer))), _Bytes)
        self.lib.i2d_X509(cert.pointer, cursor)
        return buffer.raw

    def leaf_signer(
        self, template_der: bytes, ca_key_der: bytes, leaf_key_der: bytes
    ) -> LeafSigner:
        """A signer of leaves like the template (see LeafSigner), by the CA key (DER, PKCS#8)
        for the leaf key (DER, SEC1)."""
        return LeafSigner(self, template_der, ca_key_der, leaf_key_der)

    def use_certificate(self, obj: ssl.SSLObject, cert: NativeCertificate, scope: bytes) -> None:
        """Make `obj`, a server side made from a context that holds the key `cert` is for,
        present `cert` (before its handshake), and resume only sessions begun in `scope`
        (at most 32 bytes; OpenSSL's session id context)."""
        pointer = self._ssl_pointer(obj)
        if self.lib.SSL_use_certificate(pointer, cert.pointer) != 1:
            raise ssl.SSLError("the leaf certificate is not for the context's key")
        if self.lib.SSL_set_session_id_context(pointer, scope, len(scope)) != 1:
            raise ssl.SSLError("the session id context is too long")

    def read_ahead(self, obj: ssl.SSLObject, buffer_bytes: int) -> None:
        """Make `obj` (before its handshake) read as many bytes as its source has, up to
        `buffer_bytes`, into a buffer of that size, rather than a record's header and then
        its body, each read by itself."""
        pointer = self._ssl_pointer(obj)
        self.lib.SSL_set_default_read_buffer_len(pointer, buffer_bytes)
        self.lib.SSL_set_read_ahead(pointer, 1)

    def _socket_bio(self, fd: int) -> int:
        """A new socket BIO on `fd`, which it does not close."""
        bio = self.lib.BIO_new_socket(fd, _BIO_NOCLOSE)
        if not bio:
            raise MemoryError
        return int(bio)

    def read_socket(self, obj: ssl.SSLObject, fd: int) -> None:
        """Make `obj` read its records from the socket `fd` itself (which it does not close)
        rather than from its incoming memory BIO, now empty: no copy into and out of that."""
        pointer = self._ssl_pointer(obj)
        bio = self._socket_bio(fd)
        # The SSL owns the new BIO; the memory BIO it leaves is still the MemoryBIO's own.
        self.lib.SSL_set0_rbio(pointer, bio)
        # A FIN without close_notify ends the records as close_notify would, as the relay
        # takes it: else OpenSSL fails the connection and alerts a peer that only
        # half-closed and still reads the answer.
        self.lib.SSL_set_options(pointer, _SSL_OP_IGNORE_UNEXPECTED_EOF)

    def write_socket(self, obj: ssl.SSLObject, fd: int) -> SocketWrites:
        """Make `obj` write its records to the socket `fd` itself (which it does not close)
        rather than to its outgoing memory BIO, now empty: no copy into and out of that."""
        pointer = self._ssl_pointer(obj)
        bio = self._socket_bio(fd)
        memory = self.lib.SSL_get_wbio(pointer)
        # Kept for `SocketWrites.write_memory`: SSL_set0_wbio lets go of the SSL's reference.
        self.lib.BIO_up_ref(memory)
        self.lib.SSL_set0_wbio(pointer, bio)
        # A write the socket did not take whole is retried from a copy of its bytes.
        self.lib.SSL_ctrl(pointer, _SSL_CTRL_MODE, _SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER, None)
        return SocketWrites(self, pointer, memory)

    def write(self, pointer: int, data: bytearray | memoryview) -> bool:
        """SSL_write of `data` (writable, not empty) by the SSL at `pointer`: whether its
        records are all sent (else the socket is full, and the same bytes are to be written
        again once it has room); OSError if the socket failed, ssl.SSLError otherwise."""
        anchor = ctypes.c_char.from_buffer(data)
        written = ctypes.c_size_t()
        ctypes.set_errno(0)
        if self._write_ex(pointer, ctypes.addressof(anchor), len(data), ctypes.byref(written)):
            return True
        number = ctypes.get_errno()
        error = self.lib.SSL_get_error(pointer, 0)
        self.lib.ERR_clear_error()
        if error == _SSL_ERROR_WANT_WRITE:
            return False
        if error == _SSL_ERROR_SYSCALL and number:
            raise OSError(number, os.strerror(number))
        raise ssl.SSLError(f"OpenSSL could not write the records (SSL error {error})")

    def send_close_notify(self, obj: ssl.SSLObject) -> None:
        """Write `obj`'s close_notify alert, reading nothing (SSL_shutdown once)."""
        self.lib.SSL_shutdown(self._ssl_pointer(obj))
        self.lib.ERR_clear_error()

    def check(self, context: ssl.SSLContext) -> bool:
        """Whether the pointers read from `context` (a PROTOCOL_TLS_SERVER context) and from a
        server object made from it are that library's own."""
        try:
            ctx = self.context_pointer(context)
            obj = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
            return bool(self.lib.SSL_get_SSL_CTX(self._ssl_pointer(obj)) == ctx)
        except ssl.SSLError:
            return False

    def context_pointer(self, context: ssl.SSLContext) -> int:
        """The SSL_CTX of a PROTOCOL_TLS_SERVER or PROTOCOL_TLS_CLIENT context (SSLError if it
        is not where it should be)."""
        ctx = ctypes.c_void_p.from_address(id(context) + _CONTEXT_CTX).value
        lib = self.lib
        if not ctx or lib.SSL_CTX_get_ssl_method(ctx) not in (
            lib.TLS_server_method(),
            lib.TLS_client_method(),
        ):
            raise ssl.SSLError("unexpected layout of ssl contexts")
        return ctx

    def set_tls13_suites(self, context: ssl.SSLContext, suites: str) -> None:
        """Give `context` (server or client) the TLS 1.3 cipher suites `suites`, in that order
        (OpenSSL's colon-separated names; ssl.SSLError if it takes none of them), which
        Python's ssl cannot set."""
        if self.lib.SSL_CTX_set_ciphersuites(self.context_pointer(context), suites.encode()) != 1:
            raise ssl.SSLError(f"OpenSSL takes none of the TLS 1.3 suites {suites}")

    def _ssl_pointer(self, obj: ssl.SSLObject) -> int:
        sslobj = obj._sslobj  # type: ignore[attr-defined]
        address = id(sslobj)
        # The object's own context pointer is where it should be: so is its SSL pointer.
        if ctypes.c_void_p.from_address(address + _SOCKET_CONTEXT).value != id(sslobj.context):
            raise ssl.SSLError("unexpected layout of ssl objects")
        return ctypes.c_void_p.from_address(address + _SOCKET_SSL).value or 0


def _libssl_paths() -> list[str]:
    """The files named libssl mapped into this process (`_ssl`'s, once it is imported)."""
    paths: list[str] = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if "/libssl.so" in path and path not in paths:
                    paths.append(path)
    except OSError:
        return []
    return paths


@functools.cache
def binding() -> Binding | None:
    """The binding to `_ssl`'s libssl, or None where it cannot be confirmed."""
    if sys.implementation.name != "cpython":
        return None
    paths = _libssl_paths()
    if len(paths) != 1:
        return None  # none (OpenSSL linked statically) or several: which is `_ssl`'s is unsure
    try:
        found = Binding(paths[0])
    except (OSError, AttributeError):
        return None
    return found if found.check(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)) else None
