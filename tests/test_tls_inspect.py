"""What the inspector makes of intercepted TLS flows, with real peers: curl and openssl s_server."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from capture_checks import assert_tshark_clean, flowtap_show, follow_tcp
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import RequestReceived
from test_tls_relay import (
    Pki,
    closed_records,
    exchange_line,
    pki,
    s_server,
    start_intercepting,
    tls_client,
)
from test_tui import until
from textual.pilot import Pilot

from conftest import (
    FlowtapProcess,
    exchange,
    flowtap_command,
    json_events,
    start_flowtap,
    wait_for,
)
from flowtap.inspector.summary import H2_STREAMS_LISTED, HEAD_BYTES, summarize
from flowtap.inspector.tui.app import FlowtapApp, stream_capture
from flowtap.inspector.tui.store import FlowStore
from flowtap.inspector.tui.viewer import ControlClient
from flowtap.inspector.tui.widgets.flow_detail import FlowDetail
from flowtap.inspector.tui.widgets.flow_table import LOCK, FlowTable
from flowtap.proxy.flow import FlowOpened

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


def recording_relay(
    flowtap: type[FlowtapProcess], pki: Pki, upstream: int, capture: Path
) -> FlowtapProcess:
    """A relay intercepting TLS to `upstream` (trusting the test CA) and capturing to `capture`."""
    return start_intercepting(
        flowtap, pki, upstream, "--upstream-ca", str(pki.upstream_ca), "--pcap", str(capture)
    )


def test_show_filter_tls_and_sni_selects_an_intercepted_flow_of_a_capture(
    flowtap: type[FlowtapProcess], pki: Pki, s_server: Callable[..., int], tmp_path: Path
) -> None:
    upstream = s_server(*pki.server("rsa"), "-www")
    capture = tmp_path / "intercepted.pcapng"
    relay = recording_relay(flowtap, pki, upstream, capture)
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


def watched_interceptor(
    pki: Pki, s_server: Callable[..., int], control: Path, output: str
) -> FlowtapProcess:
    """A relay intercepting TLS to a self-signed `s_server -www` (unverified), serving its
    control socket at `control`; `output` is `--quiet` or `--json`."""
    upstream = s_server(*pki.server("self"), "-www")
    return start_flowtap(
        "run", output, "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{upstream}",
        "--tls", "intercept", "--ca", str(pki.flowtap_ca), "--upstream-insecure",
        "--control", str(control),
    )  # fmt: skip


def with_attached_tui(
    relay: FlowtapProcess,
    control: Path,
    scenario: Callable[[FlowtapApp, Pilot[None]], Awaitable[None]],
) -> None:
    """Run `scenario` in a TUI (Textual's pilot) attached to `relay`'s control socket at
    `control`, then detach and stop the relay."""
    client: ControlClient | None = None
    try:
        relay.wait_line("^control unix:")
        client = ControlClient(str(control))
        client.subscribe()
        app = FlowtapApp(events=client, relay=client, source="test")  # type: ignore[arg-type]

        async def main() -> None:
            async with app.run_test(size=(160, 48)) as pilot:
                await scenario(app, pilot)

        asyncio.run(main())
    finally:
        if client is not None:
            client.close()
        relay.stop()


def test_tui_attached_to_an_intercepting_relay_marks_the_flow_and_shows_its_tls_facts(
    pki: Pki, s_server: Callable[..., int], tmp_path: Path
) -> None:
    control = tmp_path / "control.sock"
    relay = watched_interceptor(pki, s_server, control, "--quiet")
    upstream = relay.listeners[0][2].rsplit(":", 1)[1]

    async def scenario(app: FlowtapApp, pilot: Pilot[None]) -> None:
        result = await asyncio.to_thread(curl_through, pki, relay.port, "--http1.1")
        assert result.returncode == 0, result.stderr
        await asyncio.to_thread(exchange, relay.port, b"plain words\r\n")
        table = app.query_one(FlowTable)
        records = app.store.records
        await until(pilot, lambda: sum(records[i].is_closed for i in table.ids) == 2, "two flows")
        secure, plain = sorted(table.ids)
        assert records[secure].flow.tls is not None
        assert table.row_text(records[secure]).count(LOCK) == 1
        assert LOCK + f"127.0.0.1:{upstream}" in table.row_text(records[secure])
        assert LOCK not in table.row_text(records[plain])
        # HTTP inside TLS is summarised as HTTP (summaries are refreshed on the app's tick).
        await until(pilot, lambda: records[secure].summary.protocol == "http", "the summary")

        def facts() -> str:
            return str(app.query_one("#facts").render())

        # Selecting the other flow first: the pane redraws when the selection moves back.
        table.select_flow(plain)
        await until(pilot, lambda: "tls: not TLS" in facts(), "the plain flow's detail")
        assert "upstream certificate" not in facts()
        table.select_flow(secure)
        await until(pilot, lambda: "tls intercept" in facts(), "the intercepted flow's detail")
        facts_text = facts()
        assert "tls intercept  sni localhost" in facts_text
        assert "TLSv1.3" in facts_text and "TLS_" in facts_text
        assert "upstream certificate: CN=svc.test, issued by CN=svc.test, expires 20" in (
            facts_text
        )
        assert "upstream verification: off (--upstream-insecure)" in facts_text
        assert "GET / " in facts_text  # the summary of the plaintext
        assert app.query_one(FlowDetail).flow_id == secure

    with_attached_tui(relay, control, scenario)


def test_an_open_intercepted_flow_has_its_tls_facts_in_run_json_the_control_socket_and_tui(
    pki: Pki, s_server: Callable[..., int], tmp_path: Path
) -> None:
    """The facts come once the handshake is done, while the flow stays open, not at its close."""
    control = tmp_path / "control.sock"
    relay = watched_interceptor(pki, s_server, control, "--json")

    async def scenario(app: FlowtapApp, pilot: Pilot[None]) -> None:
        # The handshake, then nothing: the flow stays open while the facts are checked.
        client = await asyncio.to_thread(tls_client, pki, relay.port, "svc.test")
        try:
            wait_for(lambda: json_events(relay, "updated") != [], 10, "the updated line")
            (updated,) = json_events(relay, "updated")
            assert updated["flow"] == 1 and updated["state"] != "closed"
            assert updated["tls"]["mode"] == "intercept"
            assert updated["tls"]["sni"] == "svc.test"
            assert updated["tls"]["version"] == "TLSv1.3"
            assert json_events(relay, "closed") == []
            table = app.query_one(FlowTable)
            records = app.store.records
            await until(pilot, lambda: 1 in records, "the flow's row")
            await until(pilot, lambda: LOCK in table.row_text(records[1]), "the lock mark")
            assert not records[1].is_closed
            # A viewer attaching now gets the open flow with its facts.
            viewer = ControlClient(str(control))
            seen: list[object] = []

            def backlog() -> bool:
                seen.extend(viewer.drain())
                return any(isinstance(event, FlowOpened) for event in seen)

            try:
                viewer.subscribe()
                wait_for(backlog, 10, "the late viewer's backlog")
            finally:
                viewer.close()
            (opened,) = [event for event in seen if isinstance(event, FlowOpened)]
            assert opened.flow.tls is not None and opened.flow.tls.sni == "svc.test"
        finally:
            client.close()
        await until(pilot, lambda: records[1].is_closed, "the flow's close")
        assert LOCK in table.row_text(records[1])

    with_attached_tui(relay, control, scenario)


@pytest.fixture
def h2_server(pki: Pki) -> Iterator[int]:
    """An HTTP/2 server over TLS (ALPN h2) on loopback, made of the h2 library's connection
    object: every request gets 200 and `hello PATH`; returns its port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*pki.server("rsa"))
    context.set_alpn_protocols(["h2"])
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stopping = threading.Event()

    def serve(raw: socket.socket) -> None:
        with context.wrap_socket(raw, server_side=True) as tls:
            tls.settimeout(20)
            connection = H2Connection(H2Configuration(client_side=False))
            connection.initiate_connection()
            tls.sendall(connection.data_to_send())
            while data := tls.recv(65536):
                for event in connection.receive_data(data):
                    if isinstance(event, RequestReceived):
                        path = dict(event.headers)[b":path"]
                        body = b"hello " + path
                        reply = [(":status", "200"), ("content-length", str(len(body)))]
                        connection.send_headers(event.stream_id, reply)
                        connection.send_data(event.stream_id, body, end_stream=True)
                tls.sendall(connection.data_to_send())

    def accept() -> None:
        while not stopping.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(raw,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(listener.getsockname()[1])
    stopping.set()
    thread.join(10)
    listener.close()


def test_curl_http2_through_interception_is_summarised_as_streams(
    flowtap: type[FlowtapProcess], pki: Pki, h2_server: int, tmp_path: Path
) -> None:
    capture = tmp_path / "h2.pcapng"
    relay = recording_relay(flowtap, pki, h2_server, capture)
    result = subprocess.run(
        ["curl", "-sS", "--http2", "--cacert", str(pki.flowtap_ca_cert),
         "-w", "%{http_version} %{response_code}\\n",
         f"https://localhost:{relay.port}/first", f"https://localhost:{relay.port}/second"],
        capture_output=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello /first2 200\nhello /second2 200\n"
    (record,) = closed_records(relay, 1)  # one connection, two streams
    assert record["tls"]["alpn"] == "h2" and record["tls"]["offered_alpn"][0] == "h2"
    assert relay.stop() == 0

    # What tshark reads of the plaintext is what the summary reads.
    up, down = follow_tcp(capture, 0)
    summary = summarize(up, down)
    assert summary.protocol == "http"
    assert summary.headline == f"h2 GET /first (localhost:{relay.port}) → 200 (+1 more)"
    assert f"> [3] GET /second (localhost:{relay.port})" in summary.details
    assert "< [3] 200" in summary.details
    picked = flowtap_show(str(capture), "--filter", '"h2 GET /first" and tls', "--json")
    assert picked.returncode == 0, picked.stderr
    assert [json.loads(line)["tls"]["alpn"] for line in picked.stdout.splitlines()] == ["h2"]


def test_a_long_curl_http2_connection_is_summarised_past_its_first_bytes(
    flowtap: type[FlowtapProcess], pki: Pki, h2_server: int, tmp_path: Path
) -> None:
    capture = tmp_path / "h2-long.pcapng"
    relay = recording_relay(flowtap, pki, h2_server, capture)
    count = H2_STREAMS_LISTED + 50
    paths = [f"/items/{n:03d}/details-of-a-longer-path" for n in range(count)]
    result = subprocess.run(
        ["curl", "-sS", "--http2", "--cacert", str(pki.flowtap_ca_cert),
         *(f"https://localhost:{relay.port}{path}" for path in paths)],
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"".join(b"hello " + path.encode() for path in paths)
    (record,) = closed_records(relay, 1)  # one connection, all the streams
    assert relay.stop() == 0
    up, down = follow_tcp(capture, 0)
    assert len(up) > HEAD_BYTES and len(down) > HEAD_BYTES

    # The TUI browsing the capture: its store reads every byte of the flow.
    store = FlowStore()
    for batch, _ in stream_capture(capture):
        store.apply(batch)
    store.refresh_summaries()
    stored = store.get(record["flow"])
    assert stored is not None
    summary = stored.summary
    assert summary == summarize(up, down)
    authority = f"localhost:{relay.port}"
    assert summary.headline == f"h2 GET {paths[0]} ({authority}) → 200 (+{count - 1} more)"
    assert summary.details[0] == f"HTTP/2: {count} streams"
    last = 2 * H2_STREAMS_LISTED - 1  # the id of the last stream listed
    assert summary.details[-3:] == (
        f"> [{last}] GET {paths[H2_STREAMS_LISTED - 1]} ({authority})",
        f"< [{last}] 200",
        "… +50 more streams",
    )


def replay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*flowtap_command(), "replay", *args], capture_output=True, text=True, timeout=60
    )


def test_replay_tls_sends_a_decrypted_recording_to_a_tls_server_with_its_sni(
    flowtap: type[FlowtapProcess], pki: Pki, s_server: Callable[..., int], tmp_path: Path
) -> None:
    # The server's certificate names svc.test only: verifying it needs the recorded SNI.
    upstream = s_server(*pki.server("ecdsa"), "-rev")
    capture = tmp_path / "recorded.pcapng"
    relay = recording_relay(flowtap, pki, upstream, capture)
    sent = b"replayed over tls\n"
    assert exchange_line(pki, relay.port, sent).strip() == sent.strip()[::-1]
    closed_records(relay, 1)
    assert relay.stop() == 0

    to = ["--to", f"127.0.0.1:{upstream}", "--asap", "--json", "--turn-timeout", "0.3"]
    done = replay(str(capture), *to, "--tls", "--tls-ca", str(pki.upstream_ca), "--check")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.splitlines()[0])
    assert report["status"] == "ok", report
    assert report["server_bytes_received"] == report["server_bytes_expected"] > 0

    # Another name: the server's certificate does not match it, and the report says so.
    other = replay(str(capture), *to, "--tls", "--tls-ca", str(pki.upstream_ca), "--sni", "x.test")
    assert other.returncode == 1
    report = json.loads(other.stdout.splitlines()[0])
    assert report["status"] == "failed"
    assert report["error"].startswith("tls: server certificate not trusted: Hostname mismatch")

    # Without --tls the plaintext goes to a TLS server, which does not answer it in kind.
    plain = replay(str(capture), *to, "--check")
    assert plain.returncode == 1


