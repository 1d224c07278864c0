"""Runs inside a fresh network namespace (`unshare --net`), the relay's, which does not
forward packets: a client namespace and a server namespace, each joined to it by a veth pair,
UDP servers on 10.99.1.53 and fd00:99:1::53 port 53 in the server's, flowtap listening with
`transparent:udp:` on loopback, and TPROXY rules steering the client's datagrams to port 53
into flowtap. The client asks the servers without knowing of flowtap; only flowtap can
answer it. Prints, as JSON, what the client got (and from where) and
flowtap's --json lines. Usage: transparent_udp_scenario.py [--allow-from CIDR ...] (flowtap's
own; the client then waits 3 s for an answer rather than 10)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from conftest import flowtap_command, interrupt_after_closed, listening_port, read_listening_lines

SERVER4 = "10.99.1.53"
SERVER6 = "fd00:99:1::53"

# Run in the client namespace: one query to each server, the answer and where it came from.
_CLIENT = """
import json, socket, sys
out = {}
for family, host in ((socket.AF_INET, sys.argv[1]), (socket.AF_INET6, sys.argv[2])):
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(float(sys.argv[3]))
        sock.sendto(b"query for " + host.encode(), (host, 53))
        try:
            data, source = sock.recvfrom(2048)
            out[host] = [data.decode(), source[0], source[1], sock.getsockname()[0]]
        except OSError as exc:
            out[host] = ["no answer: " + str(exc), "", 0, ""]
print(json.dumps(out))
"""


def _sh(command: str) -> None:
    subprocess.run(command, shell=True, check=True)


# Run in the server namespace: answer each datagram with what it said and whom it came from.
_SERVER = """
import select, socket, sys
socks = []
for family, host in ((socket.AF_INET, sys.argv[1]), (socket.AF_INET6, sys.argv[2])):
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 53))
    socks.append(sock)
print("ready", flush=True)
while True:
    for sock in select.select(socks, [], [], 60)[0]:
        data, source = sock.recvfrom(2048)
        sock.sendto(b"answer; asked by " + source[0].encode() + b": " + data, source)
"""


def main() -> int:
    _sh("ip link set lo up")
    holders = [subprocess.Popen(["unshare", "--net", "sleep", "120"]) for _ in range(2)]
    try:
        client, server = (_namespace_of(holder.pid) for holder in holders)
        return _run(client, server, sys.argv[1:])
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()


def _namespace_of(pid: int) -> str:
    """`nsenter` into the network namespace of `pid` (`unshare`'s, once it exec'd sleep)."""
    deadline = time.monotonic() + 10
    own = os.readlink("/proc/self/ns/net")
    while os.readlink(f"/proc/{pid}/ns/net") == own:
        if time.monotonic() > deadline:
            raise SystemExit("a child network namespace did not appear")
        time.sleep(0.01)
    return f"nsenter --net=/proc/{pid}/ns/net"


def _join(enter: str, here: str, there: str, net: int, routes: str) -> None:
    """A veth pair from this namespace (.1) to the one `enter` enters (.2) on 10.98.NET.0/24
    and fd00:98:NET::/64, then `routes` run there."""
    pid = enter.rsplit("/", 3)[1]
    _sh(f"ip link add name {here} type veth peer name {there} netns {pid}")
    _sh(f"ip addr add 10.98.{net}.1/24 dev {here}")
    _sh(f"ip -6 addr add fd00:98:{net}::1/64 dev {here} nodad && ip link set {here} up")
    _sh(
        f"{enter} sh -c 'ip link set lo up && ip addr add 10.98.{net}.2/24 dev {there} && "
        f"ip -6 addr add fd00:98:{net}::2/64 dev {there} nodad && ip link set {there} up"
        f" && {routes}'"
    )


def _run(enter_client: str, enter_server: str, policy: list[str]) -> int:
    _join(
        enter_client,
        "ftr",
        "ftc",
        0,
        "ip route add default via 10.98.0.1 && ip -6 route add default via fd00:98:0::1",
    )
    _join(
        enter_server,
        "fts",
        "ftv",
        1,
        f"ip addr add {SERVER4}/32 dev lo && ip -6 addr add {SERVER6}/128 dev lo nodad && "
        "ip route add default via 10.98.1.1 && ip -6 route add default via fd00:98:1::1",
    )
    _sh(
        f"ip route add {SERVER4}/32 via 10.98.1.2 && ip -6 route add {SERVER6}/128 via fd00:98:1::2"
    )
    server = subprocess.Popen(
        [*enter_server.split(), sys.executable, "-c", _SERVER, SERVER4, SERVER6],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    if server.stdout.readline().strip() != "ready":
        raise SystemExit("the UDP server did not start")
    try:
        return _relay(enter_client, policy)
    finally:
        server.kill()
        server.wait()


def _relay(enter: str, policy: list[str]) -> int:
    proc = subprocess.Popen(
        [
            *flowtap_command(),
            "run",
            "--json",
            "--no-control",
            "--listen",
            "transparent:udp:127.0.0.1:0",
            "--listen",
            "transparent:udp:[::1]:0",
            *policy,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    listening = read_listening_lines(proc, 2)
    ports = [listening_port(line) for line in listening]
    # Only datagrams from the client's side (ftr) are steered: flowtap's own to the servers
    # go through lo untouched.
    for tables, on_ip, port, local in (
        ("iptables", "127.0.0.1", ports[0], "ip route add local 0.0.0.0/0 dev lo table 100"),
        ("ip6tables", "::1", ports[1], "ip -6 route add local ::/0 dev lo table 100"),
    ):
        _sh(
            f"{tables} -t mangle -A PREROUTING -i ftr -p udp --dport 53 -j TPROXY "
            f"--on-ip {on_ip} --on-port {port} --tproxy-mark 1"
        )
        family = "-6" if tables == "ip6tables" else "-4"
        _sh(f"ip {family} rule add fwmark 1 lookup 100 && {local}")
    client = subprocess.run(
        [*enter.split(), sys.executable, "-c", _CLIENT, SERVER4, SERVER6, "3" if policy else "10"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # A datagram sent to the listener itself, not steered: refused, not relayed to itself.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as direct:
        direct.sendto(b"to the listener itself", ("127.0.0.1", ports[0]))
    lines, stderr = interrupt_after_closed(proc, 0 if policy else 1)
    print(
        json.dumps(
            {
                "listening": listening,
                "client": json.loads(client.stdout) if client.returncode == 0 else {},
                "client_error": client.stderr,
                "events": [json.loads(line) for line in lines if line.startswith("{")],
                "exit": proc.returncode,
                "stderr": stderr,
            }
        )
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
