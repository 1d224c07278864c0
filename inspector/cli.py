"""The `flowtap` command: parse arguments, wire a relay to its consumers, print one-line errors."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

from flowtap.proxy.errors import FlowtapError

from . import options
from .relay_process import start_relay
from .stop_request import StopRequest


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other flowtap error."""

    def error(self, message: str) -> NoReturn:
        # What the user typed may hold control characters: shown escaped, on one line.
        message = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
        # A message about one option's value names the option and says what it accepts
        # (`--grace: 'x' is not a number of seconds between 0 and 86400`); the others point
        # to the help.
        if message.startswith("argument "):
            self.exit(2, f"flowtap: error: {message[len('argument ') :]}\n")
        self.exit(2, f"flowtap: error: {message} (see {self.prog} --help)\n")


class _TakesArguments(Protocol):
    """A parser or an argument group: what a row adds itself to."""

    def add_argument(self, *names: str, **settings: Any) -> Any: ...


# The options of each command are tables of the rows below, so that what an option is (its
# flag, value, help) reads in one place and the commands that share options share rows.


@dataclass(frozen=True, slots=True)
class _Switch:
    """An option that is on when given."""

    flag: str
    help: str

    def add_to(self, parser: _TakesArguments) -> None:
        parser.add_argument(self.flag, action="store_true", help=self.help)


@dataclass(frozen=True, slots=True)
class _Positional:
    """An argument given without a flag."""

    name: str
    metavar: str
    help: str

    def add_to(self, parser: _TakesArguments) -> None:
        parser.add_argument(self.name, metavar=self.metavar, help=self.help)


@dataclass(frozen=True, slots=True)
class _Value:
    """An option that takes a value, converted by `kind`; a repeatable one collects the values
    of all its occurrences in a list."""

    flag: str
    metavar: str
    help: str
    kind: Callable[[str], Any] = str
    default: object = None
    required: bool = False
    repeatable: bool = False

    def add_to(self, parser: _TakesArguments) -> None:
        parser.add_argument(
            self.flag,
            action="append" if self.repeatable else "store",
            default=[] if self.repeatable else self.default,
            type=self.kind,
            required=self.required,
            metavar=self.metavar,
            help=self.help,
        )


@dataclass(frozen=True, slots=True)
class _Choice:
    """An option whose value is one of `choices` (`default` when it is not given)."""

    flag: str
    choices: tuple[str, ...]
    default: str | None
    help: str

    def add_to(self, parser: _TakesArguments) -> None:
        parser.add_argument(self.flag, choices=self.choices, default=self.default, help=self.help)


@dataclass(frozen=True, slots=True)
class _OneOf:
    """Options of which a command line may give one at most."""

    rows: tuple[_Switch | _Value | _Choice, ...]

    def add_to(self, parser: _TakesArguments) -> None:
        assert isinstance(parser, argparse.ArgumentParser), "groups do not nest"
        group = parser.add_mutually_exclusive_group()
        for row in self.rows:
            row.add_to(group)


_Row = _Positional | _Switch | _Value | _Choice | _OneOf


def _add(parser: argparse.ArgumentParser, rows: Iterable[_Row]) -> None:
    for row in rows:
        row.add_to(parser)


def _filter(what: str) -> _Value:
    """The --filter option of a command, saying `what` it selects."""
    return _Value(
        "--filter",
        "EXPR",
        f"{what}, e.g. 'tcp port 6379 and bytes > 1M' (see the README's filter language)",
    )


_CAPTURE_FILE = _Positional("file", "FILE", "a pcap or pcapng capture")

_PROXY_OPTIONS: tuple[_Row, ...] = (
    _Value(
        "--auth",
        "USER:PASS",
        "proxy listeners require these credentials (SOCKS5 username/password, HTTP "
        "Proxy-Authorization basic; repeatable)",
        repeatable=True,
    ),
    _Value("--auth-file", "FILE", "proxy credentials, one USER:PASS per line"),
    _Value(
        "--allow-from",
        "CIDR",
        "proxy listeners serve only clients in CIDR (repeatable; required for a proxy "
        "listener on a non-loopback address)",
        repeatable=True,
    ),
    _Value(
        "--deny-to",
        "CIDR",
        "proxy listeners refuse destinations in CIDR (repeatable; 169.254.169.254, the "
        "cloud metadata address, is always denied unless --allow-to names it)",
        repeatable=True,
    ),
    _Value(
        "--allow-to",
        "CIDR",
        "proxy listeners may reach CIDR even if --deny-to or the default denies it",
        repeatable=True,
    ),
    _Value(
        "--allow-ports",
        "PORTS",
        "proxy listeners reach only these destination ports, e.g. 80,443,8000-8999",
    ),
    _Value(
        "--handshake-timeout",
        "S",
        "close a proxy client whose handshake is not complete after S seconds (default 10)",
        options.HANDSHAKE_TIMEOUT,
        10.0,
    ),
)

