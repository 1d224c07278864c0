"""Give one server-side `ssl.SSLObject` its own certificate, through the libssl that Python's
ssl module runs on: OpenSSL has the call (SSL_use_certificate), Python's ssl does not.

With it, one server context holding the leaf key serves every name, and a connection takes
its name's certificate in microseconds; without it, each name needs a context of its own,
which OpenSSL 3.0 makes in about a millisecond and a half (a new SSL_CTX, then the key through
its decoders). `binding()` is None where the library or the objects' layout cannot be
confirmed (another Python, an OpenSSL linked into `_ssl` statically): callers fall back.
"""

from __future__ import annotations

import ctypes
import functools
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


class NativeCertificate:
    """A certificate parsed by OpenSSL (an X509), freed when this object goes."""

    __slots__ = ("_free", "pointer")

    def __init__(self, pointer: int, free: Callable[[int], None]) -> None:
        self.pointer = pointer
        self._free = free

    def __del__(self) -> None:
        # Connections that use it hold their own reference (SSL_use_certificate takes one).
        self._free(self.pointer)


class Binding:
    """libssl's calls that Python's ssl lacks, from the very library its `_ssl` module uses."""

    def __init__(self, library: ctypes.CDLL, unlocked: ctypes.CDLL) -> None:
        # Calls on the relay's thread keep the GIL (PyDLL): each takes microseconds, and a
        # thread that lets the GIL go waits for it to come back. Parsing a certificate takes
        # OpenSSL 3.0 a third of a millisecond and lets it go (CDLL), made off the relay's thread.
        self._d2i_x509 = unlocked.d2i_X509
        self._d2i_x509.argtypes = (
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_char_p),
            ctypes.c_long,
        )
        self._d2i_x509.restype = ctypes.c_void_p
        self._x509_free = library.X509_free
        self._x509_free.argtypes = (ctypes.c_void_p,)
        self._x509_free.restype = None
        self._use_certificate = library.SSL_use_certificate
        self._use_certificate.argtypes = (ctypes.c_void_p, ctypes.c_void_p)
        self._use_certificate.restype = ctypes.c_int
        self._get_ssl_ctx = library.SSL_get_SSL_CTX
        self._get_ssl_ctx.argtypes = (ctypes.c_void_p,)
        self._get_ssl_ctx.restype = ctypes.c_void_p
        self._ctx_method = library.SSL_CTX_get_ssl_method
        self._ctx_method.argtypes = (ctypes.c_void_p,)
        self._ctx_method.restype = ctypes.c_void_p
        self._server_method = library.TLS_server_method
        self._server_method.argtypes = ()
        self._server_method.restype = ctypes.c_void_p

    def certificate(self, der: bytes) -> NativeCertificate:
        """OpenSSL's parse of a DER certificate (ValueError if it is not one)."""
        cursor = ctypes.c_char_p(der)
        pointer = self._d2i_x509(None, ctypes.byref(cursor), len(der))
        if not pointer:
            raise ValueError("OpenSSL could not parse the certificate")
        return NativeCertificate(pointer, self._x509_free)

    def use_certificate(self, obj: ssl.SSLObject, cert: NativeCertificate) -> None:
        """Make `obj`, a server side made from a context that holds the key `cert` is for,
        present `cert` (before its handshake)."""
        ssl_pointer = self._ssl_pointer(obj)
        if self._use_certificate(ssl_pointer, cert.pointer) != 1:
            raise ssl.SSLError("the leaf certificate is not for the context's key")

    def check(self, context: ssl.SSLContext) -> bool:
        """Whether the pointers read from `context` (a PROTOCOL_TLS_SERVER context) and from a
        server object made from it are that library's own."""
        ctx = _context_pointer(context)
        if not ctx or self._ctx_method(ctx) != self._server_method():
            return False
        obj = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
        try:
            return bool(self._get_ssl_ctx(self._ssl_pointer(obj)) == ctx)
        except ssl.SSLError:
            return False

    def _ssl_pointer(self, obj: ssl.SSLObject) -> int:
        sslobj = obj._sslobj  # type: ignore[attr-defined]
        address = id(sslobj)
        # The object's own context pointer is where it should be: so is its SSL pointer.
        if ctypes.c_void_p.from_address(address + _SOCKET_CONTEXT).value != id(sslobj.context):
            raise ssl.SSLError("unexpected layout of ssl objects")
        return ctypes.c_void_p.from_address(address + _SOCKET_SSL).value or 0


def _context_pointer(context: ssl.SSLContext) -> int:
    return ctypes.c_void_p.from_address(id(context) + _CONTEXT_CTX).value or 0


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
        found = Binding(ctypes.PyDLL(paths[0]), ctypes.CDLL(paths[0]))
    except (OSError, AttributeError):
        return None
    return found if found.check(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)) else None
