"""The UDP benchmark's verdict: 1.5x socat's rate, capped at the direct path's, and 0 loss."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "udp_benchmark", Path(__file__).resolve().parent.parent / "benchmarks" / "udp.py"
)
assert _spec is not None and _spec.loader is not None
udp_benchmark = sys.modules["udp_benchmark"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(udp_benchmark)
Verdict = udp_benchmark.Verdict
verdict_text = udp_benchmark.verdict_text


def test_the_target_is_one_and_a_half_times_socat_where_the_direct_path_reaches_it() -> None:
    assert Verdict("rr-window", 64, 150_000, 0, 100_000, 180_000).met
    below = Verdict("rr-window", 64, 149_000, 0, 100_000, 180_000)
    assert not below.met and not below.capped
    assert verdict_text([below]).splitlines() == [
        "target (>= 1.5x socat, or the direct path's rate where that is lower; 0 loss): "
        "missed: rr-window 64B"
    ]


def test_where_the_direct_path_stays_under_it_the_target_is_the_direct_rate() -> None:
    at_direct = Verdict("ping-pong", 64, 20_000, 0, 14_000, 20_000)
    under_direct = Verdict("ping-pong", 1400, 19_900, 0, 14_000, 20_000)
    assert at_direct.capped and at_direct.met
    assert under_direct.capped and not under_direct.met
    text = verdict_text([at_direct, under_direct]).splitlines()
    assert text[0].endswith("missed: ping-pong 1400B")
    assert text[1:] == [
        "  ping-pong 64B: the direct path is 1.43x socat, so the target is its rate; "
        "flowtap is 1.00x direct (1.43x socat: 1.5x not)",
        "  ping-pong 1400B: the direct path is 1.43x socat, so the target is its rate; "
        "flowtap is 0.99x direct (1.42x socat: 1.5x not)",
    ]


def test_any_loss_misses_the_target() -> None:
    assert not Verdict("one-way", 64, 1_000_000, 1, 100_000, 1_100_000).met
    assert not Verdict("ping-pong", 64, 30_000, 1, 14_000, 20_000).met
