"""The flow store: index in memory, payload spilled to disk beyond a budget."""

from __future__ import annotations

import itertools
import os
import re
import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st

from flowtap.inspector.pcapfile.reassembly import FlowGap
from flowtap.inspector.summary import HEAD_BYTES
from flowtap.inspector.tui.store import (
    CHUNK_GAP,
    CHUNK_NOT_SHOWN,
    CHUNK_UP,
    FlowStore,
    PayloadSpill,
)
from flowtap.proxy.control_protocol import HEADER, DataNotShown, decode_data, encode_data
from flowtap.proxy.flow import (
    Address,
    CloseReason,
    Direction,
    Flow,
    FlowClosed,
    FlowData,
    FlowEvent,
    FlowOpened,
    FlowState,
    Transport,
)


def _flow(flow_id: int, port: int = 80) -> Flow:
    return Flow(
        id=flow_id,
        transport=Transport.TCP,
        client=Address("127.0.0.1", 40000 + flow_id),
        server=Address("127.0.0.1", port),
        listener=Address("127.0.0.1", 8080),
        started_at=1000.0 + flow_id,
        state=FlowState.OPEN,
    )


def test_spill_keeps_the_budget_in_memory_and_the_rest_on_disk() -> None:
    spill = PayloadSpill(memory_budget_bytes=1000)
    blobs = [os.urandom(300) for _ in range(10)]
    offsets = [spill.append(blob) for blob in blobs]
    assert spill.size_bytes == 3000
    assert spill.memory_bytes <= 1000 + 256 * 1024
    assert [spill.read(o, 300) for o in offsets] == blobs
    big = os.urandom(600_000)
    offset = spill.append(big)
    assert spill.memory_bytes < 256 * 1024 + 1000
    assert spill.read(offset, len(big)) == big
    spill.close()


