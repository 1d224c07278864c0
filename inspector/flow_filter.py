"""The one filter language: which flows a user picks in show, replay, serve, run and the TUI.

Pure, no I/O, in the manner of h11: `parse_filter(text)` tokenizes and parses an expression
by recursive descent into a small tree of frozen dataclasses, and `FlowFilter` evaluates it
over what flowtap knows about a flow (`FlowFacts`) and, only when the expression asks for
payload, over the flow's reassembled bytes, streamed chunk by chunk (`PayloadScan`): no flow
is ever held whole, and a `contains` that straddles two chunks still matches.

The grammar (keywords are case-insensitive; juxtaposition means `and`, as in tcpdump's
`tcp port 80`):

    expr    := or
    or      := and (("or" | "||") and)*
    and     := unary (["and" | "&&"] unary)*
    unary   := ("not" | "!") unary | "(" expr ")" | term
    term    := "tcp" | "udp" | "unix" | "ip" | "ip6" | "tls"
             | ["src" | "dst"] ("port" [OP] N | "portrange" A-B | "host" [OP] ADDR | "net" CIDR)
             | ("state" | "reason" | "proto" | "sni") [OP] WORD
             | ("bytes" | "up" | "down") [OP] SIZE | "duration" [OP] TIME | "id" [OP] N
             | ["up" | "down" | "frame" | "tcp.payload" | ...] ("contains" STRING | "matches" /RE/)
             | WIRESHARK-FIELD OP VALUE        (tcp.port, ip.addr, ip.src, ...)
             | WORD | STRING                   (a substring of the flow's row)

What each term needs (`Stage`): the flow's endpoints are known when it opens; its state,
reason, byte counts and duration when it ends; `proto`, `sni` and bare words need its first
bytes (the summary); `contains` and `matches` its payload. `tls` and `sni` read the flow's TLS
facts first (on its end, when the relay intercepted or passed TLS through: an intercepted
flow's bytes are plaintext, its ClientHello is gone) and its first bytes otherwise.
"""

from __future__ import annotations

import enum
import ipaddress
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar

import stringzilla

from flowtap.proxy.errors import FlowtapError
from flowtap.proxy.flow import Address, CloseReason, Direction, Flow, Transport

from .summary import HEAD_BYTES, Summary, summarize

# A SIMD substring search: `contains` reads every byte of a flow that lacks the needle, and
# bytes.find (about 3 GB/s here) would cost more than reading the capture does.
_find: Callable[[bytes | memoryview, bytes], int] = stringzilla.find

REGEX_OVERLAP_BYTES = 8192
"""A `matches` regex sees a stream in windows that overlap by this much: a match longer than
this that straddles two chunks may be missed (a `contains` never is)."""

STATES = ("connecting", "open", "half-closed", "closed", "reset")
PROTOCOLS = ("http", "tls", "dns", "redis", "text", "binary")
_RESETS = frozenset({CloseReason.CLIENT_RESET, CloseReason.SERVER_RESET})


class Stage(enum.IntEnum):
    """When a term can be decided: what of a flow it reads."""

    OPEN = 0  # endpoints, transport, id
    END = 1  # state, reason, byte counts, duration
    HEAD = 2  # the summary of the first bytes (proto, sni, bare words)
    PAYLOAD = 3  # every byte (contains, matches)


class FilterError(FlowtapError):
    """A malformed expression: where (1-based column) and what was expected."""

    def __init__(self, text: str, column: int, expected: str) -> None:
        self.text = text
        self.column = column
        self.expected = expected
        super().__init__(f"column {column}: {expected}")

    def for_option(self, option: str) -> FlowtapError:
        """The one-line error a command prints, e.g. `--filter 'port x': column 6: ...`."""
        return FlowtapError(f"{option} {self.text!r}: {self}")


# -- what flowtap knows about a flow ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FlowFacts:
    """What a filter reads of one flow besides its payload; `summary` None: not known yet."""

    flow: Flow
    bytes_up: int
    bytes_down: int
    duration_s: float | None
    summary: Summary | None = None

    @classmethod
    def of(cls, flow: Flow, summary: Summary | None = None) -> FlowFacts:
        return cls(flow, flow.bytes_up, flow.bytes_down, flow.duration_s, summary)

    @property
    def row_text(self) -> str:
        """The text a bare word is looked for in (lower case): addresses, state, summary."""
        flow = self.flow
        summary = self.summary
        parts = [str(flow.id), str(flow.client), str(flow.server), str(flow.transport)]
        if flow.requested is not None:
            parts.append(flow.requested.label)
        parts.append(str(flow.state))
        if flow.reason is not None:
            parts.append(str(flow.reason))
        if summary is not None:
            parts += [summary.protocol, summary.headline]
        if flow.tls is not None and flow.tls.sni:
            parts.append(flow.tls.sni)
        return " ".join(parts).lower()