_RELAY_OPTIONS: tuple[_Row, ...] = (
    _Value(
        "--listen",
        "[udp:|tcp:|socks5:|http:|transparent:[udp:]]HOST:PORT",
        "where clients connect (repeatable; a bare PORT binds 127.0.0.1; 0 picks a port); "
        "socks5:, http: (proxy with CONNECT) and transparent: (iptables REDIRECT; "
        "transparent:udp: for UDP steered by TPROXY) listeners "
        "take no --upstream: each client says where it goes",
        options.listen_address,
        repeatable=True,
    ),
    _Value(
        "--upstream",
        "HOST:PORT",
        "where the matching --listen relays to (one per --listen, or one for all)",
        options.peer_address,
        repeatable=True,
    ),
    _Switch("--udp", "relay UDP instead of TCP"),
    *_PROXY_OPTIONS,
    _Switch(
        "--reuse-port",
        "share the listening ports with other flowtap processes (SO_REUSEPORT); "
        "the kernel spreads clients across them",
    ),
    _Switch("--json", "print flow events as JSON lines"),
    _Value("--pcap", "FILE", "capture flows to FILE (.pcap or .pcapng, mode 0600)"),
    _Switch(
        "--capture",
        "capture flows to a timestamped .pcapng in captures/ (when no --pcap is given)",
    ),
    _Value(
        "--pcap-max-size",
        "MB",
        "start a new capture file once one reaches MB megabytes (a ring, like dumpcap -b)",
        options.PCAP_MAX_SIZE_MB,
    ),
    _Value(
        "--pcap-max-files",
        "N",
        "with --pcap-max-size, keep only the newest N capture files",
        options.PCAP_MAX_FILES,
    ),
    _Value(
        "--connect-timeout",
        "S",
        "give up connecting upstream after S seconds (default 10)",
        options.CONNECT_TIMEOUT,
        10.0,
    ),
    _Value(
        "--idle-timeout",
        "S",
        "close flows with no traffic for S seconds (default and 0: never)",
        options.IDLE_TIMEOUT,
    ),
    _Value(
        "--grace",
        "S",
        "on SIGINT/SIGTERM, let open flows finish for S seconds (default 5; 0: close them at once)",
        options.GRACE,
        5.0,
    ),
    _Value(
        "--workers",
        "N",
        "relay threads (default 1: they share the GIL; --reuse-port scales across processes)",
        options.WORKERS,
        1,
    ),
    _Value(
        "--busy-poll",
        "US",
        "while events come less than US microseconds apart, poll without sleeping: lower "
        "latency, a busy CPU while traffic is dense (default 200; 0: never)",
        options.BUSY_POLL_US,
        200.0,
    ),
    _Value(
        "--udp-idle-timeout",
        "S",
        "close a UDP session after S seconds without a datagram (default 60; 0: never)",
        options.IDLE_TIMEOUT,
        60.0,
    ),
    _Value(
        "--udp-max-sessions",
        "N",
        "UDP sessions per listener; at the limit the least recently active one is closed "
        "(default 10000)",
        options.UDP_MAX_SESSIONS,
        10_000,
    ),
    _OneOf(
        (
            _Value(
                "--control",
                "PATH",
                "serve the control socket (for flowtap tui --attach) at PATH (default: "
                "$XDG_RUNTIME_DIR/flowtap/ or /tmp/flowtap-UID/)",
            ),
            _Switch("--no-control", "serve no control socket: no TUI can attach"),
        )
    ),
    _Choice(
        "--tls",
        ("intercept", "passthrough", "off"),
        "off",
        "TLS on TCP listeners: intercept (decrypt with a certificate from flowtap's CA; "
        "see flowtap ca), passthrough (relay untouched, note the SNI) or off (default)",
    ),
    _Value(
        "--ca",
        "FILE",
        "with --tls intercept, sign with your own CA: one PEM file with certificate and key",
    ),
    _OneOf(
        (
            _Value(
                "--upstream-ca",
                "FILE",
                "with --tls intercept, trust the upstream certificates these PEM CAs sign "
                "(default: the system store)",
            ),
            _Switch(
                "--upstream-insecure",
                "with --tls intercept, do not verify the upstream's certificate (said in each "
                "flow)",
            ),
        )
    ),
    _Value(
        "--tls-passthrough",
        "PATTERN",
        "with --tls intercept, relay TLS untouched to hosts matching this glob (SNI, e.g. "
        "'*.apple.com'; repeatable): apps that pin their certificates",
        repeatable=True,
    ),
    _Value(
        "--keylog",
        "FILE",
        "with --tls intercept, append both sides' TLS secrets to FILE (mode 0600) in the "
        "NSS key log format (SSLKEYLOGFILE) that Wireshark reads",
    ),
    _Choice(
        "--tls-capture",
        ("plaintext", "wire"),
        "plaintext",
        "with --tls intercept and a .pcapng capture, what intercepted TLS is captured as: "
        "the plaintext as ordinary TCP (default), or the ciphertext of both legs with their "
        "secrets in Decryption Secrets Blocks, which Wireshark decrypts with no settings",
    ),
    _Value(
        "--tls-handshake-timeout",
        "S",
        "close a TLS flow whose handshakes are not done within S seconds (default 10)",
        options.seconds(0.001, options.DAY_S),
        10.0,
    ),
    _Switch(
        "--quiet",
        "print only the listening and control lines, not one line per flow event",
    ),
)

