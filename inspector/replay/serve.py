"""`flowtap serve`: answer real clients with the server side of recorded flows (a mock server).

A client that connects is matched to the recorded flow whose first client turn its own first
bytes resemble most; from then on it gets the recorded server turns as its own turns match
the recorded client turns. Differences from the recorded client bytes are reported with
their offset; the connection goes on or closes per `on_mismatch`.
"""

from __future__ import annotations

import difflib
import json
import re
import select
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from flowtap.proxy.errors import FlowtapError
from flowtap.proxy.events import Bus
from flowtap.proxy.flow import Address, Direction, Transport
from flowtap.proxy.listener import ListenerSpec, bind, bound_address

from .compare import Difference, compare
from .playback import Player
from .sessions import Loop, Session, SessionResult, TlsLink
from .turns import Script

if TYPE_CHECKING:
    from flowtap.proxy.tls_ca import CertificateAuthority

_MATCH_WINDOW_BYTES = 4096


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """How to serve: where to listen, how long a quiet client has finished its turn."""

    listen: Address
    turn_timeout_s: float = 1.0
    speed: float | None = None
    on_mismatch: str = "continue"
    ignore: tuple[re.Pattern[bytes], ...] = ()
    tls: ssl.SSLContext | None = None
    """`serve --tls`: answer TCP clients over TLS with this server context (`tls_context`)."""


def tls_context(
    ca: CertificateAuthority, default_name: str, alpn: tuple[str, ...] = ()
) -> ssl.SSLContext:
    """A server context that presents, to each client, a leaf signed by `ca` for the name it
    asks for (SNI), or for `default_name` when it asks for none, and selects the first of the
    `alpn` protocols the client offers."""
    context = ca.server_context(default_name, alpn)

    def for_name(obj: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        if name:
            # The context a name switches to selects the ALPN (OpenSSL asks it, not the first).
            obj.context = ca.server_context(name, alpn)

    context.sni_callback = for_name
    return context


def recorded_alpn(scripts: Sequence[Script]) -> tuple[str, ...]:
    """The ALPN protocols the recorded TLS flows negotiated, the most frequent first (the
    first recorded first among equals): what `serve --tls` offers a client."""
    counts: dict[str, int] = {}
    for script in scripts:
        tls = script.flow.tls
        if tls is not None and tls.alpn:
            counts[tls.alpn] = counts.get(tls.alpn, 0) + 1
    return tuple(sorted(counts, key=lambda protocol: -counts[protocol]))


def _common_prefix(a: bytes, b: bytes) -> int:
    size = min(len(a), len(b))
    index = 0
    while index < size and a[index] == b[index]:
        index += 1
    return index


class FlowMatcher:
    """Chooses which recorded flow a new client is playing, from the first bytes it sends."""

    def __init__(self, scripts: Sequence[Script]) -> None:
        self._served: dict[int, int] = {s.id: 0 for s in scripts}
        self._client_first: list[tuple[Script, bytes]] = []
        self._server_first: list[Script] = []
        for script in scripts:
            first = script.turns[0] if script.turns else None
            if first is not None and first.direction is Direction.UP:
                self._client_first.append((script, first.data[:_MATCH_WINDOW_BYTES]))
            else:
                self._server_first.append(script)

    @property
    def has_server_first(self) -> bool:
        return bool(self._server_first)

    def on_connect(self) -> Script | None:
        """A flow to start at once, when no recorded client speaks first."""
        if self._client_first:
            return None
        return self._take(self._server_first)

    def on_silence(self) -> Script | None:
        """The client said nothing for a while: a flow whose server speaks first, if any."""
        return self._take(self._server_first) if self._server_first else None

    def choose(self, first: bytes, *, is_final: bool) -> Script | None:
        """The best flow for a client whose first bytes are `first`; None to wait for more."""
        if not self._client_first:
            return self._take(self._server_first)
        window = first[:_MATCH_WINDOW_BYTES]
        exact = [s for s, data in self._client_first if data == window]
        if exact:
            return self._take(exact)
        scored = []
        for script, data in self._client_first:
            prefix = _common_prefix(window, data)
            ratio = difflib.SequenceMatcher(None, window, data, autojunk=False).ratio()
            scored.append(((prefix, round(ratio, 3)), script, data))
        best_score = max(score for score, _, _ in scored)
        best = [(s, data) for score, s, data in scored if score == best_score]
        if not is_final and any(len(data) > len(window) for _, data in best):
            return None
        return self._take([s for s, _ in best])

    def _take(self, scripts: Sequence[Script]) -> Script:
        # Among equals, the least served first: a capture of three identical requests is
        # served in recorded order.
        chosen = min(scripts, key=lambda s: (self._served[s.id], s.id))
        self._served[chosen.id] += 1
        return chosen


@dataclass(frozen=True, slots=True)
class ServedReport:
    """One client served: which recorded flow, how far, and where its bytes differed."""

    connection: int
    client: Address
    flow_id: int | None
    status: str
    turns_sent: int
    turns_total: int
    client_bytes_expected: int
    client_bytes_received: int
    duration_s: float
    difference: Difference | None
    error: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "event": "served",
            "connection": self.connection,
            "client": str(self.client),
            "flow": self.flow_id,
            "status": self.status,
            "turns_sent": self.turns_sent,
            "turns_total": self.turns_total,
            "client_bytes_expected": self.client_bytes_expected,
            "client_bytes_received": self.client_bytes_received,
            "duration_s": round(self.duration_s, 6),
            "difference": None if self.difference is None else self.difference.as_dict(),
            "error": self.error,
        }

    def line(self) -> str:
        flow = "no recorded flow" if self.flow_id is None else f"flow {self.flow_id}"
        text = (
            f"#{self.connection} {self.client} served {flow} {self.status}: "
            f"turns {self.turns_sent}/{self.turns_total}, "
            f"client bytes {self.client_bytes_received}/{self.client_bytes_expected}, "
            f"{self.duration_s:.3f}s"
        )
        if self.error:
            text += f" ({self.error})"
        if self.difference is not None:
            text += self.difference.lines("mismatch at client byte", "received")
        return text


