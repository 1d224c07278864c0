"""What the inspector makes of intercepted TLS flows, with real peers: curl and openssl s_server."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from capture_checks import assert_tshark_clean, flowtap_show
from test_tls_relay import Pki, closed_records, pki, s_server, start_intercepting

from conftest import FlowtapProcess

__all__ = ["pki", "s_server"]  # fixtures this module's tests use
# The plain request's upstream (expecting a ClientHello) closes on it at once.
ALLOWED = ("Connection reset (RST)",)


def curl_through(pki: Pki, port: int, *extra: str) -> subprocess.CompletedProcess[bytes]:
    """curl, trusting flowtap's CA, asks https://localhost:PORT/ through the relay."""
    return subprocess.run(
        ["curl", "-sS", "--cacert", str(pki.flowtap_ca_cert), *extra,
         f"https://localhost:{port}/"],
        capture_output=True, timeout=30,
    )  # fmt: skip


def test_show_filter_tls_and_sni_selects_an_intercepted_flow_of_a_capture(
    flowtap: type[FlowtapProcess], pki: Pki, s_server: Callable[..., int], tmp_path: Path
) -> None:
    upstream = s_server(*pki.server("rsa"), "-www")
    capture = tmp_path / "intercepted.pcapng"
    relay = start_intercepting(
        flowtap, pki, upstream, "--upstream-ca", str(pki.upstream_ca), "--pcap", str(capture)
    )
    result = curl_through(pki, relay.port, "--http1.1")
    assert result.returncode == 0, result.stderr
    # A flow that is not TLS, in the same capture: the filter must leave it out.
    plain = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", f"http://127.0.0.1:{relay.port}/"],
        capture_output=True, timeout=30,
    )  # fmt: skip
    assert plain.returncode != 0  # s_server answers plain HTTP with nothing useful
    closed_records(relay, 2)
    assert relay.stop() == 0
    assert_tshark_clean(capture, allowed_warnings=ALLOWED)

    listing = flowtap_show(str(capture), "--json")
    assert listing.returncode == 0, listing.stderr
    every = [json.loads(line) for line in listing.stdout.splitlines()]
    assert len(every) == 2

    picked = flowtap_show(str(capture), "--filter", "tls and sni localhost", "--json")
    assert picked.returncode == 0, picked.stderr
    (record,) = [json.loads(line) for line in picked.stdout.splitlines()]
    assert record["tls"]["mode"] == "intercept" and record["tls"]["sni"] == "localhost"
    assert record["tls"]["upstream_subject"] == "CN=rsa"
    # The bytes are the plaintext: the ClientHello the sni came from is not in them.
    assert record["bytes_down"] >= len(result.stdout)

    shown = flowtap_show(str(capture), "--flow", str(record["flow"]))
    assert shown.returncode == 0, shown.stderr
    assert b"[tls intercept sni=localhost TLSv1.3" in shown.stdout
    assert b"GET / HTTP/1.1" in shown.stdout  # the plaintext request, as curl wrote it

    for other in ("sni example.com", "not tls and sni localhost", "tls and proto tls"):
        none = flowtap_show(str(capture), "--filter", other, "--json")
        assert none.returncode == 0, none.stderr
        assert none.stdout == b"", other
    plain_only = flowtap_show(str(capture), "--filter", "not tls", "--json")
    (plain_record,) = [json.loads(line) for line in plain_only.stdout.splitlines()]
    assert plain_record["flow"] != record["flow"]
    assert plain_record["tls"]["mode"] == "not-tls"
