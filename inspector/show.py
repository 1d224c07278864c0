"""`flowtap show`: the flows of any capture, one flow's conversation, a hexdump or raw bytes.

Exit status: 0 when the whole capture was read, 1 when output was shown but the capture is
cut short or damaged part-way (or `--raw` had to skip bytes the capture lacks), 2 when
nothing could be read (the CLI turns a FlowtapError into one line and status 2).
"""

from __future__ import annotations

import base64
import json
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, TextIO

from flowtap.proxy.errors import FlowtapError
from flowtap.proxy.flow import Direction, Flow, FlowClosed, FlowData, FlowOpened, Transport

from .flow_filter import FlowFilter, FlowSelection
from .log import flow_record, human_bytes, server_text
from .pcapfile.reader import CaptureReader, DamagedCaptureError
from .pcapfile.reassembly import CaptureEvent, FlowGap, readable_events

_BLOCK_BYTES = 64 * 1024
_ESCAPES = {0x5C: "\\\\", 0x0D: "\\r", 0x0A: "\\n\n", 0x09: "\\t"}
_TEXT = [_ESCAPES.get(b, chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}") for b in range(256)]


def printable(data: bytes) -> str:
    """`data` as text: printable ASCII as is, everything else escaped; lines break after \\n."""
    return "".join([_TEXT[b] for b in data])


def hexdump(data: bytes, offset: int = 0) -> str:
    """Lines of `offset  16 hex bytes  |ascii|`, offsets counted from `offset`."""
    lines = []
    for at in range(0, len(data), 16):
        row = data[at : at + 16]
        hex_part = " ".join(f"{b:02x}" for b in row[:8])
        if len(row) > 8:
            hex_part += "  " + " ".join(f"{b:02x}" for b in row[8:])
        ascii_part = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in row)
        lines.append(f"{offset + at:08x}  {hex_part:<49}  |{ascii_part}|")
    return "\n".join(lines)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _local(timestamp: float) -> datetime | None:
    try:
        return datetime.fromtimestamp(timestamp)
    except (ValueError, OverflowError, OSError):
        return None  # a damaged capture's timestamp beyond what a calendar can show


def _clock(timestamp: float) -> str:
    moment = _local(timestamp)
    return moment.strftime("%H:%M:%S.%f") if moment else f"{timestamp:.6f}"


def _when(timestamp: float) -> str:
    moment = _local(timestamp)
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else f"{timestamp:.6f}"


@dataclass
class _Listed:
    flow: Flow
    gap_bytes_up: int = 0
    gap_bytes_down: int = 0


@dataclass
class ShowResult:
    """What a `show` run read: for the exit status and the closing warning line."""

    packets_read: int = 0
    problem: str | None = None
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def exit_status(self) -> int:
        return 1 if self.problem else 0


def _events(
    reader: CaptureReader,
    flow_ids: tuple[int, ...] | None,
    result: ShowResult,
    selection: FlowSelection | None = None,
) -> Iterator[CaptureEvent]:
    """The capture's events (without data: a `selection` is handed the bytes it asks for);
    a damage part-way ends them and is noted in `result`."""

    def note(exc: DamagedCaptureError) -> None:
        result.problem = f"{exc}; shown is what was read before that point"

    try:
        if selection is None:
            yield from readable_events(reader, flow_ids, on_damage=note)
        else:
            yield from readable_events(
                reader,
                on_damage=note,
                data_for=selection.opened,
                on_data=selection.data,
            )
    finally:
        result.packets_read = reader.packets_read
        result.skipped = reader.skipped


