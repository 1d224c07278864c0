"""The ClientHello peek on real ClientHellos (openssl s_client, Python's ssl) and on garbage."""

from __future__ import annotations

import socket
import ssl
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import recv_exactly
from flowtap.proxy.tls_hello import (
    NEED_MORE,
    ClientHello,
    NotTls,
    peek_client_hello,
    version_name,
)

TLS13, TLS12 = 0x0304, 0x0303


def openssl_client_hello(*args: str) -> bytes:
    """The first TLS record `openssl s_client` sends to a loopback listener."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        client = subprocess.Popen(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            server.settimeout(20)
            conn, _ = server.accept()
            with conn:
                conn.settimeout(20)
                header = recv_exactly(conn, 5)
                return header + recv_exactly(conn, int.from_bytes(header[3:5], "big"))
        finally:
            client.kill()
            client.wait(10)


def python_client_hello(
    server_hostname: str | None,
    alpn: list[str] | None = None,
    maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
) -> bytes:
    """The bytes Python's ssl writes first as a client, through a memory BIO."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.maximum_version = maximum
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def reframe(hello: bytes, record_bytes: int) -> bytes:
    """The same handshake message cut into records of at most `record_bytes` bytes each."""
    header, message = hello[:5], hello[5:]
    out = b""
    for start in range(0, len(message), record_bytes):
        piece = message[start : start + record_bytes]
        out += header[:3] + len(piece).to_bytes(2, "big") + piece
    return out


def test_python_client_hello_gives_sni_alpn_and_versions() -> None:
    hello = python_client_hello("example.test", ["h2", "http/1.1"])
    assert peek_client_hello(hello) == ClientHello(
        sni="example.test", alpn=("h2", "http/1.1"), versions=(TLS13, TLS12), size_bytes=len(hello)
    )


def test_openssl_tls13_client_hello() -> None:
    hello = openssl_client_hello("-servername", "svc.example.test", "-alpn", "h2,http/1.1")
    result = peek_client_hello(hello)
    assert isinstance(result, ClientHello)
    assert result.sni == "svc.example.test"
    assert result.alpn == ("h2", "http/1.1")
    assert TLS13 in result.versions
    assert result.size_bytes == len(hello)


def test_openssl_tls12_only_client_hello_offers_tls12() -> None:
    result = peek_client_hello(openssl_client_hello("-servername", "old.test", "-tls1_2"))
    assert isinstance(result, ClientHello)
    assert result.sni == "old.test"
    assert result.versions == (TLS12,)
    assert result.alpn == ()
    assert version_name(result.versions[0]) == "TLSv1.2"


def test_client_hello_without_sni() -> None:
    from_openssl = peek_client_hello(openssl_client_hello("-noservername"))
    from_python = peek_client_hello(python_client_hello(None))
    assert isinstance(from_openssl, ClientHello) and from_openssl.sni is None
    assert isinstance(from_python, ClientHello) and from_python.sni is None


def test_ip_address_as_sni_is_given_as_sent() -> None:
    # Python's ssl leaves SNI out for an address; openssl s_client sends what it is told.
    result = peek_client_hello(openssl_client_hello("-servername", "127.0.0.1"))
    assert isinstance(result, ClientHello)
    assert result.sni == "127.0.0.1"
    no_sni = peek_client_hello(python_client_hello("127.0.0.1"))
    assert isinstance(no_sni, ClientHello) and no_sni.sni is None


def test_every_prefix_of_a_client_hello_needs_more() -> None:
    hello = python_client_hello("split.example.test", ["http/1.1"])
    for end in range(len(hello)):
        assert peek_client_hello(hello[:end]) == NEED_MORE, end
    assert isinstance(peek_client_hello(hello), ClientHello)


def test_one_byte_segments_accumulated_give_the_same_hello() -> None:
    hello = openssl_client_hello("-servername", "bytes.test", "-alpn", "h2")
    buffered = bytearray()
    results = []
    for byte in hello:
        buffered.append(byte)
        results.append(peek_client_hello(buffered))
    assert all(result == NEED_MORE for result in results[:-1])
    assert results[-1] == peek_client_hello(hello)


@pytest.mark.parametrize("record_bytes", [1, 7, 100])
def test_hello_fragmented_over_many_records(record_bytes: int) -> None:
    hello = python_client_hello("frag.example.test", ["h2"])
    fragmented = reframe(hello, record_bytes)
    result = peek_client_hello(fragmented)
    assert isinstance(result, ClientHello)
    assert result.sni == "frag.example.test" and result.alpn == ("h2",)
    assert result.size_bytes == len(fragmented)
    for end in range(0, len(fragmented), 97):
        assert peek_client_hello(fragmented[:end]) == NEED_MORE


def test_bytes_after_the_hello_are_not_read() -> None:
    hello = python_client_hello("a.test")
    result = peek_client_hello(hello + b"\x17\x03\x03\x00\x05hello and more")
    assert isinstance(result, ClientHello) and result.size_bytes == len(hello)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.1\r\n", "first byte 0x47"),
        (b"*1\r\n$4\r\nPING\r\n", "first byte 0x2a"),
        (b"\x16GET / HTTP/1.1\r\n", "record version 0x47"),
        (b"\x16\x03\x09", "record version 0x0309"),
        (b"\x16\x03\x01\x00\x00", "an empty TLS record"),
        (b"\x16\x03\x01\xff\xff", "a TLS record of 65535 bytes"),
        (b"\x16\x03\x01\x00\x10\x02", "handshake message type 2 is not a ClientHello"),
        (b"\x16\x03\x01\x00\x10\x01\x00\x00\x05", "is too short"),
        (b"\x80\x2e\x01\x00\x02", "first byte 0x80"),  # an SSLv2-style hello
    ],
)
def test_garbage_is_not_tls_as_soon_as_it_shows(data: bytes, reason: str) -> None:
    result = peek_client_hello(data)
    assert isinstance(result, NotTls)
    assert reason in result.reason


def test_a_hello_whose_inner_lengths_lie_is_not_tls() -> None:
    hello = bytearray(python_client_hello("lie.example.test"))
    # Offset 5+4+2+32 is the session id length: claim more than the message holds.
    hello[43] = 0xFF
    result = peek_client_hello(hello)
    assert isinstance(result, NotTls) and "malformed ClientHello" in result.reason


def test_a_hello_with_a_record_of_another_type_inside_is_not_tls() -> None:
    fragmented = bytearray(reframe(python_client_hello("x.test"), 50))
    fragmented[55] = 0x17  # the second record's type: application data
    result = peek_client_hello(fragmented)
    assert isinstance(result, NotTls) and "type 0x17 inside the ClientHello" in result.reason


def test_empty_input_needs_more() -> None:
    assert peek_client_hello(b"") == NEED_MORE


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_give_one_of_three_answers(data: bytes) -> None:
    result = peek_client_hello(data)
    assert result == NEED_MORE or isinstance(result, NotTls | ClientHello)


@pytest.fixture(scope="module")
def fuzz_hello() -> bytes:
    return python_client_hello("fuzz.example.test", ["h2", "http/1.1"])


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_a_real_hello_with_one_byte_changed_never_raises(
    fuzz_hello: bytes, data: st.DataObject
) -> None:
    hello = bytearray(fuzz_hello)
    position = data.draw(st.integers(0, len(hello) - 1))
    hello[position] = data.draw(st.integers(0, 255))
    result = peek_client_hello(hello)
    assert result == NEED_MORE or isinstance(result, NotTls | ClientHello)
