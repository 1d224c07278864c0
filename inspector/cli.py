"""The `flowtap` command: parse arguments, wire a relay to its consumers, print one-line errors."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

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


def _add_relay_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        action="append",
        default=[],
        type=options.listen_address,
        metavar="[udp:|tcp:|socks5:|http:|transparent:[udp:]]HOST:PORT",
        help="where clients connect (repeatable; a bare PORT binds 127.0.0.1; 0 picks a port); "
        "socks5:, http: (proxy with CONNECT) and transparent: (iptables REDIRECT; "
        "transparent:udp: for UDP steered by TPROXY) listeners "
        "take no --upstream: each client says where it goes",
    )
    parser.add_argument(
        "--upstream",
        action="append",
        default=[],
        type=options.peer_address,
        metavar="HOST:PORT",
        help="where the matching --listen relays to (one per --listen, or one for all)",
    )
    parser.add_argument("--udp", action="store_true", help="relay UDP instead of TCP")
    _add_proxy_options(parser)
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        help="share the listening ports with other flowtap processes (SO_REUSEPORT); "
        "the kernel spreads clients across them",
    )
    parser.add_argument("--json", action="store_true", help="print flow events as JSON lines")
    parser.add_argument(
        "--pcap", metavar="FILE", help="capture flows to FILE (.pcap or .pcapng, mode 0600)"
    )
    parser.add_argument(
        "--capture",
        action="store_true",
        help="capture flows to a timestamped .pcapng in captures/ (when no --pcap is given)",
    )
    parser.add_argument(
        "--pcap-max-size",
        type=options.PCAP_MAX_SIZE_MB,
        metavar="MB",
        help="start a new capture file once one reaches MB megabytes (a ring, like dumpcap -b)",
    )
    parser.add_argument(
        "--pcap-max-files",
        type=options.PCAP_MAX_FILES,
        metavar="N",
        help="with --pcap-max-size, keep only the newest N capture files",
    )
    parser.add_argument(
        "--connect-timeout",
        type=options.CONNECT_TIMEOUT,
        default=10.0,
        metavar="S",
        help="give up connecting upstream after S seconds (default 10)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=options.IDLE_TIMEOUT,
        default=None,
        metavar="S",
        help="close flows with no traffic for S seconds (default and 0: never)",
    )
    parser.add_argument(
        "--grace",
        type=options.GRACE,
        default=5.0,
        metavar="S",
        help="on SIGINT/SIGTERM, let open flows finish for S seconds (default 5; 0: close them "
        "at once)",
    )
    parser.add_argument(
        "--workers",
        type=options.WORKERS,
        default=1,
        metavar="N",
        help="relay threads (default 1: they share the GIL; --reuse-port scales across processes)",
    )
    parser.add_argument(
        "--busy-poll",
        type=options.BUSY_POLL_US,
        default=200.0,
        metavar="US",
        help="while events come less than US microseconds apart, poll without sleeping: lower "
        "latency, a busy CPU while traffic is dense (default 200; 0: never)",
    )
    parser.add_argument(
        "--udp-idle-timeout",
        type=options.IDLE_TIMEOUT,
        default=60.0,
        metavar="S",
        help="close a UDP session after S seconds without a datagram (default 60; 0: never)",
    )
    parser.add_argument(
        "--udp-max-sessions",
        type=options.UDP_MAX_SESSIONS,
        default=10_000,
        metavar="N",
        help="UDP sessions per listener; at the limit the least recently active one is closed "
        "(default 10000)",
    )
    control = parser.add_mutually_exclusive_group()
    control.add_argument(
        "--control",
        metavar="PATH",
        help="serve the control socket (for flowtap tui --attach) at PATH (default: "
        "$XDG_RUNTIME_DIR/flowtap/ or /tmp/flowtap-UID/)",
    )
    control.add_argument(
        "--no-control", action="store_true", help="serve no control socket: no TUI can attach"
    )
    parser.add_argument(
        "--tls",
        choices=("intercept", "passthrough", "off"),
        default="off",
        help="TLS on TCP listeners: intercept (decrypt with a certificate from flowtap's CA; "
        "see flowtap ca), passthrough (relay untouched, note the SNI) or off (default)",
    )
    parser.add_argument(
        "--ca",
        metavar="FILE",
        help="with --tls intercept, sign with your own CA: one PEM file with certificate and key",
    )
    upstream_trust = parser.add_mutually_exclusive_group()
    upstream_trust.add_argument(
        "--upstream-ca",
        metavar="FILE",
        help="with --tls intercept, trust the upstream certificates these PEM CAs sign "
        "(default: the system store)",
    )
    upstream_trust.add_argument(
        "--upstream-insecure",
        action="store_true",
        help="with --tls intercept, do not verify the upstream's certificate (said in each flow)",
    )
    parser.add_argument(
        "--tls-passthrough",
        action="append",
        default=[],
        metavar="PATTERN",
        help="with --tls intercept, relay TLS untouched to hosts matching this glob (SNI, e.g. "
        "'*.apple.com'; repeatable): apps that pin their certificates",
    )
    parser.add_argument(
        "--keylog",
        metavar="FILE",
        help="with --tls intercept, append both sides' TLS secrets to FILE (mode 0600) in the "
        "NSS key log format (SSLKEYLOGFILE) that Wireshark reads",
    )
    parser.add_argument(
        "--tls-capture",
        choices=("plaintext", "wire"),
        default="plaintext",
        help="with --tls intercept and a .pcapng capture, what intercepted TLS is captured as: "
        "the plaintext as ordinary TCP (default), or the ciphertext of both legs with their "
        "secrets in Decryption Secrets Blocks, which Wireshark decrypts with no settings",
    )
    parser.add_argument(
        "--tls-handshake-timeout",
        type=options.seconds(0.001, options.DAY_S),
        default=10.0,
        metavar="S",
        help="close a TLS flow whose handshakes are not done within S seconds (default 10)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="print only the listening and control lines, not one line per flow event",
    )


def _add_proxy_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--auth",
        action="append",
        default=[],
        metavar="USER:PASS",
        help="proxy listeners require these credentials (SOCKS5 username/password, HTTP "
        "Proxy-Authorization basic; repeatable)",
    )
    parser.add_argument(
        "--auth-file", metavar="FILE", help="proxy credentials, one USER:PASS per line"
    )
    parser.add_argument(
        "--allow-from",
        action="append",
        default=[],
        metavar="CIDR",
        help="proxy listeners serve only clients in CIDR (repeatable; required for a proxy "
        "listener on a non-loopback address)",
    )
    parser.add_argument(
        "--deny-to",
        action="append",
        default=[],
        metavar="CIDR",
        help="proxy listeners refuse destinations in CIDR (repeatable; 169.254.169.254, the "
        "cloud metadata address, is always denied unless --allow-to names it)",
    )
    parser.add_argument(
        "--allow-to",
        action="append",
        default=[],
        metavar="CIDR",
        help="proxy listeners may reach CIDR even if --deny-to or the default denies it",
    )
    parser.add_argument(
        "--allow-ports",
        metavar="PORTS",
        help="proxy listeners reach only these destination ports, e.g. 80,443,8000-8999",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=options.HANDSHAKE_TIMEOUT,
        default=10.0,
        metavar="S",
        help="close a proxy client whose handshake is not complete after S seconds (default 10)",
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
    _add_relay_options(run)
    _add_filter_option(
        run, "print and capture only the flows it selects as they open (all are relayed)"
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
    _add_relay_options(tui)
    demo = commands.add_parser("demo", help="relay built-in loopback services and show the flows")
    demo.add_argument(
        "--headless", action="store_true", help="print flow events instead of opening the TUI"
    )
    replay = commands.add_parser(
        "replay", help="play the client side of recorded flows against a live server"
    )
    replay.add_argument("file", metavar="FILE", help="a pcap or pcapng capture")
    replay.add_argument(
        "--to",
        required=True,
        type=options.peer_address,
        metavar="HOST:PORT",
        help="the server to replay to",
    )
    _add_playback_options(replay)
    pace = replay.add_mutually_exclusive_group()
    pace.add_argument(
        "--speed",
        type=options.SPEED,
        default=1.0,
        metavar="X",
        help="play X times as fast as recorded (default 1)",
    )
    pace.add_argument("--asap", action="store_true", help="ignore the recorded pauses")
    _add_filter_option(replay, "replay only the flows it selects")
    replay.add_argument(
        "--dry-run", action="store_true", help="list the flows it would replay, send nothing"
    )
    replay.add_argument(
        "--concurrency",
        type=options.CONCURRENCY,
        default=10,
        metavar="N",
        help="flows at once (default 10)",
    )
    replay.add_argument(
        "--diff", action="store_true", help="print a unified diff of differing text responses"
    )
    replay.add_argument(
        "--check", action="store_true", help="exit 1 when any response differs from the recording"
    )
    replay.add_argument("--pcap", metavar="OUT", help="capture the replay itself to OUT")
    replay.add_argument(
        "--tls",
        action="store_true",
        help="speak TLS to the server (a decrypted recording: the SNI and ALPN it names)",
    )
    replay.add_argument(
        "--sni", metavar="NAME", help="with --tls: ask for NAME, not the recorded SNI"
    )
    replay.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="with --tls: trust the CAs in FILE (PEM) instead of the system's",
    )
    replay.add_argument(
        "--tls-insecure", action="store_true", help="with --tls: do not verify the server"
    )
    replay.add_argument(
        "--connect-timeout",
        type=options.CONNECT_TIMEOUT,
        default=5.0,
        metavar="S",
        help="give up connecting after S seconds (default 5)",
    )
    serve = commands.add_parser(
        "serve", help="answer clients with the recorded server side (a mock server)"
    )
    serve.add_argument("file", metavar="FILE", help="a pcap or pcapng capture")
    serve.add_argument(
        "--listen",
        default="127.0.0.1:0",
        type=options.address,
        metavar="HOST:PORT",
        help="where clients connect (default 127.0.0.1:0, a free port)",
    )
    _add_playback_options(serve)
    _add_filter_option(serve, "answer only from the recorded flows it selects")
    serve.add_argument(
        "--tls",
        action="store_true",
        help="answer TCP clients over TLS, with a certificate flowtap's CA signs for the name "
        "each asks for",
    )
    serve.add_argument(
        "--ca",
        metavar="FILE",
        help="with --tls, sign with your own CA: one PEM file with certificate and key",
    )
    serve.add_argument(
        "--on-mismatch",
        choices=("continue", "close"),
        default="continue",
        help="when a client's bytes differ from the recording (default continue)",
    )
    show = commands.add_parser(
        "show",
        help="list the flows of any pcap/pcapng capture, or print one flow",
        description="List the flows of a pcap/pcapng capture (flowtap's, tcpdump's, dumpcap's, "
        "Wireshark's...), or print one flow. Exit status 1: the capture is cut short or the "
        "flow has bytes the capture lacks (shown all the same).",
    )
    show.add_argument("file", metavar="FILE", help="a pcap or pcapng capture")
    show.add_argument("--flow", type=options.FLOW_ID, metavar="ID", help="print flow ID")
    shape = show.add_mutually_exclusive_group()
    shape.add_argument("--hex", action="store_true", help="print the flow as a hexdump")
    shape.add_argument(
        "--raw",
        choices=("client", "server"),
        help="write the reassembled bytes one side sent to stdout",
    )
    shape.add_argument("--tui", action="store_true", help="browse the capture in the terminal UI")
    show.add_argument("--json", action="store_true", help="print JSON lines")
    _add_filter_option(show, "list only the flows it selects")
    ca = commands.add_parser(
        "ca",
        help="show the CA that signs intercepted TLS, and how to trust it",
        description="Print the CA certificate's path, SHA-256 fingerprint and validity, and how "
        "to trust it. flowtap makes its CA on first use in $XDG_DATA_HOME/flowtap (else "
        "~/.local/share/flowtap), key file mode 0600.",
    )
    ca.add_argument(
        "--ca",
        metavar="FILE",
        help="use your own CA: one PEM file with the CA certificate and its private key",
    )
    ca.add_argument(
        "--export",
        metavar="DIR",
        help="write the CA certificate (not its key) to DIR as flowtap-ca.pem and flowtap-ca.der",
    )
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flowtap")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _add_filter_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--filter",
        metavar="EXPR",
        help=f"{what}, e.g. 'tcp port 6379 and bytes > 1M' (see the README's filter language)",
    )


def _add_playback_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--flow",
        type=options.FLOW_ID,
        action="append",
        default=[],
        metavar="ID",
        help="only this recorded flow (repeatable)",
    )
    parser.add_argument(
        "--turn-timeout",
        type=options.TURN_TIMEOUT,
        default=1.0,
        metavar="S",
        help="a peer quiet for S seconds has finished its turn (default 1)",
    )
    parser.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="REGEX",
        help="mask matches (dates, ids) before comparing (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="print reports as JSON lines")


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
