"""Filter expressions over stored flows, without sockets."""

from __future__ import annotations

import pytest

from flowtap.inspector.flow_filter import parse_filter
from flowtap.inspector.store import FlowStore
from flowtap.proxy.errors import FlowtapError
from flowtap.proxy.flow import (
    Address,
    CloseReason,
    Direction,
    Flow,
    FlowClosed,
    FlowData,
    FlowOpened,
    FlowState,
    Transport,
)


@pytest.fixture
def store() -> FlowStore:
    store = FlowStore()
    flows = [
        (1, 8080, b"GET /cart HTTP/1.1\r\nHost: shop.test\r\n\r\n", CloseReason.CLIENT_CLOSED),
        (2, 6379, b"*1\r\n$4\r\nPING\r\n", CloseReason.SERVER_RESET),
        (3, 2525, b"hello there\r\n", None),
    ]
    for flow_id, port, payload, reason in flows:
        flow = Flow(
            id=flow_id,
            transport=Transport.TCP,
            client=Address("127.0.0.1", 50000 + flow_id),
            server=Address("127.0.0.1", port),
            listener=Address("127.0.0.1", 9000),
            started_at=1.0,
            state=FlowState.OPEN,
        )
        store.apply([FlowOpened(flow), FlowData(flow_id, Direction.UP, 1.1, payload)])
        if reason is not None:
            closed = flow.closed(ended_at=2.0, bytes_up=len(payload), bytes_down=0, reason=reason)
            store.apply([FlowClosed(closed)])
    store.refresh_summaries()
    return store


def shown(store: FlowStore, text: str) -> list[int]:
    flow_filter = parse_filter(text)
    return [i for i, r in store.records.items() if flow_filter.matches(r, store)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("port:6379", [2]),
        ("port:50001", [1]),
        ("host:127.0.0.1:2525", [3]),
        ("state:reset", [2]),
        ("state:open", [3]),
        ("proto:http", [1]),
        ("proto:redis", [2]),
        ("proto:tcp", [1, 2, 3]),
        ("has:PING", [2]),
        ("has:ping", [2]),
        (r"re:GET\s/c[a-z]+", [1]),
        ("shop.test", [1]),
        ("proto:text hello", [3]),
        ("port:8080 state:reset", []),
    ],
)
def test_each_kind_of_word_narrows_the_flows(
    store: FlowStore, text: str, expected: list[int]
) -> None:
    assert shown(store, text) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("port:http", "not a port number"),
        ("re:[oops", "not a valid regex"),
        ("host:", "nothing after the colon"),
    ],
)
def test_malformed_words_name_the_problem(text: str, problem: str) -> None:
    with pytest.raises(FlowtapError, match=problem):
        parse_filter(text)
