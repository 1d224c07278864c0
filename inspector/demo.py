"""`flowtap demo`: built-in loopback services, relayed through flowtap, with a little traffic."""

from __future__ import annotations

import functools
import http.server
import logging
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from .pcapfile.capture import default_capture_path
from .relay_process import RelayChild

log = logging.getLogger(__name__)

HTTP_BODY = (
    b"<html><body><h1>flowtap demo</h1><p>Hello from the built-in web server.</p></body></html>\n"
)


class _ChatHandler(socketserver.StreamRequestHandler):
    """A line chat: greets, answers each line, says goodbye on QUIT."""

    def handle(self) -> None:
        self.wfile.write(b"220 flowtap demo chat ready\r\n")
        for raw in self.rfile:
            line = raw.strip()
            if line.upper() == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            if line.upper().startswith(b"SLOW "):
                for word in line[5:].split():
                    self.wfile.write(word + b"\r\n")
                    self.wfile.flush()
                    time.sleep(0.2)
                continue
            self.wfile.write(b"250 you said: " + line + b"\r\n")


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = HTTP_BODY if self.path == "/" else b"not found\n"
        self.send_response(200 if self.path == "/" else 404)
        self.send_header("Content-Type", "text/html" if self.path == "/" else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the demo resets connections on purpose


def dns_query(name: str, query_id: int) -> bytes:
    """A DNS query for the A record of `name`."""
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split("."))
    return struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + labels + b"\0" + b"\0\1\0\1"


def dns_answer(query: bytes, address: str = "127.0.0.1") -> bytes | None:
    """The answer to an A query: `address` for any name; None for what is not a query."""
    if len(query) < 17:
        return None
    query_id, flags, questions = struct.unpack_from("!HHH", query)
    if flags & 0x8000 or questions != 1:
        return None
    end = query.find(b"\0", 12)
    if end < 0 or len(query) < end + 5:
        return None
    question = query[12 : end + 5]
    header = struct.pack("!HHHHHH", query_id, 0x8180 | (flags & 0x0100), 1, 1, 0, 0)
    record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(address)
    return header + question + record


class _DnsHandler(socketserver.BaseRequestHandler):
    """A toy resolver: every A query gets 127.0.0.1."""

    def handle(self) -> None:
        data, sock = self.request
        answer = dns_answer(data)
        if answer is not None:
            sock.sendto(answer, self.client_address)


class _UdpServer(socketserver.ThreadingUDPServer):
    daemon_threads = True


