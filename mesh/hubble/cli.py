"""`webb hubble serve`: Hubble's Observer API over one node's flows, or several nodes' (one view, as
Hubble Relay gives), for `hubble observe --server 127.0.0.1:4245`. grpc and the stubs are loaded by
the command only: `webb` itself never pays for them."""

from __future__ import annotations

import ipaddress
import logging
import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from mesh.cli.common import STATE, err
from mesh.status import STATUS_FILE

app = typer.Typer(help="Hubble's Observer API over Webb's flows (the hubble CLI, Hubble UI).", no_args_is_help=True)
DEFAULT_LISTEN = "127.0.0.1:4245"  # Hubble's own port


def parse_listen(value: str) -> tuple[str, int]:
    """"127.0.0.1:4245", "[::1]:4245" -> (address, port); a clear error for anything else."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        addr = None
    if not sep or addr is None or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise typer.BadParameter(f"{value!r}: use ADDRESS:PORT, e.g. {DEFAULT_LISTEN} or [::1]:4245", param_hint="--listen")
    return str(addr), int(port)


def expand(dirs: list[Path]) -> list[Path]:
    """Each dir as given when it is a node's (its status.json or flows.jsonl there); a directory above
    nodes (`webb wire up`'s root) as every node under it."""
    out: list[Path] = []
    for d in dirs:
        if (d / STATUS_FILE).is_file() or (d / "flows.jsonl").is_file():
            out.append(d)
            continue
        nodes = sorted(c for c in d.iterdir() if c.is_dir() and (c / STATUS_FILE).is_file())
        out += nodes or [d]  # nothing yet: the node's agent has not started; its flows will come here
    return list(dict.fromkeys(out))


@app.command()
def serve(
    state_dir: Annotated[list[Path] | None, typer.Option(
        "--state-dir", help="a node's agent state dir (its flows.jsonl), or the directory above several (webb wire "
                            "up's); repeat it for one view over several nodes "
                            f"(default {STATE})")] = None,
    listen: Annotated[str, typer.Option(help="ADDRESS:PORT to serve on (no TLS, no authentication: keep it on "
                                             "loopback unless the network is trusted)")] = DEFAULT_LISTEN,
    max_flows: Annotated[int, typer.Option(min=1, max=1 << 20, help="flows kept in memory (Hubble's ring buffer)")] = 4095,
    lifetime: Annotated[float, typer.Option(min=0, help="stop by itself after this many seconds (0: until stopped)")] = 0.0,
) -> None:
    """Serve Hubble's Observer API (GetFlows, ServerStatus, GetNodes) over the node's flows, for the hubble CLI."""
    dirs = state_dir or [STATE]
    for d in dirs:
        if not d.is_dir():
            err.print(f"[red]error:[/] {escape(str(d))}: not a directory (an agent's --state-dir)", highlight=False)
            raise typer.Exit(1)
    dirs = expand(dirs)
    host, port = parse_listen(listen)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from mesh.hubble.server import serve as start  # grpc and the stubs: loaded here only
    from mesh.hubble.store import Store

    store = Store(dirs, max_flows=max_flows)
    store.start()
    try:
        server = start(store, f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    except OSError as e:
        store.stop()
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(1) from None
    done = threading.Event()

    def stop(_sig: int, _frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    names = ", ".join(f"{n.name} ({n.state_dir})" for n in store.nodes)
    num, _ = store.counts()
    err.print(escape(f"Hubble API on {listen}: {num} flows of {names}; hubble observe --server {listen}"), highlight=False)
    try:
        done.wait(lifetime if lifetime > 0 else None)
    finally:
        server.stop(grace=1).wait(5)
        store.stop()
