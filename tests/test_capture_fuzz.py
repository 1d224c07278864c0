"""Mutated captures: the reader and `show` end with a one-line error or a result, never a crash."""

from __future__ import annotations

import contextlib
import io
import random
import subprocess
from pathlib import Path

import pytest
from capture_checks import assert_tshark_clean, flowtap_show

from flowtap.inspector.show import list_flows, show_flow
from flowtap.proxy.errors import FlowtapError

MUTANTS_PER_SEED = 400


def seeds(tmp_path: Path) -> list[Path]:
    """Small captures in every format the reader knows, written by flowtap and by editcap."""
    from test_capture_writer import conversation, make_flow, write_capture

    from flowtap.proxy.flow import Address, CloseReason, Direction, Transport

    events = [
        *conversation(
            make_flow(1, Address("127.0.0.1", 40000), Address("127.0.0.1", 6379)),
            [
                (Direction.UP, b"PING\r\n"),
                (Direction.DOWN, b"+PONG\r\n"),
                (Direction.UP, b"x" * 900),
            ],
        ),
        *conversation(
            make_flow(2, Address("", path="/tmp/a.sock"), Address("::1", 80)),
            [(Direction.UP, b"GET / HTTP/1.0\r\n\r\n")],
            CloseReason.SERVER_RESET,
        ),
        *conversation(
            make_flow(3, Address("127.0.0.1", 5000), Address("127.0.0.1", 9999), Transport.UDP),
            [(Direction.UP, b"q"), (Direction.DOWN, b"answer")],
        ),
    ]
    pcap = write_capture(tmp_path / "seed.pcap", events)
    pcapng = write_capture(tmp_path / "seed.pcapng", events)
    cooked = tmp_path / "seed-sll.pcapng"
    # Re-encapsulated by editcap: other writer, other byte layout of the same packets.
    subprocess.run(["editcap", "-F", "pcapng", str(pcap), str(cooked)], check=True, timeout=60)
    for path in (pcap, pcapng, cooked):
        assert_tshark_clean(path, allowed_warnings=("Connection reset (RST)",))
    return [pcap, pcapng, cooked]


def mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:  # flip a few bytes
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] = rng.randrange(256)
    elif kind == 1:  # cut anywhere
        del out[rng.randrange(len(out)) :]
    elif kind == 2:  # insert junk
        at = rng.randrange(len(out))
        out[at:at] = rng.randbytes(rng.randint(1, 64))
    elif kind == 3:  # repeat a slice
        at = rng.randrange(len(out))
        out[at:at] = out[at : at + rng.randint(1, 200)]
    else:  # damage a length field near a record boundary
        at = rng.randrange(0, max(1, len(out) - 4), 4)
        out[at : at + 4] = rng.choice(
            [b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x0c\x00\x00\x00"]
        )
    return bytes(out)


def test_mutated_captures_never_crash_the_reader(tmp_path: Path) -> None:
    rng = random.Random(20261125)
    target = tmp_path / "mutant"
    outcomes = {"read": 0, "partial": 0, "error": 0}
    for seed in seeds(tmp_path):
        original = seed.read_bytes()
        for _ in range(MUTANTS_PER_SEED):
            target.write_bytes(mutate(original, rng))
            out = io.StringIO()
            try:
                result = list_flows(target, out)
                outcomes["partial" if result.problem else "read"] += 1
                for flow_id in (1, 2):
                    with contextlib.suppress(FlowtapError):
                        show_flow(target, flow_id, io.StringIO(), as_hex=flow_id == 2)
            except FlowtapError as exc:
                assert str(exc) and "\n" not in str(exc)
                outcomes["error"] += 1
    # The mutations exercise all three ends: whole reads, partial reads and refusals.
    assert all(count > 0 for count in outcomes.values()), outcomes


@pytest.mark.parametrize("index", range(6))
def test_mutated_captures_through_the_cli_give_at_most_one_line(tmp_path: Path, index: int) -> None:
    rng = random.Random(index)
    seed = seeds(tmp_path)[index % 3]
    target = tmp_path / "mutant.pcapng"
    target.write_bytes(mutate(seed.read_bytes(), rng))
    result = flowtap_show(str(target))
    stderr = result.stderr.decode()
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) <= 1
    assert result.returncode in (0, 1, 2)