class _ServedClient(Session):
    """A client of the server, answered with a recorded flow's server side; `number` counts
    clients in the order they came."""

    def __init__(
        self,
        server: Server,
        sock: socket.socket,
        client: Address,
        number: int,
        *,
        transport: Transport,
        player: Player | None = None,
        tls: TlsLink | None = None,
    ) -> None:
        super().__init__(
            server.loop,
            sock,
            transport=transport,
            side=Direction.DOWN,
            peer=client,
            on_done=server.session_done,
            player=player,
            bus=server.bus,
            tls=tls,
        )
        self.number = number
        self.mismatch: Difference | None = None


class _ServeSession(_ServedClient):
    """A client connection: first matched to a recorded flow, then played."""

    def __init__(self, server: Server, sock: socket.socket, client: Address, number: int) -> None:
        tls = server.options.tls
        link = None if tls is None else TlsLink(tls, server_side=True)
        super().__init__(server, sock, client, number, transport=Transport.TCP, tls=link)
        self.server = server

    def on_connected(self, now: float) -> None:
        script = self.server.matcher.on_connect()
        if script is not None:
            self._play(script, now)
        elif self.server.matcher.has_server_first:
            self.loop.set_timer(self, now + self.server.options.turn_timeout_s)

    def on_data(self, data: memoryview, now: float) -> None:
        if self.player is None:
            script = self.server.matcher.choose(bytes(self.received), is_final=False)
            if script is None:
                self.loop.set_timer(self, now + self.server.options.turn_timeout_s)
                return
            self._play(script, now)
            return
        if self.server.options.on_mismatch == "close" and self.mismatch is None:
            self._check(now)
            if self.is_finished:
                return
        super().on_data(data, now)

    def timer(self, now: float) -> None:
        if self.player is None:
            if self.received:
                script = self.server.matcher.choose(bytes(self.received), is_final=True)
            else:
                script = self.server.matcher.on_silence()
            if script is not None:
                self._play(script, now)
            return
        super().timer(now)

    def on_peer_closed(self, now: float) -> None:
        if self.player is None and self.received:
            self._play(self.server.matcher.choose(bytes(self.received), is_final=True), now)
            if self.is_finished:
                return
        super().on_peer_closed(now)

    def _play(self, script: Script | None, now: float) -> None:
        if script is None:
            return
        options = self.server.options
        self.player = Player(
            script, Direction.DOWN, speed=options.speed, turn_timeout_s=options.turn_timeout_s
        )
        self.apply(self.player.start(now), now)
        if self.received and not self.is_finished:
            if options.on_mismatch == "close":
                self._check(now)
                if self.is_finished:
                    return
            self.apply(self.player.on_data(len(self.received), now), now)

    def _check(self, now: float) -> None:
        assert self.player is not None
        received = bytes(self.received)
        expected = self.player.script.data(Direction.UP)[: len(received)]
        difference = compare(expected, received, self.server.options.ignore)
        if difference is not None:
            self.mismatch = difference
            self.finish()


