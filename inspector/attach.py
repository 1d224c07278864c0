"""`flowtap tui`: attach the terminal UI to a running relay, start a relay child and attach to
it, or browse a capture file (in this process, no relay)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from flowtap.proxy.errors import FlowtapError

from .relay_process import RelayChild
from .tui.app import FlowtapApp, browse_capture
from .tui.viewer import ControlClient, RelayFacts, find_relays


def attach(
    path: str,
    *,
    gone_note: Callable[[], str] | None = None,
    source: str | None = None,
    app_ready: Callable[[FlowtapApp], None] | None = None,
) -> int:
    """Run the TUI on the relay serving the control socket at `path`; `q` detaches."""
    client = ControlClient(path, gone_note=gone_note)
    try:
        client.subscribe()
        app = FlowtapApp(
            events=client, relay=client, source=source or f"attached to {client.facts.describe()}"
        )
        if app_ready is not None:
            app_ready(app)
        app.run()
    finally:
        client.close()
    return 0


def choose_relay() -> str:
    """The control socket of the only relay this user runs, or of the one the user picks."""
    relays = find_relays()
    if not relays:
        raise FlowtapError(
            "no relay of yours is running: start one with flowtap run --listen ... --upstream "
            "..., or give --attach PATH"
        )
    if len(relays) == 1:
        return relays[0].path
    return _ask(relays)


def _ask(relays: list[RelayFacts]) -> str:
    for number, facts in enumerate(relays, 1):
        print(f"{number}) {facts.listing()}")
    if not sys.stdin.isatty():
        raise FlowtapError(
            f"{len(relays)} relays are running: give --attach PATH with the path of one of them"
        )
    while True:
        try:
            answer = input(f"Attach to which relay [1-{len(relays)}]? ").strip()
        except EOFError:
            raise FlowtapError("no relay picked: give --attach PATH") from None
        if answer.isdigit() and 1 <= int(answer) <= len(relays):
            return relays[int(answer) - 1].path
        if answer in ("", "q"):
            raise FlowtapError("no relay picked: give --attach PATH")


def _relay_argv(argv: list[str]) -> list[str]:
    """The options of `flowtap tui ...` as `flowtap run` options, with a control socket."""
    rest = argv[argv.index("tui") + 1 :]
    return [option for option in rest if option not in ("--no-control", "--quiet")] + ["--quiet"]


def run_tui(args: argparse.Namespace) -> int:
    """`flowtap tui`: browse a capture, attach to a relay, or start a relay child and attach;
    a bad option fails with one line before the app starts."""
    if args.file:
        if args.listen or args.attach is not None:
            raise FlowtapError(
                "give a capture FILE to browse, --attach, or --listen/--upstream to relay, not both"
            )
        return browse_capture(args.file)
    if args.attach is not None:
        if args.listen:
            raise FlowtapError(
                "--attach shows a running relay: drop --listen/--upstream, or drop --attach to "
                "start a relay"
            )
        return attach(args.attach or choose_relay())
    if not args.listen:
        raise FlowtapError(
            "nothing to show: give --listen 127.0.0.1:0 --upstream HOST:PORT to relay live, "
            "--attach to watch a running relay, or a capture FILE to browse"
        )
    child = RelayChild(_relay_argv(args.argv), listeners=len(args.listen))
    assert child.control_path is not None
    listening = "  ".join(line.split(" ", 2)[2] for line in child.listening)
    try:
        attach(child.control_path, gone_note=child.exit_note, source=listening)
    finally:
        child.stop(grace_s=min(args.grace, 1.0))
    return 0
