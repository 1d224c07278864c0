"""Protocol summaries over byte strings, no sockets."""

from __future__ import annotations

import contextlib
import os
import ssl

import redis.connection
from scapy.layers.dns import DNS, DNSQR, DNSRR

from flowtap.inspector.summary import entropy_bits_per_byte, escape_bytes, summarize


def _client_hello(server_name: str, alpn: list[str]) -> bytes:
    """The ClientHello Python's own TLS stack sends, taken from a memory BIO."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_http_request_line_status_and_headers_are_summarised() -> None:
    up = b"GET /index.html HTTP/1.1\r\nHost: example.test\r\nUser-Agent: curl/8\r\n\r\n"
    down = b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found"
    summary = summarize(up, down)
    assert summary.protocol == "http"
    assert summary.headline == "GET /index.html (example.test) → 404 Not Found"
    assert ">   User-Agent: curl/8" in summary.details
    assert "< HTTP/1.1 404 Not Found" in summary.details
    assert "<   Content-Length: 9" in summary.details


def test_http_pipelined_requests_are_counted() -> None:
    up = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n"
    summary = summarize(up, b"")
    assert summary.headline == "GET /a (h) (+1 more)"
    assert "> GET /b HTTP/1.1" in summary.details


def test_tls_client_hello_gives_version_sni_and_alpn() -> None:
    hello = _client_hello("api.example.test", ["h2", "http/1.1"])
    summary = summarize(hello, b"")
    assert summary.protocol == "tls"
    assert summary.headline == "TLS 1.3 ClientHello SNI api.example.test ALPN h2,http/1.1"
    assert ">   server name: api.example.test" in summary.details


def test_truncated_tls_record_does_not_raise() -> None:
    hello = _client_hello("a.test", [])
    for cut in (5, 9, 40, 80, len(hello) - 3):
        summary = summarize(hello[:cut], b"")
        assert summary.protocol in ("tls", "binary", "text")


def test_dns_query_and_answer_over_udp() -> None:
    query = bytes(DNS(id=7, rd=1, qd=DNSQR(qname="flowtap.test", qtype="A")))
    answer = bytes(
        DNS(
            id=7,
            qr=1,
            qd=DNSQR(qname="flowtap.test", qtype="A"),
            an=DNSRR(rrname="flowtap.test", type="A", rdata="127.0.0.9"),
        )
    )
    summary = summarize(query, answer, transport="udp")
    assert summary.protocol == "dns"
    assert summary.headline == "query flowtap.test. A → 127.0.0.9"
    assert "<   flowtap.test. A 127.0.0.9" in summary.details


def test_dns_over_tcp_is_length_prefixed() -> None:
    query = bytes(DNS(id=9, qd=DNSQR(qname="x.test", qtype="AAAA")))
    framed = len(query).to_bytes(2, "big") + query
    summary = summarize(framed, b"", server_port=53)
    assert summary.headline == "query x.test. AAAA"


def test_redis_commands_from_the_real_client_encoder() -> None:
    connection = redis.connection.Connection()
    up = b"".join(
        connection.pack_command("SET", "greeting", "hello")
        + connection.pack_command("GET", "greeting")
    )
    down = b"+OK\r\n$5\r\nhello\r\n"
    summary = summarize(up, down)
    assert summary.protocol == "redis"
    assert summary.headline == "SET greeting hello; GET greeting"
    assert "< +OK" in summary.details
    assert "< bulk 5 B" in summary.details


def test_redis_inline_ping() -> None:
    summary = summarize(b"PING\r\n", b"+PONG\r\n")
    assert (summary.protocol, summary.headline) == ("redis", "PING")


def test_plain_text_falls_back_to_its_first_line() -> None:
    summary = summarize(b"hello there\r\nsecond line\r\n", b"250 ok\r\n")
    assert summary.protocol == "text"
    assert summary.headline == "> hello there"


def test_random_bytes_fall_back_to_an_entropy_summary() -> None:
    data = os.urandom(4096)
    summary = summarize(b"", data)
    assert summary.protocol == "binary"
    assert summary.headline.startswith("< 4096 B binary, entropy 7.")


def test_nothing_sent_gives_an_empty_summary() -> None:
    assert summarize(b"", b"").headline == ""


def test_entropy_of_constant_and_two_symbol_data() -> None:
    assert entropy_bits_per_byte(b"aaaa") == 0.0
    assert entropy_bits_per_byte(b"abab") == 1.0


def test_escape_bytes_shows_control_bytes_as_escapes() -> None:
    assert escape_bytes(b"a\r\n\x00\xff\\") == "a\\r\\n\\x00\\xff\\\\"
    assert escape_bytes(b"a\nb", keep_newlines=True) == "a\\n\nb"