def test_replay_tls_options_without_tls_are_one_line_errors(tmp_path: Path) -> None:
    capture = tmp_path / "none.pcapng"
    capture.write_bytes(b"")
    for extra in (["--sni", "a.test"], ["--tls-insecure"], ["--tls-ca", "x.pem"]):
        result = replay(str(capture), "--to", "127.0.0.1:9", *extra)
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.splitlines()
        assert line == f"flowtap: error: {extra[0]} is for TLS replays; add --tls"
    missing = replay(str(capture), "--to", "127.0.0.1:9", "--tls", "--tls-ca", "/nonexistent")
    assert missing.returncode == 2
    (line,) = missing.stderr.splitlines()
    assert line.startswith("flowtap: error: --tls-ca /nonexistent: cannot load it")


def test_serve_tls_answers_curl_and_s_client_with_a_leaf_for_the_name_they_ask(
    flowtap: type[FlowtapProcess], pki: Pki, s_server: Callable[..., int], tmp_path: Path
) -> None:
    upstream = s_server(*pki.server("rsa"), "-www")
    capture = tmp_path / "page.pcapng"
    relay = recording_relay(flowtap, pki, upstream, capture)
    recorded = curl_through(pki, relay.port, "--http1.1")
    assert recorded.returncode == 0, recorded.stderr
    closed_records(relay, 1)
    assert relay.stop() == 0

    server = flowtap("serve", str(capture), "--tls", "--ca", str(pki.flowtap_ca))  # type: ignore[call-arg]
    served = curl_through(pki, server.port, "--http1.1")
    assert served.returncode == 0, served.stderr
    assert served.stdout == recorded.stdout  # the recorded page, over TLS this time

    # A client asking for another name gets a leaf for that name, which verifies.
    s_client = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}",
         "-servername", "other.test", "-verify_hostname", "other.test",
         "-CAfile", str(pki.flowtap_ca_cert), "-verify_return_error"],
        input=b"", capture_output=True, timeout=30,
    )  # fmt: skip
    assert s_client.returncode == 0, s_client.stdout + s_client.stderr
    assert b"Verify return code: 0 (ok)" in s_client.stdout
    assert b"subject=CN = other.test" in s_client.stdout or b"CN=other.test" in s_client.stdout


