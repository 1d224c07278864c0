"""HTTP/2 summaries over the bytes a real h2 client and server (the h2 library's connection
objects) send each other, no sockets."""

from __future__ import annotations

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import RequestReceived
from h2.settings import SettingCodes
from hpack import Encoder
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame, SettingsFrame
from hypothesis import given, settings
from hypothesis import strategies as st

from flowtap.inspector.summary import (
    H2_PREFACE,
    H2_STREAMS_LISTED,
    HEAD_BYTES,
    Http2Summary,
    summarize,
)

Headers = list[tuple[str, str]]


def _request(method: str, path: str, authority: str = "h2.test") -> Headers:
    return [(":method", method), (":path", path), (":authority", authority), (":scheme", "https")]


def converse(requests: list[Headers], answers: dict[str, str | None]) -> tuple[bytes, bytes]:
    """What an h2 client sends asking `requests` on one connection (50 at a time, within the
    server's limit of open streams), and what an h2 server sends back: the status `answers`
    maps a path to, or a reset stream for None."""
    client = H2Connection(H2Configuration(client_side=True))
    server = H2Connection(H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    up = down = b""
    for first in range(0, len(requests), 50):
        for number, headers in enumerate(requests[first : first + 50], start=first):
            client.send_headers(1 + 2 * number, headers, end_stream=True)
        sent = client.data_to_send()
        up += sent
        for event in server.receive_data(sent):
            if isinstance(event, RequestReceived):
                asked = dict((k.decode(), v.decode()) for k, v in event.headers)
                status = answers[asked[":path"]]
                if status is None:
                    server.reset_stream(event.stream_id)
                    continue
                reply = [(":status", status), ("content-type", "text/plain")]
                server.send_headers(event.stream_id, reply)
                server.send_data(event.stream_id, b"body of " + asked[":path"].encode(), True)
        answered = server.data_to_send()
        down += answered
        client.receive_data(answered)
    up += client.data_to_send()  # the client's SETTINGS ACK, WINDOW_UPDATEs
    return up, down


def test_streams_are_listed_with_method_path_and_status() -> None:
    up, down = converse(
        [_request("GET", "/index.html"), _request("POST", "/api/items"), _request("GET", "/gone")],
        {"/index.html": "200", "/api/items": "201", "/gone": None},
    )
    assert up.startswith(H2_PREFACE)
    summary = summarize(up, down)
    assert summary.protocol == "http"
    assert summary.headline == "h2 GET /index.html (h2.test) → 200 (+2 more)"
    assert summary.details == (
        "HTTP/2: 3 streams",
        "> [1] GET /index.html (h2.test)",
        "< [1] 200",
        "> [3] POST /api/items (h2.test)",
        "< [3] 201",
        "> [5] GET /gone (h2.test)",
        "< [5] reset",
    )


def test_headers_indexed_in_the_dynamic_table_decode_in_later_streams() -> None:
    # The second request's :authority and the second response's content-type are references
    # to the table the first ones filled: decoded only if every block is decoded in order.
    requests = [_request("GET", f"/page/{n}", "dynamic.test") for n in range(4)]
    up, down = converse(requests, {f"/page/{n}": str(200 + n) for n in range(4)})
    details = summarize(up, down).details
    assert "> [7] GET /page/3 (dynamic.test)" in details
    assert "< [7] 203" in details


def test_a_connection_without_requests_yet_is_still_http2() -> None:
    client = H2Connection(H2Configuration(client_side=True))
    client.initiate_connection()
    summary = summarize(client.data_to_send(), b"")
    assert summary == summarize(H2_PREFACE, b"")
    assert (summary.protocol, summary.headline) == ("http", "HTTP/2 connection")


def test_a_header_block_continued_in_continuation_frames_is_decoded_whole() -> None:
    block = Encoder().encode(_request("DELETE", "/split/across/frames"))
    first = HeadersFrame(1, data=block[:5], flags=["END_STREAM"])
    rest = ContinuationFrame(1, data=block[5:], flags=["END_HEADERS"])
    up = H2_PREFACE + SettingsFrame(0).serialize() + first.serialize() + rest.serialize()
    assert summarize(up, b"").details[1] == "> [1] DELETE /split/across/frames (h2.test)"


def test_the_first_bytes_ending_inside_a_frame_keep_the_streams_before_it() -> None:
    up, down = converse([_request("GET", "/a"), _request("GET", "/b")], {"/a": "200", "/b": "404"})
    cut = summarize(up, down[: len(down) - 20])
    assert cut.headline.startswith("h2 GET /a (h2.test) → 200")


def test_a_larger_header_table_the_client_allowed_is_honoured() -> None:
    client = H2Connection(H2Configuration(client_side=True))
    server = H2Connection(H2Configuration(client_side=False))
    client.initiate_connection()
    client.update_settings({SettingCodes.HEADER_TABLE_SIZE: 65536})
    server.initiate_connection()
    up, down = bytearray(), bytearray()

    def pump() -> None:
        sent = client.data_to_send()
        up.extend(sent)
        for event in server.receive_data(sent):
            if isinstance(event, RequestReceived):
                reply = [(":status", "200"), ("x-big", "y" * 1000)]
                server.send_headers(event.stream_id, reply, end_stream=True)
        answered = server.data_to_send()
        down.extend(answered)
        client.receive_data(answered)

    pump()  # settings both ways: the server's encoder may now use a 64 KiB table
    client.send_headers(1, _request("GET", "/big"), end_stream=True)
    pump()
    assert b"\x3f\xe1\xff\x03" in down  # the encoder's table size update to 65536
    assert "< [1] 200" in summarize(bytes(up), bytes(down)).details


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.binary(max_size=600))
def test_any_bytes_after_the_preface_summarise_without_raising(up: bytes, down: bytes) -> None:
    summary = summarize(H2_PREFACE + up, down)
    assert summary.protocol == "http"


