"""Wire captures in a ring of files: each file decrypts the TLS flows in it on its own."""

from __future__ import annotations

import socketserver
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from capture_checks import _parse_follow, assert_tshark_clean, fields, tshark
from test_tls_relay import Pki, closed_records, pki, start_intercepting, tls_client

from conftest import FlowtapProcess

__all__ = ["pki"]  # a fixture this module's tests use


def _follow_tls_streams(path: Path, streams: list[int]) -> dict[int, tuple[bytes, bytes]]:
    """What tshark alone decrypts of each TCP stream of `path` (Follow TLS Stream, raw)."""
    args = [arg for stream in streams for arg in ("-z", f"follow,tls,raw,{stream}")]
    out = tshark("-r", str(path), "-q", *args)
    sections = out.split("Filter: tcp.stream eq ")[1:]
    return {int(section.split("\n", 1)[0]): _parse_follow(section) for section in sections}


@pytest.fixture(params=[ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
def tls_echo_server(
    pki: Pki, request: pytest.FixtureRequest
) -> Iterator[tuple[int, ssl.TLSVersion]]:
    """A TLS echo server on loopback (Python's ssl, a thread per connection) speaking at most
    the TLS version of the parameter (the upstream leg's secrets differ: a TLS 1.2 session
    has a master secret, a TLS 1.3 one traffic secrets); its port and that version."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*pki.server("ecdsa"))
    context.maximum_version = request.param

    class Echo(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            with context.wrap_socket(self.request, server_side=True) as tls:
                while data := tls.recv(65536):
                    tls.sendall(data)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True

    with Server(("127.0.0.1", 0), Echo) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield server.server_address[1], request.param
        server.shutdown()
        thread.join(10)


def test_each_file_of_a_wire_capture_ring_decrypts_the_tls_flows_in_it_on_its_own(
    flowtap: type[FlowtapProcess],
    pki: Pki,
    tls_echo_server: tuple[int, ssl.TLSVersion],
    tmp_path: Path,
) -> None:
    upstream, version = tls_echo_server
    relay = start_intercepting(
        flowtap, pki, upstream, "--upstream-ca", str(pki.upstream_ca), "--pcap",
        str(tmp_path / "ring.pcapng"), "--tls-capture", "wire", "--pcap-max-size", "1",
    )  # fmt: skip
    said: dict[int, tuple[bytes, bytes]] = {}  # by client port: (sent, received)

    def talk(client: ssl.SSLSocket, lines: list[bytes]) -> None:
        sent = b"".join(lines)
        client.sendall(sent)
        received = b""
        while len(received) < len(sent):
            chunk = client.recv(65536)
            assert chunk, "the upstream closed before answering"
            received += chunk
        port = client.getsockname()[1]
        before = said.get(port, (b"", b""))
        said[port] = (before[0] + sent, before[1] + received)

    # A flow opened in the first file that speaks again after the ring moved on, while
    # short flows (each one's ciphertext well within what a ring repeats) fill the first file.
    with tls_client(pki, relay.port) as lasting:
        talk(lasting, [b"first words of the lasting flow\n"])
        for number in range(18):
            if len(list(tmp_path.glob("ring_*.pcapng"))) > 1:
                break
            with tls_client(pki, relay.port) as filler:
                talk(filler, [b"%02d %s\n" % (number, b"f" * 1020) for _ in range(24)])
        assert len(list(tmp_path.glob("ring_*.pcapng"))) > 1, "the ring did not rotate"
        talk(lasting, [b"last words of the lasting flow\n"])
    versions = {record["tls"]["version"] for record in closed_records(relay, len(said))}
    assert versions == {"TLSv1.2" if version is ssl.TLSVersion.TLSv1_2 else "TLSv1.3"}
    assert relay.stop() == 0
    files = sorted(tmp_path.glob("ring_*.pcapng"))
    last_file_of: dict[int, Path] = {}
    decrypted: dict[tuple[Path, int], list[tuple[bytes, bytes]]] = {}
    for path in files:
        assert_tshark_clean(path)
        ports = {
            int(stream): {int(src), int(dst)}
            for stream, src, dst in fields(path, "tcp.stream", "tcp.srcport", "tcp.dstport")
        }
        for stream, (first, second) in _follow_tls_streams(path, sorted(ports)).items():
            (client_port,) = ports[stream] - {relay.port, upstream}
            if first or second:
                decrypted.setdefault((path, client_port), []).append((first, second))
            last_file_of[client_port] = path
    for port, (sent, received) in said.items():
        for path in files:
            for pair in decrypted.get((path, port), []):
                # tshark names as node 1 whoever sent the first decrypted bytes it saw.
                ups, downs = pair if sent.startswith(pair[0]) else pair[::-1]
                assert sent.startswith(ups) and received.startswith(downs), (path.name, port)
        # Where each leg of a flow ends, it decrypts from its start, whichever file it began in.
        assert decrypted.get((last_file_of[port], port)) == [(sent, received)] * 2, port
