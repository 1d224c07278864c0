"""`flowtap replay`: play the client side of recorded flows against a live server, and compare.

Each flow gets a fresh connection to the target; its client turns go out as the server
answers (see `playback.Player`), and what the server sends back is compared with what it
sent in the recording (`compare`).
"""

from __future__ import annotations

import collections
import enum
import errno
import json
import os
import re
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from flowtap.proxy.errors import FlowtapError
from flowtap.proxy.events import Bus
from flowtap.proxy.flow import Address, Direction, Transport
from flowtap.proxy.listener import resolve

from .compare import Difference, compare, text_diff
from .playback import Player
from .sessions import Loop, Session, SessionResult, TlsLink
from .turns import Script

ProgressCallback = Callable[[int, int, int], None]
"""Called with (flows done, flows in all, flows failed) as a replay goes on."""


@dataclass(frozen=True, slots=True)
class ReplayTls:
    """`replay --tls`: the server is spoken to over TLS; how to trust it, what name to ask."""

    ca_file: Path | None = None
    insecure: bool = False
    sni: str | None = None

    def context(self, alpn: str | None) -> ssl.SSLContext:
        """A client context verifying as asked, offering the recording's ALPN protocol."""
        try:
            context = ssl.create_default_context(
                cafile=None if self.ca_file is None else str(self.ca_file)
            )
        except (OSError, ssl.SSLError) as exc:
            raise FlowtapError(
                f"--tls-ca {self.ca_file}: cannot load it ({exc}); give a PEM file of CA "
                "certificates"
            ) from None
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if alpn:
            context.set_alpn_protocols([alpn])
        return context

    def server_name(self, script: Script, target: Address) -> str | None:
        """The name to ask for: `--sni`, else the recording's SNI, else the target's host."""
        recorded = script.flow.tls.sni if script.flow.tls is not None else None
        return self.sni or recorded or target.host or None


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    """How to replay: where to, how fast, how many at once, what to ignore when comparing."""

    target: Address
    speed: float | None = 1.0
    turn_timeout_s: float = 1.0
    concurrency: int = 10
    connect_timeout_s: float = 5.0
    ignore: tuple[re.Pattern[bytes], ...] = ()
    want_diff: bool = False
    tls: ReplayTls | None = None

    def __post_init__(self) -> None:
        if self.speed is not None and self.speed <= 0:
            raise FlowtapError("--speed must be above 0: e.g. --speed 2 plays twice as fast")
        if self.concurrency < 1:
            raise FlowtapError("--concurrency must be at least 1: e.g. --concurrency 10")
        if self.turn_timeout_s <= 0:
            raise FlowtapError("--turn-timeout must be above 0: e.g. --turn-timeout 0.5")


class Status(enum.StrEnum):
    """How one replayed flow came out: clean, different, failed, or cut short by a gap."""

    OK = "ok"
    DIFFERS = "differs"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class FlowReport:
    """The outcome of replaying one recorded flow."""

    flow_id: int
    transport: Transport
    status: Status
    turns_sent: int
    turns_total: int
    bytes_sent: int
    server_bytes_expected: int
    server_bytes_received: int
    duration_s: float
    difference: Difference | None = None
    diff: str | None = None
    error: str | None = None
    note: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "flow": self.flow_id,
            "transport": str(self.transport),
            "status": str(self.status),
            "turns_sent": self.turns_sent,
            "turns_total": self.turns_total,
            "bytes_sent": self.bytes_sent,
            "server_bytes_expected": self.server_bytes_expected,
            "server_bytes_received": self.server_bytes_received,
            "duration_s": round(self.duration_s, 6),
            "difference": None if self.difference is None else self.difference.as_dict(),
            "diff": self.diff,
            "error": self.error,
            "note": self.note,
        }

    def line(self) -> str:
        head = (
            f"flow {self.flow_id} {self.transport} {self.status}: "
            f"turns {self.turns_sent}/{self.turns_total} sent, "
            f"server bytes {self.server_bytes_received} replayed, "
            f"{self.server_bytes_expected} recorded, "
            f"{self.duration_s:.3f}s"
        )
        if self.error:
            head += f" ({self.error})"
        if self.note:
            head += f" ({self.note})"
        if self.difference is not None:
            head += self.difference.lines("first difference at server byte", "replayed")
        if self.diff:
            head += "\n" + self.diff.rstrip("\n")
        return head