@dataclass
class DemoServices:
    """The built-in upstream services, each on a free loopback port."""

    chat: _Server
    http: _Server
    dns: _UdpServer

    @classmethod
    def start(cls) -> DemoServices:
        services = cls(
            chat=_Server(("127.0.0.1", 0), _ChatHandler),
            http=_Server(("127.0.0.1", 0), _HttpHandler),
            dns=_UdpServer(("127.0.0.1", 0), _DnsHandler),
        )
        for server in services.servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return services

    @property
    def servers(self) -> tuple[socketserver.BaseServer, ...]:
        return (self.chat, self.http, self.dns)

    @property
    def upstreams(self) -> dict[str, str]:
        """Service name to `HOST:PORT`; the `dns` service is UDP."""
        return {
            "chat": f"127.0.0.1:{self.chat.server_address[1]}",
            "http": f"127.0.0.1:{self.http.server_address[1]}",
            "dns": f"127.0.0.1:{self.dns.server_address[1]}",
        }

    def stop(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


def _dns_lookup(port: int, name: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(dns_query(name, 0x4242), ("127.0.0.1", port))
        sock.recv(512)


def _chat_session(port: int, lines: list[bytes]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        for line in lines:
            sock.sendall(line + b"\r\n")
            reader.readline()
        sock.sendall(b"QUIT\r\n")
        reader.readline()


def _slow_stream(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        words = [b"one", b"two", b"three", b"four", b"five"]
        sock.sendall(b"SLOW " + b" ".join(words) + b"\r\n")
        for _ in words:
            reader.readline()
        sock.sendall(b"QUIT\r\n")
        reader.readline()


def _http_get(port: int, path: str) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: flowtap-demo\r\n"
        sock.sendall(request.encode() + b"Connection: close\r\n\r\n")
        while sock.recv(65536):
            pass


def _reset_midway(port: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.recv(100)
    sock.sendall(b"this client will vanish\r\n")
    sock.recv(100)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def drive_traffic(ports: dict[str, int], rounds: int = 1) -> None:
    """Send a bounded, varied mix of traffic through the relay's demo listeners."""
    steps: list[Callable[[], None]] = []
    for i in range(rounds):
        steps += [
            lambda: _chat_session(ports["chat"], [b"hello", b"how are you?", b"flowtap rocks"]),
            lambda: _http_get(ports["http"], "/"),
            lambda: _http_get(ports["http"], "/missing"),
            lambda: _dns_lookup(ports["dns"], "shop.flowtap.test"),
            functools.partial(_chat_session, ports["chat"], [f"round {i}".encode()]),
        ]
    steps += [lambda: _slow_stream(ports["chat"]), lambda: _reset_midway(ports["chat"])]
    for step in steps:
        try:
            step()
        except OSError as exc:
            print(f"flowtap: demo traffic failed: {exc}", file=sys.stderr)


def start_demo_relay(
    services: DemoServices, extra_args: list[str] | None = None, *, stdout: IO[str] | None = None
) -> tuple[RelayChild, dict[str, int]]:
    """Start a relay child in front of each service; return it with its port per service."""
    argv: list[str] = []
    for name, upstream in services.upstreams.items():
        listen = "udp:127.0.0.1:0" if name == "dns" else "127.0.0.1:0"
        argv += ["--listen", listen, "--upstream", upstream]
    extra = extra_args or []
    child = RelayChild(
        [*argv, *extra],
        listeners=len(services.upstreams),
        control="--no-control" not in extra,
        stdout=stdout,
        stderr=sys.stderr if stdout is not None else None,
    )
    ports = {
        name: int(line.split(" ")[2].rsplit(":", 1)[1])
        for name, line in zip(services.upstreams, child.listening, strict=True)
    }
    return child, ports


def keep_driving(
    ports: dict[str, int], stop: threading.Event, *, duration_s: float = 120.0, max_steps: int = 200
) -> None:
    """Drive one round of traffic at once, then a step about every second until `stop`.

    Bounded: at most `max_steps` steps and `duration_s` seconds.
    """
    deadline = time.monotonic() + duration_s
    drive_traffic(ports)
    steps: list[Callable[[], None]] = [
        lambda: _chat_session(ports["chat"], [b"ping", b"still there?"]),
        lambda: _http_get(ports["http"], "/"),
        lambda: _slow_stream(ports["chat"]),
        lambda: _http_get(ports["http"], "/missing"),
        lambda: _dns_lookup(ports["dns"], "api.flowtap.test"),
        lambda: _reset_midway(ports["chat"]),
    ]
    for count in range(max_steps):
        if stop.wait(1.0) or time.monotonic() > deadline:
            return
        try:
            steps[count % len(steps)]()
        except OSError as exc:
            log.warning("demo traffic failed: %s", exc)


def run_demo_tui(*, duration_s: float = 120.0) -> int:
    """Run the demo with the TUI: flows appear at once, traffic goes on a while, `q` quits."""
    from .attach import attach

    capture = default_capture_path()
    services = DemoServices.start()
    try:
        child, ports = start_demo_relay(services, ["--pcap", str(capture), "--quiet"])
    except BaseException:
        services.stop()
        raise
    stop = threading.Event()
    driver = threading.Thread(
        target=keep_driving,
        args=(ports, stop),
        kwargs={"duration_s": duration_s},
        name="flowtap-demo-traffic",
        daemon=True,
    )
    source = "demo " + " ".join(f"{name} :{port}" for name, port in ports.items())
    source += f" → {capture}"
    try:
        assert child.control_path is not None
        attach(
            child.control_path,
            gone_note=child.exit_note,
            source=source,
            app_ready=lambda app: driver.start(),
        )
    finally:
        stop.set()
        if driver.is_alive():
            driver.join(5)
        child.stop(grace_s=0.5)
        services.stop()
    print(f"flowtap: demo flows captured to {capture}")
    return 0


def run_demo() -> int:
    """Run the headless demo: relay the services, drive traffic, print the flows, stop."""
    services = DemoServices.start()
    try:
        child, ports = start_demo_relay(
            services, ["--no-control", "--grace", "2"], stdout=sys.stdout
        )
        for line in child.listening:
            print(line, flush=True)
        try:
            drive_traffic(ports)
        finally:
            child.stop(grace_s=2.0)
    finally:
        services.stop()
    return 0
