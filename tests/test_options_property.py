"""Random values and random combinations of every option of run, tui, replay, serve and show:
the real program exits 0 or 2 (replay --check 1 too: an echo server's answers differ from the
recording), with one error line at most, no traceback and no hang. The TLS modes drawn are
passthrough and off: intercept would make a CA in the user's data folder.

Where a combination starts a relay (or a mock server) and it prints `listening ...`, SIGTERM
must stop it with exit 0. Valid durations are drawn short (a second or so) where the program
would really wait that long, so that every run is bounded; invalid ones are drawn from the
whole range of nonsense. Everything listens and connects on loopback only.
"""

from __future__ import annotations

import argparse
import itertools
import math
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import flowtap_command, wait_for
from flowtap.inspector import options
from flowtap.inspector.cli import build_parser

SAMPLES = Path(__file__).resolve().parent.parent / "captures" / "samples"
CAPTURES = [str(SAMPLES / "redis.pcapng"), str(SAMPLES / "http.pcapng"), "no-such-file.pcapng"]

# Reproducible in CI: the same examples every run, nothing remembered between runs.
_SETTINGS: dict[str, Any] = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
}

_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=12,
)
NONSENSE = st.one_of(
    st.sampled_from(
        [
            "nan",
            "NaN",
            "inf",
            "-inf",
            "Infinity",
            "1e10",
            "1e400",
            "-1e-400",
            "-1",
            "-0",
            "0",
            "",
            " ",
            "abc",
            "0x10",
            "1_0",
            "\u0661",
            "\u00b2",
            "9" * 40,
            "+5",
            "1.5",
            "--",
            "-",
            "1e-9",
            "86401",
            "65",
            "1000001",
        ]
    ),
    st.floats().map(repr),
    st.integers().map(str),
    _TEXT,
)


def _number(low: float, high: float) -> st.SearchStrategy[str]:
    """Valid numbers in [low, high], written as floats and, where there are some, as integers."""
    floats = st.floats(low, high).map(repr)
    if math.ceil(low) > math.floor(high):
        return floats
    return st.one_of(floats, st.integers(math.ceil(low), math.floor(high)).map(str))


def _whole(low: int, high: int) -> st.SearchStrategy[str]:
    return st.integers(low, high).map(str)


def _value(valid: st.SearchStrategy[str], sane: bool = False) -> st.SearchStrategy[str]:
    """A valid value when `sane`, else valid or nonsense."""
    return valid if sane else st.one_of(valid, valid, NONSENSE)


def _invalid(kind: Callable[[str], object]) -> st.SearchStrategy[str]:
    """Nonsense that the option's own type refuses."""

    def refused(text: str) -> bool:
        try:
            kind(text)
        except argparse.ArgumentTypeError:
            return True
        return False

    return NONSENSE.filter(refused)


_NEVER = st.sampled_from(["0", "0.0", "-0"])
# The proxy listeners' policy options, with values they take.
PROXY_TEXTS = {
    "--auth": st.sampled_from(["user:secret", "a:b"]),
    "--allow-from": st.sampled_from(["127.0.0.0/8", "::1/128", "10.0.0.0/8"]),
    "--deny-to": st.sampled_from(["192.168.0.0/16", "fd00::/8"]),
    "--allow-to": st.sampled_from(["169.254.169.254/32", "127.0.0.1/32"]),
    "--allow-ports": st.sampled_from(["80,443", "8000-8999", "1-65535"]),
    "--tls-passthrough": st.sampled_from(["*.example.com", "example.org"]),
}
# Valid filters (any flow, as it opens) and a malformed one.
FILTERS = st.sampled_from(["tcp", "udp", "tcp port 80", "host 127.0.0.1", "port x"])
# Each relay option with the values that keep a run short when valid.
RELAY_NUMBERS: dict[str, tuple[Callable[[str], object], st.SearchStrategy[str]]] = {
    "--connect-timeout": (options.CONNECT_TIMEOUT, _number(0.001, 86_400)),
    "--idle-timeout": (options.IDLE_TIMEOUT, _NEVER | _number(0.001, options.YEAR_S)),
    "--grace": (options.GRACE, _number(0, 86_400)),  # no flow is open at SIGTERM
    "--workers": (options.WORKERS, _whole(1, 64)),
    "--busy-poll": (options.BUSY_POLL_US, _number(0, 1_000_000)),
    "--udp-idle-timeout": (options.IDLE_TIMEOUT, _NEVER | _number(0.001, options.YEAR_S)),
    "--udp-max-sessions": (options.UDP_MAX_SESSIONS, _whole(1, 1_000_000)),
    "--pcap-max-size": (options.PCAP_MAX_SIZE_MB, _whole(1, 1_000_000)),
    "--pcap-max-files": (options.PCAP_MAX_FILES, _whole(1, 100_000)),
    "--tls-handshake-timeout": (options.seconds(0.001, options.DAY_S), _number(0.001, 86_400)),
    "--handshake-timeout": (options.HANDSHAKE_TIMEOUT, _number(0.001, 86_400)),
}
PLAYBACK_NUMBERS: dict[str, tuple[Callable[[str], object], st.SearchStrategy[str]]] = {
    "--turn-timeout": (options.TURN_TIMEOUT, _number(0.001, 0.3)),
    "--flow": (options.FLOW_ID, _whole(1, 3)),
}
REPLAY_NUMBERS: dict[str, tuple[Callable[[str], object], st.SearchStrategy[str]]] = {
    **PLAYBACK_NUMBERS,
    "--speed": (options.SPEED, _number(5, 1_000_000)),
    "--concurrency": (options.CONCURRENCY, _whole(1, 10_000)),
    "--connect-timeout": (options.CONNECT_TIMEOUT, _number(0.001, 2)),
}


