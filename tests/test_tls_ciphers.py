"""The cipher suites of intercepted flows: AES-128-GCM on both legs where the peers allow it,
whatever order the client offers, and OpenSSL's own order where the binding is unconfirmed."""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_tls_relay import (
    Pki,
    closed_records,
    pki,
    relay_in_process,
    s_server,
    start_intercepting,
    tls_client,
)

from conftest import FlowtapProcess, wait_for
from flowtap.proxy import tls_native
from flowtap.proxy.flow import TlsFacts
from flowtap.proxy.tls_ciphers import prefer_aes128

__all__ = ["pki", "s_server"]  # fixtures

AES128 = "TLS_AES_128_GCM_SHA256"
AES256 = "TLS_AES_256_GCM_SHA384"
CHACHA = "TLS_CHACHA20_POLY1305_SHA256"
GET = b"GET / HTTP/1.0\r\n\r\n"


def upstream_says(page: bytes) -> str:
    """The version and cipher `openssl s_server -www` says its client's connection has."""
    found = re.search(rb"New, (TLSv[\d.]+), Cipher is (\S+)", page)
    assert found, page[-300:]
    return f"{found.group(1).decode()} {found.group(2).decode()}"


def fetch(sock: ssl.SSLSocket) -> bytes:
    sock.sendall(GET)
    page = b""
    while chunk := sock.recv(65536):
        page += chunk
    return page


@pytest.mark.parametrize(
    ("version", "client_ciphers", "aes256_first", "expected"),
    [
        ("-tls1_3", None, AES256, AES128),
        (
            "-tls1_2",
            "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256",
            "ECDHE-ECDSA-AES256-GCM-SHA384",
            "ECDHE-ECDSA-AES128-GCM-SHA256",
        ),
    ],
)
def test_a_client_offering_aes256_first_gets_aes128_on_both_legs(
    flowtap: type[FlowtapProcess],
    pki: Pki,
    s_server: Callable[..., int],
    version: str,
    client_ciphers: str | None,
    aes256_first: str,
    expected: str,
) -> None:
    # An upstream that honours its client's order (OpenSSL's default, no -serverpref).
    upstream = s_server(*pki.server("ecdsa"), "-www", version)
    name = "TLSv1.3" if version == "-tls1_3" else "TLSv1.2"

    def client(cafile: Path, port: int) -> ssl.SSLSocket:
        context = ssl.create_default_context(cafile=str(cafile))
        if client_ciphers is not None:
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            context.set_ciphers(client_ciphers)
        first = next(c["name"] for c in context.get_ciphers() if name in c["protocol"])
        assert first == aes256_first
        raw = socket.create_connection(("127.0.0.1", port), timeout=20)
        return context.wrap_socket(raw, server_hostname="svc.test")

    # Straight to the upstream, the client's first choice is what it gets: the order counts.
    with client(pki.upstream_ca, upstream) as direct:
        assert upstream_says(fetch(direct)) == f"{name} {aes256_first}"
    relay = start_intercepting(flowtap, pki, upstream, "--upstream-ca", str(pki.upstream_ca))
    with client(pki.flowtap_ca_cert, relay.port) as through:
        cipher = through.cipher()
        assert cipher is not None and cipher[0] == expected
        assert upstream_says(fetch(through)) == f"{name} {expected}"
    (record,) = closed_records(relay, 1)
    assert (record["tls"]["version"], record["tls"]["cipher"]) == (name, expected)
    assert (record["tls"]["client_version"], record["tls"]["client_cipher"]) == (name, expected)


