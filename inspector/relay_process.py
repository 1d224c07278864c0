"""The relay process: a relay with its consumers (flow log, capture, control socket), built in
this process for `flowtap run`, or started as a `flowtap run` child for the TUI and the demo."""

from __future__ import annotations

import argparse
import collections
import ctypes
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

from flowtap.proxy.control import ControlServer, default_control_path
from flowtap.proxy.errors import FlowtapError
from flowtap.proxy.events import Bus, Observer
from flowtap.proxy.flow import Address, Transport
from flowtap.proxy.listener import ListenerSpec, is_loopback
from flowtap.proxy.policy import (
    DEFAULT_DENIED,
    Mode,
    ProxyPolicy,
    parse_credentials,
    parse_network,
    parse_ports,
    read_credentials_file,
)
from flowtap.proxy.relay import Relay, RelayConfig, raise_fd_limit

from .filtered_observer import filtered
from .flow_filter import FlowFilter
from .log import FlowLog
from .pcapfile.capture import CaptureObserver, capture_path_for

if TYPE_CHECKING:
    from flowtap.proxy.tls_intercept import TlsSettings

ERROR_PREFIX = "flowtap: error: "


_MODE_PREFIXES = {
    # Before "transparent:", which it starts with.
    "transparent:udp:": (Mode.TRANSPARENT, Transport.UDP),
    "transparent:tcp:": (Mode.TRANSPARENT, Transport.TCP),
    "tcp:": (Mode.REVERSE, Transport.TCP),
    "udp:": (Mode.REVERSE, Transport.UDP),
    "socks5:": (Mode.SOCKS5, Transport.TCP),
    "http:": (Mode.HTTP, Transport.TCP),
    "transparent:": (Mode.TRANSPARENT, Transport.TCP),
}


def listener_specs(args: argparse.Namespace) -> list[ListenerSpec]:
    """Pair each --listen with its --upstream (proxy-mode listeners take none); raise
    FlowtapError when they do not pair up."""
    listens: list[str] = args.listen
    upstreams: list[str] = args.upstream
    if not listens:
        raise FlowtapError("no --listen given: add --listen 127.0.0.1:0 --upstream HOST:PORT")
    parsed: list[tuple[Mode, Transport, Address]] = []
    for listen in listens:
        mode, transport = Mode.REVERSE, Transport.UDP if args.udp else Transport.TCP
        for prefix, (prefix_mode, prefix_transport) in _MODE_PREFIXES.items():
            if listen.startswith(prefix):
                if args.udp and prefix == "tcp:":
                    raise FlowtapError(
                        f"--listen {listen} asks for TCP but --udp for UDP: drop --udp, or "
                        "write udp: (or no prefix)"
                    )
                mode, transport = prefix_mode, prefix_transport
                listen = listen[len(prefix) :]
                break
        if mode.is_proxy and args.udp:
            raise FlowtapError(
                f"--udp does not apply to {mode}:{listen}: proxy listeners take TCP clients; "
                "write udp:HOST:PORT for a UDP relay beside it"
            )
        parsed.append((mode, transport, Address.parse(listen)))
    reverse = sum(1 for mode, _, _ in parsed if not mode.is_proxy)
    if reverse and not upstreams:
        raise FlowtapError("no --upstream given: add --upstream HOST:PORT after --listen")
    if not reverse and upstreams:
        raise FlowtapError(
            "--upstream given but every --listen is a proxy listener (socks5:, http:, "
            "transparent:), whose clients say where they go: drop --upstream"
        )
    if len(upstreams) == 1:
        upstreams = upstreams * reverse
    if len(upstreams) != reverse:
        raise FlowtapError(
            f"{reverse} --listen but {len(upstreams)} --upstream: give one --upstream "
            "per --listen (proxy listeners take none), or a single one for all"
        )
    policy = proxy_policy(args) if reverse < len(parsed) else None
    remaining = iter(upstreams)
    specs = []
    for mode, transport, address in parsed:
        if mode.is_proxy:
            assert policy is not None
            if not is_loopback(address) and not policy.allow_from:
                raise FlowtapError(
                    f"{mode}:{address} would be an open proxy: anyone who reaches it could "
                    "relay anywhere; add --allow-from CIDR for the clients you mean, or "
                    "listen on 127.0.0.1"
                )
            if mode is Mode.TRANSPARENT and address.is_unix:
                raise FlowtapError(
                    f"transparent:{address} cannot be a unix socket: iptables redirects to "
                    "an IP address; listen on HOST:PORT"
                )
            upstream = None
        else:
            upstream = Address.parse(next(remaining))
        specs.append(
            ListenerSpec(
                listen=address,
                upstream=upstream,
                transport=transport,
                reuse_port=args.reuse_port,
                mode=mode,
                policy=policy if mode.is_proxy else None,
            )
        )
    return specs