def sni_of(summary: Summary) -> str | None:
    """The TLS server name a summary tells, if any."""
    if summary.protocol != "tls":
        return None
    for line in summary.details:
        name, sep, value = line.partition("server name: ")
        if sep and name.startswith(">"):
            return value.strip()
    return None


def summary_of(head_up: bytes, head_down: bytes, flow: Flow) -> Summary:
    """The summary a filter reads, from the first bytes of each direction (as the TUI's)."""
    return summarize(
        head_up[:HEAD_BYTES],
        head_down[:HEAD_BYTES],
        transport=str(flow.transport),
        server_port=flow.server.port,
    )


# -- the tree --------------------------------------------------------------------------------

Verdict = bool | None  # None: cannot tell yet
Found = Callable[["Payload"], Verdict]


class Side(enum.StrEnum):
    """Which end of a flow a term reads: either, the client (`src`) or the server (`dst`)."""

    EITHER = "either"
    SRC = "src"
    DST = "dst"


_COMPARE: dict[str, Callable[[float, float], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


@dataclass(frozen=True, slots=True)
class _Junction:
    """Two expressions joined in three-valued logic: a `decisive` verdict of either decides
    (False for `and`, True for `or`); else the other verdict if both tell, None if one cannot."""

    left: Expr
    right: Expr
    decisive: ClassVar[bool]

    def evaluate(self, facts: FlowFacts, known: Stage, found: Found) -> Verdict:
        decisive = self.decisive
        left = self.left.evaluate(facts, known, found)
        if left is decisive:
            return decisive
        right = self.right.evaluate(facts, known, found)
        if right is decisive:
            return decisive
        return None if left is None or right is None else not decisive


class And(_Junction):
    __slots__ = ()
    decisive = False


class Or(_Junction):
    __slots__ = ()
    decisive = True


@dataclass(frozen=True, slots=True)
class Not:
    operand: Expr

    def evaluate(self, facts: FlowFacts, known: Stage, found: Found) -> Verdict:
        verdict = self.operand.evaluate(facts, known, found)
        return None if verdict is None else not verdict


class _EndpointTerm:
    """A term about a flow's transport and endpoints, which are known once it opens."""

    __slots__ = ()
    stage = Stage.OPEN


@dataclass(frozen=True, slots=True)
class IsTransport(_EndpointTerm):
    """`tcp`, `udp`."""

    transport: Transport

    def evaluate(self, facts: FlowFacts, known: Stage, found: Found) -> Verdict:
        return facts.flow.transport is self.transport


@dataclass(frozen=True, slots=True)
class IsFamily(_EndpointTerm):
    """`unix`, `ip` (IPv4), `ip6`: an end of the flow is of this family."""

    family: str

    def evaluate(self, facts: FlowFacts, known: Stage, found: Found) -> Verdict:
        ends = (facts.flow.client, facts.flow.server)
        if self.family == "unix":
            return any(end.is_unix for end in ends)
        want_v6 = self.family == "ip6"
        return any(not end.is_unix and end.is_ipv6 is want_v6 for end in ends)


@dataclass(frozen=True, slots=True)
class Ports(_EndpointTerm):
    """`port N`, `src port > 1024`, `portrange A-B`, `tcp.port == N`: an end's port is in
    [`low`, `high`] (`!=` is `not`)."""

    side: Side
    low: int
    high: int

    def evaluate(self, facts: FlowFacts, known: Stage, found: Found) -> Verdict:
        return any(
            self.low <= end.port <= self.high and not end.is_unix
            for end in _addresses(facts.flow, self.side)
        )


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Net(_EndpointTerm):
    """`host ADDR` (a one-address net), `net CIDR`, `ip.addr == ADDR` (`!=` is `not`)."""

    side: Side
    network: Network

    def evaluate(self, facts: FlowFacts, known: Stage, found: Found) -> Verdict:
        inside = [_in_network(end.host, self.network) for end in _addresses(facts.flow, self.side)]
        requested = facts.flow.requested
        if requested is not None and self.side is not Side.SRC:
            # An address literal the client asked for counts, like the server's address.
            inside.append(_in_network(requested.host, self.network))
        return any(inside)


@dataclass(frozen=True, slots=True)
class HostName(_EndpointTerm):
    """`host NAME`: the name a proxy client asked for (SOCKS, HTTP proxy; `!=` is `not`)."""

    side: Side
    name: str

    def evaluate(self, facts: FlowFacts, known: Stage, found: Found) -> Verdict:
        requested = facts.flow.requested
        # What the client asked for is the server side of the flow.
        return (
            self.side is not Side.SRC
            and requested is not None
            and requested.host.lower() == self.name
        )


# When each field a term may name is known: a flow's state, reason and counts once it ends,
# its protocol and SNI from its first bytes.
_FIELD_STAGES = {
    "id": Stage.OPEN,
    "proto": Stage.HEAD,
    "sni": Stage.HEAD,
    "state": Stage.END,
    "reason": Stage.END,
    "bytes": Stage.END,
    "up": Stage.END,
    "down": Stage.END,
    "duration": Stage.END,
}


class _FieldTerm:
    """A term about one named field of a flow, which is known at that field's stage."""

    __slots__ = ()
    field: str

    @property
    def stage(self) -> Stage:
        return _FIELD_STAGES[self.field]


@dataclass(frozen=True, slots=True)
class Text(_FieldTerm):
    """`state open`, `reason client-reset`, `proto http`, `sni example.com` (`!=` is `not`)."""

    field: str
    value: str

    def evaluate(self, facts: FlowFacts, known: Stage, found: Found) -> Verdict:
        if self.stage > known:
            return None
        flow = facts.flow
        if self.field == "state":
            states = {str(flow.state)}
            if flow.reason in _RESETS:
                states.add("reset")
            hit = self.value in states
        elif self.field == "reason":
            hit = flow.reason is not None and self.value == str(flow.reason)
        else:
            tls = facts.flow.tls
            summary = facts.summary
            actual: str | None
            if self.field == "sni" and tls is not None and tls.mode != "not-tls":
                actual = tls.sni  # the relay saw the ClientHello; the bytes may be plaintext
            elif summary is None:
                return None
            else:
                actual = summary.protocol if self.field == "proto" else sni_of(summary)
            hit = actual is not None and actual.lower() == self.value
        return hit


@dataclass(frozen=True, slots=True)
class IsTls:
    """`tls`: the relay intercepted or passed the flow's TLS through, or it starts with a TLS
    handshake (a capture or a relay without interception)."""

    stage = Stage.HEAD

    def evaluate(self, facts: FlowFacts, known: Stage, found: Found) -> Verdict:
        tls = facts.flow.tls
        if tls is not None:
            return tls.mode != "not-tls"
        if known < Stage.HEAD or facts.summary is None:
            return None
        return facts.summary.protocol == "tls"


@dataclass(frozen=True, slots=True)
class Number(_FieldTerm):
    """`bytes > 1M`, `up >= 10K`, `down == 0`, `duration > 2s`, `id 3`."""

    field: str
    op: str
    value: float

    def evaluate(self, facts: FlowFacts, known: Stage, found: Found) -> Verdict:
        if self.stage > known:
            return None
        actual: float | None
        if self.field == "id":
            actual = facts.flow.id
        elif self.field == "bytes":
            actual = facts.bytes_up + facts.bytes_down
        elif self.field == "up":
            actual = facts.bytes_up
        elif self.field == "down":
            actual = facts.bytes_down
        else:
            actual = facts.duration_s
        if actual is None:
            return False
        return _COMPARE[self.op](actual, self.value)


@dataclass(frozen=True, slots=True)
class Word:
    """A bare word or string: a case-insensitive substring of the flow's row."""

    text: str
    stage = Stage.HEAD

    def evaluate(self, facts: FlowFacts, known: Stage, found: Found) -> Verdict:
        if known < Stage.HEAD:
            return None
        return self.text in facts.row_text


@dataclass(frozen=True, slots=True)
class _PayloadTerm:
    """A term about the bytes of one `direction` (None: either): whether a scan of the
    flow's payload has `found` it so far."""

    direction: Direction | None
    stage = Stage.PAYLOAD

    def evaluate(self, facts: FlowFacts, known: Stage, found: Found) -> Verdict:
        # Contains and Matches are the only payload terms, so `self` is one of them.
        return found(self)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Contains(_PayloadTerm):
    """`contains "GET /"` in either direction, or `up contains` / `down contains`."""

    needle: bytes


@dataclass(frozen=True, slots=True)
class Matches(_PayloadTerm):
    """`matches /regex/` (a bytes regex) in either direction, or one with `up`/`down`."""

    pattern: re.Pattern[bytes]


Payload = Contains | Matches
Term = IsTransport | IsFamily | IsTls | Ports | Net | HostName | Text | Number | Word | Payload
Expr = And | Or | Not | Term


def _addresses(flow: Flow, side: Side) -> tuple[Address, ...]:
    if side is Side.SRC:
        return (flow.client,)
    if side is Side.DST:
        return (flow.server,)
    return (flow.client, flow.server)


def _is_host_name(text: str) -> bool:
    """A DNS name (labels of letters, digits and hyphens), as a proxy client may ask for."""
    labels = text.rstrip(".").split(".")
    return any(c.isalpha() for c in text) and all(
        label and len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
        for label in labels
    )


def _in_network(host: str, network: Network) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.version == network.version and address in network


def _terms(expr: Expr) -> Iterator[Term]:
    if isinstance(expr, And | Or):
        yield from _terms(expr.left)
        yield from _terms(expr.right)
    elif isinstance(expr, Not):
        yield from _terms(expr.operand)
    else:
        yield expr


# -- streaming payload ---------------------------------------------------------------------------


class PayloadScan:
    """Which payload terms one flow's bytes have matched so far, fed chunk by chunk.

    Keeps only a short tail of each direction, so that a needle split across two chunks is
    found: memory per flow is bounded whatever the flow's size.
    """

    __slots__ = ("_cut", "_pending", "_tails", "found")

    def __init__(self, terms: Iterable[Payload]) -> None:
        self._pending: list[Payload] = list(dict.fromkeys(terms))
        self._tails: dict[tuple[Payload, Direction], bytes] = {}
        self._cut: set[tuple[Payload, Direction]] = set()
        self.found: set[Payload] = set()

    @property
    def is_done(self) -> bool:
        """Every payload term has matched: the rest of the bytes cannot change anything."""
        return not self._pending

    def feed(self, direction: Direction, data: bytes | memoryview) -> bool:
        """Look at the next bytes of `direction` (kept only as a short tail, so `data` may be
        a view of a buffer reused afterwards); True when a term newly matched."""
        if not data:
            return False
        newly = False
        tails = self._tails
        for term in self._pending:
            if term.direction is not None and term.direction is not direction:
                continue
            key = (term, direction)
            tail = tails.get(key, b"")
            if isinstance(term, Contains):
                needle = term.needle
                keep = len(needle) - 1
                hit = (
                    not needle
                    or _find(data, needle) >= 0
                    or (tail and needle in tail + data[:keep])
                )
                if not hit and keep:
                    tails[key] = bytes(data[-keep:]) if len(data) >= keep else (tail + data)[-keep:]
            else:
                # A tail cut from a longer stream keeps one byte before the overlap and the
                # search starts after it, so that `^` matches at the stream's start only.
                window = tail + data
                start = 1 if key in self._cut else 0
                hit = term.pattern.search(window, start) is not None
                if not hit:
                    if len(window) > REGEX_OVERLAP_BYTES + 1:
                        self._cut.add(key)
                        window = window[-(REGEX_OVERLAP_BYTES + 1) :]
                    tails[key] = window
            if hit:
                self.found.add(term)
                tails.pop((term, Direction.UP), None)
                tails.pop((term, Direction.DOWN), None)
                newly = True
        if newly:
            self._pending = [term for term in self._pending if term not in self.found]
        return newly

    def lookup(self, finished: bool) -> Found:
        """The payload verdicts: matched, not matched (once `finished`), or not known yet."""
        found = self.found

        def verdict(term: Payload) -> Verdict:
            if term in found:
                return True
            return False if finished else None

        return verdict


# -- the parsed filter ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FlowFilter:
    """A parsed expression: `matches` answers for one flow; `stage` is what it reads at most."""

    text: str
    expr: Expr

    @property
    def stage(self) -> Stage:
        return max(term.stage for term in _terms(self.expr))

    @property
    def payload_terms(self) -> tuple[Payload, ...]:
        return tuple(t for t in _terms(self.expr) if isinstance(t, Contains | Matches))

    def terms_after(self, stage: Stage) -> list[str]:
        """The names of the terms that need more than `stage` knows (for error messages)."""
        return list(dict.fromkeys(_term_name(t) for t in _terms(self.expr) if t.stage > stage))

    def decide(self, facts: FlowFacts, known: Stage, scan: PayloadScan | None = None) -> Verdict:
        """The verdict from what is `known` so far (None: it takes more of the flow)."""
        found = scan.lookup(known >= Stage.PAYLOAD) if scan is not None else _unknown
        return self.expr.evaluate(facts, known, found)

    def matches(self, facts: FlowFacts, chunks: Iterable[tuple[Direction, bytes]] = ()) -> bool:
        """Whether the flow passes; `chunks` (its payload in order) is read only if needed."""
        verdict = self.expr.evaluate(facts, Stage.HEAD, _unknown)
        if verdict is not None:
            return verdict
        scan = PayloadScan(self.payload_terms)
        lookup = scan.lookup(False)
        for direction, data in chunks:
            if scan.feed(direction, data):
                verdict = self.expr.evaluate(facts, Stage.HEAD, lookup)
                if verdict is not None:
                    return verdict
        return self.expr.evaluate(facts, Stage.PAYLOAD, scan.lookup(True)) is True


def _unknown(term: Payload) -> Verdict:
    return None


class _Undecided:
    """What a `FlowSelection` keeps of a flow it cannot decide yet: its first bytes, a scan."""

    __slots__ = ("head_down", "head_up", "scan")

    def __init__(self, scan: PayloadScan | None) -> None:
        self.head_up = b""
        self.head_down = b""
        self.scan = scan


class FlowSelection:
    """A filter applied to a stream of flow events, reading as little of each flow as it can.

    `opened` decides from the endpoints when it can (and says whether the flow's data is
    wanted at all), `data` feeds bytes until the verdict is sure, `closed` gives it. A
    header-only expression never asks for data; a payload one stops asking once decided.
    """

    def __init__(self, flow_filter: FlowFilter) -> None:
        self._filter = flow_filter
        self._stage = flow_filter.stage
        self._payload = flow_filter.payload_terms
        self._needs_head = any(t.stage is Stage.HEAD for t in _terms(flow_filter.expr))
        self._undecided: dict[int, _Undecided] = {}
        self._decided: dict[int, bool] = {}

    def opened(self, flow: Flow) -> bool:
        """Note a new flow; True when its data is needed to decide."""
        verdict = self._filter.decide(FlowFacts.of(flow), Stage.OPEN)
        if verdict is not None:
            self._decided[flow.id] = verdict
            return False
        if self._stage < Stage.HEAD:
            return False  # decided at its end, from the closed flow alone
        scan = PayloadScan(self._payload) if self._payload else None
        self._undecided[flow.id] = _Undecided(scan)
        return True

    def data(self, flow: Flow, direction: Direction, data: bytes | memoryview) -> bool:
        """Look at the next bytes of a flow (kept only in copies, so a view of a buffer that is
        reused afterwards will do); False once no more of them are needed."""
        pending = self._undecided.get(flow.id)
        if pending is None:
            return False
        is_up = direction is Direction.UP
        head = pending.head_up if is_up else pending.head_down
        if self._needs_head and len(head) < HEAD_BYTES:
            head += data[: HEAD_BYTES - len(head)]
            if is_up:
                pending.head_up = head
            else:
                pending.head_down = head
        scan = pending.scan
        if scan is not None and scan.feed(direction, data):
            verdict = self._filter.decide(FlowFacts.of(flow), Stage.OPEN, scan)
            if verdict is not None:
                self._decided[flow.id] = verdict
                del self._undecided[flow.id]
                return False
        if scan is not None and not scan.is_done:
            return True
        return self._needs_head and min(len(pending.head_up), len(pending.head_down)) < HEAD_BYTES

    def closed(self, flow: Flow) -> bool:
        """Whether the flow, now ended, is selected."""
        verdict = self._decided.pop(flow.id, None)
        if verdict is not None:
            return verdict
        pending = self._undecided.pop(flow.id, None)
        summary = None
        scan = None
        if pending is not None:
            # What the scan found decides with the end's facts (`contains X and state reset`).
            scan = pending.scan
            if self._needs_head:
                summary = summary_of(pending.head_up, pending.head_down, flow)
        facts = FlowFacts.of(flow, summary)
        return self._filter.decide(facts, Stage.PAYLOAD, scan or PayloadScan(())) is True


def _term_name(term: Term) -> str:
    if isinstance(term, Text | Number):
        return term.field
    if isinstance(term, Word):
        return f"the word {term.text!r}"
    if isinstance(term, IsTls):
        return "tls"
    return "contains" if isinstance(term, Contains) else "matches"


# -- tokens --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Token:
    """One lexical unit: `kind` is word, string, regex, op, (, ), and, or, not or end."""

    kind: str
    text: str
    column: int
    value: bytes = b""


_BREAKS = frozenset(' \t\r\n()"!=<>&|')
_SYMBOLS = (
    ("&&", "and"),
    ("||", "or"),
    ("==", "op"),
    ("!=", "op"),
    ("<=", "op"),
    (">=", "op"),
    ("(", "("),
    (")", ")"),
    ("!", "not"),
    ("=", "op"),
    ("<", "op"),
    (">", "op"),
)
_WORD_OPS = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_ESCAPES = {"n": 0x0A, "r": 0x0D, "t": 0x09, "0": 0x00, "\\": 0x5C, '"': 0x22}


def tokenize(text: str) -> list[Token]:
    """The tokens of `text`, ending with an `end` token; FilterError where one is malformed."""
    tokens: list[Token] = []
    at = 0
    size = len(text)
    while True:
        while at < size and text[at].isspace():
            at += 1
        if at >= size:
            tokens.append(Token("end", "", at + 1))
            return tokens
        column = at + 1
        char = text[at]
        if char == '"':
            value, at = _string(text, at)
            tokens.append(Token("string", text[column - 1 : at], column, value))
            continue
        previous = tokens[-1].text.lower() if tokens else ""
        if char == "/" and previous in ("matches", "~"):
            tokens.append(_regex(text, at))
            at = tokens[-1].column - 1 + len(tokens[-1].text)
            continue
        for symbol, kind in _SYMBOLS:
            if text.startswith(symbol, at):
                text_of = "==" if symbol == "=" else symbol
                tokens.append(Token(kind, text_of, column))
                at += len(symbol)
                break
        else:
            end = at
            while end < size and text[end] not in _BREAKS:
                end += 1
            if end == at:  # a lone & or |
                raise FilterError(text, column, f"expected {char}{char} or a word")
            tokens.append(_word(text[at:end], column))
            at = end


def _word(word: str, column: int) -> Token:
    lower = word.lower()
    if lower in ("and", "or", "not"):
        return Token(lower, word, column)
    if lower in _WORD_OPS:
        return Token("op", _WORD_OPS[lower], column)
    if lower == "~":
        return Token("word", "matches", column)
    return Token("word", word, column)


def _string(text: str, at: int) -> tuple[bytes, int]:
    """A double-quoted string from `at` (escapes \\" \\\\ \\n \\r \\t \\xNN) as bytes."""
    out = bytearray()
    start = at
    at += 1
    while at < len(text):
        char = text[at]
        if char == '"':
            return bytes(out), at + 1
        if char == "\\":
            nxt = text[at + 1 : at + 2]
            if nxt == "x" and re.fullmatch(r"[0-9a-fA-F]{2}", text[at + 2 : at + 4]):
                out.append(int(text[at + 2 : at + 4], 16))
                at += 4
                continue
            if nxt in _ESCAPES:
                out.append(_ESCAPES[nxt])
                at += 2
                continue
            raise FilterError(text, at + 1, 'expected an escape: \\" \\\\ \\n \\r \\t or \\xNN')
        out += char.encode()
        at += 1
    raise FilterError(text, start + 1, 'expected a closing " for this string')


def _regex(text: str, at: int) -> Token:
    """A /regex/ (with an optional `i` flag) from `at`; `\\/` stands for a slash."""
    end = at + 1
    while end < len(text) and text[end] != "/":
        end += 2 if text[end] == "\\" else 1
    if end >= len(text):
        raise FilterError(text, at + 1, "expected a closing / for this regex")
    stop = end + 1
    if text[stop : stop + 1] == "i" and (stop + 1 == len(text) or text[stop + 1] in _BREAKS):
        stop += 1
    return Token("regex", text[at:stop], at + 1)


# -- the parser ----------------------------------------------------------------------------------


def parse_filter(text: str) -> FlowFilter | None:
    """Parse an expression (None when blank); FilterError names the column and what was expected."""
    if not text.strip():
        return None
    parser = _Parser(text)
    expr = parser.expression()
    parser.expect_end()
    return FlowFilter(text=text, expr=expr)


def parse_option(option: str, text: str | None) -> FlowFilter | None:
    """Parse a command's `--filter`; errors read `--filter 'port x': column 6: expected ...`."""
    if text is None:
        return None
    try:
        return parse_filter(text)
    except FilterError as exc:
        raise exc.for_option(option) from None


_SIDES = {"src": Side.SRC, "dst": Side.DST}
# The ports (`low`, `high`) that compare true with a port N, for each operator (`!=` is `not`
# of `==`).
_PORTS_COMPARED: dict[str, Callable[[int], tuple[int, int]]] = {
    "==": lambda n: (n, n),
    "!=": lambda n: (n, n),
    "<": lambda n: (0, n - 1),
    "<=": lambda n: (0, n),
    ">": lambda n: (n + 1, 65535),
    ">=": lambda n: (n, 65535),
}


def _negated_if(op: str, term: Term) -> Expr:
    """`term`, or `not term` when the operator is `!=`."""
    return Not(term) if op == "!=" else term


_OLD_KEYS = {
    "port": "port {}",
    "host": "host {}",
    "addr": "host {}",
    "state": "state {}",
    "proto": "proto {}",
    "has": 'contains "{}"',
    "re": "matches /{}/",
}
# Wireshark's port and address fields: `tcp.port`, `udp.srcport`, `ip.dst`, `ipv6.addr`...
_WIRESHARK_PORTS = {
    f"{transport}.{field}": (transport, side)
    for transport in (Transport.TCP, Transport.UDP)
    for field, side in (("port", Side.EITHER), ("srcport", Side.SRC), ("dstport", Side.DST))
}
_WIRESHARK_ADDRESSES = {
    f"{family}.{field}": side
    for family in ("ip", "ipv6")
    for field, side in (("addr", Side.EITHER), ("src", Side.SRC), ("dst", Side.DST))
}
_WIRESHARK_PAYLOADS = {
    "frame": None,
    "data": None,
    "data.data": None,
    "tcp.payload": Transport.TCP,
    "udp.payload": Transport.UDP,
}
_WIRESHARK_TEXT = {"tls.handshake.extensions_server_name": "sni"}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "kb": 1000,
    "m": 1 << 20,
    "mib": 1 << 20,
    "mb": 1000**2,
    "g": 1 << 30,
    "gib": 1 << 30,
    "gb": 1000**3,
}
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "m": 60.0, "min": 60.0, "h": 3600.0}
_NUMBER = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([a-zA-Z]*)")


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.at = 0

    # -- tokens

    def peek(self, ahead: int = 0) -> Token:
        return self.tokens[min(self.at + ahead, len(self.tokens) - 1)]

    def take(self) -> Token:
        token = self.peek()
        self.at = min(self.at + 1, len(self.tokens) - 1)
        return token

    def fail(self, token: Token, expected: str) -> FilterError:
        found = "the end" if token.kind == "end" else repr(token.text)
        return FilterError(self.text, token.column, f"expected {expected}, found {found}")

    def accept(self, kind: str) -> bool:
        """Take the next token if it is of `kind`; whether it was."""
        if self.peek().kind != kind:
            return False
        self.take()
        return True

    def expect_end(self) -> None:
        token = self.peek()
        if token.kind != "end":
            what = "an operator or the end" if token.kind != ")" else "the end (no '(' to close)"
            raise self.fail(token, what)

    # -- expressions

    def expression(self) -> Expr:
        left = self.conjunction()
        while self.accept("or"):
            left = Or(left, self.conjunction())
        return left

    def conjunction(self) -> Expr:
        left = self.unary()
        while self.peek().kind not in ("or", ")", "end"):
            self.accept("and")  # optional: `a b` is `a and b`
            left = And(left, self.unary())
        return left

    def unary(self) -> Expr:
        if self.accept("not"):
            return Not(self.unary())
        opening = self.peek()
        if not self.accept("("):
            return self.term()
        inner = self.expression()
        if not self.accept(")"):
            raise self.fail(self.peek(), "')' to close the '(' at column " + str(opening.column))
        return inner

    def term(self) -> Expr:
        token = self.take()
        if token.kind == "string":
            return Word(token.value.decode("utf-8", "replace").lower())
        if token.kind != "word":
            raise self.fail(token, "a filter term")
        word = token.text.lower()
        if word in ("tcp", "udp"):
            return IsTransport(Transport(word))
        if word in ("unix", "ip", "ip6"):
            return IsFamily(word)
        if word == "tls":
            return IsTls()
        if word in _SIDES:
            return self.endpoint(_SIDES[word], self.take())
        if word in ("port", "portrange", "host", "net"):
            return self.endpoint(Side.EITHER, token)
        if word in ("state", "reason", "proto", "sni"):
            return self.text_field(word)
        if word in ("up", "down") and self.peek().text.lower() in ("contains", "matches"):
            return self.payload(Direction(word), self.take())
        if word in ("contains", "matches"):
            return self.payload(None, token)
        if word in _WIRESHARK_PAYLOADS and self.peek().text.lower() in ("contains", "matches"):
            found = self.payload(None, self.take())
            transport = _WIRESHARK_PAYLOADS[word]
            return found if transport is None else And(IsTransport(transport), found)
        if word in ("bytes", "up", "down", "duration", "id"):
            return self.number(word)
        if word in _WIRESHARK_PORTS:
            transport, side = _WIRESHARK_PORTS[word]
            return And(IsTransport(transport), self.port(side, self.operator(required=True)))
        if word in _WIRESHARK_ADDRESSES:
            return self.address(_WIRESHARK_ADDRESSES[word], self.operator(required=True), True)
        if word in _WIRESHARK_TEXT:
            return self.text_field(_WIRESHARK_TEXT[word], required=True)
        key, colon, value = token.text.partition(":")
        key = key.lower()
        if colon and value and key in _OLD_KEYS:
            # The TUI's former `key:value` words: say what they are now rather than find nothing.
            written = _OLD_KEYS[key].format(value)
            raise FilterError(self.text, token.column, f"expected {written}, not {token.text}")
        return Word(word)

    def operator(self, *, required: bool = False, ordered: bool = True) -> str:
        token = self.peek()
        if token.kind == "op":
            if not ordered and token.text not in ("==", "!="):
                raise self.fail(token, "== or != (this field has no order)")
            self.take()
            return token.text
        if required:
            raise self.fail(token, "a comparison such as ==")
        return "=="

    def value(self, expected: str) -> Token:
        token = self.take()
        if token.kind not in ("word", "string"):
            raise self.fail(token, expected)
        return token

    def endpoint(self, side: Side, token: Token) -> Expr:
        word = token.text.lower() if token.kind == "word" else ""
        if word == "port":
            return self.port(side, self.operator())
        if word == "portrange":
            return self.port_range(side)
        if word == "host":
            return self.address(side, self.operator(ordered=False), False)
        if word == "net":
            return self.address(side, "==", True)
        raise self.fail(token, "port, portrange, host or net")

    def port(self, side: Side, op: str) -> Expr:
        token = self.value("a port number")
        if not token.text.isdigit() or int(token.text) > 65535:
            raise self.fail(token, "a port number")
        port = int(token.text)
        low, high = _PORTS_COMPARED[op](port)
        return _negated_if(op, Ports(side, low, high))

    def port_range(self, side: Side) -> Expr:
        token = self.value("a port range such as 1000-2000")
        low, sep, high = token.text.partition("-")
        if not (sep and low.isdigit() and high.isdigit() and int(low) <= int(high) <= 65535):
            raise self.fail(token, "a port range such as 1000-2000")
        return Ports(side, int(low), int(high))

    def address(self, side: Side, op: str, allow_net: bool) -> Expr:
        expected = "a network such as 10.0.0.0/8" if allow_net else "an IP address or a host name"
        if op not in ("==", "!="):
            raise self.fail(self.tokens[self.at - 1], "== or != (addresses have no order)")
        token = self.value(expected)
        text = token.text.strip("[]")
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            if not allow_net and _is_host_name(text):
                return _negated_if(op, HostName(side, text.lower()))
            raise self.fail(token, expected) from None
        if "/" in text and not allow_net:
            raise self.fail(token, expected + " (use net for a CIDR)")
        return _negated_if(op, Net(side, network))

    def text_field(self, field: str, *, required: bool = False) -> Expr:
        op = self.operator(required=required, ordered=False)
        choices = {"state": STATES, "proto": PROTOCOLS, "reason": tuple(CloseReason)}.get(field)
        expected = f"one of {', '.join(choices)}" if choices else "a server name"
        token = self.value(f"a {field}: {expected}" if choices else expected)
        value = (
            token.value.decode("utf-8", "replace") if token.kind == "string" else token.text
        ).lower()
        if choices and value not in choices:
            raise self.fail(token, f"a {field}: {expected}")
        return _negated_if(op, Text(field, value))

    def number(self, field: str) -> Expr:
        op = self.operator()
        units: Mapping[str, float]
        if field == "duration":
            expected, units = "a duration such as 2s or 500ms", _TIME_UNITS
        elif field == "id":
            expected, units = "a flow id", {"": 1}
        else:
            expected, units = "a size such as 1500, 10K or 1M", _SIZE_UNITS
        token = self.value(expected)
        found = _NUMBER.fullmatch(token.text)
        if found is None or found.group(2).lower() not in units:
            raise self.fail(token, expected)
        if field == "id" and not found.group(1).isdigit():
            raise self.fail(token, expected)
        return Number(field, op, float(found.group(1)) * units[found.group(2).lower()])

    def payload(self, direction: Direction | None, keyword: Token) -> Expr:
        if keyword.text.lower() == "contains":
            token = self.take()
            if token.kind == "string":
                return Contains(direction, token.value)
            if token.kind == "word":
                return Contains(direction, token.text.encode())
            raise self.fail(token, 'a string to look for, such as "GET /"')
        token = self.take()
        if token.kind == "regex":
            ignore_case = token.text.endswith("/i") and len(token.text) > 2
            body = token.text[1:-2] if ignore_case else token.text[1:-1]
            flags, source = (re.IGNORECASE if ignore_case else 0), body.replace("\\/", "/")
        elif token.kind == "string":
            flags, source = 0, token.text[1:-1]
        else:
            raise self.fail(token, "a /regex/")
        try:
            pattern = re.compile(source.encode(), flags)
        except re.error as exc:
            raise FilterError(self.text, token.column, f"expected a valid regex ({exc})") from None
        return Matches(direction, pattern)