@pytest.mark.parametrize(
    ("offered", "client_leg"),
    [
        (AES256, AES256),  # only AES-256
        (CHACHA, CHACHA),  # only ChaCha20
        # ChaCha20 first: a client without AES instructions keeps it (SSL_OP_PRIORITIZE_CHACHA)
        (f"{CHACHA}:{AES128}", CHACHA),
    ],
)
def test_a_client_offering_other_suites_is_served_with_its_own(
    flowtap: type[FlowtapProcess],
    pki: Pki,
    s_server: Callable[..., int],
    offered: str,
    client_leg: str,
) -> None:
    upstream = s_server(*pki.server("ecdsa"), "-www")
    relay = start_intercepting(flowtap, pki, upstream, "--upstream-ca", str(pki.upstream_ca))
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{relay.port}", "-servername", "svc.test",
         "-CAfile", str(pki.flowtap_ca_cert), "-verify_return_error", "-ign_eof", "-brief",
         "-ciphersuites", offered],
        input=GET, capture_output=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"Ciphersuite: {client_leg}".encode() in result.stderr
    # The upstream leg is flowtap's own offer, whatever the client's.
    assert upstream_says(result.stdout) == f"TLSv1.3 {AES128}"
    (record,) = closed_records(relay, 1)
    assert record["tls"]["cipher"] == AES128 and record["tls"]["client_cipher"] == client_leg
    facts = TlsFacts.from_dict(record["tls"])
    assert facts.client_leg() == f"client TLSv1.3 {client_leg}"
    assert f"TLSv1.3 {AES128} client TLSv1.3 {client_leg}" in facts.summary()


def test_the_facts_name_the_client_leg_only_where_it_differs() -> None:
    same = TlsFacts("intercept", version="TLSv1.3", cipher=AES128, client_version="TLSv1.3",
                    client_cipher=AES128)  # fmt: skip
    assert same.client_leg() is None and "client" not in same.summary()
    assert TlsFacts("intercept", version="TLSv1.3", cipher=AES128).client_leg() is None
    other = TlsFacts("intercept", version="TLSv1.3", cipher=AES128, client_version="TLSv1.2",
                     client_cipher="ECDHE-ECDSA-CHACHA20-POLY1305")  # fmt: skip
    assert other.client_leg() == "client TLSv1.2 ECDHE-ECDSA-CHACHA20-POLY1305"


@pytest.fixture
def unconfirmed_layout(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The native binding as where `_ssl`'s libssl cannot be found (OpenSSL linked statically)."""
    monkeypatch.setattr(tls_native, "_libssl_paths", list)
    tls_native.binding.cache_clear()
    assert tls_native.binding() is None
    yield
    monkeypatch.undo()
    tls_native.binding.cache_clear()


def test_the_preference_sets_tls13_order_only_with_the_binding(unconfirmed_layout: None) -> None:
    fallback = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert prefer_aes128(fallback) is False
    names = [cipher["name"] for cipher in fallback.get_ciphers()]
    assert names[0] == AES256  # OpenSSL's default TLS 1.3 order
    assert names[3] == "ECDHE-ECDSA-AES128-GCM-SHA256"  # TLS 1.2's is Python's to set


def test_with_the_binding_tls13_and_tls12_orders_start_with_aes128() -> None:
    for protocol in (ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS_CLIENT):
        context = ssl.SSLContext(protocol)
        assert prefer_aes128(context) is True
        names = [cipher["name"] for cipher in context.get_ciphers()]
        assert names[:4] == [AES128, AES256, CHACHA, "ECDHE-ECDSA-AES128-GCM-SHA256"]


def test_with_the_layout_unconfirmed_flows_are_intercepted_in_openssls_order(
    unconfirmed_layout: None, pki: Pki, s_server: Callable[..., int]
) -> None:
    upstream = s_server(*pki.server("ecdsa"), "-www")
    with relay_in_process(pki, upstream, upstream_ca=pki.upstream_ca) as (relay, recorder):
        with tls_client(pki, relay.listeners[0].address.port) as client:
            cipher = client.cipher()
            assert cipher is not None and cipher[0] == AES256
            assert upstream_says(fetch(client)) == f"TLSv1.3 {AES256}"
            # Its records go through the memory BIOs: OpenSSL does not read the sockets.
            (flow,) = [flow for tcp in relay._tcp for flow in tcp.flows.values()]
            assert flow.tls.reads_directly is False
        wait_for(lambda: recorder.closed_count() == 1, 10, "the flow closed")


def test_a_context_whose_pointer_is_not_confirmed_keeps_openssls_tls13_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unconfirmed(self: tls_native.Binding, context: ssl.SSLContext) -> int:
        raise ssl.SSLError("unexpected layout of ssl contexts")

    # The binding is found first (its check reads a context's pointer too, and its answer is
    # kept for the process).
    assert tls_native.binding() is not None
    monkeypatch.setattr(tls_native.Binding, "context_pointer", unconfirmed)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert prefer_aes128(context) is False
    assert context.get_ciphers()[0]["name"] == AES256