def test_serve_tls_offers_the_recorded_alpn_so_curl_http2_gets_the_recorded_h2_answer(
    flowtap: type[FlowtapProcess], pki: Pki, h2_server: int, tmp_path: Path
) -> None:
    capture = tmp_path / "h2.pcapng"
    relay = recording_relay(flowtap, pki, h2_server, capture)
    asked = ["curl", "-sS", "--http2", "--cacert", str(pki.flowtap_ca_cert),
             "-w", " %{http_version} %{response_code}\\n"]  # fmt: skip
    recorded = subprocess.run(
        [*asked, f"https://localhost:{relay.port}/recorded"], capture_output=True, timeout=30
    )
    assert recorded.returncode == 0, recorded.stderr
    assert recorded.stdout == b"hello /recorded 2 200\n"
    (record,) = closed_records(relay, 1)
    assert record["tls"]["alpn"] == "h2"
    assert relay.stop() == 0

    server = flowtap("serve", str(capture), "--tls", "--ca", str(pki.flowtap_ca))  # type: ignore[call-arg]
    # The same request on the same port as recorded (its :authority names the port).
    served = subprocess.run(
        [*asked, "--connect-to", f"localhost:{relay.port}:127.0.0.1:{server.port}",
         f"https://localhost:{relay.port}/recorded"],
        capture_output=True, timeout=30,
    )  # fmt: skip
    assert served.returncode == 0, served.stderr
    assert served.stdout == recorded.stdout  # h2 negotiated, and the recorded answer
    # A client that offers only HTTP/1.1 is still served TLS, without ALPN.
    s_client = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}", "-alpn", "http/1.1",
         "-servername", "localhost", "-CAfile", str(pki.flowtap_ca_cert)],
        input=b"", capture_output=True, timeout=30,
    )  # fmt: skip
    assert b"Verify return code: 0 (ok)" in s_client.stdout, s_client.stdout
    assert b"No ALPN negotiated" in s_client.stdout


def test_serve_ca_without_tls_is_a_one_line_error(tmp_path: Path) -> None:
    capture = tmp_path / "none.pcapng"
    capture.write_bytes(b"")
    result = subprocess.run(
        [*flowtap_command(), "serve", str(capture), "--ca", "x.pem"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == "flowtap: error: --ca is for serving TLS; add --tls\n"