@st.composite
def _numbers(
    draw: st.DrawFn,
    table: dict[str, tuple[Callable[[str], object], st.SearchStrategy[str]]],
    sane: bool = False,
) -> list[str]:
    args: list[str] = []
    for option, (_, valid) in table.items():
        if draw(st.booleans()):
            args += [option, draw(_value(valid, sane))]
    return args


@st.composite
def _flags(draw: st.DrawFn, flags: list[str]) -> list[str]:
    return [flag for flag in flags if draw(st.booleans())]


class _Run:
    """One run of the real program: its exit status and what it printed."""

    def __init__(self, args: list[str], cwd: Path, *, timeout_s: float = 20.0) -> None:
        self.args = args
        proc = subprocess.Popen(
            [*flowtap_command(), *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        self.stdout: list[str] = []
        reader = threading.Thread(target=self._read, args=(proc,), daemon=True)
        reader.start()
        try:
            wait_for(
                lambda: proc.poll() is not None or any(self._listening()),
                timeout_s,
                f"flowtap {args} to exit or listen",
            )
            self.listened = proc.poll() is None
            if self.listened:
                proc.send_signal(signal.SIGTERM)
            self.code = proc.wait(timeout_s)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        reader.join(5)
        assert proc.stderr is not None
        self.stderr = proc.stderr.read()
        event(f"exit {self.code}{' after listening' if self.listened else ''}")

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.stdout.append(line)

    def _listening(self) -> list[str]:
        return [line for line in list(self.stdout) if line.startswith("listening ")]

    def check(self, *, codes: tuple[int, ...] = (0, 2)) -> None:
        where = f"flowtap {self.args}: exit {self.code}, stderr {self.stderr!r}"
        assert "Traceback" not in self.stderr, where
        lines = self.stderr.splitlines()
        assert len(lines) <= 1, where
        if self.listened:
            assert self.code == 0, where
            return
        assert self.code in codes, where
        if self.code == 2:
            assert len(lines) == 1 and lines[0].startswith("flowtap: error: "), where


_names = itertools.count()


@st.composite
def _relay_args(draw: st.DrawFn, tmp: Path, upstream: str) -> list[str]:
    """--listen/--upstream pairs, numbers, flags and a capture: all valid (half the time, so
    that relays start), or with nonsense and mismatched pairs anywhere."""
    sane = draw(st.booleans())
    sock = f"unix:{tmp}/l{next(_names)}.sock"
    listens = st.sampled_from(
        [
            *("127.0.0.1:0", "0", "tcp:127.0.0.1:0", "udp:127.0.0.1:0", "[::1]:0", sock),
            *("socks5:127.0.0.1:0", "http:127.0.0.1:0"),
        ]
    )
    upstreams = st.sampled_from([upstream, f"unix:{tmp}/nothing.sock"])
    if sane:
        count = draw(st.integers(1, 2))
        args = [item for _ in range(count) for item in ("--listen", draw(listens))]
        for _ in range(draw(st.sampled_from([1, count]))):
            args += ["--upstream", draw(upstreams)]
    else:
        args = []
        for _ in range(draw(st.integers(0, 2))):
            args += ["--listen", draw(st.one_of(listens, NONSENSE))]
        for _ in range(draw(st.integers(0, 2))):
            args += ["--upstream", draw(st.one_of(upstreams, st.just("127.0.0.1:0"), NONSENSE))]
    args += draw(_numbers(RELAY_NUMBERS, sane))
    args += draw(_flags(["--udp", "--json", "--reuse-port", "--capture", "--quiet"]))
    if draw(st.booleans()) or (sane and "--pcap-max-size" in args):
        args += ["--pcap", str(tmp / f"c{next(_names)}.pcapng")]
    if draw(st.booleans()):
        args += draw(st.sampled_from([["--no-control"], ["--control", f"{tmp}/k{next(_names)}"]]))
    if draw(st.booleans()):
        args += ["--tls", draw(_value(st.sampled_from(["passthrough", "off"]), sane))]
    if draw(st.booleans()):
        args += ["--filter", draw(_value(FILTERS, sane))]
    for option, valid in PROXY_TEXTS.items():  # what proxy listeners allow, checked later
        if draw(st.integers(0, 3)) == 0:
            args += [option, draw(_value(valid, sane))]
    return args


@settings(max_examples=50, **_SETTINGS)
@given(data=st.data())
def test_run_with_random_options_exits_cleanly(
    data: st.DataObject, tmp_path: Path, echo_server: tuple[str, int]
) -> None:
    # No traffic is sent: a UDP upstream needs an address only (the echo's port, in UDP).
    args = data.draw(_relay_args(tmp_path, f"127.0.0.1:{echo_server[1]}"))
    _Run(["run", *args], tmp_path).check()


@settings(max_examples=15, **_SETTINGS)
@given(data=st.data())
def test_tui_with_an_invalid_option_value_is_one_line(data: st.DataObject, tmp_path: Path) -> None:
    option = data.draw(st.sampled_from(sorted(RELAY_NUMBERS)))
    kind, _ = RELAY_NUMBERS[option]
    value = data.draw(_invalid(kind))
    others = data.draw(_numbers(RELAY_NUMBERS))
    file = data.draw(st.sampled_from([[], [CAPTURES[0]]]))
    args = ["tui", *file, "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", *others]
    run = _Run([*args, option, value], tmp_path)
    run.check(codes=(2,))


@settings(max_examples=25, **_SETTINGS)
@given(data=st.data())
def test_replay_with_random_options_exits_cleanly(
    data: st.DataObject, tmp_path: Path, echo_server: tuple[str, int]
) -> None:
    sane = data.draw(st.booleans())
    to = data.draw(_value(st.just(f"127.0.0.1:{echo_server[1]}"), sane))
    args = ["replay", data.draw(st.sampled_from(CAPTURES)), "--to", to]
    args += data.draw(_numbers(REPLAY_NUMBERS, sane))
    args += data.draw(_flags(["--json", "--diff", "--check", "--asap", "--dry-run"]))
    if data.draw(st.booleans()):
        args += ["--filter", data.draw(_value(FILTERS, sane))]
    if data.draw(st.booleans()):
        args += ["--ignore", data.draw(st.sampled_from(["Date: [^\\r]*", "(unclosed", "x+"]))]
    if data.draw(st.booleans()):
        args += ["--pcap", str(tmp_path / f"r{next(_names)}.pcapng")]
    # --check exits 1 when the echoed responses differ from the recorded ones, as they do.
    _Run(args, tmp_path).check(codes=(0, 1, 2) if "--check" in args else (0, 2))


@settings(max_examples=15, **_SETTINGS)
@given(data=st.data())
def test_serve_with_random_options_exits_cleanly(data: st.DataObject, tmp_path: Path) -> None:
    sane = data.draw(st.booleans())
    args = ["serve", data.draw(st.sampled_from(CAPTURES))]
    if data.draw(st.booleans()):
        listen = st.sampled_from(["127.0.0.1:0", "0", "[::1]:0", "127.0.0.1:99999"])
        args += ["--listen", data.draw(_value(listen, sane))]
    args += data.draw(_numbers(PLAYBACK_NUMBERS, sane))
    args += data.draw(_flags(["--json"]))
    if data.draw(st.booleans()):
        args += [
            "--on-mismatch",
            data.draw(st.one_of(st.sampled_from(["continue", "close"]), NONSENSE)),
        ]
    _Run(args, tmp_path).check()


@settings(max_examples=20, **_SETTINGS)
@given(data=st.data())
def test_show_with_random_options_exits_cleanly(data: st.DataObject, tmp_path: Path) -> None:
    args = ["show", data.draw(st.sampled_from(CAPTURES))]
    if data.draw(st.booleans()):
        args += ["--flow", data.draw(_value(_whole(1, 3)))]
    args += data.draw(_flags(["--hex", "--json"]))
    if data.draw(st.booleans()):
        args += ["--filter", data.draw(_value(FILTERS))]
    if data.draw(st.booleans()):
        args += ["--raw", data.draw(st.one_of(st.sampled_from(["client", "server"]), NONSENSE))]
    _Run(args, tmp_path).check()


@settings(max_examples=300, **_SETTINGS)
@given(
    command=st.sampled_from(["run", "tui", "replay", "serve", "show"]),
    values=st.lists(st.tuples(st.sampled_from(sorted(RELAY_NUMBERS | REPLAY_NUMBERS)), NONSENSE)),
)
def test_parsed_values_are_finite_and_in_range(
    command: str, values: list[tuple[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    """In-process: what the parser accepts is what the option's range allows, and what it
    refuses is one line naming the option."""
    head = {
        "run": ["run"],
        "tui": ["tui"],
        "replay": ["replay", "f.pcapng", "--to", "127.0.0.1:9"],
        "serve": ["serve", "f.pcapng"],
        "show": ["show", "f.pcapng"],
    }[command]
    argv = head + [f"{option}={text}" for option, text in values]
    try:
        parsed = build_parser().parse_args(argv)
    except SystemExit as exc:
        assert exc.code == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("flowtap: error: ")
        return
    for option, (kind, _) in (RELAY_NUMBERS | REPLAY_NUMBERS).items():
        value = getattr(parsed, option[2:].replace("-", "_"), None)
        for item in value if isinstance(value, list) else [value]:
            if item is not None:
                kind(repr(item))  # what was parsed is within the option's range