class _DatagramSession(_ServedClient):
    """One UDP client of the server, on a socket connected to it."""

    def __init__(
        self, server: Server, sock: socket.socket, client: Address, number: int, player: Player
    ) -> None:
        super().__init__(server, sock, client, number, transport=Transport.UDP, player=player)


class _Listening:
    """A socket of the server's that new clients arrive on; it has no timers."""

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock

    def on_timer(self, now: float) -> None:
        pass


class _Accepter(_Listening):
    def on_ready(self, mask: int, now: float) -> None:
        for _ in range(64):
            try:
                client, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            self.server.start_session(client, addr, now)


class _DatagramListener(_Listening):
    """Hands each client address's first datagram to a new session on a connected socket."""

    def on_ready(self, mask: int, now: float) -> None:
        for _ in range(64):
            try:
                data, addr = self.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an ICMP error about an earlier reply; the next datagram may be fine
            self.server.on_datagram(data, addr, now)


class Server:
    """Listens and serves recorded flows until `stop`; reports each client to `on_report`.

    TCP flows are served on a TCP listener and UDP flows on a UDP socket, on the same port.
    """

    def __init__(
        self,
        scripts: Sequence[Script],
        options: ServeOptions,
        *,
        on_report: Callable[[ServedReport], None],
        bus: Bus | None = None,
    ) -> None:
        tcp = [s for s in scripts if s.transport is Transport.TCP]
        udp = [s for s in scripts if s.transport is Transport.UDP]
        if not tcp and not udp:
            raise FlowtapError(
                "serve plays TCP and UDP flows and the capture has none: pick a capture "
                "with TCP or UDP flows (flowtap show lists them)"
            )
        if options.on_mismatch not in ("continue", "close"):
            raise FlowtapError("--on-mismatch takes continue or close")
        self.options = options
        self.matcher = FlowMatcher(tcp)
        self.udp_matcher = FlowMatcher(udp)
        self.bus = bus
        self.loop = Loop()
        self._on_report = on_report
        self._socks: list[socket.socket] = []
        self.listeners: list[tuple[Transport, Address]] = []
        self._datagram_sessions: dict[Any, Session] = {}
        listen = options.listen
        try:
            if tcp:
                sock = self._bind(ListenerSpec(listen=listen, upstream=listen))
                self.loop.register(sock.fileno(), select.EPOLLIN, _Accepter(self, sock))
                listen = self.listeners[-1][1]
            if udp:
                spec = ListenerSpec(listen=listen, upstream=listen, transport=Transport.UDP)
                self._udp_spec = spec
                sock = self._bind(spec)
                self.loop.register(sock.fileno(), select.EPOLLIN, _DatagramListener(self, sock))
        except BaseException:
            self._close_sockets()
            self.loop.close()
            raise
        self.address = self.listeners[0][1]
        self._numbers = 0
        self._stopping = False  # set by `stop` (from another thread); serve_forever ends

    def _bind(self, spec: ListenerSpec) -> socket.socket:
        sock = bind(spec)
        self._socks.append(sock)
        self.listeners.append((spec.transport, bound_address(sock, spec)))
        return sock

    def _close_sockets(self) -> None:
        for sock in self._socks:
            sock.close()

    def on_datagram(self, data: bytes, addr: Any, now: float) -> None:
        """A datagram on the UDP listener: to the client's session, or a new one."""
        session = self._datagram_sessions.get(addr)
        if session is not None and not session.is_finished:
            session.deliver(memoryview(data), now)
            return
        script = self.udp_matcher.choose(data, is_final=True)
        if script is None:
            return
        family = socket.AF_INET6 if ":" in str(addr[0]) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            # A socket connected to this client gets its later datagrams; the listener
            # keeps getting everyone else's.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(self._socks[-1].getsockname())
            sock.connect(addr)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._numbers += 1
        options = self.options
        session = _DatagramSession(
            self,
            sock,
            Address(str(addr[0]), int(addr[1])),
            self._numbers,
            Player(
                script,
                Direction.DOWN,
                speed=options.speed,
                turn_timeout_s=options.turn_timeout_s,
            ),
        )
        self._datagram_sessions[addr] = session
        session.begin(now)
        session.deliver(memoryview(data), now)

    def start_session(self, sock: socket.socket, addr: Any, now: float) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._numbers += 1
        session = _ServeSession(self, sock, Address(str(addr[0]), int(addr[1])), self._numbers)
        session.begin(now)

    def session_done(self, session: Session, result: SessionResult) -> None:
        assert isinstance(session, _ServedClient)
        if isinstance(session, _DatagramSession):
            addr = (session.peer.host, session.peer.port)
            if self._datagram_sessions.get(addr) is session:
                del self._datagram_sessions[addr]
        script = result.script
        mismatch = session.mismatch
        if mismatch is None and script is not None and result.error is None:
            expected = script.data(Direction.UP)
            mismatch = compare(expected, result.received, self.options.ignore)
        if result.error is not None:
            status = "failed"
        elif script is None:
            status = "unmatched"
        elif mismatch is not None:
            status = "mismatch"
        else:
            status = "ok"
        self._on_report(
            ServedReport(
                connection=session.number,
                client=result.peer,
                flow_id=None if script is None else script.id,
                status=status,
                turns_sent=result.turns_sent,
                turns_total=result.turns_total,
                client_bytes_expected=0 if script is None else script.size_bytes(Direction.UP),
                client_bytes_received=len(result.received),
                duration_s=result.duration_s,
                difference=mismatch,
                error=result.error,
            )
        )

    def describe(self, name: str) -> str:
        """The `listening ...` lines printed once the server is ready."""
        return "\n".join(f"listening {t} {address} -> {name}" for t, address in self.listeners)

    def serve_forever(self) -> None:
        """Serve until `stop` is called (from a signal handler or another thread)."""
        try:
            while not self._stopping:
                self.loop.poll(0.2)
        finally:
            self._close_sockets()
            self.loop.close()

    def stop(self) -> None:
        self._stopping = True