def report_for(script: Script, result: SessionResult, options: ReplayOptions) -> FlowReport:
    """Judge one replayed flow: failed, stopped at a gap, differing or clean."""
    expected = script.data(Direction.DOWN)
    difference = None
    diff = None
    if result.error is None:
        received = result.received
        if result.is_received_truncated:
            expected = expected[: len(received)]
        difference = compare(expected, received, options.ignore)
        if difference is not None and options.want_diff:
            diff = text_diff(expected, received, options.ignore, name=f"flow {script.id}")
    if result.error is not None:
        status = Status.FAILED
    elif script.gap is not None:
        status = Status.STOPPED
    elif difference is not None:
        status = Status.DIFFERS
    else:
        status = Status.OK
    note = None
    if script.gap is not None:
        note = "stopped at a gap in the capture"
    elif result.waits_timed_out:
        note = f"{result.waits_timed_out} answers ended by --turn-timeout"
    return FlowReport(
        flow_id=script.id,
        transport=script.transport,
        status=status,
        turns_sent=result.turns_sent,
        turns_total=script.turn_count(Direction.UP),
        bytes_sent=result.bytes_sent,
        server_bytes_expected=script.size_bytes(Direction.DOWN),
        server_bytes_received=result.peer_bytes,
        duration_s=result.duration_s,
        difference=difference,
        diff=diff,
        error=result.error,
        note=note,
    )


class Replayer:
    """Replays scripts against one target with a bounded number of connections at once."""

    def __init__(
        self,
        scripts: Sequence[Script],
        options: ReplayOptions,
        *,
        bus: Bus | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
        self.scripts = list(scripts)
        self.options = options
        self._bus = bus
        self._progress = progress
        self._families: dict[Transport, tuple[int, object]] = {}
        for transport in {s.transport for s in self.scripts}:
            self._families[transport] = resolve(options.target, transport)
        self._tls_contexts: dict[str | None, ssl.SSLContext] = {}
        if options.tls is not None:
            self._tls_contexts[None] = options.tls.context(None)  # a bad --tls-ca fails here
        self._reports: dict[int, FlowReport] = {}
        self._active = 0
        self._failed = 0

    def run(self) -> list[FlowReport]:
        """Replay every script; return one report per script, in script order."""
        loop = Loop()
        pending = collections.deque(enumerate(self.scripts))
        speed = self.options.speed
        first_at = min((s.flow.started_at for s in self.scripts), default=0.0)
        started = time.monotonic()
        total = len(self.scripts)
        last_progress = 0.0
        try:
            while pending or self._active:
                now = time.monotonic()
                wait_s = 0.5
                while pending and self._active < self.options.concurrency:
                    index, script = pending[0]
                    if speed is not None:
                        due = started + (script.flow.started_at - first_at) / speed
                        if due > now:
                            wait_s = min(wait_s, due - now)
                            break
                    pending.popleft()
                    self._start(loop, index, script, now)
                if self._active or pending:
                    loop.poll(wait_s)
                if self._progress is not None and now - last_progress >= 0.1:
                    last_progress = now
                    self._progress(len(self._reports), total, self._failed)
        finally:
            loop.close()
        if self._progress is not None:
            self._progress(len(self._reports), total, self._failed)
        return [self._reports[i] for i in range(total)]

    def _start(self, loop: Loop, index: int, script: Script, now: float) -> None:
        options = self.options
        family, sockaddr = self._families[script.transport]
        is_udp = script.transport is Transport.UDP
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM if is_udp else socket.SOCK_STREAM)
        except OSError as exc:
            raise FlowtapError(
                f"cannot open a socket ({exc.strerror}): lower --concurrency or raise the "
                "open-files limit (ulimit -n)"
            ) from None
        sock.setblocking(False)
        player = Player(
            script,
            Direction.UP,
            speed=options.speed,
            turn_timeout_s=options.turn_timeout_s,
        )

        def done(session: Session, result: SessionResult) -> None:
            self._active -= 1
            if result.error is not None:
                self._failed += 1
            self._reports[index] = report_for(script, result, options)

        if not is_udp:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex(sockaddr)  # type: ignore[arg-type]
            if err not in (0, errno.EINPROGRESS):
                sock.close()
                self._failed += 1
                self._reports[index] = _refused(script, options.target, err)
                return
        else:
            try:
                sock.connect(sockaddr)  # type: ignore[arg-type]
            except OSError as exc:
                sock.close()
                self._failed += 1
                self._reports[index] = _refused(script, options.target, exc.errno or 0)
                return
        tls = None if is_udp else self._tls_link(script)
        session = Session(
            loop,
            sock,
            transport=script.transport,
            side=Direction.UP,
            peer=options.target,
            on_done=done,
            player=player,
            bus=self._bus,
            connect_timeout_s=None if is_udp else options.connect_timeout_s,
            tls=tls,
        )
        self._active += 1
        session.begin(now)

    def _tls_link(self, script: Script) -> TlsLink | None:
        """The TLS end of a session replaying `script`, when `--tls` asks for one: the
        recording's ALPN protocol is offered, so an h2 recording is replayed as h2."""
        settings = self.options.tls
        if settings is None:
            return None
        alpn = script.flow.tls.alpn if script.flow.tls is not None else None
        context = self._tls_contexts.get(alpn)
        if context is None:
            context = self._tls_contexts[alpn] = settings.context(alpn)
        return TlsLink(context, settings.server_name(script, self.options.target))