def test_a_long_connection_is_followed_past_the_first_bytes_and_lists_a_bounded_number() -> None:
    count = H2_STREAMS_LISTED + 40
    paths = [f"/catalogue/item/{n:04d}?view=full&lang=en" for n in range(count)]
    up, down = converse([_request("GET", path) for path in paths], dict.fromkeys(paths, "200"))
    assert len(up) > HEAD_BYTES and len(down) > HEAD_BYTES
    summary = summarize(up, down)
    assert summary.headline == f"h2 GET {paths[0]} (h2.test) → 200 (+{count - 1} more)"
    assert summary.details[0] == f"HTTP/2: {count} streams"
    last = 2 * H2_STREAMS_LISTED - 1  # the last listed stream's id
    assert summary.details[-3:] == (
        f"> [{last}] GET {paths[H2_STREAMS_LISTED - 1]} (h2.test)",
        f"< [{last}] 200",
        "… +40 more streams",
    )
    assert len(summary.details) == 1 + 2 * H2_STREAMS_LISTED + 1


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=3000), min_size=1, max_size=40))
def test_fed_in_any_pieces_the_summary_is_that_of_the_whole_bytes(cuts: list[int]) -> None:
    paths = [f"/piece/{n}" for n in range(30)]
    up, down = converse([_request("POST", path) for path in paths], dict.fromkeys(paths, "201"))
    follower = Http2Summary()
    for data, is_up in ((up, True), (down, False)):
        at = 0
        for cut in cuts * (len(data) // sum(cuts) + 1):
            follower.feed(is_up, data[at : at + cut])
            at += cut
    assert follower.summary() == summarize(up, down)
    assert follower.summary().details[0] == "HTTP/2: 30 streams"


def test_large_data_frames_are_skipped_without_being_held() -> None:
    client = H2Connection(H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, _request("PUT", "/upload"))
    up = client.data_to_send()
    body = DataFrame(1, data=b"u" * 16000, flags=["END_STREAM"]).serialize()
    follower = Http2Summary()
    follower.feed(True, up)
    for _ in range(64):  # 1 MB of DATA frames, fed a frame and a half at a time
        follower.feed(True, body[:9000])
        follower.feed(True, body[9000:] + body[:100])
        follower.feed(True, body[100:])
    assert "> [1] PUT /upload (h2.test)" in follower.summary().details
    assert follower._up.partial == bytearray()  # no body kept, only frames' headers pass
