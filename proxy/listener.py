"""Listening sockets: what to listen on, where its flows go, and binding with clear errors."""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass

from .errors import FlowtapError
from .flow import Address, Transport


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    """One `--listen` with its `--upstream`."""

    listen: Address
    upstream: Address
    transport: Transport = Transport.TCP


def is_loopback(address: Address) -> bool:
    if address.is_unix:
        return True
    if address.host == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.host).is_loopback
    except ValueError:
        return False


def resolve(address: Address, transport: Transport = Transport.TCP) -> tuple[int, object]:
    """The socket family and sockaddr for `address`; raise FlowtapError if it cannot resolve."""
    if address.path is not None:
        return socket.AF_UNIX, address.path
    kind = socket.SOCK_DGRAM if transport is Transport.UDP else socket.SOCK_STREAM
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=kind)
    except socket.gaierror as exc:
        raise FlowtapError(
            f"cannot resolve {address.host!r} ({exc.strerror}): use an IP address or a known host"
        ) from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def bind(spec: ListenerSpec, *, backlog: int = 4096) -> socket.socket:
    """A non-blocking socket listening on `spec.listen`; raise FlowtapError if it cannot bind."""
    family, sockaddr = resolve(spec.listen, spec.transport)
    kind = socket.SOCK_DGRAM if spec.transport is Transport.UDP else socket.SOCK_STREAM
    sock = socket.socket(family, kind)
    try:
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)  # type: ignore[arg-type]
        if kind == socket.SOCK_STREAM:
            sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise _bind_error(spec, exc) from None
    sock.setblocking(False)
    return sock


def _bind_error(spec: ListenerSpec, exc: OSError) -> FlowtapError:
    where = str(spec.listen)
    if exc.errno == errno.EADDRINUSE:
        if spec.listen.is_unix:
            return FlowtapError(f"{where} is in use by another program: pick another path")
        return FlowtapError(
            f"port {spec.listen.port} is in use on {spec.listen.host}: "
            f"pick another port, or :0 for a free one"
        )
    if exc.errno == errno.EACCES:
        return FlowtapError(
            f"no permission to listen on {where}: use a port above 1023 or run with privileges"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return FlowtapError(
            f"{spec.listen.host} is not an address of this machine: listen on 127.0.0.1 or [::1]"
        )
    return FlowtapError(f"cannot listen on {where}: {exc.strerror}")


def bound_address(sock: socket.socket, spec: ListenerSpec) -> Address:
    """The address `sock` really listens on (port 0 replaced by the port the kernel picked)."""
    if spec.listen.is_unix:
        return spec.listen
    name = sock.getsockname()
    return Address(host=spec.listen.host, port=int(name[1]))
