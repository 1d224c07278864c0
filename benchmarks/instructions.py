"""What one new connection costs the relay, counted so that load on the machine does not
change the count: instructions (valgrind's callgrind) or system calls (strace -c).

Run on demand:  python benchmarks/instructions.py MODE [--connections N] [--flowtap PATH]
                                                  [--syscalls]
MODE is socks5, http (a CONNECT tunnel), reverse or transparent (as root: in a network
namespace this script makes, behind an iptables REDIRECT that leaves flowtap's own group
alone). One client at a time does what benchmarks/modes.py's connection load does (connect,
the proxy handshake, echo a byte, close) against the echo peer of benchmarks/peers.py; the
relay runs with busy polling off, since a spinning poll's count depends on timing. After
200 connections to warm up, the counters are zeroed, N connections run, and the count is
divided by N (callgrind); strace counts the whole run, start-up and warm-up included. Give
`--flowtap` another build's flowtap (e.g. a main checkout's .venv/bin/flowtap) to compare two
builds. Counts vary by about 1 % from run to run (how events fall into polls).
Everything runs on loopback; every loop is bounded.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from processes import free_port, wait_port

HERE = Path(__file__).resolve().parent
WARM_UP = 200
# flowtap's group in transparent mode: iptables leaves its own upstream connections alone.
FLOWTAP_GID = 65534


def one_connection(mode: str, port: int, echo: int) -> None:
    """Connect (through the proxy handshake of `mode`), echo a byte, close."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mode == "socks5":
            sock.sendall(b"\x05\x01\x00")
            if sock.recv(2) != b"\x05\x00":
                raise RuntimeError("the SOCKS5 greeting was refused")
            sock.sendall(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + struct.pack("!H", echo))
            reply = b""
            while len(reply) < 10 and (chunk := sock.recv(10 - len(reply))):
                reply += chunk
            if reply[1:2] != b"\x00":
                raise RuntimeError(f"SOCKS5 reply {reply!r}")
        elif mode == "http":
            sock.sendall(f"CONNECT 127.0.0.1:{echo} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head and (chunk := sock.recv(1)):
                head += chunk
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"CONNECT answered {head[:40]!r}")
        sock.sendall(b"c")
        if sock.recv(1) != b"c":
            raise RuntimeError("the connection lost its byte")


def _flowtap_group() -> None:
    os.setgroups([])
    os.setgid(FLOWTAP_GID)


def measure(mode: str, count: int, flowtap: str, syscalls: bool) -> str:
    """Run the relay under callgrind (or strace) over `count` connections; the figure."""
    peers = subprocess.Popen(
        [sys.executable, str(HERE / "peers.py")], stdout=subprocess.PIPE, text=True
    )
    assert peers.stdout is not None
    echo = int(dict(peers.stdout.readline().split() for _ in range(2))["echo"])
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="flowtap-instructions-"))
    out = workdir / "out"
    if mode == "reverse":
        listen = ["--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{echo}"]
    else:
        listen = ["--listen", f"{mode}:127.0.0.1:{port}"]
    if syscalls:
        tool = ["strace", "-c", "-f", "-o", str(out)]
    else:
        tool = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p"]
    relay = subprocess.Popen(
        [*tool, flowtap, "run", "--quiet", "--no-control", "--busy-poll", "0", *listen],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONHASHSEED="0"),
        preexec_fn=_flowtap_group if mode == "transparent" else None,
    )
    try:
        wait_port(port, 120, proc=relay, name="flowtap")
        target = port
        if mode == "transparent":
            subprocess.run(
                f"iptables -t nat -A OUTPUT -p tcp -d 127.0.0.1 --dport {echo} -m owner ! "
                f"--gid-owner {FLOWTAP_GID} -j REDIRECT --to-ports {port}",
                shell=True,
                check=True,
            )
            target = echo
        for _ in range(WARM_UP):
            one_connection(mode, target, echo)
        time.sleep(0.5)
        if not syscalls:
            subprocess.run(["callgrind_control", "--zero", str(relay.pid)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        for _ in range(count):
            one_connection(mode, target, echo)
        time.sleep(0.5)  # the last closes reach the relay
        if not syscalls:
            subprocess.run(["callgrind_control", "--dump", str(relay.pid)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    finally:
        # strace passes no signal on: the relay it runs is told to stop itself.
        children = Path(f"/proc/{relay.pid}/task/{relay.pid}/children")
        pids = children.read_text().split() if syscalls and children.exists() else []
        for pid in pids:
            os.kill(int(pid), 15)
        if not pids:
            relay.terminate()
        relay.wait(60)
        peers.terminate()
        peers.wait()
    if syscalls:
        text = out.read_text()
        total = re.search(r"^100\.00\s+\S+\s+\S+\s+(\d+)", text, re.M)
        assert total is not None
        done = count + WARM_UP
        return f"{text}\n{mode}: {int(total.group(1)) / done:.1f} system calls a connection"
    (dump,) = glob.glob(f"{out}.*.1")
    match = re.search(r"^(?:summary|totals): (\d+)", Path(dump).read_text(), re.M)
    assert match is not None
    return f"{mode}: {int(match.group(1)) / count:,.0f} instructions a connection ({count})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=("socks5", "http", "reverse", "transparent"))
    parser.add_argument("--connections", type=int, default=1500)
    parser.add_argument("--flowtap", help="the flowtap to measure (default: this venv's)")
    parser.add_argument("--syscalls", action="store_true", help="count system calls instead")
    parser.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    flowtap = args.flowtap or shutil.which("flowtap", path=os.path.dirname(sys.executable))
    if not flowtap:
        print("flowtap: error: no flowtap beside this python; give --flowtap PATH")
        return 2
    tool = "strace" if args.syscalls else "valgrind"
    if not shutil.which(tool):
        print(f"flowtap: error: {tool} is not installed; apt-get install {tool}")
        return 2
    if args.mode == "transparent" and not args.in_namespace:
        if os.getuid() != 0 or not shutil.which("unshare") or not shutil.which("iptables"):
            print("flowtap: error: transparent mode needs root, unshare and iptables")
            return 2
        command = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--flowtap",
                   flowtap, "--in-namespace"]  # fmt: skip
        return subprocess.run(["unshare", "--net", *command], check=False).returncode
    if args.in_namespace:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    print(measure(args.mode, args.connections, flowtap, args.syscalls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