def list_flows(
    path: Path, out: TextIO, *, as_json: bool = False, flow_filter: FlowFilter | None = None
) -> ShowResult:
    """Print one line (or JSON object) per flow of the capture at `path` that passes the filter."""
    result = ShowResult()
    flows: dict[int, _Listed] = {}
    selection = FlowSelection(flow_filter) if flow_filter is not None else None
    seen = 0
    with CaptureReader(path) as reader:
        # No FlowData comes: a payload filter reads the bytes it needs through `selection.data`.
        for event in _events(reader, (), result, selection):
            if isinstance(event, FlowGap):
                listed = flows[event.flow_id]
                if event.direction is Direction.UP:
                    listed.gap_bytes_up += event.size_bytes
                else:
                    listed.gap_bytes_down += event.size_bytes
            elif isinstance(event, FlowOpened):
                flows[event.flow.id] = _Listed(event.flow)
                seen += 1
            elif isinstance(event, FlowClosed):
                if selection is None or selection.closed(event.flow):
                    flows[event.flow.id].flow = event.flow
                else:
                    del flows[event.flow.id]
        capture_format = reader.format
    ordered = [flows[i] for i in sorted(flows)]
    if as_json:
        for listed in ordered:
            record = flow_record(listed.flow)
            record["gap_bytes_up"] = listed.gap_bytes_up
            record["gap_bytes_down"] = listed.gap_bytes_down
            out.write(json.dumps(record, separators=(",", ":")) + "\n")
        return result
    out.write(_heading(path, capture_format, result, ordered, seen) + "\n")
    if not ordered:
        return result
    rows = [("ID", "PROTO", "CLIENT", "SERVER", "START", "DURATION", "UP", "DOWN", "END")]
    for listed in ordered:
        flow = listed.flow
        end = _end_text(flow, "")
        missing = listed.gap_bytes_up + listed.gap_bytes_down
        if missing:
            end += f", {human_bytes(missing)} missing"
        rows.append(
            (
                str(flow.id),
                str(flow.transport),
                str(flow.client),
                server_text(flow),
                _clock(flow.started_at),
                f"{flow.duration_s or 0.0:.3f}s",
                human_bytes(flow.bytes_up),
                human_bytes(flow.bytes_down),
                end,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {0, 5, 6, 7}
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        out.write("  ".join(cells).rstrip() + "\n")
    return result


def _heading(
    path: Path, capture_format: str, result: ShowResult, flows: list[_Listed], seen: int
) -> str:
    counted = _count(seen, "flow") if len(flows) == seen else f"{len(flows)} of {seen} flows"
    head = f"{path.name}: {capture_format}, {_count(result.packets_read, 'packet')}, {counted}"
    if flows:
        start = min(listed.flow.started_at for listed in flows)
        end = max(listed.flow.ended_at or listed.flow.started_at for listed in flows)
        head += f", {_when(start)} for {end - start:.3f}s"
    skipped = sum(result.skipped.values())
    if skipped:
        reasons = ", ".join(f"{count} {why}" for why, count in result.skipped.most_common())
        head += f" ({skipped} other packets: {reasons})"
    return head


def _flow_events(path: Path, flow_id: int, result: ShowResult) -> Iterator[CaptureEvent]:
    """The events of one flow; FlowtapError if the capture has no such flow."""
    seen = False
    flows = 0
    with CaptureReader(path) as reader:
        for event in _events(reader, (flow_id,), result):
            if isinstance(event, FlowOpened | FlowClosed):
                flows = max(flows, event.flow.id)
                if event.flow.id != flow_id:
                    continue
                seen = True
            elif event.flow_id != flow_id:
                continue
            yield event
    if not seen:
        raise FlowtapError(
            f"{path.name} has no flow {flow_id} (it has {flows}): "
            f"list them with flowtap show {path}"
        )


def _flow_heading(flow: Flow) -> str:
    line = f"flow {flow.id} {flow.transport} {flow.client} -> {server_text(flow)}"
    if flow.listener != flow.server:
        line += f" via {flow.listener}"
    return line


def _end_text(flow: Flow, still: str) -> str:
    """How a flow ended, as far as the capture tells."""
    if flow.reason is not None:
        return str(flow.reason)
    if flow.transport is Transport.UDP:
        # A UDP session ends without a packet (an idle timeout, a relay stopping): the
        # capture holds its datagrams, not its end.
        return "no end on the wire (udp)"
    return f"{still}{flow.state} at capture end"


def _closing_line(flow: Flow) -> str:
    end = _end_text(flow, "still ")
    line = (
        f"{_clock(flow.ended_at or flow.started_at)} -- {end}: "
        f"up {human_bytes(flow.bytes_up)}, down {human_bytes(flow.bytes_down)}, "
        f"{flow.duration_s or 0.0:.3f}s"
    )
    if flow.tls is not None:
        line = f"{line} [{flow.tls.summary()}]"
    return f"{line} ({flow.error})" if flow.error else line


def show_flow(
    path: Path, flow_id: int, out: TextIO, *, as_hex: bool = False, as_json: bool = False
) -> ShowResult:
    """Print one flow's conversation: direction marks, timestamps, text (or hex, or JSON)."""
    result = ShowResult()
    block = bytearray()
    block_direction: Direction | None = None
    block_time = 0.0
    offsets = {Direction.UP: 0, Direction.DOWN: 0}
    write = out.write
    is_udp = False

    def flush_block() -> None:
        nonlocal block_direction
        if block_direction is None:
            return
        mark = ">> client" if block_direction is Direction.UP else "<< server"
        write(f"{_clock(block_time)} {mark} {len(block)} bytes\n")
        if as_hex:
            body = hexdump(bytes(block), offsets[block_direction])
        else:
            body = printable(bytes(block)).rstrip("\n")
        write("    " + body.replace("\n", "\n    ") + "\n")
        offsets[block_direction] += len(block)
        block.clear()
        block_direction = None

    for event in _flow_events(path, flow_id, result):
        if as_json:
            write(json.dumps(_json_event(event), separators=(",", ":")) + "\n")
            continue
        if isinstance(event, FlowData):
            # TCP chunk boundaries mean nothing, so a direction's bytes print as one block;
            # a UDP datagram is a message of its own.
            if block_direction is not event.direction or len(block) >= _BLOCK_BYTES or is_udp:
                flush_block()
                block_direction = event.direction
                block_time = event.timestamp
            block += event.data
        elif isinstance(event, FlowGap):
            flush_block()
            side = "client" if event.direction is Direction.UP else "server"
            write(
                f"{_clock(event.timestamp)} !! {side}: gap of {event.size_bytes} bytes "
                "missing from the capture\n"
            )
            offsets[event.direction] += event.size_bytes
        elif isinstance(event, FlowOpened):
            is_udp = event.flow.transport == "udp"
            write(_flow_heading(event.flow) + "\n")
        else:
            flush_block()
            write(_closing_line(event.flow) + "\n")
    flush_block()
    return result


def _json_event(event: CaptureEvent) -> dict[str, object]:
    if isinstance(event, FlowData | FlowGap):
        record: dict[str, object] = {
            "event": "gap" if isinstance(event, FlowGap) else "data",
            "flow": event.flow_id,
            "direction": str(event.direction),
            "timestamp": event.timestamp,
            "size_bytes": event.size_bytes if isinstance(event, FlowGap) else len(event.data),
        }
        if isinstance(event, FlowData):
            record["data_b64"] = base64.b64encode(event.data).decode()
        return record
    name = "opened" if isinstance(event, FlowOpened) else "closed"
    return {"event": name, **flow_record(event.flow)}


def write_raw(path: Path, flow_id: int, side: str, out: BinaryIO) -> ShowResult:
    """Write the reassembled bytes one side of a flow sent (`client` or `server`) to `out`."""
    result = ShowResult()
    direction = Direction.UP if side == "client" else Direction.DOWN
    gaps = 0
    missing = 0
    for event in _flow_events(path, flow_id, result):
        if isinstance(event, FlowData) and event.direction is direction:
            out.write(event.data)
        elif isinstance(event, FlowGap) and event.direction is direction:
            gaps += 1
            missing += event.size_bytes
    out.flush()
    if missing and result.problem is None:
        result.problem = (
            f"flow {flow_id}'s {side} side misses {missing} bytes in {gaps} gaps the capture "
            "does not hold; the output skips them"
        )
    return result


def run_show(
    path: str,
    *,
    flow_id: int | None,
    as_hex: bool,
    raw: str | None,
    as_json: bool,
    flow_filter: FlowFilter | None = None,
    out: TextIO | None = None,
) -> int:
    """The `flowtap show` command; returns the exit status."""
    text_out = out or sys.stdout
    capture = Path(path)
    if (as_hex or raw) and flow_id is None:
        raise FlowtapError(
            "--hex and --raw show one flow: add --flow ID (flowtap show FILE lists them)"
        )
    if flow_filter is not None and flow_id is not None:
        raise FlowtapError("--filter picks flows to list and --flow shows one: drop one of them")
    if raw and (as_hex or as_json):
        raise FlowtapError("--raw writes bytes only: drop --hex and --json")
    if flow_id is None:
        result = list_flows(capture, text_out, as_json=as_json, flow_filter=flow_filter)
    elif raw:
        text_out.flush()
        result = write_raw(capture, flow_id, raw, sys.stdout.buffer)
    else:
        result = show_flow(capture, flow_id, text_out, as_hex=as_hex, as_json=as_json)
    text_out.flush()
    if result.problem:
        print(f"flowtap: warning: {result.problem}", file=sys.stderr)
    return result.exit_status
