"""Command-line option values, each checked against its accepted range when the line is parsed.

Every rejected value gets a message of one shape, built by `out_of_range`: the option's value
and what the option accepts (`'inf' is not a number of seconds between 0.001 and 86400`);
the parser prefixes the option's name. A value the relay or a player computes with is thus
finite and bounded before any socket is opened.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass

from flowtap.proxy.errors import FlowtapError
from flowtap.proxy.flow import Address

# Digits beyond these are out of any range here; int() is not even asked (it refuses
# thousands of digits with an error of its own).
_MAX_DIGITS = 30
_WHOLE = re.compile(r"\s*\+?[0-9]+\s*", re.ASCII)

DAY_S = 86_400.0
YEAR_S = 365 * DAY_S


def _number_text(value: float) -> str:
    """A bound as a person writes it: 86400, 0.001, 1000000."""
    return str(int(value)) if value == int(value) else repr(value)


def out_of_range(text: str, noun: str, low: float, high: float, zero: str | None = None) -> str:
    """The one message for a value outside [low, high] (or 0, when `zero` says what 0 means)."""
    also = f" (or 0: {zero})" if zero else ""
    return f"{text!r} is not {noun} between {_number_text(low)} and {_number_text(high)}{also}"


@dataclass(frozen=True, slots=True)
class Number:
    """An argparse type: a finite number in [low, high], or 0 where `zero` gives 0 a meaning."""

    noun: str
    low: float
    high: float
    zero: str | None = None
    whole: bool = False

    def __call__(self, text: str) -> float:
        value = self._parse(text)
        if value is None or not (self.low <= value <= self.high or (self.zero and value == 0)):
            raise argparse.ArgumentTypeError(
                out_of_range(text, self.noun, self.low, self.high, self.zero)
            )
        return value

    def _parse(self, text: str) -> float | None:
        if self.whole:
            if not _WHOLE.fullmatch(text) or len(text.strip()) > _MAX_DIGITS:
                return None
            return int(text)
        try:
            value = float(text)
        except ValueError:
            return None
        return value if math.isfinite(value) else None


def count(noun: str, low: int, high: int) -> Number:
    """A whole-number option in [low, high]."""
    return Number(noun, low, high, whole=True)


def seconds(low: float, high: float, zero: str | None = None) -> Number:
    """A duration option in seconds."""
    return Number("a number of seconds", low, high, zero)


CONNECT_TIMEOUT = seconds(0.001, DAY_S)
HANDSHAKE_TIMEOUT = seconds(0.001, DAY_S)
TURN_TIMEOUT = seconds(0.001, DAY_S)
# 0 means never; past a year a timeout is the same as never, so longer ones are refused.
IDLE_TIMEOUT = seconds(0.001, YEAR_S, zero="never")
# 0 closes the open flows at once.
GRACE = seconds(0.0, DAY_S)
BUSY_POLL_US = Number("a number of microseconds", 0.0, 1_000_000.0)
SPEED = Number("a speed factor", 0.001, 1_000_000.0)
# Relay threads share one GIL, so past a few they only contend for it; each costs an epoll
# and an eventfd descriptor, a receive buffer and a thread. 64 is far past any gain and far
# below the descriptors a process has (the flows need those).
WORKERS = count("a number of relay threads", 1, 64)
CONCURRENCY = count("a number of flows at once", 1, 10_000)
PCAP_MAX_SIZE_MB = count("a number of megabytes", 1, 1_000_000)
PCAP_MAX_FILES = count("a number of files", 1, 100_000)
UDP_MAX_SESSIONS = count("a number of sessions", 1, 1_000_000)
FLOW_ID = count("a flow number", 1, 1_000_000_000)


def address(text: str) -> str:
    """An argparse type for HOST:PORT, [V6]:PORT, PORT or unix:PATH (kept as text)."""
    try:
        Address.parse(text)
    except FlowtapError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def listen_address(text: str) -> str:
    """An argparse type for `--listen`: an address, optionally prefixed by its transport or
    mode (`tcp:`, `udp:`, `socks5:`, `http:`, `transparent:`, `transparent:udp:`)."""
    for prefix in (
        "tcp:",
        "udp:",
        "socks5:",
        "http:",
        "transparent:udp:",
        "transparent:tcp:",
        "transparent:",
    ):
        if text.startswith(prefix):
            address(text[len(prefix) :])
            return text
    return address(text)


def peer_address(text: str) -> str:
    """An argparse type for an address flowtap connects to: port 0 is refused."""
    parsed = Address.parse(address(text))
    if not parsed.is_unix and parsed.port == 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} has port 0, where nothing listens; give the server's port"
        )
    return text
