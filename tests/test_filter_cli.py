"""`--filter` on the command line, `--version`, `tui --json`, and replay's report wording."""

from __future__ import annotations

import json
import socket
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

from capture_checks import assert_tshark_clean

from conftest import flowtap_command, free_port
from flowtap.inspector.replay.replay import FlowReport, Status, Summary
from flowtap.proxy.flow import Transport

SAMPLES = Path(__file__).resolve().parent.parent / "captures" / "samples"
HTTP = str(SAMPLES / "http.pcapng")


def _flowtap(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*flowtap_command(), *args], capture_output=True, text=True, timeout=60)


def test_show_filter_lists_only_matching_flows_and_says_how_many_of_all() -> None:
    result = _flowtap("show", HTTP, "--filter", 'tcp port 18080 and contains "index.html"')
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "1 of 2 flows" in lines[0]
    assert [line.split()[0] for line in lines[2:]] == ["1"]


def test_show_filter_rejects_a_malformed_expression_in_one_line() -> None:
    result = _flowtap("show", HTTP, "--filter", "port x")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        "flowtap: error: --filter 'port x': column 6: expected a port number, found 'x'\n"
    )


def test_show_tui_refuses_filter_in_one_line() -> None:
    result = _flowtap("show", HTTP, "--tui", "--filter", "tcp")
    assert result.returncode == 2
    assert result.stderr == (
        "flowtap: error: --filter lists flows: in the TUI, type the expression after /\n"
    )


def test_version_prints_the_package_version() -> None:
    result = _flowtap("--version")
    assert result.returncode == 0
    assert result.stdout == f"flowtap {version('flowtap')}\n"


def test_tui_refuses_json_in_one_line() -> None:
    result = _flowtap("tui", "--json", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowtap: error: tui draws flows on screen")


def test_replay_dry_run_lists_the_flows_and_sends_nothing() -> None:
    nobody = f"127.0.0.1:{free_port()}"  # nothing listens: a real replay fails to connect
    result = _flowtap("replay", HTTP, "--to", nobody, "--dry-run", "--filter", "contains missing")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"flow 2 tcp 127.0.0.1:47764 -> 127.0.0.1:18080: would send 1 turn (86 bytes) to {nobody}",
        "1 flow to replay (dry run: nothing sent)",
    ]
    assert _flowtap("replay", HTTP, "--to", nobody, "--filter", "id 2").returncode == 1


def test_serve_filter_that_selects_nothing_is_one_line() -> None:
    result = _flowtap("serve", HTTP, "--filter", "udp")
    assert result.returncode == 2
    assert result.stderr.startswith("flowtap: error: no flow in ")
    assert "matches the --filter" in result.stderr and result.stderr.count("\n") == 1


def test_replay_reports_count_in_the_singular_and_name_both_byte_counts() -> None:
    summary = Summary(flows=1, ok=1, differs=0, failed=0, stopped=0, turns_sent=1, duration_s=0.1)
    assert summary.line().startswith("replayed 1 flow in 0.100s")
    assert summary.line().endswith("; 1 turn sent")
    report = FlowReport(
        flow_id=1,
        transport=Transport.TCP,
        status=Status.DIFFERS,
        turns_sent=1,
        turns_total=1,
        bytes_sent=10,
        server_bytes_expected=0,
        server_bytes_received=358,
        duration_s=0.1,
    )
    assert "server bytes 358 replayed, 0 recorded" in report.line()


def test_run_filter_refuses_terms_not_known_when_a_flow_opens(tmp_path: Path) -> None:
    result = _flowtap(
        "run", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--pcap",
        str(tmp_path / "never.pcapng"), "--filter", "port 80 and bytes > 1M or contains GET",
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(
        "flowtap: error: --filter 'port 80 and bytes > 1M or contains GET': bytes, contains are "
        "not known when a flow opens"
    )
    assert not (tmp_path / "never.pcapng").exists()


def test_run_filter_prints_and_captures_only_picked_flows_but_relays_all(
    flowtap: Any, echo_server: tuple[str, int], udp_echo: Any, tmp_path: Path
) -> None:
    udp = udp_echo()
    capture = tmp_path / "picked.pcapng"
    relay = flowtap(
        "run", "--json", "--pcap", str(capture), "--filter", "tcp and not udp",
        "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{echo_server[1]}",
        "--listen", "udp:127.0.0.1:0", "--upstream", f"127.0.0.1:{udp.port}",
        listeners=2,
    )  # fmt: skip
    tcp_port, udp_port = (int(row[1].rsplit(":", 1)[1]) for row in relay.listeners)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.sendto(b"not picked", ("127.0.0.1", udp_port))
        assert sock.recv(100) == b"not picked"  # relayed all the same
    with socket.create_connection(("127.0.0.1", tcp_port), timeout=10) as sock:
        sock.sendall(b"picked")
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b"picked"
    relay.wait_line('"event": ?"closed"')
    assert relay.stop() == 0
    events = [json.loads(line) for line in relay.lines if line.startswith("{")]
    assert [(e["event"], e["transport"]) for e in events] == [("opened", "tcp"), ("closed", "tcp")]
    assert_tshark_clean(capture)
    listed = subprocess.run(
        [*flowtap_command(), "show", str(capture), "--json"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    flows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(f["transport"], f["bytes_up"], f["bytes_down"]) for f in flows] == [("tcp", 6, 6)]
