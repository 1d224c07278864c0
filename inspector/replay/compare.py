"""Comparing what a peer sent in a replay with what it sent in the recording.

Pure functions over bytes. Volatile fields (dates, ids) are masked with `--ignore` patterns
before comparing; offsets are always reported in the bytes as received.
"""

from __future__ import annotations

import bisect
import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from flowtap.proxy.errors import FlowtapError

MASK = b"\xe2\x80\xa6"  # what a masked field compares as (an ellipsis, so diffs read well)
_SNIPPET_BEFORE = 16
_SNIPPET_AFTER = 32
_BLOCK = 4096


def compile_patterns(texts: Sequence[str]) -> tuple[re.Pattern[bytes], ...]:
    """Compile `--ignore` regular expressions over bytes; FlowtapError if one is malformed."""
    patterns = []
    for text in texts:
        try:
            patterns.append(re.compile(text.encode("utf-8", "surrogateescape")))
        except re.error as exc:
            raise FlowtapError(
                f"--ignore {text!r} is not a regular expression ({exc}): fix it or quote it "
                "for the shell"
            ) from None
    return tuple(patterns)


@dataclass(frozen=True, slots=True)
class Masked:
    """Bytes with volatile fields replaced by `MASK`, and how to map offsets back."""

    data: bytes
    # Sorted offsets in `data` where a span starts, with the original offset it came from.
    _masked_starts: tuple[int, ...] = ()
    _original_starts: tuple[int, ...] = ()

    def original_offset(self, offset: int) -> int:
        """The offset in the unmasked bytes that `offset` in `data` stands for."""
        index = bisect.bisect_right(self._masked_starts, offset) - 1
        if index < 0:
            return offset
        return self._original_starts[index] + (offset - self._masked_starts[index])


def mask(data: bytes, patterns: Sequence[re.Pattern[bytes]]) -> Masked:
    """Replace every match of `patterns` in `data` (in order, each over the result)."""
    if not patterns:
        return Masked(data)
    spans: list[tuple[int, int]] = []
    for pattern in patterns:
        spans.extend(m.span() for m in pattern.finditer(data) if m.end() > m.start())
    if not spans:
        return Masked(data)
    spans.sort()
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    out = bytearray()
    masked_starts: list[int] = []
    original_starts: list[int] = []
    position = 0
    for start, end in merged:
        masked_starts.append(len(out))
        original_starts.append(position)
        out += data[position:start]
        masked_starts.append(len(out))
        original_starts.append(start)
        out += MASK
        position = end
    masked_starts.append(len(out))
    original_starts.append(position)
    out += data[position:]
    return Masked(bytes(out), tuple(masked_starts), tuple(original_starts))


def first_difference_offset(expected: bytes, received: bytes) -> int | None:
    """The first offset where the two differ (the shorter one's length if one is a prefix)."""
    if expected == received:
        return None
    size = min(len(expected), len(received))
    a = memoryview(expected)
    b = memoryview(received)
    start = 0
    while start < size and a[start : start + _BLOCK] == b[start : start + _BLOCK]:
        start += _BLOCK
    end = min(size, start + _BLOCK)
    for offset in range(start, end):
        if expected[offset] != received[offset]:
            return offset
    return size


def snippet(data: bytes, offset: int) -> str:
    """A short printable excerpt of `data` around `offset`, escaped like a Python bytes literal."""
    start = max(0, offset - _SNIPPET_BEFORE)
    text = repr(data[start : offset + _SNIPPET_AFTER])[2:-1]
    return ("..." if start else "") + text + ("..." if offset + _SNIPPET_AFTER < len(data) else "")


@dataclass(frozen=True, slots=True)
class Difference:
    """Where a peer's bytes first differ from the recording, with both excerpts."""

    offset: int
    expected: str
    received: str

    def as_dict(self) -> dict[str, object]:
        return {"offset": self.offset, "expected": self.expected, "received": self.received}

    def lines(self, heading: str, received_as: str) -> str:
        """The difference as indented report lines: `heading` and the offset, then both excerpts
        (`received_as` names the peer's, in a label as wide as "recorded")."""
        return (
            f"\n  {heading} {self.offset}:"
            f"\n    recorded: {self.expected}\n    {received_as}: {self.received}"
        )


def compare(
    expected: bytes, received: bytes, patterns: Sequence[re.Pattern[bytes]] = ()
) -> Difference | None:
    """None when the bytes agree once `patterns` are masked; else the first difference."""
    if expected == received:
        return None
    masked_expected = mask(expected, patterns)
    masked_received = mask(received, patterns)
    offset = first_difference_offset(masked_expected.data, masked_received.data)
    if offset is None:
        return None
    at_expected = masked_expected.original_offset(offset)
    at_received = masked_received.original_offset(offset)
    return Difference(
        offset=at_received,
        expected=snippet(expected, at_expected),
        received=snippet(received, at_received),
    )


def is_text(data: bytes) -> bool:
    """Whether `data` reads as text (UTF-8 without control bytes other than whitespace)."""
    if b"\x00" in data:
        return False
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    controls = sum(1 for ch in text if ord(ch) < 32 and ch not in "\r\n\t")
    return controls <= len(text) // 100


def text_diff(
    expected: bytes,
    received: bytes,
    patterns: Sequence[re.Pattern[bytes]] = (),
    *,
    name: str = "response",
) -> str | None:
    """A unified diff of two text responses (masked), or None if either is not text."""
    a = mask(expected, patterns).data
    b = mask(received, patterns).data
    if not (is_text(a) and is_text(b)):
        return None
    lines = difflib.unified_diff(
        a.decode("utf-8").splitlines(keepends=True),
        b.decode("utf-8").splitlines(keepends=True),
        fromfile=f"{name} (recorded)",
        tofile=f"{name} (replayed)",
    )
    out = []
    for line in lines:
        out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(out)