def proxy_policy(args: argparse.Namespace) -> ProxyPolicy:
    """The rules of proxy listeners from --auth, --auth-file, --allow-from, --deny-to,
    --allow-to, --allow-ports and --handshake-timeout."""
    credentials: dict[str, str] = {}
    if args.auth_file:
        credentials.update(read_credentials_file(args.auth_file))
    for text in args.auth:
        user, password = parse_credentials("--auth", text)
        credentials[user] = password
    return ProxyPolicy(
        credentials=credentials,
        allow_from=tuple(parse_network("--allow-from", text) for text in args.allow_from),
        deny_to=DEFAULT_DENIED + tuple(parse_network("--deny-to", text) for text in args.deny_to),
        allow_to=tuple(parse_network("--allow-to", text) for text in args.allow_to),
        allow_ports=parse_ports("--allow-ports", args.allow_ports) if args.allow_ports else (),
        handshake_timeout_s=args.handshake_timeout,
    )


def tls_settings(args: argparse.Namespace) -> TlsSettings | None:
    """The TLS settings of `--tls` and its options, or None when TLS is left alone."""
    upstream_ca = getattr(args, "upstream_ca", None)
    insecure = bool(getattr(args, "upstream_insecure", False))
    keylog = getattr(args, "keylog", None)
    wire = getattr(args, "tls_capture", "plaintext") == "wire"
    if (
        wire
        and capture_path_for(getattr(args, "pcap", None), getattr(args, "capture", False)) is None
    ):
        raise FlowtapError("--tls-capture wire says what a capture holds; add --pcap FILE.pcapng")
    if (getattr(args, "tls", None) or "off") != "intercept" and wire:
        raise FlowtapError("--tls-capture wire captures intercepted TLS; add --tls intercept")
    if (getattr(args, "tls", None) or "off") == "off":
        passthrough = getattr(args, "tls_passthrough", None)
        if upstream_ca or insecure or keylog or passthrough or getattr(args, "ca", None):
            raise FlowtapError(
                "--ca, --upstream-ca, --upstream-insecure, --keylog and --tls-passthrough apply "
                "to intercepted TLS; "
                "add --tls intercept"
            )
        return None
    # Imported here: cryptography costs start-up time that relays without TLS need not pay.
    from flowtap.proxy.tls_ca import load_ca_file, load_or_create_ca
    from flowtap.proxy.tls_intercept import TlsMode, TlsSettings

    mode = TlsMode(args.tls)
    if upstream_ca and insecure:
        raise FlowtapError("--upstream-ca and --upstream-insecure contradict each other; give one")
    ca = None
    if mode is TlsMode.INTERCEPT:
        ca_file = getattr(args, "ca", None)
        ca = load_ca_file(Path(ca_file)) if ca_file else load_or_create_ca()
    return TlsSettings(
        mode=mode,
        ca=ca,
        upstream_ca=None if upstream_ca is None else Path(upstream_ca),
        upstream_insecure=insecure,
        handshake_timeout_s=getattr(args, "tls_handshake_timeout", 10.0),
        keylog=None if keylog is None else Path(keylog),
        wire_capture=wire,
        passthrough_globs=tuple(getattr(args, "tls_passthrough", None) or ()),
    )


def start_relay(
    args: argparse.Namespace,
    extra_observers: Sequence[Observer] = (),
    *,
    log: bool = True,
    flow_filter: FlowFilter | None = None,
    on_failure: Callable[[BaseException], None] | None = None,
) -> Relay:
    """Bind the listeners and the control socket of `args`, print their lines, start relaying
    (printing flow events if `log`; printing and capturing only the flows `flow_filter`
    picks as they open); a relay thread that fails is logged and reported to `on_failure`."""
    specs = listener_specs(args)
    tls = tls_settings(args)
    raise_fd_limit()
    observers: list[Observer] = []
    if log:
        observers.append(filtered(FlowLog(sys.stdout, as_json=args.json), flow_filter))
    observers += extra_observers
    capture_path = capture_path_for(args.pcap, args.capture)
    if capture_path is None and (args.pcap_max_size or args.pcap_max_files):
        raise FlowtapError("--pcap-max-size and --pcap-max-files need --pcap FILE or --capture")
    control: ControlServer | None = None
    if not getattr(args, "no_control", True):
        control = ControlServer(getattr(args, "control", None) or default_control_path())
        observers.append(control)
    if capture_path is not None:
        max_size = args.pcap_max_size
        try:
            capture = CaptureObserver(
                capture_path,
                max_size_bytes=None if max_size is None else max_size * 1_000_000,
                max_files=args.pcap_max_files,
                tls_wire=tls is not None and tls.wire_capture,
            )
            observers.append(filtered(capture, flow_filter))
        except BaseException:
            Bus(observers).close()
            raise
    bus = Bus(observers)
    config = RelayConfig(
        connect_timeout_s=args.connect_timeout,
        idle_timeout_s=args.idle_timeout or None,
        workers=max(1, args.workers),
        busy_poll_s=args.busy_poll / 1e6,
        udp_idle_timeout_s=args.udp_idle_timeout or None,
        udp_max_sessions=args.udp_max_sessions,
        tls=tls,
    )
    try:
        relay = Relay(specs, bus, config, on_failure=on_failure)
    except BaseException:
        bus.close()
        raise
    for listener in relay.listeners:
        if not is_loopback(listener.address) and not listener.spec.mode.is_proxy:
            print(
                f"flowtap: warning: listening on {listener.address}: anyone who can reach it "
                "can relay through it; listen on 127.0.0.1 unless that is intended",
                file=sys.stderr,
            )
    try:
        relay.start()
    except BaseException:
        bus.close()
        raise
    if control is not None:
        control.start(relay)
    for listener in relay.listeners:
        print(listener.describe(), flush=True)
    if control is not None:
        print(control.describe(), flush=True)
    return relay