def _refused(script: Script, target: Address, err: int) -> FlowReport:
    return FlowReport(
        flow_id=script.id,
        transport=script.transport,
        status=Status.FAILED,
        turns_sent=0,
        turns_total=script.turn_count(Direction.UP),
        bytes_sent=0,
        server_bytes_expected=script.size_bytes(Direction.DOWN),
        server_bytes_received=0,
        duration_s=0.0,
        error=f"cannot connect to {target}: {os.strerror(err)}",
    )


def replay(
    scripts: Sequence[Script],
    options: ReplayOptions,
    *,
    bus: Bus | None = None,
    progress: ProgressCallback | None = None,
) -> list[FlowReport]:
    """Replay `scripts` against `options.target`; one report per script, in order."""
    return Replayer(scripts, options, bus=bus, progress=progress).run()


@dataclass(frozen=True, slots=True)
class Summary:
    """Totals over a replay's reports."""

    flows: int
    ok: int
    differs: int
    failed: int
    stopped: int
    turns_sent: int
    duration_s: float

    @classmethod
    def of(cls, reports: Sequence[FlowReport], duration_s: float) -> Summary:
        count = collections.Counter(r.status for r in reports)
        return cls(
            flows=len(reports),
            ok=count[Status.OK],
            differs=count[Status.DIFFERS],
            failed=count[Status.FAILED],
            stopped=count[Status.STOPPED],
            turns_sent=sum(r.turns_sent for r in reports),
            duration_s=duration_s,
        )

    def line(self) -> str:
        return (
            f"replayed {_count(self.flows, 'flow')} in {self.duration_s:.3f}s: {self.ok} ok, "
            f"{self.differs} differ, {self.failed} failed, {self.stopped} stopped at a gap; "
            f"{_count(self.turns_sent, 'turn')} sent"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "flows": self.flows,
            "ok": self.ok,
            "differs": self.differs,
            "failed": self.failed,
            "stopped": self.stopped,
            "turns_sent": self.turns_sent,
            "duration_s": round(self.duration_s, 6),
        }

    def exit_code(self, *, check: bool) -> int:
        """1 when a flow failed, or with `check` when any response differs; else 0."""
        if self.failed:
            return 1
        if check and (self.differs or self.stopped):
            return 1
        return 0


def write_reports(
    out: TextIO, reports: Sequence[FlowReport], summary: Summary, *, as_json: bool
) -> None:
    """Print the per-flow reports and the summary, as text or as JSON lines."""
    if as_json:
        for report in reports:
            out.write(json.dumps({"event": "replayed", **report.as_dict()}) + "\n")
        out.write(json.dumps({"event": "summary", **summary.as_dict()}) + "\n")
    else:
        for report in reports:
            out.write(report.line() + "\n")
        out.write(summary.line() + "\n")
    out.flush()


