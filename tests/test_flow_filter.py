"""The filter language on flow records and byte strings, without sockets or files."""

from __future__ import annotations

import ssl
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowtap.inspector.flow_filter import (
    Contains,
    FilterError,
    FlowFacts,
    FlowFilter,
    FlowSelection,
    PayloadScan,
    Stage,
    parse_filter,
    parse_option,
    summary_of,
    tokenize,
)
from flowtap.proxy.errors import FlowtapError
from flowtap.proxy.flow import (
    Address,
    CloseReason,
    Direction,
    Flow,
    FlowState,
    TlsFacts,
    Transport,
)

UP, DOWN = Direction.UP, Direction.DOWN


def _client_hello(server_name: str) -> bytes:
    """A real TLS ClientHello naming `server_name`, from the ssl module without a socket."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


HELLO = _client_hello("shop.example")


def _flow(
    flow_id: int,
    *,
    transport: Transport = Transport.TCP,
    client: Address | None = None,
    server: Address | None = None,
    reason: CloseReason | None = CloseReason.CLIENT_CLOSED,
    up: int = 0,
    down: int = 0,
    duration_s: float = 0.5,
) -> Flow:
    flow = Flow(
        id=flow_id,
        transport=transport,
        client=client or Address("127.0.0.1", 50000 + flow_id),
        server=server or Address("127.0.0.1", 6379),
        listener=Address("127.0.0.1", 9000),
        started_at=100.0,
        state=FlowState.OPEN,
    )
    if reason is None:
        return flow
    return flow.closed(ended_at=100.0 + duration_s, bytes_up=up, bytes_down=down, reason=reason)


# id, flow, the payload chunks in order
FLOWS: list[tuple[Flow, list[tuple[Direction, bytes]]]] = [
    (
        _flow(1, server=Address("10.0.0.1", 80), up=40, down=17, duration_s=0.004),
        [
            (UP, b"GET /cart HTTP/1.1\r\nHost: shop.test\r\n\r\n"),
            (DOWN, b"HTTP/1.1 200 OK\r\n\r\n"),
        ],
    ),
    (
        _flow(2, reason=CloseReason.SERVER_RESET, up=14, down=7, duration_s=3.0),
        [(UP, b"*1\r\n$4\r\nPING\r\n"), (DOWN, b"+PONG\r\n")],
    ),
    (
        _flow(
            3,
            transport=Transport.UDP,
            client=Address("::1", 5353),
            server=Address("::1", 53),
            reason=None,
        ),
        [(UP, b"\x12\x34\x01\x00")],
    ),
    (
        _flow(4, server=Address("192.168.1.9", 443), up=2 << 20, down=1500, duration_s=12.0),
        [(UP, HELLO), (UP, b"\x00" * 100), (DOWN, b"\x16\x03\x03")],
    ),
    (
        _flow(5, client=Address("", path="/tmp/c.sock"), server=Address("", path="/tmp/s.sock")),
        [(UP, b"hel"), (UP, b"lo wor"), (UP, b"ld")],
    ),
]


def _intercepted(flow_id: int, facts: TlsFacts) -> Flow:
    """A closed flow whose TLS the relay handled, as its closed event carries it."""
    opened = _flow(flow_id, server=Address("127.0.0.1", 8443), reason=None)
    return opened.closed(
        ended_at=100.5, bytes_up=30, bytes_down=19, reason=CloseReason.CLIENT_CLOSED, tls=facts
    )


# Flows whose TLS the relay handled: their bytes are plaintext (intercept), ciphertext whose
# ClientHello names another host than the facts never would (passthrough), or not TLS at all.
TLS_FLOWS: list[tuple[Flow, list[tuple[Direction, bytes]]]] = [
    (
        _intercepted(
            6,
            TlsFacts(mode="intercept", sni="api.example", alpn="http/1.1", version="TLSv1.3"),
        ),
        [
            (UP, b"GET /v1 HTTP/1.1\r\nHost: api.example\r\n\r\n"),
            (DOWN, b"HTTP/1.1 200 OK\r\n\r\n"),
        ],
    ),
    (
        _intercepted(7, TlsFacts(mode="passthrough", sni="pinned.example")),
        [(UP, _client_hello("pinned.example")), (DOWN, b"\x16\x03\x03")],
    ),
    (
        _intercepted(8, TlsFacts(mode="not-tls", note="not a ClientHello")),
        [(UP, b"*1\r\n$4\r\nPING\r\n"), (DOWN, b"+PONG\r\n")],
    ),
    (_intercepted(9, TlsFacts(mode="intercept")), [(UP, b"hello")]),
]


def selected(
    text: str, flows: list[tuple[Flow, list[tuple[Direction, bytes]]]] = FLOWS
) -> list[int]:
    """The ids a filter picks through `FlowFilter.matches`, as the TUI and replay use it."""
    flow_filter = parse_filter(text)
    assert flow_filter is not None
    picked = []
    for flow, chunks in flows:
        up = b"".join(d for way, d in chunks if way is UP)
        down = b"".join(d for way, d in chunks if way is DOWN)
        facts = FlowFacts.of(flow, summary_of(up, down, flow))
        if flow_filter.matches(facts, iter(chunks)):
            picked.append(flow.id)
    return picked


def streamed(
    text: str, flows: list[tuple[Flow, list[tuple[Direction, bytes]]]] = FLOWS
) -> list[int]:
    """The ids a filter picks through `FlowSelection`, as `show` streams a capture."""
    flow_filter = parse_filter(text)
    assert flow_filter is not None
    selection = FlowSelection(flow_filter)
    picked = []
    for flow, chunks in flows:
        opened = Flow(flow.id, flow.transport, flow.client, flow.server, flow.listener, 100.0)
        if selection.opened(opened):
            for direction, data in chunks:
                if not selection.data(opened, direction, data):
                    break
        if selection.closed(flow):
            picked.append(flow.id)
    return picked


CASES = [
    ("tcp", [1, 2, 4, 5]),
    ("udp", [3]),
    ("unix", [5]),
    ("ip", [1, 2, 4]),
    ("ip6", [3]),
    ("port 80", [1]),
    ("port == 6379", [2]),
    ("src port 5353", [3]),
    ("dst port 5353", []),
    ("port > 50000", [1, 2, 4]),
    ("portrange 1-100", [1, 3]),
    ("dst portrange 400-500", [4]),
    ("host 10.0.0.1", [1]),
    ("host ::1", [3]),
    ("src host 127.0.0.1", [1, 2, 4]),
    ("dst host 127.0.0.1", [2]),
    ("host != 127.0.0.1", [3, 5]),
    ("net 192.168.0.0/16", [4]),
    ("net 10.0.0.0/8 or net ::/0", [1, 3]),
    ("state closed", [1, 2, 4, 5]),
    ("state reset", [2]),
    ("state open", [3]),
    ("reason server-reset", [2]),
    ("reason != client-closed", [2, 3]),
    ("proto http", [1]),
    ("proto redis", [2]),
    ("proto tls", [4]),
    ("sni shop.example", [4]),
    ("tls.handshake.extensions_server_name == SHOP.example", [4]),
    ("bytes > 1M", [4]),
    ("up >= 2M", [4]),
    ("down < 10", [2, 3, 5]),
    ("bytes == 0", [3, 5]),
    ("duration > 2s", [2, 4]),
    ("duration < 10ms", [1]),
    ("id 2", [2]),
    ("id >= 4", [4, 5]),
    ('contains "GET /"', [1]),
    ("contains PONG", [2]),
    ("up contains PONG", []),
    ("down contains PONG", [2]),
    ('contains "lo wor"', [5]),
    ('contains "hello world"', [5]),
    ('contains "\\x12\\x34"', [3]),
    ("matches /P[IO]NG/", [2]),
    ("matches /^\\*1/", [2]),
    ("matches /cart http/i", [1]),
    ("up matches /hel+o w/", [5]),
    ("matches /\\x00{50}/", [4]),
    ("tcp.port == 80", [1]),
    ("udp.port == 53", [3]),
    ("tcp.dstport == 443", [4]),
    ("ip.addr == 10.0.0.1", [1]),
    ("ip.src == ::1", [3]),
    ("ip.addr == 10.0.0.0/8", [1]),
    ('frame contains "GET /"', [1]),
    ("tcp.payload contains PONG", [2]),
    ("udp.payload contains PONG", []),
    ("udp.payload matches /\\x12\\x34/", [3]),
    ("tcp contains PING", [2]),
    ("shop.test", [1]),
    ("cart", [1]),
    ("http", [1]),
    ("server-reset", [2]),
    ('"/tmp/c.sock"', [5]),
    ("tcp port 6379", [2]),
    ("tcp and not port 6379", [1, 4, 5]),
    ("! tcp", [3]),
    ("tcp && !(port 80 || port 443)", [2, 5]),
    ("udp or tcp and port 80", [1, 3]),
    ("(udp or tcp) and port 80", [1]),
    ("not udp and not tcp", []),
    ("proto http or contains PONG", [1, 2]),
    ("not contains PING", [1, 3, 4, 5]),
    ("contains PONG and state reset", [2]),
    ("up contains PING and duration > 2s", [2]),
    ("TCP PORT 6379 AND STATE RESET", [2]),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_each_term_and_operator_selects_the_expected_flows(text: str, expected: list[int]) -> None:
    assert selected(text) == expected


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_streaming_over_events_selects_the_same_flows(text: str, expected: list[int]) -> None:
    assert streamed(text) == expected


TLS_CASES = [
    ("tls", [4, 6, 7, 9]),
    ("not tls", [1, 2, 3, 5, 8]),
    ("sni api.example", [6]),
    ("sni API.example", [6]),
    ("sni != api.example", [1, 2, 3, 4, 5, 7, 8, 9]),
    ("sni shop.example", [4]),
    ("sni pinned.example", [7]),
    ("tls.handshake.extensions_server_name == api.example", [6]),
    ("tls and proto http", [6]),
    ("tls and not sni api.example and port 8443", [7, 9]),
    ("api.example", [6]),
    ("proto tls", [4, 7]),
]


@pytest.mark.parametrize(("text", "expected"), TLS_CASES)
def test_tls_and_sni_read_the_relays_tls_facts_before_the_bytes(
    text: str, expected: list[int]
) -> None:
    assert selected(text, FLOWS + TLS_FLOWS) == expected
    assert streamed(text, FLOWS + TLS_FLOWS) == expected


def test_tls_is_undecided_until_the_first_bytes_or_the_facts_are_known() -> None:
    flow_filter = parse_filter("tls")
    assert flow_filter is not None
    opened = _flow(10, reason=None)
    assert flow_filter.stage is Stage.HEAD
    assert flow_filter.decide(FlowFacts.of(opened), Stage.OPEN) is None
    assert flow_filter.decide(FlowFacts.of(opened), Stage.END) is None
    assert flow_filter.terms_after(Stage.OPEN) == ["tls"]


def test_and_binds_tighter_than_or_and_not_tightest() -> None:
    flow_filter = parse_filter("udp or tcp port 80 and not id 9")
    assert flow_filter is not None
    assert type(flow_filter.expr).__name__ == "Or"
    assert repr(flow_filter.expr).count("Not(") == 1


@pytest.mark.parametrize(
    ("text", "column", "expected"),
    [
        ("port x", 6, "expected a port number"),
        ("port 70000", 6, "expected a port number"),
        ("tcp and", 8, "expected a filter term"),
        ("(tcp", 5, "expected ')' to close the '(' at column 1"),
        ("tcp)", 4, "expected the end (no '(' to close)"),
        ("host 300.1.1.1", 6, "expected an IP address or a host name"),
        ("host 10.0.0.0/8", 6, "expected an IP address or a host name (use net for a CIDR)"),
        ("net nowhere", 5, "expected a network such as 10.0.0.0/8"),
        ("portrange 9-1", 11, "expected a port range"),
        ("state sleeping", 7, "expected a state: one of connecting, open"),
        ("reason bored", 8, "expected a reason: one of client-closed"),
        ("proto gopher", 7, "expected a proto: one of http, tls"),
        ("bytes > lots", 9, "expected a size such as 1500, 10K or 1M"),
        ("duration > 2days", 12, "expected a duration such as 2s"),
        ("host > 10.0.0.1", 6, "expected == or !="),
        ("id 1.5", 4, "expected a flow id"),
        ("contains", 9, 'expected a string to look for, such as "GET /"'),
        ('contains "open', 10, 'expected a closing " for this string'),
        ('contains "\\q"', 11, "expected an escape"),
        ("matches GET", 9, "expected a /regex/"),
        ("matches /[a/", 9, "expected a valid regex"),
        ("matches /abc", 9, "expected a closing / for this regex"),
        ("tcp.port 80", 10, "expected a comparison such as =="),
        ("tcp & udp", 5, "expected && or a word"),
        ("src 80", 5, "expected port, portrange, host or net"),
        ("tcp port:8080", 5, "expected port 8080, not port:8080"),
        ("has:needle", 1, 'expected contains "needle", not has:needle'),
        ("re:GET", 1, "expected matches /GET/, not re:GET"),
    ],
)
def test_malformed_expressions_name_the_column_and_what_was_expected(
    text: str, column: int, expected: str
) -> None:
    with pytest.raises(FilterError) as caught:
        parse_filter(text)
    assert caught.value.column == column
    assert str(caught.value).startswith(f"column {column}: {expected}")


def test_a_command_error_is_one_line_naming_the_option_and_expression() -> None:
    with pytest.raises(FlowtapError) as caught:
        parse_option("--filter", "port x")
    assert str(caught.value) == "--filter 'port x': column 6: expected a port number, found 'x'"


def test_blank_expression_selects_everything() -> None:
    assert parse_filter("  ") is None
    assert parse_option("--filter", None) is None


def test_tokens_keep_columns_and_decode_strings() -> None:
    tokens = tokenize('tcp&&!(bytes>=1M) contains "a\\"b\\x00"')
    assert [(t.kind, t.column) for t in tokens] == [
        ("word", 1),
        ("and", 4),
        ("not", 6),
        ("(", 7),
        ("word", 8),
        ("op", 13),
        ("word", 15),
        (")", 17),
        ("word", 19),
        ("string", 28),
        ("end", 38),
    ]
    assert tokens[9].value == b'a"b\x00'


@pytest.mark.parametrize(
    ("text", "stage"),
    [
        ("tcp port 80 and host ::1 or id 3", Stage.OPEN),
        ("tcp and bytes > 1M", Stage.END),
        ("proto http or state open", Stage.HEAD),
        ("hello", Stage.HEAD),
        ("port 80 and not contains x", Stage.PAYLOAD),
    ],
)
def test_stage_tells_what_an_expression_reads_at_most(text: str, stage: Stage) -> None:
    flow_filter = parse_filter(text)
    assert flow_filter is not None and flow_filter.stage is stage


def test_terms_after_names_those_not_known_when_a_flow_opens() -> None:
    flow_filter = parse_filter('port 80 and (bytes > 1M or proto http) or contains "x" or foo')
    assert flow_filter is not None
    assert flow_filter.terms_after(Stage.OPEN) == ["bytes", "proto", "contains", "the word 'foo'"]


def test_contains_matches_across_chunk_boundaries_keeping_only_a_tail() -> None:
    flow_filter = parse_filter('contains "needle"')
    assert flow_filter is not None
    scan = PayloadScan(flow_filter.payload_terms)
    for piece in (b"hay" * 1000 + b"ne", b"e", b"dle" + b"hay" * 1000):
        scan.feed(UP, piece)
    assert scan.is_done
    # the same bytes split between the two directions are no match
    scan = PayloadScan(flow_filter.payload_terms)
    scan.feed(UP, b"nee")
    scan.feed(DOWN, b"dle")
    assert not scan.is_done


@settings(max_examples=300, deadline=None)
@given(
    stream=st.binary(max_size=400),
    needle=st.binary(max_size=12),
    at=st.one_of(st.none(), st.integers(0, 400)),
    cuts=st.lists(st.integers(0, 420), max_size=8),
    as_views=st.booleans(),
)
def test_contains_finds_the_needle_exactly_as_in_the_joined_stream(
    stream: bytes, needle: bytes, at: int | None, cuts: list[int], as_views: bool
) -> None:
    """However the stream is cut (empty pieces too, bytes or views), `contains` agrees with
    `needle in stream`: at the start, the very end, across any boundary, or absent (an
    empty needle is in any byte, not in a direction without any); the other direction's
    term never matches."""
    if at is not None:
        at = min(at, len(stream))
        stream = stream[:at] + needle + stream[at:]
    bounds = sorted([0, len(stream), *(cut for cut in cuts if cut <= len(stream))])
    scan = PayloadScan([Contains(None, needle), Contains(DOWN, needle)])
    for start, end in pairwise(bounds):
        piece = stream[start:end]
        scan.feed(UP, memoryview(piece) if as_views else piece)
    assert (Contains(None, needle) in scan.found) is (stream != b"" and needle in stream)
    assert Contains(DOWN, needle) not in scan.found


def test_contains_finds_a_needle_ending_a_long_chunk_or_split_after_empty_ones() -> None:
    needle = b"flowtap-needle"
    hay = bytes(range(256)) * 256  # every byte value, as in the benchmark's bulk flows
    for pieces, found in [
        ([hay + needle], True),
        ([hay + needle[:-1]], False),
        ([b"", hay + needle[:3], b"", needle[3:], b""], True),
        ([hay + needle[:3], b"", hay[:1] + needle[3:]], False),
        ([b"", b""], False),
    ]:
        scan = PayloadScan([Contains(UP, needle)])
        for piece in pieces:
            scan.feed(UP, memoryview(piece))
        assert scan.is_done is found, pieces[-1][-20:]


def test_regex_sees_a_window_across_chunks_but_anchors_only_at_the_start() -> None:
    terms = parse_filter("matches /ab+c/ or matches /^x/")
    assert terms is not None
    scan = PayloadScan(terms.payload_terms)
    scan.feed(UP, b"yyyyab")
    scan.feed(UP, b"x")
    assert not scan.found  # ^x: x starts a chunk, not the stream
    scan.feed(UP, b"abb")
    scan.feed(UP, b"bc")
    assert len(scan.found) == 1  # ab+c across two chunks


def test_header_only_expression_never_asks_for_payload() -> None:
    flow_filter = parse_filter("tcp port 80 or bytes > 1M")
    assert flow_filter is not None
    selection = FlowSelection(flow_filter)
    for flow, _ in FLOWS:
        assert selection.opened(flow) is False


def test_payload_selection_stops_asking_once_decided() -> None:
    flow_filter = parse_filter("port 6379 and contains PING")
    assert flow_filter is not None
    selection = FlowSelection(flow_filter)
    web, redis = FLOWS[0][0], FLOWS[1][0]
    assert selection.opened(web) is False  # port 80: decided without a byte
    assert selection.opened(redis) is True
    assert selection.data(redis, UP, b"*1\r\n$4\r\nPI") is True
    assert selection.data(redis, UP, b"NG\r\n") is False
    assert selection.closed(redis) and not selection.closed(web)


def test_flow_filters_compare_equal_when_they_read_the_same() -> None:
    first = parse_filter("tcp port 80")
    assert isinstance(first, FlowFilter)
    assert first == parse_filter("tcp port 80")
    assert first != parse_filter("tcp port 81")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "tcp",
                "port",
                "80",
                "host",
                "::1",
                "net",
                "10.0.0.0/8",
                "(",
                ")",
                "!",
                "&&",
                "||",
                "and",
                "or",
                "not",
                "contains",
                '"x',
                '"\\x4',
                '"\\xZZ"',
                '"ok"',
                "matches",
                "/a",
                "/[/",
                "/b/i",
                "bytes",
                ">",
                ">=",
                "==",
                "1M",
                "2s",
                "duration",
                "state",
                "open",
                "id",
                "tcp.port",
                "ip.addr",
                "up",
                "down",
                "src",
                "dst",
                "portrange",
                "1-2",
                "port:1",
                "sni",
                "tls",
                "proto",
                "http",
                "=",
                "<",
                "&",
                "|",
                "~",
                "\\",
            ]
        ),
        max_size=8,
    ).map(" ".join)
    | st.text(max_size=30)
)
def test_any_text_parses_or_fails_with_a_column_inside_it(text: str) -> None:
    """The TUI parses on every keystroke: nothing typed may raise anything but FilterError."""
    try:
        flow_filter = parse_filter(text)
    except FilterError as exc:
        assert 1 <= exc.column <= len(text) + 1
        return
    if flow_filter is not None:
        flow, chunks = FLOWS[0]
        flow_filter.matches(FlowFacts.of(flow), iter(chunks))