def report_writer(out: TextIO, *, as_json: bool) -> Callable[[ServedReport], None]:
    """A report callback that prints one line (or JSON object) per served client."""

    def write(report: ServedReport) -> None:
        text = json.dumps(report.as_dict()) if as_json else report.line()
        try:
            out.write(text + "\n")
            out.flush()
        except (BrokenPipeError, ValueError):
            pass

    return write


def serve_command(args: Any) -> int:
    """`flowtap serve FILE --listen HOST:PORT ...`: the CLI's wiring; exits 0 on SIGINT/SIGTERM."""
    import os
    import sys

    from flowtap.inspector.flow_filter import parse_option
    from flowtap.inspector.stop_request import StopRequest

    from .compare import compile_patterns
    from .turns import load_scripts, select_scripts

    flow_filter = parse_option("--filter", args.filter)
    listen = Address.parse(args.listen)
    ca = None
    if args.tls:
        # Imported here: cryptography costs start-up time that plain serving need not pay.
        from flowtap.proxy.tls_ca import load_ca_file, load_or_create_ca

        ca = load_ca_file(Path(args.ca)) if args.ca else load_or_create_ca()
    elif args.ca:
        raise FlowtapError("--ca is for serving TLS; add --tls")
    ignore = compile_patterns(args.ignore)

    def warn(message: str) -> None:
        print(f"flowtap: warning: {message}", file=sys.stderr)

    loaded = load_scripts(args.file, flow_ids=args.flow, warn=warn)
    scripts = select_scripts(loaded, flow_ids=args.flow, flow_filter=flow_filter, source=args.file)
    for script in scripts:
        if script.gap is not None:
            warn(script.gap.describe(script.id))
    context = None
    if ca is not None:
        context = tls_context(ca, listen.host or "localhost", recorded_alpn(scripts))
    options = ServeOptions(
        listen=listen,
        turn_timeout_s=args.turn_timeout,
        on_mismatch=args.on_mismatch,
        ignore=ignore,
        tls=context,
    )
    stop = StopRequest()  # before the server's first thread
    server = Server(scripts, options, on_report=report_writer(sys.stdout, as_json=args.json))

    def serve() -> None:
        try:
            server.serve_forever()
        finally:
            stop.request()

    print(server.describe(os.path.basename(args.file)), flush=True)
    # The server runs on a thread; the main thread takes SIGINT/SIGTERM (see StopRequest).
    serving = threading.Thread(target=serve, name="flowtap-serve")
    serving.start()
    stop.wait()
    server.stop()
    serving.join()
    return 0
