"""The HTTP proxy's first request on byte strings alone: CONNECT, absolute URIs, every refusal."""

from __future__ import annotations

import base64

import pytest

from flowtap.proxy.flow import Address, CloseReason, Requested
from flowtap.proxy.handshake import Command, Failure, OpenUpstream, Reject
from flowtap.proxy.http_proxy import MAX_HEAD_BYTES, HttpProxyServer


def _status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def test_connect_opens_a_tunnel_and_keeps_bytes_after_the_head() -> None:
    server = HttpProxyServer()
    (event,) = server.receive(
        b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n\x16\x03\x01"
    )
    assert event == OpenUpstream(Requested("example.test", 443), Command.CONNECT, b"\x16\x03\x01")
    assert server.succeeded(Address("127.0.0.1", 1)) == (
        b"HTTP/1.1 200 Connection established\r\n\r\n"
    )


def test_connect_to_an_ipv6_literal() -> None:
    (event,) = HttpProxyServer().receive(b"CONNECT [::1]:6379 HTTP/1.1\r\n\r\n")
    assert event == OpenUpstream(Requested("::1", 6379), Command.CONNECT, b"")


def test_head_split_into_single_bytes_decides_once() -> None:
    server = HttpProxyServer()
    events = []
    for byte in b"CONNECT a.test:22 HTTP/1.1\r\n\r\n":
        events += server.receive(bytes((byte,)))
    assert events == [OpenUpstream(Requested("a.test", 22), Command.CONNECT, b"")]


def test_absolute_uri_goes_upstream_in_origin_form_without_proxy_headers() -> None:
    server = HttpProxyServer()
    (event,) = server.receive(
        b"GET http://web.test:8080/a/b?q=1 HTTP/1.1\r\nHost: web.test:8080\r\n"
        b"Proxy-Connection: Keep-Alive\r\nProxy-Authorization: Basic eDp5\r\n"
        b"Accept: */*\r\n\r\n"
    )
    assert event == OpenUpstream(
        Requested("web.test", 8080),
        Command.CONNECT,
        b"GET /a/b?q=1 HTTP/1.1\r\nHost: web.test:8080\r\nAccept: */*\r\n\r\n",
    )
    assert server.succeeded(Address("127.0.0.1", 1)) == b""


def test_absolute_uri_without_port_path_or_host_header_gets_them() -> None:
    body = b"POST http://web.test HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi"
    (event,) = HttpProxyServer().receive(body)
    assert event == OpenUpstream(
        Requested("web.test", 80),
        Command.CONNECT,
        b"POST / HTTP/1.0\r\nHost: web.test\r\nContent-Length: 2\r\n\r\nhi",
    )


@pytest.mark.parametrize(
    ("request_bytes", "why"),
    [
        (b"GET /index.html HTTP/1.1\r\n\r\n", "not an absolute URI"),
        (b"GET https://x.test/ HTTP/1.1\r\n\r\n", "use CONNECT"),
        (b"CONNECT x.test HTTP/1.1\r\n\r\n", "no port"),
        (b"CONNECT x.test:0 HTTP/1.1\r\n\r\n", "malformed port"),
        (b"CONNECT x.test:99999 HTTP/1.1\r\n\r\n", "malformed port"),
        (b"CONNECT [zz]:1 HTTP/1.1\r\n\r\n", "malformed IPv6"),
        (b"GET http://u:p@x.test/ HTTP/1.1\r\n\r\n", "credentials in the URI"),
        (b"\x16\x03\x01\x00\x05hello\r\n\r\n", "malformed request line"),
        (b"GET / HTTP/2.0\r\n\r\n", "unsupported protocol"),
        (b"GET  / HTTP/1.1\r\n\r\n", "malformed request line"),
        (b"CONNECT a.test:1 HTTP/1.1\r\nno colon here\r\n\r\n", "malformed header"),
        (b"CONNECT a.test:1 HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", "folded"),
    ],
)
def test_bad_requests_get_400_with_a_one_line_reason(request_bytes: bytes, why: str) -> None:
    (event,) = HttpProxyServer().receive(request_bytes)
    assert isinstance(event, Reject)
    assert _status(event.reply) == 400
    assert event.reason is CloseReason.HANDSHAKE_ERROR
    assert why in event.error
    body = event.reply.split(b"\r\n\r\n", 1)[1]
    assert body.count(b"\n") == 1 and why.encode() in body


def test_request_line_of_64_kib_gets_431_before_its_end() -> None:
    server = HttpProxyServer()
    assert server.receive(b"GET http://x.test/" + b"a" * 1000) == []
    (event,) = server.receive(b"a" * MAX_HEAD_BYTES)
    assert isinstance(event, Reject) and _status(event.reply) == 431