# What replay and serve share: which recorded flows they play, and how they compare.
_PLAYBACK_OPTIONS: tuple[_Row, ...] = (
    _Value(
        "--flow", "ID", "only this recorded flow (repeatable)", options.FLOW_ID, repeatable=True
    ),
    _Value(
        "--turn-timeout",
        "S",
        "a peer quiet for S seconds has finished its turn (default 1)",
        options.TURN_TIMEOUT,
        1.0,
    ),
    _Value(
        "--ignore",
        "REGEX",
        "mask matches (dates, ids) before comparing (repeatable)",
        repeatable=True,
    ),
    _Switch("--json", "print reports as JSON lines"),
)

_REPLAY_OPTIONS: tuple[_Row, ...] = (
    _CAPTURE_FILE,
    _Value("--to", "HOST:PORT", "the server to replay to", options.peer_address, required=True),
    *_PLAYBACK_OPTIONS,
    _OneOf(
        (
            _Value(
                "--speed",
                "X",
                "play X times as fast as recorded (default 1)",
                options.SPEED,
                1.0,
            ),
            _Switch("--asap", "ignore the recorded pauses"),
        )
    ),
    _filter("replay only the flows it selects"),
    _Switch("--dry-run", "list the flows it would replay, send nothing"),
    _Value("--concurrency", "N", "flows at once (default 10)", options.CONCURRENCY, 10),
    _Switch("--diff", "print a unified diff of differing text responses"),
    _Switch("--check", "exit 1 when any response differs from the recording"),
    _Value("--pcap", "OUT", "capture the replay itself to OUT"),
    _Switch(
        "--tls",
        "speak TLS to the server (a decrypted recording: the SNI and ALPN it names)",
    ),
    _Value("--sni", "NAME", "with --tls: ask for NAME, not the recorded SNI"),
    _Value("--tls-ca", "FILE", "with --tls: trust the CAs in FILE (PEM) instead of the system's"),
    _Switch("--tls-insecure", "with --tls: do not verify the server"),
    _Value(
        "--connect-timeout",
        "S",
        "give up connecting after S seconds (default 5)",
        options.CONNECT_TIMEOUT,
        5.0,
    ),
)

_SERVE_OPTIONS: tuple[_Row, ...] = (
    _CAPTURE_FILE,
    _Value(
        "--listen",
        "HOST:PORT",
        "where clients connect (default 127.0.0.1:0, a free port)",
        options.address,
        "127.0.0.1:0",
    ),
    *_PLAYBACK_OPTIONS,
    _filter("answer only from the recorded flows it selects"),
    _Switch(
        "--tls",
        "answer TCP clients over TLS, with a certificate flowtap's CA signs for the name "
        "each asks for",
    ),
    _Value(
        "--ca",
        "FILE",
        "with --tls, sign with your own CA: one PEM file with certificate and key",
    ),
    _Choice(
        "--on-mismatch",
        ("continue", "close"),
        "continue",
        "when a client's bytes differ from the recording (default continue)",
    ),
)

_SHOW_OPTIONS: tuple[_Row, ...] = (
    _CAPTURE_FILE,
    _Value("--flow", "ID", "print flow ID", options.FLOW_ID),
    _OneOf(
        (
            _Switch("--hex", "print the flow as a hexdump"),
            _Choice(
                "--raw",
                ("client", "server"),
                None,
                "write the reassembled bytes one side sent to stdout",
            ),
            _Switch("--tui", "browse the capture in the terminal UI"),
        )
    ),
    _Switch("--json", "print JSON lines"),
    _filter("list only the flows it selects"),
)

