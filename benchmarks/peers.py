"""Loopback peers for the benchmarks: a threaded bulk/ping-pong server and an asyncio echo.

Run as a process: `python benchmarks/peers.py [--tls CERT KEY]` prints `bulk PORT`,
`echo PORT` and `once PORT` lines (`once` echoes its first read, then closes); with `--tls`,
the bulk server speaks TLS (Python's ssl, OpenSSL's defaults) with that certificate, each
connection's handshake in its thread, choosing the cipher its client prefers (as
`openssl s_server` and nginx do by default).
A bulk client's first byte picks the job: `U` upload (the server reads to EOF, answers the
sha256 of what it read), `S<size>\\n` sized upload (the same after `size` bytes, with no
EOF), `D<size>\\n` download (the server sends `size` bytes of a fixed pattern and closes),
`P` ping-pong (one byte echoed at a time), `C` the connection's TLS version and cipher
suite (one line: `TLSv1.3 TLS_AES_128_GCM_SHA256`, or `plain`), `V<size>\n` sized upload of
the download pattern (the server reads `size` bytes comparing each with the pattern, with no
EOF, and answers `ok <bytes>`, or `bad <offset>` of the first read that differs, or
`short <bytes>` if the client closed before: a comparison costs it about a hundredth of a
sha256).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import socket
import ssl
import sys
import threading

BLOCK = bytes(range(256)) * 4096  # 1 MiB, deterministic so both ends know the digest


def pattern_digest(size_bytes: int) -> str:
    """The sha256 of `size_bytes` bytes of the download pattern."""
    digest = hashlib.sha256()
    full, rest = divmod(size_bytes, len(BLOCK))
    for _ in range(full):
        digest.update(BLOCK)
    digest.update(BLOCK[:rest])
    return digest.hexdigest()


def _serve_bulk(conn: socket.socket, context: ssl.SSLContext | None) -> None:
    # A client may give up early (a killed flow, a benchmark stopping), or fail its TLS
    # handshake: not an error here.
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        if context is not None:
            conn = context.wrap_socket(conn, server_side=True)
        _bulk_job(conn)


def _bulk_job(conn: socket.socket) -> None:
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        kind = conn.recv(1)
        if kind == b"U":
            digest = hashlib.sha256()
            buf = bytearray(262144)
            view = memoryview(buf)
            while n := conn.recv_into(buf):
                digest.update(view[:n])
            conn.sendall(digest.hexdigest().encode())
        elif kind == b"V":
            # Sized, as "S" is: a proxy need not relay the client's half-close (mitmdump does
            # not through TLS), so every proxy's upload is measured the same way.
            size = _read_size(conn)
            # The pattern from any offset on, for one receive.
            expected = BLOCK + BLOCK[:262144]
            buf = bytearray(262144)
            view = memoryview(buf)
            got = 0
            bad = -1
            while got < size and (n := conn.recv_into(buf, min(size - got, len(buf)))):
                offset = got % len(BLOCK)
                # A memcmp in place: slicing both sides to compare them took a copy of each,
                # about 0.9 ms/MB here against 0.03.
                if bad < 0 and not expected.startswith(view[:n], offset):
                    bad = got
                got += n
            if bad >= 0:
                conn.sendall(b"bad %d" % bad)
            else:
                conn.sendall(b"ok %d" % got if got == size else b"short %d" % got)
        elif kind == b"S":
            # A sized upload: the digest after `size` bytes, for proxies that do not relay a
            # half-close (microsocks closes both ways at the client's FIN).
            left = _read_size(conn)
            digest = hashlib.sha256()
            buf = bytearray(262144)
            view = memoryview(buf)
            while left > 0 and (n := conn.recv_into(buf, min(left, len(buf)))):
                digest.update(view[:n])
                left -= n
            conn.sendall(digest.hexdigest().encode())
        elif kind == b"D":
            left = _read_size(conn)
            view = memoryview(BLOCK)
            while left > 0:
                step = min(left, len(BLOCK))
                conn.sendall(view[:step])
                left -= step
        elif kind == b"C":
            cipher = conn.cipher() if isinstance(conn, ssl.SSLSocket) else None
            conn.sendall(b"plain\n" if cipher is None else f"{cipher[1]} {cipher[0]}\n".encode())
        elif kind == b"P":
            while data := conn.recv(1):
                conn.sendall(data)


def _read_size(conn: socket.socket) -> int:
    """The size a job announces after its letter: decimal digits and a newline."""
    header = b""
    while not header.endswith(b"\n"):
        byte = conn.recv(1)
        if not byte:
            raise ConnectionResetError("closed in the size header")
        header += byte
    return int(header)


def _bulk_server(sock: socket.socket, context: ssl.SSLContext | None) -> None:
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=_serve_bulk, args=(conn, context), daemon=True).start()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _echo_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo what the first read brings, then close: the server ends the connection, so its
    TIME_WAIT sits on this listening port, not on an ephemeral port of the client's."""
    try:
        writer.write(await reader.read(65536))
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _echo_server() -> None:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0, backlog=4096)
    once = await asyncio.start_server(_echo_once, "127.0.0.1", 0, backlog=4096)
    print(f"echo {server.sockets[0].getsockname()[1]}", flush=True)
    print(f"once {once.sockets[0].getsockname()[1]}", flush=True)
    async with server, once:
        await asyncio.gather(server.serve_forever(), once.serve_forever())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"), help="serve bulk over TLS")
    args = parser.parse_args()
    context = None
    if args.tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*args.tls)
        # Python's ssl makes a server choose by its own order (AES-256 first): this one takes
        # its client's, so that each proxy's upstream leg has the cipher the proxy offers first.
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    bulk = socket.create_server(("127.0.0.1", 0), backlog=1024)
    print(f"bulk {bulk.getsockname()[1]}", flush=True)
    threading.Thread(target=_bulk_server, args=(bulk, context), daemon=True).start()
    asyncio.run(_echo_server())


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
    finally:
        os._exit(0)
