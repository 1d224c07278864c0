"""Runs inside a fresh network namespace (`unshare --net`): web servers on test addresses
(10.99.0.2 and fd00:99::2 on the namespace's loopback), flowtap in transparent mode, iptables
and ip6tables REDIRECT rules for the connections of the user `nobody`, and curl run as nobody,
which connects to the servers without knowing of flowtap. Prints, as JSON, what curl got and
flowtap's --json lines. Usage: transparent_scenario.py CAPTURE_PATH
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from conftest import flowtap_command, interrupt_after_closed, listening_port, read_listening_lines

NOBODY = 65534
BODY = b"reached without knowing of flowtap\n" * 20


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _V6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _sh(command: str) -> None:
    subprocess.run(command, shell=True, check=True)


def _curl_as_nobody(url: str) -> str:
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "10", url],
        capture_output=True,
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        timeout=20,
        check=False,
    )
    return result.stdout.decode() if result.returncode == 0 else f"curl failed: {result.stderr!r}"


def main() -> int:
    capture = Path(sys.argv[1])
    _sh("ip link set lo up && ip addr add 10.99.0.2/32 dev lo")
    _sh("ip -6 addr add fd00:99::2/128 dev lo nodad")
    servers = [
        http.server.ThreadingHTTPServer(("10.99.0.2", 80), _Handler),
        _V6Server(("fd00:99::2", 80), _Handler),
    ]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    proc = subprocess.Popen(
        [
            *flowtap_command(),
            "run",
            "--json",
            "--no-control",
            "--listen",
            "transparent:127.0.0.1:0",
            "--listen",
            "transparent:[::1]:0",
            "--pcap",
            str(capture),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ports = [listening_port(line) for line in read_listening_lines(proc, 2)]
    # Only nobody's connections are redirected: flowtap's own (as root) go out untouched.
    _sh(
        f"iptables -t nat -A OUTPUT -p tcp -d 10.99.0.2 --dport 80 -m owner --uid-owner {NOBODY} "
        f"-j REDIRECT --to-ports {ports[0]}"
    )
    _sh(
        f"ip6tables -t nat -A OUTPUT -p tcp -d fd00:99::2 --dport 80 -m owner --uid-owner "
        f"{NOBODY} -j REDIRECT --to-ports {ports[1]}"
    )
    got4 = _curl_as_nobody("http://10.99.0.2/index.txt")
    got6 = _curl_as_nobody("http://[fd00:99::2]/index.txt")
    # A client that connects to the listener itself, not redirected: refused, not looped.
    with socket.create_connection(("127.0.0.1", ports[0]), timeout=10) as direct:
        direct.settimeout(10)
        try:
            direct_answer = direct.recv(100)
        except ConnectionResetError:
            direct_answer = b""
    lines, stderr = interrupt_after_closed(proc, 3)
    print(
        json.dumps(
            {
                "body4": got4,
                "body6": got6,
                "expected": BODY.decode(),
                "direct_answer": direct_answer.decode("latin-1"),
                "events": [json.loads(line) for line in lines if line.startswith("{")],
                "exit": proc.returncode,
                "stderr": stderr,
            }
        )
    )
    for server in servers:
        server.shutdown()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