_CA_OPTIONS: tuple[_Row, ...] = (
    _Value(
        "--ca",
        "FILE",
        "use your own CA: one PEM file with the CA certificate and its private key",
    ),
    _Value(
        "--export",
        "DIR",
        "write the CA certificate (not its key) to DIR as flowtap-ca.pem and flowtap-ca.der",
    ),
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="flowtap",
        description="A TCP/UDP man-in-the-middle proxy and traffic inspector.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log diagnostics to stderr")
    parser.add_argument("--version", action="version", version=f"flowtap {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    run = commands.add_parser("run", help="relay headless, printing one line per flow event")
    _add(
        run,
        (
            *_RELAY_OPTIONS,
            _filter("print and capture only the flows it selects as they open (all are relayed)"),
        ),
    )
    tui = commands.add_parser("tui", help="relay with a live terminal UI, or browse a capture")
    tui.add_argument("file", nargs="?", metavar="FILE", help="a pcap or pcapng file to browse")
    tui.add_argument(
        "--attach",
        nargs="?",
        const="",
        metavar="PATH",
        help="attach to a running relay's control socket (without PATH: the only relay you "
        "run, or pick one from a list); q detaches and leaves the relay running",
    )
    _add(tui, _RELAY_OPTIONS)
    demo = commands.add_parser("demo", help="relay built-in loopback services and show the flows")
    _Switch("--headless", "print flow events instead of opening the TUI").add_to(demo)
    replay = commands.add_parser(
        "replay", help="play the client side of recorded flows against a live server"
    )
    _add(replay, _REPLAY_OPTIONS)
    serve = commands.add_parser(
        "serve", help="answer clients with the recorded server side (a mock server)"
    )
    _add(serve, _SERVE_OPTIONS)
    show = commands.add_parser(
        "show",
        help="list the flows of any pcap/pcapng capture, or print one flow",
        description="List the flows of a pcap/pcapng capture (flowtap's, tcpdump's, dumpcap's, "
        "Wireshark's...), or print one flow. Exit status 1: the capture is cut short or the "
        "flow has bytes the capture lacks (shown all the same).",
    )
    _add(show, _SHOW_OPTIONS)
    ca = commands.add_parser(
        "ca",
        help="show the CA that signs intercepted TLS, and how to trust it",
        description="Print the CA certificate's path, SHA-256 fingerprint and validity, and how "
        "to trust it. flowtap makes its CA on first use in $XDG_DATA_HOME/flowtap (else "
        "~/.local/share/flowtap), key file mode 0600.",
    )
    _add(ca, _CA_OPTIONS)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flowtap")
    except PackageNotFoundError:
        return "unknown (not installed)"


def cmd_run(args: argparse.Namespace) -> int:
    from .filtered_observer import check_decidable_at_open
    from .flow_filter import parse_option

    flow_filter = parse_option("--filter", args.filter)
    if flow_filter is not None:
        check_decidable_at_open(flow_filter, "--filter")
    # Before the listening line is printed: a signal sent right after it must still stop
    # flowtap gracefully.
    stop = StopRequest()
    relay = start_relay(
        args, log=not args.quiet, flow_filter=flow_filter, on_failure=lambda exc: stop.request()
    )
    stop.wait()
    relay.stop(args.grace)
    relay.bus.close()
    if relay.failure is not None:
        # A bug, not a mistake of the user's: logged above when it happened.
        print(
            "flowtap: error: stopped: a relay thread failed (see the log line above; -v adds "
            "its traceback)",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_tui(args: argparse.Namespace) -> int:
    from .attach import run_tui

    if args.json:
        raise FlowtapError("tui draws flows on screen: for JSON lines run flowtap run --json")
    return run_tui(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo, run_demo_tui

    return run_demo() if args.headless else run_demo_tui()


def cmd_replay(args: argparse.Namespace) -> int:
    from .replay.replay import replay_command

    return replay_command(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from .replay.serve import serve_command

    return serve_command(args)


def cmd_show(args: argparse.Namespace) -> int:
    from .show import run_show

    if args.tui:
        from .tui.app import browse_capture

        if args.filter:
            raise FlowtapError("--filter lists flows: in the TUI, type the expression after /")
        return browse_capture(args.file, select_flow=args.flow)
    from .flow_filter import parse_option

    flow_filter = parse_option("--filter", args.filter)
    try:
        return run_show(
            args.file,
            flow_id=args.flow,
            as_hex=args.hex,
            raw=args.raw,
            as_json=args.json,
            flow_filter=flow_filter,
        )
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def cmd_ca(args: argparse.Namespace) -> int:
    from .ca import ca_command

    return ca_command(args.ca, args.export)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    # `flowtap tui --listen ...` starts `flowtap run` with the same relay options.
    args.argv = argv
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="flowtap: %(levelname)s: %(message)s",
    )
    handlers = {
        "run": cmd_run,
        "tui": cmd_tui,
        "demo": cmd_demo,
        "replay": cmd_replay,
        "serve": cmd_serve,
        "show": cmd_show,
        "ca": cmd_ca,
    }
    try:
        return handlers[args.command](args)
    except FlowtapError as exc:
        print(f"flowtap: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
