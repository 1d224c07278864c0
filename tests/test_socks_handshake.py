"""The SOCKS5 / SOCKS4a handshake on byte strings alone: every reply code, every bad input."""

from __future__ import annotations

import struct

import pytest

from flowtap.proxy.flow import Address, CloseReason, Requested
from flowtap.proxy.handshake import Command, Failure, OpenUpstream, Reject, SendReply
from flowtap.proxy.socks5 import SocksServer, pack_address, parse_address


def _request(cmd: int, address: bytes) -> bytes:
    return bytes((5, cmd, 0)) + address


def _connect_to(host: str, port: int) -> bytes:
    return _request(1, pack_address(host, port))


def test_connect_by_name_without_auth_asks_for_the_name() -> None:
    server = SocksServer()
    assert server.receive(b"\x05\x01\x00") == [SendReply(b"\x05\x00")]
    events = server.receive(_connect_to("example.test", 443))
    assert events == [OpenUpstream(Requested("example.test", 443), Command.CONNECT, b"")]


@pytest.mark.parametrize(
    ("host", "bound", "reply_tail"),
    [
        ("10.1.2.3", Address("127.0.0.1", 4000), b"\x01\x7f\x00\x00\x01\x0f\xa0"),
        ("2001:db8::1", Address("::1", 4001), b"\x04" + b"\x00" * 15 + b"\x01\x0f\xa1"),
    ],
)
def test_connect_by_address_and_its_success_reply(
    host: str, bound: Address, reply_tail: bytes
) -> None:
    server = SocksServer()
    server.receive(b"\x05\x02\x00\x02")
    (event,) = server.receive(_connect_to(host, 80))
    assert event == OpenUpstream(Requested(host, 80), Command.CONNECT, b"")
    assert server.succeeded(bound) == b"\x05\x00\x00" + reply_tail


def test_handshake_split_into_single_bytes_decides_the_same() -> None:
    whole = b"\x05\x01\x00" + _connect_to("a.test", 8080)
    server = SocksServer()
    events = []
    for byte in whole:
        events += server.receive(bytes((byte,)))
    assert events == [
        SendReply(b"\x05\x00"),
        OpenUpstream(Requested("a.test", 8080), Command.CONNECT, b""),
    ]


def test_greeting_and_request_in_one_segment_keep_pipelined_bytes() -> None:
    server = SocksServer()
    events = server.receive(b"\x05\x01\x00" + _connect_to("127.0.0.1", 6379) + b"*1\r\n")
    assert events[-1] == OpenUpstream(Requested("127.0.0.1", 6379), Command.CONNECT, b"*1\r\n")


def test_udp_associate_is_its_own_command() -> None:
    server = SocksServer()
    server.receive(b"\x05\x01\x00")
    (event,) = server.receive(_request(3, pack_address("0.0.0.0", 0)))
    assert event == OpenUpstream(Requested("0.0.0.0", 0), Command.UDP_ASSOCIATE, b"")


def test_bind_is_refused_with_reply_07() -> None:
    server = SocksServer()
    server.receive(b"\x05\x01\x00")
    (event,) = server.receive(_request(2, pack_address("127.0.0.1", 1)))
    assert isinstance(event, Reject)
    assert event.reply[:2] == b"\x05\x07"
    assert event.reason is CloseReason.HANDSHAKE_ERROR
    assert "BIND" in event.error


def test_unknown_command_is_refused_with_reply_07() -> None:
    server = SocksServer()
    server.receive(b"\x05\x01\x00")
    (event,) = server.receive(_request(9, pack_address("127.0.0.1", 1)))
    assert isinstance(event, Reject) and event.reply[:2] == b"\x05\x07"


def test_unknown_address_type_is_refused_with_reply_08() -> None:
    server = SocksServer()
    server.receive(b"\x05\x01\x00")
    (event,) = server.receive(b"\x05\x01\x00\x09\x00\x00")
    assert isinstance(event, Reject) and event.reply[:2] == b"\x05\x08"


def test_empty_host_name_is_refused_with_reply_08() -> None:
    server = SocksServer()
    server.receive(b"\x05\x01\x00")
    (event,) = server.receive(b"\x05\x01\x00\x03\x00\x00\x50")
    assert isinstance(event, Reject) and event.reply[:2] == b"\x05\x08"


def test_request_of_another_version_gets_general_failure() -> None:
    server = SocksServer()
    server.receive(b"\x05\x01\x00")
    (event,) = server.receive(b"\x06\x01\x00" + pack_address("127.0.0.1", 1))
    assert isinstance(event, Reject) and event.reply[:2] == b"\x05\x01"


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\n", b"\x00", b"\xff\xff", b"\x16\x03\x01"])
def test_garbage_greeting_gets_no_acceptable_methods_and_a_reason(garbage: bytes) -> None:
    (event,) = SocksServer().receive(garbage)
    assert event == Reject(
        b"\x05\xff", CloseReason.HANDSHAKE_ERROR, event.error if isinstance(event, Reject) else ""
    )
    assert isinstance(event, Reject) and "not a SOCKS greeting" in event.error


