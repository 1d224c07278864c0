"""Runs inside a fresh network namespace (`unshare --net`): a UDP relay whose upstream route
has a 600-byte MTU, so the kernel refuses to send runs of larger segments with segmentation
offload. Prints, as JSON, what the upstream received and what the relay recorded.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from conftest import EventRecorder, send_segmented
from flowtap.proxy.events import Bus
from flowtap.proxy.flow import Address, Direction, Transport
from flowtap.proxy.listener import ListenerSpec
from flowtap.proxy.relay import Relay, RelayConfig


def main() -> int:
    subprocess.run(
        "ip link set lo up && ip route replace local 127.0.0.2 dev lo table local mtu lock 600",
        shell=True,
        check=True,
    )
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    upstream.bind(("127.0.0.2", 0))
    upstream.settimeout(1.0)
    recorder = EventRecorder()
    spec = ListenerSpec(
        Address.parse("127.0.0.1:0"),
        Address.parse(f"127.0.0.2:{upstream.getsockname()[1]}"),
        Transport.UDP,
    )
    relay = Relay([spec], Bus([recorder]), RelayConfig())
    relay.start()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target = ("127.0.0.1", relay.listeners[0].address.port)
    for run in json.loads(sys.argv[1]):
        send_segmented(client, [bytes.fromhex(p) for p in run], target)
    received = []
    try:
        while True:
            received.append(upstream.recv(70_000).hex())
    except TimeoutError:
        pass
    relay.stop(grace_s=1.0)
    (closed,) = recorder.closed()
    result = {
        "received": received,
        "recorded": [data.hex() for data in recorder.data(Direction.UP)],
        "error": closed.flow.error,
        "bytes_up": closed.flow.bytes_up,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
