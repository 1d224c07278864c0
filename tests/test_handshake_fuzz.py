"""Whatever bytes a client sends, split however, a handshake answers with events, never an
exception: a bug here would stop a relay thread, so random input must not reach one."""

from __future__ import annotations

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
