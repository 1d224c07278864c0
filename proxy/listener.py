"""Listening sockets: what to listen on, where its flows go, and binding with clear errors."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass

from .errors import FlowtapError
from .flow import Address, Transport
from .policy import Mode, ProxyPolicy


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    """One `--listen` with its `--upstream` (none in a proxy mode, whose clients say where
    they go, within `policy`)."""

    listen: Address
    upstream: Address | None
    transport: Transport = Transport.TCP
    # SO_REUSEPORT: several processes listen on one port and the kernel spreads clients.
    reuse_port: bool = False
    mode: Mode = Mode.REVERSE
    policy: ProxyPolicy | None = None


@dataclass(slots=True)
class BoundListener:
    """A listening socket with where its flows go."""

    spec: ListenerSpec
    sock: socket.socket
    address: Address
    # A proxy-mode listener has none: each client says where it goes.
    upstream_family: int
    upstream_sockaddr: object
    upstream: Address | None

    def describe(self) -> str:
        """The `listening ...` line the CLI prints once the listener is ready."""
        if self.spec.mode.is_proxy:
            # Written as --listen takes it: `transparent:udp` is the one proxy mode over UDP.
            udp = ":udp" if self.spec.transport is Transport.UDP else ""
            return f"listening {self.spec.mode}{udp} {self.address} -> *"
        return f"listening {self.spec.transport} {self.address} -> {self.spec.upstream}"


# sockaddr_un holds 108 bytes including the terminating NUL.
_MAX_UNIX_PATH_BYTES = 107


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
        size = len(os.fsencode(address.path))
        if size > _MAX_UNIX_PATH_BYTES:
            raise FlowtapError(
                f"the unix socket path {address.path!r} is {size} bytes, longer than the "
                f"{_MAX_UNIX_PATH_BYTES} the system allows: use a shorter path"
            )
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
    if family == socket.AF_UNIX:
        if spec.reuse_port:
            raise FlowtapError(
                f"--reuse-port does not apply to {spec.listen}: drop it, or listen on HOST:PORT"
            )
        remove_stale_unix_socket(str(sockaddr))
    sock = socket.socket(family, kind)
    try:
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if spec.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)  # type: ignore[arg-type]
        if kind == socket.SOCK_STREAM:
            if family != socket.AF_UNIX:
                # Accepted sockets inherit it (Linux): no setsockopt per client.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise _bind_error(spec, exc) from None
    sock.setblocking(False)
    return sock


def remove_stale_unix_socket(path: str) -> None:
    """Remove the socket file at `path` if nothing listens on it; FlowtapError if something does.

    A socket file outlives a process that was killed; like servers do, try to connect to tell
    a stale one from a live one, and never remove anything that is not a socket.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise FlowtapError(f"cannot inspect {path}: {exc.strerror}: pick another path") from None
    if not stat.S_ISSOCK(mode):
        raise FlowtapError(
            f"{path} exists and is not a socket: remove it yourself or listen on another path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        pass  # nothing listens: stale
    except OSError as exc:
        if exc.errno == errno.EPROTOTYPE:
            raise FlowtapError(
                f"unix:{path} is in use by a datagram socket of another program: stop it or "
                "pick another path"
            ) from None
        raise FlowtapError(
            f"cannot tell whether unix:{path} is in use ({exc.strerror or exc}): remove it "
            "yourself if it is stale, or pick another path"
        ) from None
    else:
        raise FlowtapError(
            f"unix:{path} is in use: another program accepts connections on it; stop it or "
            "pick another path"
        )
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise FlowtapError(
            f"cannot remove the stale socket {path}: {exc.strerror}: remove it yourself or "
            "pick another path"
        ) from None


def _bind_error(spec: ListenerSpec, exc: OSError) -> FlowtapError:
    where = str(spec.listen)
    if spec.listen.path is not None and exc.errno == errno.ENOENT:
        return FlowtapError(
            f"cannot listen on {where}: the directory {os.path.dirname(spec.listen.path)!r} "
            "does not exist: create it or pick another path"
        )
    if exc.errno == errno.EADDRINUSE:
        if spec.listen.is_unix:
            return FlowtapError(f"{where} is in use by another program: pick another path")
        if spec.reuse_port:
            return FlowtapError(
                f"port {spec.listen.port} is in use on {spec.listen.host} by a program that "
                "does not share it: pick another port (every sharer needs --reuse-port)"
            )
        return FlowtapError(
            f"port {spec.listen.port} is in use on {spec.listen.host}: "
            f"pick another port, or :0 for a free one"
        )
    if exc.errno == errno.EACCES and spec.listen.is_unix:
        return FlowtapError(
            f"no permission to create {where}: pick a path in a directory you can write"
        )
    if exc.errno == errno.EACCES:
        return FlowtapError(
            f"no permission to listen on {where}: use a port above 1023 or run with privileges"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return FlowtapError(
            f"{spec.listen.host} is not an address of this machine: listen on 127.0.0.1 or [::1]"
        )
    return FlowtapError(f"cannot listen on {where}: {exc.strerror or exc}")


def bound_address(sock: socket.socket, spec: ListenerSpec) -> Address:
    """The address `sock` really listens on (port 0 replaced by the port the kernel picked)."""
    if spec.listen.is_unix:
        return spec.listen
    name = sock.getsockname()
    return Address(host=spec.listen.host, port=int(name[1]))