def _parent_death_signal() -> Callable[[], None]:
    """A function for the child to run before it starts: get SIGTERM when the parent dies,
    so that no relay outlives its TUI.

    The C function is looked up here, in the parent: between fork and exec the child only
    calls it (looking up symbols there could wait on a lock another thread held at fork).
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1
    term = int(signal.SIGTERM)
    return lambda: prctl(pr_set_pdeathsig, term)


class RelayChild:
    """A `flowtap run` child process whose `listening` (and `control`) lines have been read.

    Its later stdout goes to `stdout` (or is discarded) and its stderr to `stderr` (or is kept,
    the last lines, for `exit_note`), so that a full pipe never stalls the relay.
    """

    def __init__(
        self,
        run_args: Sequence[str],
        *,
        listeners: int,
        control: bool = True,
        stdout: IO[str] | None = None,
        stderr: IO[str] | None = None,
        timeout_s: float = 15.0,
    ) -> None:
        command = [sys.executable, "-m", "flowtap.inspector.cli", "run", *run_args]
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # the terminal's ^C is the TUI's; the parent stops the child
            preexec_fn=_parent_death_signal(),
        )
        self.pid = self.proc.pid
        self.listening: list[str] = []
        self.control_path: str | None = None
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self._stderr_to = stderr
        self._stderr_thread = threading.Thread(
            target=self._read_stderr, name="flowtap-relay-stderr", daemon=True
        )
        self._stderr_thread.start()
        assert self.proc.stdout is not None
        lines = self._lines(self.proc.stdout, timeout_s, listeners, control)
        for line in lines:
            if line.startswith("listening "):
                self.listening.append(line)
            elif line.startswith("control unix:"):
                self.control_path = line[len("control unix:") :]
            elif stdout is not None:
                stdout.write(line + "\n")
                stdout.flush()
            if len(self.listening) >= listeners and (self.control_path or not control):
                break
        else:
            self._stop_unstarted()
            raise FlowtapError(self._start_failure())
        self._stdout_thread = threading.Thread(
            target=self._copy_stdout, args=(stdout,), name="flowtap-relay-stdout", daemon=True
        )
        self._stdout_thread.start()

    def _lines(
        self, stream: IO[str], timeout_s: float, listeners: int, control: bool
    ) -> Iterator[str]:
        # Read on a thread so that a child that hangs before listening cannot hang us.
        found: collections.deque[str | None] = collections.deque()
        ready = threading.Event()

        def read() -> None:
            seen = 0
            for line in stream:
                found.append(line.rstrip("\n"))
                ready.set()
                seen += line.startswith("listening ")
                if line.startswith("control unix:") or (not control and seen >= listeners):
                    break
            found.append(None)
            ready.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout_s
        while True:
            while found:
                line = found.popleft()
                if line is None:
                    return
                yield line
            if time.monotonic() > deadline:
                return
            ready.wait(0.05)
            ready.clear()

    def _stop_unstarted(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()

    def _start_failure(self) -> str:
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            return "the relay did not start listening in time: try flowtap run with these options"
        self._stderr_thread.join(2)
        for line in self._stderr_tail:
            if line.startswith(ERROR_PREFIX):
                return line[len(ERROR_PREFIX) :]
        return f"the relay exited with status {self.proc.returncode} before listening" + (
            f": {self._stderr_tail[-1]}" if self._stderr_tail else ""
        )

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr_tail.append(line.rstrip("\n"))
            if self._stderr_to is not None and not line.startswith(ERROR_PREFIX):
                self._stderr_to.write(line)
                self._stderr_to.flush()

    def _copy_stdout(self, to: IO[str] | None) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if to is not None:
                to.write(line)
                to.flush()

    def exit_note(self) -> str:
        """One line on how the child ended (or that it runs)."""
        try:
            # Its control socket closes while it exits, a moment before it can be reaped.
            code: int | None = self.proc.wait(2.0)
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            return f"the relay (pid {self.pid}) closed its control socket"
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        self._stderr_thread.join(1)
        last = f": {self._stderr_tail[-1]}" if self._stderr_tail else ""
        return f"the relay (pid {self.pid}) {how}{last}"

    def stop(self, grace_s: float = 1.0) -> int:
        """SIGTERM the child (open flows get `grace_s` to finish), SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(grace_s + 5.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._stdout_thread.join(2)
        self._stderr_thread.join(2)
        return code