def write_plan(out: TextIO, scripts: Sequence[Script], target: Address, *, as_json: bool) -> None:
    """Print the flows a replay would send to `target` (`--dry-run`), as text or JSON lines."""
    for script in scripts:
        turns = script.turn_count(Direction.UP)
        sent = script.size_bytes(Direction.UP)
        if as_json:
            record = {
                "event": "would-replay",
                "flow": script.id,
                "transport": str(script.transport),
                "client": str(script.flow.client),
                "server": str(script.flow.server),
                "turns": turns,
                "bytes": sent,
            }
            out.write(json.dumps(record) + "\n")
        else:
            out.write(
                f"flow {script.id} {script.transport} {script.flow.client} -> "
                f"{script.flow.server}: would send {_count(turns, 'turn')} "
                f"({_count(sent, 'byte')}) to {target}\n"
            )
    if not as_json:
        out.write(f"{_count(len(scripts), 'flow')} to replay (dry run: nothing sent)\n")
    out.flush()


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


class _Progress:
    """A progress bar on stderr for replays that take a while (only on a terminal)."""

    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._progress = Progress(
            TextColumn("replay"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed"),
            console=Console(stderr=True),
            transient=True,
        )
        self._task = self._progress.add_task("replay", total=total, failed=0)
        self._progress.start()

    def update(self, done: int, total: int, failed: int) -> None:
        self._progress.update(self._task, completed=done, failed=failed)

    def stop(self) -> None:
        self._progress.stop()


def _tls_settings(args: Any) -> ReplayTls | None:
    """`--tls` and the options that only make sense with it; one-line errors otherwise."""
    if not args.tls:
        for option, value in (
            ("--sni", args.sni),
            ("--tls-ca", args.tls_ca),
            ("--tls-insecure", args.tls_insecure),
        ):
            if value:
                raise FlowtapError(f"{option} is for TLS replays; add --tls")
        return None
    if args.tls_ca and args.tls_insecure:
        raise FlowtapError("--tls-ca and --tls-insecure contradict each other; give one")
    settings = ReplayTls(
        ca_file=Path(args.tls_ca) if args.tls_ca else None,
        insecure=args.tls_insecure,
        sni=args.sni,
    )
    settings.context(None)  # a --tls-ca that cannot load fails before the capture is read
    return settings


def replay_command(args: Any) -> int:
    """`flowtap replay FILE --to HOST:PORT ...`: the CLI's wiring, returning the exit status."""
    import sys

    from flowtap.inspector.flow_filter import parse_option
    from flowtap.proxy.relay import raise_fd_limit

    from .compare import compile_patterns
    from .turns import load_scripts, select_scripts

    raise_fd_limit()
    target = Address.parse(args.to)
    flow_filter = parse_option("--filter", args.filter)
    options = ReplayOptions(
        target=target,
        speed=None if args.asap else args.speed,
        turn_timeout_s=args.turn_timeout,
        concurrency=args.concurrency,
        connect_timeout_s=args.connect_timeout,
        ignore=compile_patterns(args.ignore),
        want_diff=args.diff,
        tls=_tls_settings(args),
    )

    def warn(message: str) -> None:
        print(f"flowtap: warning: {message}", file=sys.stderr)

    loaded = load_scripts(args.file, flow_ids=args.flow, warn=warn)
    scripts = select_scripts(loaded, flow_ids=args.flow, flow_filter=flow_filter, source=args.file)
    if args.dry_run:
        write_plan(sys.stdout, scripts, target, as_json=args.json)
        return 0
    for script in scripts:
        if script.gap is not None:
            warn(script.gap.describe(script.id))
    bus = None
    if args.pcap:
        from flowtap.inspector.pcapfile.capture import CaptureObserver

        bus = Bus([CaptureObserver(Path(args.pcap))])
    progress = _Progress(len(scripts)) if sys.stderr.isatty() and len(scripts) > 1 else None
    started = time.monotonic()
    try:
        reports = replay(
            scripts, options, bus=bus, progress=None if progress is None else progress.update
        )
    finally:
        if progress is not None:
            progress.stop()
        if bus is not None:
            bus.close()
    summary = Summary.of(reports, time.monotonic() - started)
    write_reports(sys.stdout, reports, summary, as_json=args.json)
    return summary.exit_code(check=args.check)
