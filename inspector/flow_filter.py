"""Filter expressions for the flow table: which flows a user wants to see.

An expression is words separated by spaces, all of which must match a flow:
`port:N` (client or server port), `host:TEXT` (in an address), `state:TEXT` (state or close
reason), `proto:TEXT` (protocol or transport), `has:TEXT` (in the payload), `re:REGEX`
(payload regex; write a space as \\s), and any other word, found in the row's text
(addresses, state, summary).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from flowtap.proxy.errors import FlowtapError

from .store import FlowRecord, FlowStore

Test = Callable[[FlowRecord, FlowStore], bool]


@dataclass(frozen=True)
class FlowFilter:
    """A parsed filter expression; `matches` answers for one flow."""

    text: str
    tests: tuple[Test, ...]
    reads_payload: bool

    def matches(self, record: FlowRecord, store: FlowStore) -> bool:
        return all(test(record, store) for test in self.tests)


def _row_text(record: FlowRecord) -> str:
    flow = record.flow
    return (
        f"{flow.id} {flow.client} {flow.server} {flow.transport} {record.state_text} "
        f"{record.summary.protocol} {record.summary.headline}"
    ).lower()


def _port(value: str) -> Test:
    if not value.isdigit():
        raise FlowtapError(f"port:{value} is not a port number: write port:8080")
    port = int(value)
    return lambda r, s: port in (r.flow.client.port, r.flow.server.port)


def _contains(getter: Callable[[FlowRecord], str], value: str) -> Test:
    needle = value.lower()
    return lambda r, s: needle in getter(r).lower()


def _payload(pattern: re.Pattern[bytes]) -> Test:
    return lambda r, s: s.contains(r.id, pattern)


def parse_filter(text: str) -> FlowFilter:
    """Parse a filter expression; FlowtapError names a malformed word and how to fix it."""
    tests: list[Test] = []
    reads_payload = False
    for word in text.split():
        key, sep, value = word.partition(":")
        key = key.lower() if sep else ""
        if sep and not value:
            raise FlowtapError(f"{word!r} has nothing after the colon: write {key}:VALUE")
        if key == "port":
            tests.append(_port(value))
        elif key in ("host", "addr"):
            tests.append(_contains(lambda r: f"{r.flow.client} {r.flow.server}", value))
        elif key == "state":
            tests.append(_contains(lambda r: f"{r.flow.state} {r.state_text}", value))
        elif key == "proto":
            tests.append(_contains(lambda r: f"{r.summary.protocol} {r.flow.transport}", value))
        elif key == "has":
            reads_payload = True
            tests.append(_payload(re.compile(re.escape(value.encode()), re.IGNORECASE)))
        elif key == "re":
            reads_payload = True
            try:
                pattern = re.compile(value.encode())
            except re.error as exc:
                raise FlowtapError(f"re:{value} is not a valid regex ({exc})") from None
            tests.append(_payload(pattern))
        else:
            tests.append(_contains(_row_text, word))
    return FlowFilter(text=text, tests=tuple(tests), reads_payload=reads_payload)
