"""The proxy-mode benchmark's verdict: strict against each lightweight proxy and mitmdump."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "modes_benchmark", Path(__file__).resolve().parent.parent / "benchmarks" / "modes.py"
)
assert _spec is not None and _spec.loader is not None
modes_benchmark = sys.modules["modes_benchmark"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(modes_benchmark)


def _row(up: float, down: float, conns: float, p50: float) -> dict[str, float]:
    return {"bulk up MB/s": up, "bulk down MB/s": down, "conn/s": conns, "p50 us": p50}


def test_every_target_is_met_only_when_flowtap_is_at_least_as_good() -> None:
    results = {
        "flowtap socks5": _row(300, 300, 2000, 20),
        "microsocks": _row(200, 300, 2000, 19),
        "dante": _row(300, 100, 1000, 30),
        "mitmdump socks5": _row(50, 50, 400, 200),
    }
    checks = modes_benchmark.verdict("socks5", results, ("microsocks", "dante"))
    assert [(c.text, c.met) for c in checks] == [
        ("socks5 conn/s >= 1.0x microsocks", True),
        ("socks5 conn/s >= 1.0x dante", True),
        ("socks5 conn/s >= 5x mitmdump socks5", True),
        ("socks5 bulk up MB/s >= 1.0x the best", True),
        ("socks5 bulk down MB/s >= 1.0x the best", True),
        ("socks5 ping-pong p50 <= 1.1x the best", True),
    ]


def test_a_figure_just_short_of_its_target_fails() -> None:
    results = {
        "flowtap http": _row(299, 300, 1999, 20.1),
        "tinyproxy": _row(300, 300, 2000, 18),
        "mitmdump regular": _row(10, 10, 400.1, 500),
    }
    failed = [c.text for c in modes_benchmark.verdict("connect", results, ("tinyproxy",))]
    checks = modes_benchmark.verdict("connect", results, ("tinyproxy",))
    assert [c.text for c in checks if not c.met] == [
        "connect conn/s >= 1.0x tinyproxy",
        "connect conn/s >= 5x mitmdump regular",
        "connect bulk up MB/s >= 1.0x the best",
        "connect ping-pong p50 <= 1.1x the best",
    ]
    assert len(failed) == 5
