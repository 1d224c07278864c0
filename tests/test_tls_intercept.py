"""TLS interception without sockets: Python ssl client and server objects on memory BIOs,
with `TlsInterception` moving the bytes between them."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest

from flowtap.proxy.tls_ca import CertificateAuthority, load_or_create_ca
from flowtap.proxy.tls_intercept import (
    ALERT_HANDSHAKE_FAILURE,
    Outgoing,
    Phase,
    TlsInterception,
    TlsMode,
    TlsSettings,
)

CAs = tuple[CertificateAuthority, CertificateAuthority]
"""flowtap's CA (clients trust it) and the upstream's (flowtap trusts it)."""


@dataclass
class Peer:
    """One end (client or server) as Python's ssl on memory BIOs."""

    obj: ssl.SSLObject
    incoming: ssl.MemoryBIO
    outgoing: ssl.MemoryBIO
    done: bool = False

    def step(self) -> None:
        if not self.done:
            try:
                self.obj.do_handshake()
                self.done = True
            except ssl.SSLWantReadError:
                pass


@pytest.fixture(scope="module")
def cas(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[CertificateAuthority, CertificateAuthority]:
    base = tmp_path_factory.mktemp("cas")
    return load_or_create_ca(base / "flowtap"), load_or_create_ca(base / "upstream")


def make_client(flowtap_ca: CertificateAuthority, alpn: list[str] | None = None) -> Peer:
    context = ssl.create_default_context(cafile=str(flowtap_ca.cert_file))
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    return Peer(
        context.wrap_bio(incoming, outgoing, server_hostname="svc.test"), incoming, outgoing
    )


def make_server(upstream_ca: CertificateAuthority, alpn: str | None = None) -> Peer:
    context = upstream_ca.server_context("svc.test", alpn=alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    return Peer(context.wrap_bio(incoming, outgoing, server_side=True), incoming, outgoing)


def pump(client: Peer, tls: TlsInterception, server: Peer, rounds: int = 20) -> None:
    """Move bytes every way until nothing moves (the flow's sockets, without sockets)."""
    tls.server_connected()
    for _ in range(rounds):
        client.step()
        server.step()
        moved = False
        if client.outgoing.pending:
            tls.feed_client(client.outgoing.read())
            moved = True
        if server.outgoing.pending:
            tls.feed_server(server.outgoing.read())
            moved = True
        if tls.to_server:
            server.incoming.write(bytes(tls.to_server))
            tls.to_server.clear()
            moved = True
        if tls.to_client:
            client.incoming.write(bytes(tls.to_client))
            tls.to_client.clear()
            moved = True
        if not moved and client.done and server.done:
            return


def settings(cas: CAs, **extra: object) -> TlsSettings:
    flowtap_ca, upstream_ca = cas
    assert upstream_ca.cert_file is not None
    options: dict[str, object] = {"upstream_ca": upstream_ca.cert_file, **extra}
    return TlsSettings(TlsMode.INTERCEPT, flowtap_ca, **options)  # type: ignore[arg-type]


def test_both_handshakes_complete_and_plaintext_is_seen_both_ways(
    cas: CAs,
) -> None:
    client, server = make_client(cas[0]), make_server(cas[1])
    tls = TlsInterception(settings(cas), "127.0.0.1")
    pump(client, tls, server)
    assert client.done and server.done and tls.phase is Phase.OPEN
    client.obj.write(b"ping")
    pump(client, tls, server)
    assert server.obj.read(100) == b"ping"
    server.obj.write(b"pong")
    pump(client, tls, server)
    assert client.obj.read(100) == b"pong"
    assert tls.plaintext_up == [b"ping"] and tls.plaintext_down == [b"pong"]
    assert tls.facts is not None
    assert tls.facts.sni == "svc.test" and tls.facts.version == "TLSv1.3"
    assert tls.facts.upstream_subject == "CN=svc.test"
    # The client was answered with flowtap's leaf, not the upstream's certificate.
    peer = client.obj.getpeercert()
    assert peer is not None and dict(x[0] for x in peer["issuer"])["organizationName"] == "flowtap"


def test_the_client_gets_the_alpn_the_upstream_chose(
    cas: CAs,
) -> None:
    client = make_client(cas[0], alpn=["h2", "http/1.1"])
    server = make_server(cas[1], alpn="http/1.1")
    tls = TlsInterception(settings(cas), "127.0.0.1")
    pump(client, tls, server)
    assert server.obj.selected_alpn_protocol() == "http/1.1"
    assert client.obj.selected_alpn_protocol() == "http/1.1"
    assert tls.facts is not None and tls.facts.offered_alpn == ("h2", "http/1.1")


def test_an_untrusted_upstream_fails_with_the_reason_and_an_alert_for_the_client(
    cas: CAs,
) -> None:
    client, server = make_client(cas[0]), make_server(cas[1])
    tls = TlsInterception(TlsSettings(TlsMode.INTERCEPT, cas[0]), "127.0.0.1")  # system store
    tls.server_connected()
    client.step()
    tls.feed_client(client.outgoing.read())
    server.incoming.write(bytes(tls.to_server))
    server.step()
    tls.feed_server(server.outgoing.read())
    assert tls.phase is Phase.FAILED
    assert tls.error is not None
    assert tls.error.startswith("tls: upstream certificate not trusted: ")
    assert bytes(tls.to_client) == ALERT_HANDSHAKE_FAILURE
    assert tls.facts is not None and tls.facts.verification == "system store"


def test_an_insecure_upstream_context_holds_no_ca_certificates(
    cas: CAs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Unchecked, the upstream's chain needs no CA certificates: with them, OpenSSL looks for
    # the issuer of an unknown one in the system's directory at every handshake.
    monkeypatch.setenv("SSLKEYLOGFILE", str(tmp_path / "sslkeylog"))
    insecure = TlsSettings(TlsMode.INTERCEPT, cas[0], upstream_insecure=True)
    context = insecure.upstream_context(())
    assert context.verify_mode is ssl.CERT_NONE and not context.check_hostname
    assert context.cert_store_stats()["x509"] == 0
    assert context.keylog_filename == str(tmp_path / "sslkeylog")  # as a verifying one has
    client, server = make_client(cas[0]), make_server(cas[1])
    tls = TlsInterception(insecure, "127.0.0.1")
    pump(client, tls, server)
    assert tls.phase is Phase.OPEN, tls.error


def test_bytes_that_are_not_tls_go_to_the_server_untouched(
    cas: CAs,
) -> None:
    tls = TlsInterception(settings(cas), "127.0.0.1")
    tls.feed_client(b"GET / HTTP/1.1\r\n")
    tls.feed_client(b"\r\n")
    tls.feed_server(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert tls.phase is Phase.PLAIN
    assert bytes(tls.to_server) == b"GET / HTTP/1.1\r\n\r\n"
    assert bytes(tls.to_client) == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert tls.facts is not None and tls.facts.mode == "not-tls"


def test_close_notify_from_the_client_reaches_the_server(
    cas: CAs,
) -> None:
    client, server = make_client(cas[0]), make_server(cas[1])
    tls = TlsInterception(settings(cas), "127.0.0.1")
    pump(client, tls, server)
    with pytest.raises(ssl.SSLWantReadError):
        client.obj.unwrap()
    tls.feed_client(client.outgoing.read())
    assert tls.client_done and not tls.server_done
    server.incoming.write(bytes(tls.to_server))
    assert server.obj.read(10) == b""  # what SSLObject.read returns on a close_notify


@pytest.mark.parametrize(
    ("bytes_in", "where"),
    [
        (b"", "waiting for the client's ClientHello"),
        (b"\x16\x03\x01\x02\x00\x01", "waiting for the client's ClientHello"),
    ],
)
def test_a_handshake_timeout_names_where_it_stopped(cas: CAs, bytes_in: bytes, where: str) -> None:
    tls = TlsInterception(settings(cas), "127.0.0.1")
    tls.feed_client(bytes_in)
    tls.handshake_timed_out(2.5)
    assert tls.error == f"tls: handshake not complete within 2.5 s ({where})"


def test_a_timeout_waiting_for_the_upstream_is_told_so(
    cas: CAs,
) -> None:
    client = make_client(cas[0])
    tls = TlsInterception(settings(cas), "127.0.0.1")
    tls.server_connected()
    client.step()
    tls.feed_client(client.outgoing.read())
    assert tls.phase is Phase.UPSTREAM_HANDSHAKE and tls.to_server  # its ClientHello went up
    tls.handshake_timed_out(1)
    assert (
        tls.error == "tls: handshake not complete within 1 s (in the handshake with the upstream)"
    )
    assert bytes(tls.to_client).endswith(ALERT_HANDSHAKE_FAILURE)


def test_keylog_file_is_private_and_gets_both_legs_secrets(cas: CAs, tmp_path: Path) -> None:
    keylog = tmp_path / "keys.log"
    fresh_ca = CertificateAuthority(cas[0].cert, cas[0]._key, cas[0].path, cas[0].cert_file)
    client, server = make_client(cas[0]), make_server(cas[1])
    tls = TlsInterception(settings((fresh_ca, cas[1]), keylog=keylog), "127.0.0.1")
    assert keylog.stat().st_mode & 0o777 == 0o600
    pump(client, tls, server)
    labels = [line.split()[0] for line in keylog.read_text().splitlines()]
    assert labels.count("CLIENT_TRAFFIC_SECRET_0") == 2


def test_a_distrusted_host_is_passed_through_for_ten_minutes_then_intercepted_again(
    cas: CAs,
) -> None:
    tls_settings = settings(cas)
    assert tls_settings.mark_distrusted("Svc.Test", now=100.0) == 10
    reason = tls_settings.passthrough_reason("svc.test", now=100.0 + 599)
    assert reason is not None and "did not trust flowtap's CA for svc.test" in reason
    assert tls_settings.passthrough_reason("other.test", now=101.0) is None
    assert tls_settings.passthrough_reason("svc.test", now=100.0 + 600) is None


def test_a_client_rejecting_the_leaf_marks_its_host_for_passthrough(cas: CAs) -> None:
    tls_settings = settings(cas)
    # This client trusts only the upstream's CA, so it rejects flowtap's leaf.
    context = ssl.create_default_context(cafile=str(cas[1].cert_file))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    distrustful = Peer(context.wrap_bio(incoming, outgoing, server_hostname="svc.test"),
                       incoming, outgoing)  # fmt: skip
    tls = TlsInterception(tls_settings, "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError):
        pump(distrustful, tls, make_server(cas[1]))
    tls.feed_client(distrustful.outgoing.read())  # its alert: unknown CA
    assert tls.error is not None
    assert tls.error.startswith("tls: client does not trust flowtap's CA (passthrough for 10 min")
    after = TlsInterception(tls_settings, "127.0.0.1")
    client = make_client(cas[0])
    client.step()
    after.feed_client(client.outgoing.read())
    assert after.phase is Phase.PLAIN and after.facts is not None
    assert after.facts.mode == "passthrough"


def test_passthrough_globs_match_the_sni_case_blind(cas: CAs) -> None:
    tls_settings = settings(cas, passthrough_globs=("*.Pinned.test",))
    assert tls_settings.passthrough_reason("api.pinned.TEST") == "--tls-passthrough *.Pinned.test"
    assert tls_settings.passthrough_reason("pinned.test") is None


def test_a_client_half_closing_tcp_still_gets_the_answer(cas: CAs) -> None:
    client, server = make_client(cas[0]), make_server(cas[1])
    tls = TlsInterception(settings(cas), "127.0.0.1")
    pump(client, tls, server)
    client.obj.write(b"upload")
    tls.feed_client(client.outgoing.read())
    tls.client_eof()  # a TCP FIN without close_notify, as a shut-down-write socket sends
    assert tls.client_done and not tls.server_done
    server.incoming.write(bytes(tls.to_server))
    tls.to_server.clear()
    assert server.obj.read(100) == b"upload"
    assert server.obj.read(100) == b""  # flowtap's close_notify for the upstream
    server.obj.write(b"digest")
    tls.feed_server(server.outgoing.read())
    assert tls.error is None
    client.incoming.write(bytes(tls.to_client))
    assert client.obj.read(100) == b"digest"


def read_all(peer: Peer) -> bytes:
    """All the plaintext a peer's TLS has for it now."""
    data = b""
    while True:
        try:
            chunk = peer.obj.read(1 << 20)
        except ssl.SSLWantReadError:
            return data
        if not chunk:
            return data
        data += chunk


@pytest.mark.parametrize("keeps", [True, False])
def test_many_records_are_relayed_whole_in_batches_and_counted(cas: CAs, keeps: bool) -> None:
    client, server = make_client(cas[0]), make_server(cas[1])
    tls = TlsInterception(settings(cas), "127.0.0.1")
    pump(client, tls, server)
    tls.keeps_plaintext = keeps
    # 41 records of at most 16 KiB each way, fed at once: more than one batch of 256 KiB.
    upload = bytes(range(256)) * 2600
    download = upload[::-1]
    for start in range(0, len(upload), 16384):
        client.obj.write(upload[start : start + 16384])
        server.obj.write(download[start : start + 16384])
    tls.feed_client(client.outgoing.read())
    tls.feed_server(server.outgoing.read())
    server.incoming.write(bytes(tls.to_server))
    client.incoming.write(bytes(tls.to_client))
    assert read_all(server) == upload and read_all(client) == download
    assert (tls.bytes_up, tls.bytes_down) == (len(upload), len(download))
    if keeps:
        # One chunk per batch of records for observers, not one per record.
        assert b"".join(tls.plaintext_up) == upload and len(tls.plaintext_up) == 3
        assert b"".join(tls.plaintext_down) == download and len(tls.plaintext_down) == 3
    else:
        assert tls.plaintext_up == [] and tls.plaintext_down == []


def test_plaintext_that_is_not_tls_is_counted_when_not_kept(cas: CAs) -> None:
    tls = TlsInterception(settings(cas), "127.0.0.1")
    tls.server_connected()
    tls.keeps_plaintext = False
    tls.feed_client(memoryview(b"GET / HTTP/1.1\r\n\r\n"))
    tls.feed_server(memoryview(b"HTTP/1.1 204 No Content\r\n\r\n"))
    assert tls.phase is Phase.PLAIN
    assert bytes(tls.to_server) == b"GET / HTTP/1.1\r\n\r\n"
    assert bytes(tls.to_client) == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert (tls.bytes_up, tls.bytes_down) == (18, 27)
    assert tls.plaintext_up == [] and tls.plaintext_down == []


def test_queued_chunks_reach_a_full_socket_whole_and_in_order() -> None:
    """What is due to a peer is sent from the chunks it came in, across short sends that end
    inside a chunk and calls that span several; `take` gives the bytes a send took."""
    chunks = [bytes([i]) * size for i, size in enumerate((70_000, 1, 250_000, 3_000, 90_000))]
    pending = Outgoing()
    for chunk in chunks[:2]:
        pending.append(chunk)
    pending += bytearray(chunks[2])
    pending += memoryview(chunks[3])
    pending.append(b"")
    pending.append(chunks[4])
    expected = b"".join(chunks)
    assert len(pending) == len(expected) and bytes(pending) == expected
    sender, receiver = socket.socketpair()
    with sender, receiver:
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sender.setblocking(False)
        receiver.settimeout(10)
        taken, done, sends, received = b"", 0, 0, b""
        while pending:
            try:
                sent = pending.send_to(sender)
            except BlockingIOError:
                sent = 0  # full: the receiver below makes room
            if sent:
                sends += 1
                # Alternately taken (what a wire capture records) and dropped.
                if sends % 2:
                    taken += pending.take(sent)
                else:
                    taken += expected[done : done + sent]
                    pending.drop(sent)
                done += sent
            assert len(pending) == len(expected) - done
            received += receiver.recv(1 << 20)
        while len(received) < len(expected):
            received += receiver.recv(1 << 20)
    assert sends > len(chunks)  # short sends, then more from where they stopped
    assert taken == expected and received == expected
    assert bytes(pending) == b"" and not pending


def test_small_chunks_are_joined_and_go_out_in_one_call() -> None:
    """A peer's bytes trickling in one at a time towards a peer that does not read are not
    kept as a chunk each: once it reads, one call sends them all."""
    pending = Outgoing()
    trickle = bytes(range(256)) * 400  # 102,400 bytes, one chunk each
    for index in range(len(trickle)):
        pending.append(trickle[index : index + 1])
    big = b"\xee" * 20_000  # a TLS batch's size is kept as it came
    pending.append(big)
    pending.append(b"tail")
    assert len(pending) == len(trickle) + len(big) + 4
    sender, receiver = socket.socketpair()
    with sender, receiver:
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        sender.settimeout(10)  # room for all of it: a send that blocks fails, never hangs
        sent = pending.send_to(sender)
        assert sent == len(pending)
        assert pending.take(sent) == trickle + big + b"tail" and not pending


def test_a_new_names_leaf_is_made_when_asked_once_the_client_hello_to_the_upstream_is_due(
    cas: CAs, tmp_path: Path
) -> None:
    # The relay asks (prepare_leaf) once it has sent what is due to the upstream: the leaf is
    # then made while the upstream answers, and the client's handshake finds it made.
    flowtap_ca = load_or_create_ca(tmp_path / "flowtap")
    tls = TlsInterception(TlsSettings(TlsMode.INTERCEPT, flowtap_ca, upstream_insecure=True), "x")
    context = ssl.create_default_context(cafile=str(flowtap_ca.cert_file))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = Peer(
        context.wrap_bio(incoming, outgoing, server_hostname="due.test"), incoming, outgoing
    )
    tls.server_connected()
    client.step()
    tls.feed_client(client.outgoing.read())
    assert tls.to_server  # flowtap's ClientHello
    assert tls.leaf_due == "due.test" and "due.test" not in flowtap_ca.cached_names()
    tls.prepare_leaf()
    assert tls.leaf_due is None and flowtap_ca.cached_names() == ["due.test"]
    pump(client, tls, make_server(cas[1]))
    assert client.done and tls.phase is Phase.OPEN
    peer = client.obj.getpeercert()
    assert peer is not None and peer["subjectAltName"] == (("DNS", "due.test"),)
    assert flowtap_ca.cached_names() == ["due.test"]  # made once
