"""`webb observe`: the node's flows, like hubble observe.

The agent appends one JSON object a line to ``<state-dir>/flows.jsonl`` and rotates it to
``flows.jsonl.1`` past a size (mesh.agent.flows.FlowLog). With -f the file is followed as
``tail -F`` does: the open file is kept and each poll reads only the bytes added since the last;
a file rotated away is read to its end and the new one from its start; a truncated one from its
start.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import IO, Annotated, Any

import typer
import yaml
from rich.text import Text

from mesh.cli.common import STATE, StateOpt, console, output_option
from mesh.cli.flowquery import FlowQuery, Layer, QueryError, Verdict

POLL_S = 0.2


class FlowFormat(StrEnum):
    table = "table"
    wide = "wide"
    json = "json"
    yaml = "yaml"


_COLOUR = {"denied": "red", "failed": "red", "dropped": "yellow", "audit": "yellow"}
# -o wide: these too, as key=value, when a flow has them
_WIDE = ("protocol", "policy", "via", "tls", "direction", "grpc_status", "duration_ms", "retries", "bytes_sent",
         "bytes_received", "envoy_details")
# the options that are FlowQuery's filters, by its names (an error names the option)
_OPTION = {"pod": "--pod", "from_pod": "--from-pod", "to_pod": "--to-pod", "namespace": "--namespace",
           "protocol": "--protocol", "method": "--http-method", "status": "--http-status", "since": "--since"}


def _clock(t: Any, wide: bool) -> str:
    try:
        when = float(t or 0)
    except (TypeError, ValueError):
        when = 0.0
    if wide:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) + f".{int(when % 1 * 1000):03d}"
    return time.strftime("%H:%M:%S", time.localtime(when))


def flow_text(f: dict[str, Any], wide: bool = False) -> Text:
    """One flow on one line: time src -> dst layer VERDICT reason [method path status] [k=v ...] — why.
    A Text: what the flow holds (a request path, a name, Envoy's words) is shown as it is, never as markup."""
    dst = str(f.get("service") or f.get("dst") or "")
    if f.get("dst_pod"):
        dst += f" ({f['dst_pod']})"
    verdict = str(f.get("verdict"))
    line = Text(f"{_clock(f.get('time'), wide)} {f.get('src')} -> {dst} {f.get('layer')} ")
    line.append(verdict.upper(), style=_COLOUR.get(verdict, "green"))
    line.append(f" {f.get('reason')}")
    if f.get("layer") == "L7":
        line.append(f" {f.get('method')} {f.get('path')} {_status(f)}")
    if f.get("peer"):  # an mTLS flow: who the other end proved to be
        line.append(f" peer {f['peer']}")
    if wide:
        line.append("".join(f" {k}={f[k]}" for k in _WIDE if f.get(k) not in (None, "")))
    if f.get("why"):
        line.append(f" — {f['why']}")
    return line


def _status(f: dict[str, Any]) -> str:
    """The HTTP status; for a gRPC call its gRPC status (the HTTP one is 200 even for a denial)."""
    grpc = f.get("grpc_status")
    if isinstance(grpc, int) and not isinstance(grpc, bool):
        name = f.get("grpc_code") or ""
        return f"grpc {name}({grpc})" if name else f"grpc {grpc}"
    return str(f.get("status"))


def print_flows(flows: Iterable[dict[str, Any]], output: str = "table") -> None:
    for f in flows:
        if output == "json":
            print(json.dumps(f, sort_keys=True), flush=True)
        elif output == "yaml":  # a stream of documents, one a flow (so -f can go on adding)
            print(yaml.safe_dump(f, explicit_start=True, sort_keys=True, allow_unicode=True), end="", flush=True)
        else:
            console.print(flow_text(f, wide=output == "wide"), soft_wrap=True, highlight=False)


class FlowFile:
    """A file followed as ``tail -F`` does: each ``lines()`` returns the complete lines added since
    the last call, reading only those bytes. Rotated away (another file at the path, or none): the
    rest of the old file, then the new one from its start. Truncated (shorter than what was read):
    from its start again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.bytes_read = 0
        self._f: IO[bytes] | None = None
        self._id: tuple[int, int] = (0, 0)
        self._partial = b""

    @property
    def identity(self) -> tuple[int, int] | None:
        """(device, inode) of the open file."""
        return self._id if self._f is not None else None

    @property
    def offset(self) -> int:
        return self._f.tell() if self._f is not None else 0

    def lines(self) -> list[bytes]:
        out: list[bytes] = []
        try:
            st = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        if self._f is not None and (st is None or (st.st_dev, st.st_ino) != self._id):
            out += self._read()  # what the agent wrote to it before it rotated it away
            if self._partial.strip():
                out.append(self._partial)
            self.close()
        if self._f is None and st is not None:
            try:
                self._f = open(self.path, "rb")  # kept open between calls: close()
            except (FileNotFoundError, NotADirectoryError):
                return out
            fs = os.fstat(self._f.fileno())
            self._id = (fs.st_dev, fs.st_ino)
        if self._f is not None:
            if os.fstat(self._f.fileno()).st_size < self._f.tell():  # truncated: the new content from its start
                self._f.seek(0)
                self._partial = b""
            out += self._read()
        return out

    def _read(self) -> list[bytes]:
        assert self._f is not None
        data = self._f.read()
        if not data:
            return []
        self.bytes_read += len(data)
        *complete, self._partial = (self._partial + data).split(b"\n")
        return [ln for ln in complete if ln.strip()]

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        self._f, self._partial = None, b""


def parse(lines: Iterable[bytes]) -> list[dict[str, Any]]:
    out = []
    for ln in lines:
        try:
            doc = json.loads(ln)
        except ValueError:  # a torn or foreign line (UnicodeDecodeError is one too)
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


def _by_time(f: dict[str, Any]) -> float:
    try:
        return float(f.get("time") or 0)
    except (TypeError, ValueError):
        return 0.0


def first_flows(tail: FlowFile) -> list[dict[str, Any]]:
    """Every flow now in the two files, oldest first; ``tail`` is left at the end of the current one.
    The current file is opened first: if it is rotated meanwhile, the old file is the one open (same
    inode) and is not read twice."""
    current = tail.lines()
    old: list[bytes] = []
    rotated = tail.path.with_suffix(".jsonl.1")
    try:
        with open(rotated, "rb") as f:
            fs = os.fstat(f.fileno())
            if (fs.st_dev, fs.st_ino) != tail.identity:
                old = f.read().splitlines()
    except (FileNotFoundError, NotADirectoryError):
        pass
    return sorted(parse(old + current), key=_by_time)


def observe(
    state_dir: StateOpt = STATE,
    pod: Annotated[str | None, typer.Option(help="flows from or to this pod (ns/name or name)")] = None,
    from_pod: Annotated[str | None, typer.Option(help="flows from this pod (ns/name or name)")] = None,
    to_pod: Annotated[str | None, typer.Option(help="flows to this pod (ns/name or name)")] = None,
    namespace: Annotated[str | None, typer.Option("--namespace", "-n", help="flows from or to this namespace")]
    = None,
    verdict: Annotated[Verdict | None, typer.Option(case_sensitive=False, help="only this verdict (any case)")] = None,
    layer: Annotated[Layer | None, typer.Option(case_sensitive=False, help="only this layer")] = None,
    protocol: Annotated[str | None, typer.Option(help="tcp, udp, http (any version), grpc, http/1.1, http/2 ...")]
    = None,
    http_status: Annotated[str | None, typer.Option(help="L7 flows with this status (403) or class (4xx)")] = None,
    http_method: Annotated[str | None, typer.Option(help="L7 flows with this method (GET, POST ...)")] = None,
    since: Annotated[str | None, typer.Option(help="flows since: 30s, 5m, 2h, 1d ago, a Unix time or an ISO time")]
    = None,
    last: Annotated[int, typer.Option(min=0, help="how many recent flows to show first (0: none; with -f, "
                                                  "only new ones)")] = 20,
    output: Annotated[FlowFormat, output_option("table (one line a flow), wide (and the date, protocol, policy, "
                                                "peer ...), json (one object a line), yaml (one document a flow)")]
    = FlowFormat.table,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="then print new flows as they come, until Ctrl-C")] = False,
    follow_for: Annotated[float, typer.Option("--follow-for", "--timeout", min=0, hidden=True,
                                              help="stop following after this many seconds (0: until Ctrl-C)")] = 0.0,
) -> None:
    """Show recent flows (like hubble observe); -f follows them."""
    try:
        q = FlowQuery.of({"pod": pod, "from_pod": from_pod, "to_pod": to_pod, "namespace": namespace,
                          "verdict": verdict.value if verdict else None, "layer": layer.value if layer else None,
                          "protocol": protocol, "status": http_status, "method": http_method, "since": since})
    except QueryError as e:
        raise typer.BadParameter(str(e), param_hint=f"'{_OPTION.get(e.key, e.key)}'") from None
    keep = q.matches
    tail = FlowFile(state_dir / "flows.jsonl")
    try:
        shown = [f for f in first_flows(tail) if keep(f)]
        print_flows(shown[-last:] if last else [], output.value)
        if not follow:
            return
        deadline = time.monotonic() + follow_for if follow_for > 0 else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(POLL_S)
            print_flows([f for f in parse(tail.lines()) if keep(f)], output.value)
    except KeyboardInterrupt:  # Ctrl-C: the way to stop following, not an error
        pass
    finally:
        tail.close()
