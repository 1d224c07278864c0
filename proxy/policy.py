"""How a listener finds its flows' upstreams (its mode), and who may use a proxy-mode listener
for what: pure rules, checked by the relay on each client and each destination."""

from __future__ import annotations

import enum
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .errors import FlowtapError
from .flow import is_decimal

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Mode(enum.StrEnum):
    """Where a listener's flows go: a fixed upstream, or what each client asks for."""

    REVERSE = "tcp"
    SOCKS5 = "socks5"
    HTTP = "http"
    TRANSPARENT = "transparent"

    @property
    def is_proxy(self) -> bool:
        return self is not Mode.REVERSE


# Cloud metadata services hand out credentials to whoever asks from inside the machine: a
# proxy must not relay to them unless told to (`--allow-to`).
DEFAULT_DENIED: tuple[Network, ...] = (
    ipaddress.IPv4Network("169.254.169.254/32"),
    ipaddress.IPv6Network("fd00:ec2::254/128"),
)


def parse_network(option: str, text: str) -> Network:
    """A CIDR (or a bare address, one host); FlowtapError naming `option` if malformed."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise FlowtapError(
            f"{option} {text!r} is not a network: write an address or a CIDR such as "
            "10.0.0.0/8 or ::1/128"
        ) from None


def parse_ports(option: str, text: str) -> tuple[tuple[int, int], ...]:
    """`80,443,8000-8999` as inclusive ranges; FlowtapError naming `option` if malformed."""
    ranges = []
    for part in text.split(","):
        low_text, dash, high_text = part.strip().partition("-")
        if not dash:
            high_text = low_text
        if not (is_decimal(low_text) and is_decimal(high_text)):
            raise FlowtapError(
                f"{option} {text!r}: {part.strip()!r} is not a port or a range: write "
                "e.g. 80,443,8000-8999"
            )
        low, high = int(low_text), int(high_text)
        if not 1 <= low <= high <= 65535:
            raise FlowtapError(f"{option} {text!r}: ports go from 1 to 65535, low to high")
        ranges.append((low, high))
    return tuple(ranges)


def parse_credentials(option: str, text: str) -> tuple[str, str]:
    """`USER:PASS`; FlowtapError naming `option` if there is no colon or no user."""
    user, colon, password = text.partition(":")
    if not colon or not user:
        raise FlowtapError(f"{option} wants USER:PASS, e.g. {option} alice:s3cret")
    return user, password


def read_credentials_file(path: str) -> dict[str, str]:
    """USER:PASS lines of `path` (blank lines and `#` comments skipped)."""
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except OSError as exc:
        raise FlowtapError(
            f"cannot read --auth-file {path}: {exc.strerror}: give a readable file"
        ) from None
    credentials = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, password = line.partition(":")
        if not colon or not user:
            raise FlowtapError(f"--auth-file {path} line {number}: write USER:PASS")
        credentials[user] = password
    return credentials


_V4_MAPPED = bytes(10) + b"\xff\xff"


def address_key(host: str) -> tuple[int, int] | None:
    """(IP version, the address as an integer) of an address literal, IPv4-mapped IPv6 as
    IPv4; None for a name. inet_pton, since `ipaddress` costs ~10x more, once per flow."""
    try:
        packed = socket.inet_pton(socket.AF_INET, host)
        return 4, int.from_bytes(packed)
    except OSError:
        pass
    try:
        packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    except OSError:
        return None
    if packed[:12] == _V4_MAPPED:
        return 4, int.from_bytes(packed[12:])
    return 6, int.from_bytes(packed)


def _net_key(net: Network) -> tuple[int, int, int]:
    return net.version, int(net.network_address), int(net.netmask)


def _inside(key: tuple[int, int], nets: Sequence[tuple[int, int, int]]) -> bool:
    version, value = key
    return any(v == version and value & mask == base for v, base, mask in nets)


@dataclass(slots=True)
class ProxyPolicy:
    """Who may use a proxy-mode listener, where it may go, and with which credentials."""

    credentials: Mapping[str, str] = field(default_factory=dict)
    allow_from: Sequence[Network] = ()
    deny_to: Sequence[Network] = DEFAULT_DENIED
    allow_to: Sequence[Network] = ()
    allow_ports: Sequence[tuple[int, int]] = ()
    handshake_timeout_s: float = 10.0
    # Clients refused by `allow_from`: counted, and said at most once a minute.
    refused_clients: int = 0
    _last_said: float = -3600.0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # The networks as integers, for a membership test per flow that costs microseconds.
    _allow_from: tuple[tuple[int, int, int], ...] = ()
    _deny_to: tuple[tuple[int, int, int], ...] = ()
    _allow_to: tuple[tuple[int, int, int], ...] = ()

    def __post_init__(self) -> None:
        self._allow_from = tuple(_net_key(net) for net in self.allow_from)
        self._deny_to = tuple(_net_key(net) for net in self.deny_to)
        self._allow_to = tuple(_net_key(net) for net in self.allow_to)

    def is_client_allowed(self, host: str) -> bool:
        """True when `allow_from` is empty or holds the client's address."""
        if not self._allow_from:
            return True
        key = address_key(host)
        return key is not None and _inside(key, self._allow_from)

    def refuse_client(self, host: str) -> None:
        """Count a refused client; log it, at most one line a minute."""
        now = time.monotonic()
        with self._lock:
            self.refused_clients += 1
            if now - self._last_said < 60:
                return
            self._last_said = now
            count = self.refused_clients
        log.warning(
            "refused a client from %s outside --allow-from (%d refused so far)", host, count
        )

    def destination_refusal(self, host: str, port: int) -> str | None:
        """Why the destination `host` (an address, or a name not yet resolved) and `port`
        are refused, or None if they are allowed."""
        if self.allow_ports and not any(low <= port <= high for low, high in self.allow_ports):
            return f"port {port} is not in --allow-ports"
        key = address_key(host)
        if key is None or not _inside(key, self._deny_to) or _inside(key, self._allow_to):
            return None
        for net in self.deny_to:
            if _inside(key, (_net_key(net),)):
                return f"{host} is in --deny-to {net}"
        return None  # pragma: no cover - _inside said one holds it