def test_head_over_the_limit_arriving_whole_gets_431() -> None:
    big = b"GET http://x.test/ HTTP/1.1\r\nX: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n"
    (event,) = HttpProxyServer().receive(big)
    assert isinstance(event, Reject) and _status(event.reply) == 431


def _basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def test_right_proxy_credentials_name_the_user() -> None:
    server = HttpProxyServer({"alice": "s3cret"})
    (event,) = server.receive(
        b"CONNECT a.test:443 HTTP/1.1\r\nProxy-Authorization: "
        + _basic("alice", "s3cret")
        + b"\r\n\r\n"
    )
    assert event == OpenUpstream(Requested("a.test", 443, "alice"), Command.CONNECT, b"")


@pytest.mark.parametrize(
    "header",
    [
        b"",
        b"Proxy-Authorization: " + _basic("alice", "nope") + b"\r\n",
        b"Proxy-Authorization: Bearer abc\r\n",
        b"Proxy-Authorization: Basic !!!\r\n",
    ],
)
def test_missing_or_wrong_proxy_credentials_get_407_with_a_challenge(header: bytes) -> None:
    (event,) = HttpProxyServer({"alice": "s3cret"}).receive(
        b"CONNECT a.test:443 HTTP/1.1\r\n" + header + b"\r\n"
    )
    assert isinstance(event, Reject) and _status(event.reply) == 407
    assert b'Proxy-Authenticate: Basic realm="flowtap"' in event.reply


@pytest.mark.parametrize(
    ("failure", "status"),
    [
        (Failure.NOT_ALLOWED, 403),
        (Failure.HOST_UNREACHABLE, 502),
        (Failure.REFUSED, 502),
        (Failure.TIMEOUT, 504),
    ],
)
def test_failures_get_their_status_and_a_one_line_body(failure: Failure, status: int) -> None:
    server = HttpProxyServer()
    server.receive(b"CONNECT a.test:1 HTTP/1.1\r\n\r\n")
    reply = server.failed(failure)
    assert _status(reply) == status
    head, body = reply.split(b"\r\n\r\n", 1)
    assert body == f"flowtap: {failure.value}\n".encode()
    assert f"Content-Length: {len(body)}".encode() in head


def test_timeout_gets_408() -> None:
    server = HttpProxyServer()
    server.receive(b"CONNECT a.te")
    assert _status(server.timed_out()) == 408


def _forwarding(first: bytes) -> tuple[HttpProxyServer, OpenUpstream]:
    server = HttpProxyServer()
    (event,) = server.receive(first)
    assert isinstance(event, OpenUpstream)
    return server, event


def test_later_requests_on_a_forwarded_connection_are_rewritten_too() -> None:
    server, first = _forwarding(b"GET http://web.test/a HTTP/1.1\r\nHost: web.test\r\n\r\n")
    assert first.early_data == b"GET /a HTTP/1.1\r\nHost: web.test\r\n\r\n"
    rewriter = server.upstream_rewriter()
    assert rewriter is not None
    second = (
        b"POST http://web.test/b HTTP/1.1\r\nHost: web.test\r\nProxy-Connection: keep-alive\r\n"
        b"Content-Length: 26\r\n\r\nGET http://x.test/ HTTP/1."
    )
    out = b"".join(rewriter.feed(bytes((byte,))) for byte in second)
    # The body is passed as it is, even where it looks like a request for another server.
    assert out == (
        b"POST /b HTTP/1.1\r\nHost: web.test\r\nContent-Length: 26\r\n\r\n"
        b"GET http://x.test/ HTTP/1."
    )
    assert rewriter.stop_reason is None


def test_chunked_bodies_are_followed_to_the_next_request() -> None:
    server, _ = _forwarding(
        b"POST http://web.test/up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    rewriter = server.upstream_rewriter()
    assert rewriter is not None
    body = b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nTrailer: x\r\n\r\n"
    nxt = b"GET http://web.test/next HTTP/1.1\r\n\r\n"
    assert rewriter.feed(body + nxt) == body + b"GET /next HTTP/1.1\r\nHost: web.test\r\n\r\n"


def test_a_request_for_another_server_stops_the_forwarding() -> None:
    server, _ = _forwarding(b"GET http://web.test/ HTTP/1.1\r\n\r\n")
    rewriter = server.upstream_rewriter()
    assert rewriter is not None
    assert rewriter.feed(b"GET http://other.test/ HTTP/1.1\r\n\r\n") == b""
    assert rewriter.stop_reason is not None and "other.test:80" in rewriter.stop_reason
    assert rewriter.feed(b"GET http://web.test/ HTTP/1.1\r\n\r\n") == b""


def test_a_tunnel_has_no_rewriter() -> None:
    server = HttpProxyServer()
    server.receive(b"CONNECT a.test:443 HTTP/1.1\r\n\r\n")
    assert server.upstream_rewriter() is None
