"""Whatever bytes a client sends, split however, a handshake answers with events, never an
exception: a bug here would stop a relay thread, so random input must not reach one."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from flowtap.proxy.handshake import OpenUpstream, Reject, SendReply
from flowtap.proxy.http_proxy import HttpProxyServer
from flowtap.proxy.socks5 import SocksServer, pack_address

_SOCKS_PREFIXES = st.sampled_from(
    [
        b"",
        b"\x05\x01\x00",
        b"\x05\x01\x02",
        b"\x05\x01\x00\x05\x01\x00",
        b"\x04\x01",
        b"\x05\x02\x00\x02\x01",
    ]
)
_HTTP_PREFIXES = st.sampled_from(
    [
        b"",
        b"CONNECT ",
        b"CONNECT a.test:",
        b"GET http://a.test:",
        b"GET http://",
        b"GET http://a.test/ HTTP/1.1\r\nContent-Length: ",
        b"GET http://a.test/ HTTP/1.1\r\n",
        b"POST http://a.test/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    ]
)


def _splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    pieces, start = [], 0
    for point in [*points, len(data)]:
        pieces.append(data[start:point])
        start = point
    return [piece for piece in pieces if piece]


@settings(max_examples=300, deadline=None)
@given(
    _SOCKS_PREFIXES,
    st.binary(max_size=300),
    st.lists(st.integers(0, 320), max_size=6),
    st.booleans(),
)
def test_socks_handshake_never_raises_on_any_bytes(
    prefix: bytes, body: bytes, cuts: list[int], with_auth: bool
) -> None:
    server = SocksServer({"u": "p"} if with_auth else None)
    for piece in _splits(prefix + body, cuts):
        events = server.receive(piece)
        assert all(isinstance(e, SendReply | OpenUpstream | Reject) for e in events)
        if any(isinstance(e, OpenUpstream | Reject) for e in events):
            break


@settings(max_examples=300, deadline=None)
@given(
    _HTTP_PREFIXES,
    # Digits beyond ASCII (latin-1 0xb2 is a superscript 2, which str.isdigit accepts).
    st.binary(max_size=400) | st.sampled_from([b"1\xb2 HTTP/1.1", b"1\xb2\r\n"]),
    st.lists(st.integers(0, 420), max_size=6),
    st.booleans(),
)
def test_http_proxy_request_never_raises_on_any_bytes(
    prefix: bytes, body: bytes, cuts: list[int], with_auth: bool
) -> None:
    server = HttpProxyServer({"u": "p"} if with_auth else None)
    decided = False
    for piece in _splits(prefix + body + b"\r\n\r\n", cuts):
        if decided:
            rewriter = server.upstream_rewriter()
            if rewriter is not None:
                rewriter.feed(piece)
            continue
        events = server.receive(piece)
        assert all(isinstance(e, OpenUpstream | Reject) for e in events)
        decided = bool(events)


def test_pack_address_round_trip_names_stay_names() -> None:
    assert pack_address("a.test", 1)[0] == 0x03


# Each part of a CONNECT head: its common form first, then forms that the general parse
# takes or refuses differently.
_HEAD_PARTS = {
    "method": ["CONNECT", "connect", "CONNECT ", "GET"],
    "host": ["127.0.0.1", "a.test", "a_b-c.test", "[::1]", "::1", "a/b", ""],
    "port": ["443", "080", "65535", "65536", "0", "99999", "", "1\xb2"],
    "version": ["HTTP/1.1", "HTTP/1.0", "HTTP/2", "http/1.1"],
    "name": ["Host", "User-Agent", "X-A", "a b", " Host", "Host ", "\tA", "", "\xe9"],
    "value": ["x", "", " 127.0.0.1:1 ", "a\rb", "\xe9", "a:b"],
    "end": ["\r\n", "\n"],
}


@st.composite
def _connect_heads(draw: st.DrawFn) -> bytes:
    """CONNECT heads in the common form with at most a few parts changed."""
    changed = draw(st.sets(st.sampled_from(sorted(_HEAD_PARTS)), max_size=2))

    def part(name: str) -> str:
        forms = _HEAD_PARTS[name]
        return draw(st.sampled_from(forms)) if name in changed else forms[0]

    method, host, port, version = part("method"), part("host"), part("port"), part("version")
    headers = [f"{part('name')}:{part('value')}" for _ in range(draw(st.integers(0, 3)))]
    end = part("end")
    lines = [f"{method} {host}:{port} {version}", *headers]
    early = draw(st.binary(max_size=8))
    return (end.join(lines) + end + end).encode("latin-1") + early


@settings(max_examples=500, deadline=None)
@given(_connect_heads() | st.binary(max_size=200).map(lambda b: b"CONNECT " + b + b"\r\n\r\n"))
def test_http_proxy_request_in_one_piece_decides_as_in_two(data: bytes) -> None:
    """A head that comes whole (which the common CONNECT's short path parses) gets the same
    events as when it comes in two pieces (which the general parse takes)."""
    whole = HttpProxyServer().receive(data)
    split = HttpProxyServer()
    assert whole == split.receive(data[:1]) + split.receive(data[1:])
    assert whole


_SOCKS_GREETINGS = st.sampled_from(
    [b"\x05\x01\x00", b"\x05\x01\x02", b"\x05\x02\x00\x02", b"\x05\x01", b"\x04\x01\x00\x01"]
)
_SOCKS_AUTHS = st.sampled_from([b"\x01\x01u\x01p", b"\x01\x01u\x01x", b"\x02\x01u\x01p"])
_SOCKS_REQUESTS = st.sampled_from(
    [
        b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50",
        b"\x05\x01\x07\x01\x0a\x00\x00\x01\xff\xff",
        b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x00",
        b"\x05\x03\x00\x01\x7f\x00\x00\x01\x00\x50",
        b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50",
        b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50",
        b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50early",
        b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00",
        b"\x05\x01\x00\x03\x06a.test\x00\x50",
    ]
)


@settings(max_examples=500, deadline=None)
@given(_SOCKS_GREETINGS, _SOCKS_AUTHS, _SOCKS_REQUESTS, st.booleans(), st.integers(1, 3))
def test_socks_steps_in_reads_of_their_own_decide_as_byte_by_byte(
    greeting: bytes, auth: bytes, request: bytes, with_auth: bool, count: int
) -> None:
    """A client's handshake steps each in a read of its own (which the common steps' short
    paths take) get the same events as the same bytes a byte at a time (the general parse)."""
    credentials = {"u": "p"} if with_auth else None
    steps = ([greeting, auth, request] if with_auth else [greeting, request])[:count]
    whole, split = SocksServer(credentials), SocksServer(credentials)
    whole_events: list[object] = []
    for step in steps:
        whole_events += whole.receive(step)
        if any(isinstance(e, OpenUpstream | Reject) for e in whole_events):
            break
    split_events: list[object] = []
    joined = b"".join(steps)
    step_ends = list(itertools.accumulate(len(step) for step in steps))
    for index, byte in enumerate(joined):
        split_events += split.receive(bytes((byte,)))
        last = split_events[-1] if split_events else None
        if isinstance(last, OpenUpstream):
            # Decided a byte at a time, the rest of that read is early data too.
            end = next(end for end in step_ends if end > index)
            early = last.early_data + joined[index + 1 : end]
            split_events[-1] = OpenUpstream(last.requested, last.command, early)
        if isinstance(last, OpenUpstream | Reject):
            break
    decided = any(isinstance(e, OpenUpstream | Reject) for e in whole_events)
    assert whole_events == (split_events if decided else split_events[: len(whole_events)])
