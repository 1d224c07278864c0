"""Proxy-listener rules on plain values: who may connect, where to, and the option parsers."""

from __future__ import annotations

import pytest

from flowtap.proxy.errors import FlowtapError
from flowtap.proxy.flow import Address, Requested
from flowtap.proxy.modes import transparent_target
from flowtap.proxy.policy import (
    DEFAULT_DENIED,
    ProxyPolicy,
    parse_credentials,
    parse_network,
    parse_ports,
)


def _policy(**kwargs: object) -> ProxyPolicy:
    return ProxyPolicy(**kwargs)  # type: ignore[arg-type]


def test_the_metadata_address_is_denied_by_default_in_either_spelling() -> None:
    policy = _policy()
    assert policy.destination_refusal("169.254.169.254", 80) is not None
    assert policy.destination_refusal("::ffff:169.254.169.254", 80) is not None
    assert policy.destination_refusal("fd00:ec2::254", 80) is not None
    assert policy.destination_refusal("169.254.169.253", 80) is None
    assert policy.destination_refusal("metadata.test", 80) is None  # a name: checked resolved


def test_allow_to_lifts_a_denial_and_deny_to_adds_networks() -> None:
    policy = _policy(
        deny_to=(*DEFAULT_DENIED, parse_network("--deny-to", "10.0.0.0/8")),
        allow_to=(parse_network("--allow-to", "169.254.169.254"),),
    )
    assert policy.destination_refusal("169.254.169.254", 80) is None
    refusal = policy.destination_refusal("10.200.0.1", 80)
    assert refusal is not None and "10.0.0.0/8" in refusal


def test_allow_ports_limits_destination_ports() -> None:
    policy = _policy(allow_ports=parse_ports("--allow-ports", "80,443,8000-8999"))
    assert [policy.destination_refusal("127.0.0.1", p) is None for p in (80, 443, 8000, 8999)] == [
        True
    ] * 4
    refusal = policy.destination_refusal("127.0.0.1", 9000)
    assert refusal is not None and "--allow-ports" in refusal


def test_allow_from_admits_only_its_networks() -> None:
    policy = _policy(allow_from=(parse_network("--allow-from", "192.168.1.0/24"),))
    assert policy.is_client_allowed("192.168.1.7")
    assert policy.is_client_allowed("::ffff:192.168.1.7")
    assert not policy.is_client_allowed("192.168.2.7")
    assert not policy.is_client_allowed("::1")
    assert _policy().is_client_allowed("203.0.113.9")


@pytest.mark.parametrize(
    ("call", "text"),
    [
        (lambda: parse_network("--deny-to", "10.0.0.0/33"), "--deny-to '10.0.0.0/33'"),
        (lambda: parse_ports("--allow-ports", "80,x"), "'x' is not a port"),
        (lambda: parse_ports("--allow-ports", "90-80"), "low to high"),
        (lambda: parse_credentials("--auth", "nocolon"), "USER:PASS"),
    ],
)
def test_malformed_option_values_are_one_line_errors(call: object, text: str) -> None:
    with pytest.raises(FlowtapError) as caught:
        call()  # type: ignore[operator]
    assert text in str(caught.value)
    assert "\n" not in str(caught.value)


def test_ports_in_digits_beyond_ascii_are_one_line_errors() -> None:
    from flowtap.proxy.flow import Address

    with pytest.raises(FlowtapError):
        parse_ports("--allow-ports", "8\u00b2")
    with pytest.raises(FlowtapError):
        Address.parse("127.0.0.1:8\u00b2")


def test_a_transparent_client_goes_at_once_only_where_it_may_and_not_back_to_the_listener() -> None:
    listener = Address("127.0.0.1", 8081)
    policy = _policy(allow_ports=parse_ports("--allow-ports", "80,443"))
    assert transparent_target(listener, policy, "10.0.0.7", 443) == (
        Address("10.0.0.7", 443),
        Requested("10.0.0.7", 443),
    )
    assert transparent_target(listener, policy, "10.0.0.7", 22) is None
    assert transparent_target(listener, policy, "169.254.169.254", 80) is None
    assert transparent_target(listener, _policy(), "127.0.0.1", 8081) is None
