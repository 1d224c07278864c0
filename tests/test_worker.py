"""The worker loop on its own: timers, service deadlines, commands from other threads, and a
failure that closes every service's flows, with services that are plain objects (no sockets)."""

from __future__ import annotations

import math
import select
import socket
import threading
import time
from collections.abc import Callable

from conftest import wait_for
from flowtap.proxy.events import Bus
from flowtap.proxy.flow import CloseReason
from flowtap.proxy.worker import Deadlines, RelayConfig, Worker


class _Flows:
    """A service holding `count` pretend flows; it records what the worker asked of it."""

    def __init__(self, worker: Worker, count: int = 0, deadline: float = math.inf) -> None:
        self.worker = worker
        self.count = count
        self.deadline = deadline
        self.calls: list[tuple[str, object]] = []
        self.threads: set[str] = set()
        self.fail_on_deadline = False
        worker.add_service(self)

    @property
    def open_count(self) -> int:
        return self.count

    def on_deadline(self, now: float) -> None:
        self.threads.add(threading.current_thread().name)
        self.calls.append(("deadline", now))
        self.deadline = math.inf
        if self.fail_on_deadline:
            raise KeyError("a bug in a service")

    def stop_accepting(self, now: float) -> None:
        self.calls.append(("stop-accepting", None))

    def kill(self, flow_id: int) -> None:
        self.threads.add(threading.current_thread().name)
        self.calls.append(("kill", flow_id))

    def close_all(self, reason: CloseReason, note: str | None = None) -> None:
        self.calls.append(("close-all", (reason, note)))
        self.count = 0


def _worker(failures: list[BaseException], empty: threading.Event) -> Worker:
    return Worker(
        0,
        Bus(),
        RelayConfig(busy_poll_s=0.0),
        on_empty=empty.set,
        on_failure=lambda worker, exc: failures.append(exc),
    )


def test_timers_fire_in_time_order_and_a_far_one_never_overflows_the_poller() -> None:
    failures: list[BaseException] = []
    worker = _worker(failures, threading.Event())
    fired: list[str] = []
    now = time.monotonic()
    worker.call_at(now + 1e10, lambda now: fired.append("far"))  # past epoll's timeouts
    worker.call_at(now + 0.05, lambda now: fired.append("second"))
    worker.call_at(now + 0.01, lambda now: fired.append("first"))
    worker.start()
    try:
        wait_for(lambda: len(fired) == 2, 5, "the near timers")
        assert fired == ["first", "second"]
    finally:
        worker.submit(worker.exit)
        worker.join(5)
        worker.release()
    assert not worker.is_alive() and failures == []


def test_deadlines_fall_due_in_the_order_added_and_a_discarded_one_never_does() -> None:
    deadlines: Deadlines[str] = Deadlines(10.0)
    assert deadlines.next_due == math.inf and deadlines.pop_due(1e9) == []
    assert deadlines.add("a", 100.0) == 110.0
    deadlines.add("b", 101.0)
    deadlines.add("c", 102.0)
    deadlines.discard("b")
    deadlines.discard("never added")
    assert deadlines.next_due == 110.0
    assert deadlines.pop_due(109.9) == []
    assert deadlines.pop_due(112.0) == ["a", "c"]
    assert len(deadlines) == 0 and deadlines.next_due == math.inf


def test_commands_and_deadlines_run_on_the_worker_thread() -> None:
    failures: list[BaseException] = []
    empty = threading.Event()
    worker = _worker(failures, empty)
    flows = _Flows(worker, count=2, deadline=time.monotonic() + 0.02)
    worker.start()
    try:
        worker.submit(lambda: worker.kill(7))
        wait_for(lambda: ("kill", 7) in flows.calls, 5, "the kill command")
        wait_for(lambda: any(name == "deadline" for name, _ in flows.calls), 5, "the deadline")
        assert flows.threads == {worker.name}
        worker.submit(worker.stop_accepting)
        wait_for(lambda: ("stop-accepting", None) in flows.calls, 5, "stop-accepting")
        assert not empty.is_set()  # two flows still open
        worker.submit(lambda: worker.close_all(CloseReason.SHUTDOWN))
        assert empty.wait(5)
    finally:
        worker.submit(worker.exit)
        worker.join(5)
        worker.release()
    assert failures == []


def test_a_failing_service_closes_every_services_flows_as_error_and_reports() -> None:
    failures: list[BaseException] = []
    empty = threading.Event()
    worker = _worker(failures, empty)
    failing = _Flows(worker, count=1, deadline=time.monotonic() + 0.01)
    failing.fail_on_deadline = True
    other = _Flows(worker, count=3)
    worker.start()
    worker.join(5)
    assert not worker.is_alive()
    worker.release()
    assert len(failures) == 1 and isinstance(failures[0], KeyError)
    assert worker.failure is failures[0]
    note = "the relay thread failed: KeyError: 'a bug in a service'"
    for service in (failing, other):
        assert service.calls[-1] == ("close-all", (CloseReason.ERROR, note))
    assert empty.is_set()  # the relay's stop does not wait for a dead worker


class _Recorder:
    """A handler that records its events and runs `then` on the first one."""

    def __init__(self, then: Callable[[], None] | None = None) -> None:
        self.events: list[int] = []
        self.then = then

    def on_ready(self, fd: int, mask: int, now: float) -> None:
        self.events.append(fd)
        if self.then is not None:
            then, self.then = self.then, None
            then()


def test_an_event_of_a_descriptor_closed_in_its_batch_skips_the_next_owner_of_its_number() -> None:
    failures: list[BaseException] = []
    worker = _worker(failures, threading.Event())
    first = socket.socketpair()
    second = socket.socketpair()
    reused: list[socket.socket] = []
    newcomer = _Recorder()

    def close_second_and_reuse_its_number() -> None:
        # As a flow that closes and a new one that gets the same descriptor number.
        fd = second[1].fileno()
        worker.forget(fd)
        second[1].close()
        reused.extend(socket.socketpair())
        assert reused[0].fileno() == fd
        worker.watch(fd, select.EPOLLOUT | select.EPOLLET, newcomer)

    closer = _Recorder(close_second_and_reuse_its_number)
    # Both readable before the loop starts, so that the first poll returns both events.
    first[0].send(b"x")
    second[0].send(b"x")
    worker.watch(first[1].fileno(), select.EPOLLIN | select.EPOLLET, closer)
    worker.watch(second[1].fileno(), select.EPOLLIN | select.EPOLLET, _Recorder())
    worker.start()
    try:
        wait_for(lambda: bool(closer.events), 5, "the first event")
        # Writable at once: the new socket's own event comes in the next batch, and only it.
        wait_for(lambda: bool(newcomer.events), 5, "the new socket's own event")
        done = threading.Event()
        worker.submit(done.set)
        assert done.wait(5)
        assert newcomer.events == [reused[0].fileno()]
    finally:
        worker.submit(worker.exit)
        worker.join(5)
        worker.release()
        for sock in (*first, second[0], *reused):
            sock.close()
    assert failures == []