def test_store_follows_a_flow_from_open_to_close() -> None:
    store = FlowStore()
    flow = _flow(1)
    changes = store.apply(
        [
            FlowOpened(flow),
            FlowData(1, Direction.UP, 1001.1, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"),
            FlowData(1, Direction.DOWN, 1001.2, b"HTTP/1.1 200 OK\r\n\r\n"),
        ]
    )
    assert changes.added == [1]
    assert store.open_count == 1
    store.refresh_summaries()
    record = store.get(1)
    assert record is not None
    assert record.summary.headline == "GET / (h) → 200 OK"
    closed = flow.closed(
        ended_at=1002.0, bytes_up=27, bytes_down=19, reason=CloseReason.CLIENT_CLOSED
    )
    store.apply([FlowClosed(closed)])
    store.refresh_summaries()
    assert store.open_count == 0
    assert record.is_closed and record.state_text == "client-closed"
    assert record.head_up is None  # after close the summary reads back from the spill
    assert store.raw_bytes(1, Direction.DOWN) == b"HTTP/1.1 200 OK\r\n\r\n"
    assert [type(e).__name__ for e in store.events(1)] == [
        "FlowOpened",
        "FlowData",
        "FlowData",
        "FlowClosed",
    ]


def test_bytes_beyond_the_per_flow_cap_are_counted_but_not_kept() -> None:
    store = FlowStore(max_kept_bytes_per_direction=1000)
    store.apply([FlowOpened(_flow(1))])
    store.apply([FlowData(1, Direction.UP, 1.0, b"x" * 700) for _ in range(3)])
    record = store.get(1)
    assert record is not None
    assert record.bytes_up == 2100
    assert record.kept_up == 1000
    assert record.truncated_bytes == 1100
    assert len(store.raw_bytes(1, Direction.UP)) == 1000


def test_content_search_and_clearing_closed_flows() -> None:
    store = FlowStore()
    store.apply([FlowOpened(_flow(1)), FlowOpened(_flow(2))])
    store.apply(
        [FlowData(1, Direction.UP, 1.0, b"needle in here"), FlowData(2, Direction.UP, 1.0, b"hay")]
    )
    assert store.contains(1, re.compile(rb"need+le"))
    assert not store.contains(2, re.compile(rb"needle"))
    store.apply(
        [
            FlowClosed(
                _flow(2).closed(ended_at=2.0, bytes_up=3, bytes_down=0, reason=CloseReason.KILLED)
            )
        ]
    )
    assert store.clear_closed() == [2]
    assert list(store.records) == [1]


def test_unknown_events_mark_the_flow_without_failing() -> None:
    class Gap:
        flow_id = 1

    store = FlowStore()
    store.apply([FlowOpened(_flow(1))])
    changes = store.apply([Gap()])
    record = store.get(1)
    assert record is not None and record.gaps == 1
    assert changes.changed == {1}


def test_the_chunk_index_of_a_flow_takes_tens_of_bytes_a_chunk() -> None:
    """100,000 small chunks: the index in memory stays a small multiple of the bytes kept."""
    store = FlowStore(PayloadSpill(memory_budget_bytes=64 * 1024))  # payload on disk
    store.apply([FlowOpened(_flow(1))])
    events = [
        FlowData(1, Direction.UP if i % 2 else Direction.DOWN, 2000.0 + i, b"%06d\n" % i)
        for i in range(100_000)
    ]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        store.apply(events)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 40 * 100_000  # a tuple per chunk took about 170 bytes
    chunks = list(store.chunks(1))
    assert len(chunks) == 100_000
    assert chunks[12_345].data == events[12_345].data and chunks[12_345].timestamp == 14345.0
    store.close()


def test_missing_bytes_are_noted_in_place_and_left_out_of_the_payload() -> None:
    store = FlowStore(max_kept_bytes_per_direction=100)
    store.apply([FlowOpened(_flow(1))])
    store.apply(
        [
            FlowData(1, Direction.UP, 1001.5, b"before "),
            DataNotShown(1, Direction.UP, 300),
            DataNotShown(1, Direction.UP, 200),  # the same hole, told in two parts
            FlowData(1, Direction.UP, 1002.0, b"after"),
            FlowGap(1, Direction.DOWN, 1002.5, 40),
            FlowData(1, Direction.DOWN, 1003.0, b"x" * 100),  # reaches the keep cap
            FlowGap(1, Direction.DOWN, 1003.5, 60),  # past the cap: nothing is shown anyway
        ]
    )
    record = store.records[1]
    index = record.chunks
    assert list(index.flags) == [CHUNK_UP, CHUNK_UP | CHUNK_NOT_SHOWN, CHUNK_UP, CHUNK_GAP, 0]
    assert list(index.lengths) == [7, 500, 5, 40, 100]
    assert index.timestamps[1] == 1001.5  # about where it was missed: after the last chunk
    assert (record.not_shown, record.gaps, record.bytes_up) == (500, 2, 512)
    assert store.raw_bytes(1, Direction.UP) == b"before after"
    assert [c.data for c in store.chunks(1)] == [b"before ", b"after", b"x" * 100]
    assert store.chunk_datas(record, 0, 3) == [b"before ", b"", b"after"]
    assert store.chunk_bytes(record, 1) == b""
    assert [type(e).__name__ for e in store.events(1)] == ["FlowOpened"] + ["FlowData"] * 3


def test_an_http2_flow_is_summarised_from_all_its_bytes_until_some_are_missing() -> None:
    from test_summary_h2 import _request, converse

    paths = [f"/stream/{n:03d}/of/a/long/connection" for n in range(90)]
    traced = [
        [*_request("GET", path), ("x-trace", f"{n * 0x9E3779B97F4A7C15:032x}")]
        for n, path in enumerate(paths)
    ]
    up, down = converse(traced, dict.fromkeys(paths, "200"))
    assert len(up) > HEAD_BYTES and len(down) > HEAD_BYTES
    store = FlowStore()
    store.apply([FlowOpened(_flow(1, port=443))])
    for at in range(0, max(len(up), len(down)), 1000):  # both directions, interleaved
        store.apply(
            [
                FlowData(1, Direction.UP, 1.0, up[at : at + 1000]),
                FlowData(1, Direction.DOWN, 1.0, down[at : at + 1000]),
            ]
        )
        store.refresh_summaries()
    record = store.get(1)
    assert record is not None
    assert record.summary.headline == f"h2 GET {paths[0]} (h2.test) → 200 (+89 more)"
    assert record.summary.details[-2:] == (f"> [179] GET {paths[-1]} (h2.test)", "< [179] 200")
    # A hole in the bytes (a viewer fell behind): what was followed stays, and says so.
    store.apply([DataNotShown(1, Direction.UP, 500)])
    store.apply([FlowData(1, Direction.UP, 2.0, b"\x00\x00\x05\x01\x04\x00\x00\x00\xa1")])
    store.refresh_summaries()
    assert record.summary.details[0] == "HTTP/2: 90 streams"
    assert record.summary.details[-1] == "… bytes missing: later streams not followed"
    closed = _flow(1, port=443).closed(
        ended_at=1003.0, bytes_up=len(up), bytes_down=len(down), reason=CloseReason.CLIENT_CLOSED
    )
    store.apply([FlowClosed(closed)])
    store.refresh_summaries()
    assert record.summary.details[0] == "HTTP/2: 90 streams" and record.h2 is None


def _fed(events: list[FlowEvent | DataNotShown], runs: list[int] | None) -> FlowStore:
    """A store fed `events` one by one, or with the data between other events in runs of
    the sizes `runs` cycles through, as the control socket carries them."""
    store = FlowStore(max_kept_bytes_per_direction=HEAD_BYTES + 3000)
    if runs is None:
        store.apply(events)
        return store
    sizes = itertools.cycle(runs)
    pending: list[FlowData] = []
    fed: list[object] = []
    for event in [*events, None]:
        if isinstance(event, FlowData):
            pending.append(event)
            continue
        while pending:
            size = next(sizes)
            fed.append(decode_data(encode_data(pending[:size])[HEADER.size :]))
            del pending[:size]
        if event is not None:
            fed.append(event)
    store.apply(fed)
    return store


def _state(store: FlowStore) -> list[object]:
    """Everything a store holds of its flows, to compare two stores by."""
    out: list[object] = [sorted(store.capped), store.open_count]
    for flow_id, record in store.records.items():
        chunks = record.chunks
        out += [
            flow_id,
            record.flow,
            (record.bytes_up, record.bytes_down, record.kept_up, record.kept_down),
            (record.head_up, record.head_down, record.not_shown, record.summary_stale),
            bytes(chunks.flags),
            list(chunks.timestamps),
            list(chunks.lengths),
            [(c.direction, c.timestamp, c.data) for c in store.chunks(flow_id)],
        ]
    return out


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 700), min_size=1, max_size=150),
    flows=st.lists(st.sampled_from([1, 2]), min_size=1, max_size=120),
    runs=st.lists(st.integers(1, 40), min_size=1, max_size=5),
    not_shown_at=st.integers(0, 130),
)
def test_data_in_runs_is_kept_as_the_same_chunks_fed_one_by_one(
    sizes: list[int], flows: list[int], runs: list[int], not_shown_at: int
) -> None:
    """Runs of one flow past its heads take the fast path; the others, the keep cap and
    missing bytes between runs must come out the same."""
    events: list[FlowEvent | DataNotShown] = [FlowOpened(_flow(1)), FlowOpened(_flow(2))]
    for flow_id, direction in itertools.product((1, 2), Direction):  # their heads taken
        events.append(FlowData(flow_id, direction, 999.0, b"h" * (HEAD_BYTES + flow_id)))
    for i, size in enumerate(sizes):
        if i == not_shown_at:
            events.append(DataNotShown(1, Direction.DOWN, 77))
        flow_id = flows[i % len(flows)]
        direction = Direction.UP if i % 3 else Direction.DOWN
        events.append(FlowData(flow_id, direction, 1000.0 + i, bytes([i % 256]) * size))
    closed = _flow(2).closed(
        ended_at=2000.0, bytes_up=1, bytes_down=2, reason=CloseReason.CLIENT_CLOSED
    )
    events.append(FlowClosed(closed))
    one_by_one, in_runs = _fed(events, None), _fed(events, runs)
    try:
        assert _state(in_runs) == _state(one_by_one)
    finally:
        one_by_one.close()
        in_runs.close()
