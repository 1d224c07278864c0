"""A UDP echo server run as its own process: `python udp_echo.py HOST PORT`.

It prints `port N` once bound, sends every datagram back to its sender, and on SIGTERM prints
`datagrams=N bytes=M` (what it received) and exits. A process of its own keeps the test's GIL
out of the echo path.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
from types import FrameType


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((host, port))
    buf = bytearray(70_000)
    view = memoryview(buf)
    counts = [0, 0]
    stop = [False]

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop[0] = True
        sock.close()

    signal.signal(signal.SIGTERM, on_term)
    print(f"port {sock.getsockname()[1]}", flush=True)
    recvfrom_into = sock.recvfrom_into
    sendto = sock.sendto
    while not stop[0]:
        try:
            n, addr = recvfrom_into(buf)
        except OSError:
            break
        counts[0] += 1
        counts[1] += n
        with contextlib.suppress(OSError):
            sendto(view[:n], addr)
    print(f"datagrams={counts[0]} bytes={counts[1]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