def test_client_without_no_auth_method_is_refused() -> None:
    (event,) = SocksServer().receive(b"\x05\x01\x02")
    assert isinstance(event, Reject) and event.reply == b"\x05\xff"


def test_auth_required_and_right_credentials_name_the_user() -> None:
    server = SocksServer({"alice": "s3cret"})
    assert server.receive(b"\x05\x02\x00\x02") == [SendReply(b"\x05\x02")]
    assert server.receive(b"\x01\x05alice\x06s3cret") == [SendReply(b"\x01\x00")]
    (event,) = server.receive(_connect_to("db.test", 5432))
    assert event == OpenUpstream(Requested("db.test", 5432, "alice"), Command.CONNECT, b"")


@pytest.mark.parametrize("auth", [b"\x01\x05alice\x05wrong", b"\x01\x03bob\x06s3cret"])
def test_wrong_credentials_get_rfc1929_failure_01(auth: bytes) -> None:
    server = SocksServer({"alice": "s3cret"})
    server.receive(b"\x05\x01\x02")
    (event,) = server.receive(auth)
    assert isinstance(event, Reject)
    assert event.reply == b"\x01\x01"
    assert "wrong credentials" in event.error


def test_client_offering_only_no_auth_when_auth_is_required_is_refused() -> None:
    (event,) = SocksServer({"alice": "x"}).receive(b"\x05\x01\x00")
    assert isinstance(event, Reject) and event.reply == b"\x05\xff"


def test_auth_subnegotiation_of_wrong_version_is_refused() -> None:
    server = SocksServer({"alice": "x"})
    server.receive(b"\x05\x01\x02")
    (event,) = server.receive(b"\x05\x05alice\x01x")
    assert isinstance(event, Reject) and event.reply == b"\x01\x01"


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (Failure.NOT_ALLOWED, 0x02),
        (Failure.NETWORK_UNREACHABLE, 0x03),
        (Failure.HOST_UNREACHABLE, 0x04),
        (Failure.REFUSED, 0x05),
        (Failure.TIMEOUT, 0x06),
        (Failure.GENERAL, 0x01),
    ],
)
def test_each_failure_has_its_reply_code(failure: Failure, code: int) -> None:
    server = SocksServer()
    server.receive(b"\x05\x01\x00" + _connect_to("x.test", 1))
    assert server.failed(failure) == bytes((5, code, 0, 1, 0, 0, 0, 0, 0, 0))


def test_incomplete_greeting_waits_and_times_out_without_reply() -> None:
    server = SocksServer()
    assert server.receive(b"\x05\x03\x00") == []
    assert server.timed_out() == b""


def test_socks4a_connect_by_name_with_pipelined_bytes() -> None:
    server = SocksServer()
    request = b"\x04\x01" + struct.pack("!H", 6379) + b"\x00\x00\x00\x01" + b"me\x00redis.test\x00"
    (event,) = server.receive(request + b"PING\r\n")
    assert event == OpenUpstream(Requested("redis.test", 6379, "me"), Command.CONNECT, b"PING\r\n")
    assert server.succeeded(Address("127.0.0.1", 1)) == b"\x00\x5a" + b"\x00" * 6
    server2 = SocksServer()
    server2.receive(request)
    assert server2.failed(Failure.REFUSED) == b"\x00\x5b" + b"\x00" * 6


def test_socks4_connect_by_address_split_anywhere() -> None:
    request = b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00"
    server = SocksServer()
    events = []
    for byte in request:
        events += server.receive(bytes((byte,)))
    assert events == [OpenUpstream(Requested("127.0.0.1", 80), Command.CONNECT, b"")]


def test_socks4_bind_and_socks4_with_auth_required_are_rejected_with_5b() -> None:
    (bind,) = SocksServer().receive(b"\x04\x02\x00\x50\x7f\x00\x00\x01\x00")
    assert isinstance(bind, Reject) and bind.reply[:2] == b"\x00\x5b"
    (auth,) = SocksServer({"a": "b"}).receive(b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00")
    assert isinstance(auth, Reject) and "credentials" in auth.error


def test_socks4_user_id_that_never_ends_is_rejected() -> None:
    (event,) = SocksServer().receive(b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 300)
    assert isinstance(event, Reject) and event.reply[:2] == b"\x00\x5b"


def test_address_round_trips_through_pack_and_parse() -> None:
    for host in ("1.2.3.4", "::1", "example.test"):
        packed = pack_address(host, 65535)
        assert parse_address(packed, 0) == (host, 65535, len(packed))
        assert parse_address(packed[:-1], 0) is None


def test_receive_after_the_decision_is_a_bug() -> None:
    server = SocksServer()
    server.receive(b"\x05\x01\x00" + _connect_to("x.test", 1))
    with pytest.raises(RuntimeError):
        server.receive(b"more")
