"""Playing one side of a recorded flow, without sockets: events in, commands out.

A `Player` plays the client side (replay) or the server side (serve) of a `Script`. The
caller feeds it what the peer sends, the peer's close and the clock, executes the commands
it returns (send, half-close, reset, close) and calls it again at `next_deadline`. Each of
our turns is sent once the peer has answered the previous one: as many bytes as it sent in
the recording, or nothing more for `turn_timeout_s`, or its close.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from flowtap.proxy.flow import Direction, Transport

from .turns import Ending, Script

# TCP chunks recorded this close together went out as one write; no timing between them.
_BURST_WINDOW_S = 0.002


@dataclass(frozen=True, slots=True)
class Send:
    """Write these bytes (for UDP: one datagram)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class HalfClose:
    """Send a FIN once everything queued is written, and keep reading."""


@dataclass(frozen=True, slots=True)
class Reset:
    """Abort the connection with an RST."""


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection once everything queued is written; the player is done."""


Command = Send | HalfClose | Reset | Close


@dataclass(frozen=True, slots=True)
class _Step:
    """One of our turns: sent after the peer has sent `peer_bytes_before`, `think_s` later."""

    peer_bytes_before: int
    think_s: float
    bursts: tuple[_Burst, ...]


@dataclass(frozen=True, slots=True)
class _Burst:
    """Bytes of a turn, sent `offset_s` after the turn is released."""

    offset_s: float
    data: bytes


class _Phase(enum.Enum):
    WAIT = "wait"  # for the peer to answer before the next turn
    SEND = "send"  # the turn is released; bursts go out when due
    DRAIN = "drain"  # all turns sent; the peer's last answer
    LINGER = "linger"  # we half-closed; the peer's close
    DONE = "done"


def _steps(script: Script, side: Direction, *, is_datagram: bool) -> list[_Step]:
    steps: list[_Step] = []
    peer_bytes = 0
    last_at = script.flow.started_at
    for turn in script.turns:
        if turn.direction is not side:
            peer_bytes += turn.size_bytes
            last_at = turn.ended_at
            continue
        bursts: list[_Burst] = []
        start = turn.started_at
        if is_datagram:
            bursts = [_Burst(max(0.0, c.timestamp - start), c.data) for c in turn.chunks]
        else:
            pieces: list[bytes] = []
            burst_at = start
            for chunk in turn.chunks:
                if pieces and chunk.timestamp - burst_at > _BURST_WINDOW_S:
                    bursts.append(_Burst(max(0.0, burst_at - start), b"".join(pieces)))
                    pieces = []
                    burst_at = chunk.timestamp
                pieces.append(chunk.data)
            bursts.append(_Burst(max(0.0, burst_at - start), b"".join(pieces)))
        steps.append(_Step(peer_bytes, max(0.0, start - last_at), tuple(bursts)))
        last_at = turn.ended_at
    return steps


class Player:
    """Plays `side` of `script`: `UP` plays the client against a server, `DOWN` the server.

    `speed` scales the recorded pauses (2.0 plays twice as fast); `None` ignores them.
    """

    def __init__(
        self,
        script: Script,
        side: Direction,
        *,
        speed: float | None = 1.0,
        turn_timeout_s: float = 1.0,
    ) -> None:
        self.script = script
        self.side = side
        is_datagram = script.transport is Transport.UDP
        self._is_datagram = is_datagram
        self._steps = _steps(script, side, is_datagram=is_datagram)
        peer = Direction.DOWN if side is Direction.UP else Direction.UP
        self.peer_bytes_expected = script.size_bytes(peer)
        self._scale = 0.0 if speed is None else 1.0 / speed
        self._turn_timeout_s = turn_timeout_s
        self._phase = _Phase.WAIT
        self._step = 0
        self._burst = 0
        self._released_at = 0.0
        self._last_activity = 0.0
        self.peer_bytes = 0
        self.peer_closed = False
        self.turns_sent = 0
        self.bytes_sent = 0
        self.waits_timed_out = 0
        ending = script.ending
        ours_first = Ending.CLIENT_CLOSE if side is Direction.UP else Ending.SERVER_CLOSE
        ours_reset = Ending.CLIENT_RESET if side is Direction.UP else Ending.SERVER_RESET
        # Datagrams have no close; a flow cut short by a gap ends quietly where it stops.
        self._closes_first = ending is ours_first and not is_datagram
        self._resets = ending is ours_reset and not is_datagram and script.gap is None
        peer_reset = Ending.SERVER_RESET if side is Direction.UP else Ending.CLIENT_RESET
        self.is_expecting_peer_reset = ending is peer_reset and not is_datagram

    @property
    def turns_total(self) -> int:
        return len(self._steps)

    @property
    def is_done(self) -> bool:
        return self._phase is _Phase.DONE

    @property
    def next_deadline(self) -> float | None:
        """When to call `on_timer` next (same clock as `now`), or None to wait for the peer."""
        phase = self._phase
        if phase is _Phase.SEND:
            step = self._steps[self._step]
            return self._released_at + (step.think_s + step.bursts[self._burst].offset_s) * (
                self._scale
            )
        if phase is _Phase.DONE:
            return None
        if self.peer_closed and phase is not _Phase.WAIT:
            return None
        return self._last_activity + self._turn_timeout_s

    def start(self, now: float) -> list[Command]:
        """The connection is up: begin playing."""
        self._last_activity = now
        return self._advance(now)

    def on_data(self, size_bytes: int, now: float) -> list[Command]:
        """The peer sent `size_bytes` more bytes (for UDP: one datagram of that size)."""
        self.peer_bytes += size_bytes
        self._last_activity = now
        return self._advance(now)

    def on_peer_closed(self, now: float) -> list[Command]:
        """The peer closed its side (FIN): it will send no more."""
        self.peer_closed = True
        return self._advance(now)

    def on_timer(self, now: float) -> list[Command]:
        return self._advance(now)

    def abort(self) -> None:
        """The connection failed; nothing more will be played."""
        self._phase = _Phase.DONE

    def _is_quiet(self, now: float) -> bool:
        return now >= self._last_activity + self._turn_timeout_s

    def _advance(self, now: float) -> list[Command]:
        out: list[Command] = []
        while True:
            phase = self._phase
            if phase is _Phase.WAIT:
                if self._step >= len(self._steps):
                    self._phase = _Phase.DRAIN
                    continue
                need = self._steps[self._step].peer_bytes_before
                if self.peer_bytes < need and not self.peer_closed:
                    if not self._is_quiet(now):
                        return out
                    self.waits_timed_out += 1
                self._phase = _Phase.SEND
                self._released_at = now
                self._burst = 0
            elif phase is _Phase.SEND:
                step = self._steps[self._step]
                burst = step.bursts[self._burst]
                due = self._released_at + (step.think_s + burst.offset_s) * self._scale
                if now < due:
                    return out
                out.append(Send(burst.data))
                self.bytes_sent += len(burst.data)
                self._last_activity = now
                self._burst += 1
                if self._burst == len(step.bursts):
                    self.turns_sent += 1
                    self._step += 1
                    self._phase = _Phase.WAIT
            elif phase is _Phase.DRAIN:
                if (
                    self.peer_bytes < self.peer_bytes_expected
                    and not self.peer_closed
                    and not self._is_quiet(now)
                ):
                    return out
                if self.peer_bytes < self.peer_bytes_expected and not self.peer_closed:
                    self.waits_timed_out += 1
                if self._resets:
                    out.append(Reset())
                    self._phase = _Phase.DONE
                elif (
                    self._closes_first
                    and not self.peer_closed
                    and self.peer_bytes >= self.peer_bytes_expected
                ):
                    # Nothing more is due from the peer: a close sends the same FIN as a
                    # half-close would, without waiting a round trip for the peer's.
                    out.append(Close())
                    self._phase = _Phase.DONE
                elif self._closes_first and not self.peer_closed:
                    out.append(HalfClose())
                    self._last_activity = now
                    self._phase = _Phase.LINGER
                else:
                    self._phase = _Phase.LINGER
            elif phase is _Phase.LINGER:
                # Wait for the peer's close where the recording had one, never for long.
                if self._is_datagram or self.peer_closed or self._is_quiet(now):
                    out.append(Close())
                    self._phase = _Phase.DONE
                else:
                    return out
            else:
                return out
