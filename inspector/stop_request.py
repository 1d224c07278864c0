"""How a long-running command learns it must stop: SIGINT, SIGTERM, or a thread of its own."""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
# What a thread of the process sends the main thread to make it stop (a relay thread that failed).
_WAKE = signal.SIGUSR1


class StopRequest:
    """SIGINT, SIGTERM or `request()` from any thread, taken by the main thread's `wait()`.

    The signals are blocked in every thread and taken with sigwait, so no Python signal handler
    runs: a handler that sets a threading.Event deadlocks when the signal lands while the main
    thread holds that Event's lock inside wait(), and a handler interrupted by the next signal
    nests. Bursts happen: a SIGKILLed parent with many threads sends its parent-death signal once
    per thread that dies. Here any number of signals is one request.

    Make it in the main thread before starting any thread (threads inherit the signal mask), and
    start no child process after it (a child would inherit the mask too).
    """

    def __init__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopRequest is made in the main thread")
        self._main = threading.main_thread().ident
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS | {_WAKE})

    def request(self) -> None:
        """Ask the main thread to stop (from any thread; asking twice is asking once)."""
        assert self._main is not None
        signal.pthread_kill(self._main, _WAKE)

    def wait(self) -> signal.Signals | None:
        """Block until a stop signal or `request()`; the signal, or None for a request."""
        taken = signal.sigwait(STOP_SIGNALS | {_WAKE})
        return None if taken == _WAKE else signal.Signals(taken)
