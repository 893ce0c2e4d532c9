"""`webb hubble serve`: Hubble's Observer API over one node's flows, or several nodes' (one view, as
Hubble Relay gives), for `hubble observe --server 127.0.0.1:4245`; `webb hubble relay`: one API over
several machines' `webb hubble serve` (mesh.hubble.relay). grpc and the stubs are loaded by the
commands only: `webb` itself never pays for them."""

from __future__ import annotations

import ipaddress
import logging
import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from typer._click.exceptions import MissingParameter  # typer's own click (typer.BadParameter's)

from mesh.cli.common import STATE, err
from mesh.status import STATUS_FILE

app = typer.Typer(help="Hubble's Observer API over Webb's flows (the hubble CLI, Hubble UI).", no_args_is_help=True)
DEFAULT_LISTEN = "127.0.0.1:4245"  # Hubble's own port


def parse_listen(value: str, flag: str = "--listen") -> tuple[str, int]:
    """"127.0.0.1:4245", "[::1]:4245" -> (address, port); a clear error (naming ``flag``) for anything else."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        addr = None
    if not sep or addr is None or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise typer.BadParameter(f"{value!r}: use ADDRESS:PORT, e.g. {DEFAULT_LISTEN} or [::1]:4245", param_hint=flag)
    return str(addr), int(port)


def join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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


def _wait(lifetime: float) -> None:
    """Until SIGTERM/SIGINT, or ``lifetime`` seconds (0: no end)."""
    done = threading.Event()

    def stop(_sig: int, _frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    done.wait(lifetime if lifetime > 0 else None)


def parse_dns(value: str) -> tuple[str, int]:
    """"webb-hubble-peer.webb-system.svc.cluster.local:4244" -> (name, port); a clear error otherwise."""
    name, sep, port = value.rpartition(":")
    labels = name.rstrip(".").split(".")
    if (not sep or not port.isdigit() or not 1 <= int(port) <= 65535 or len(name) > 253
            or not all(lb and len(lb) <= 63 and lb.replace("-", "").replace("_", "").isalnum() and lb.isascii()
                       and not lb.startswith("-") and not lb.endswith("-") for lb in labels)):
        raise typer.BadParameter(f"{value!r}: use NAME:PORT, e.g. webb-hubble-peer.webb-system.svc.cluster.local:4244",
                                 param_hint="--peers-dns")
    return name, int(port)


@app.command()
def relay(
    peer: Annotated[list[str] | None, typer.Option(
        "--peer", metavar="ADDRESS:PORT", help="a node's `webb hubble serve`; repeat it for every node")] = None,
    peers_dns: Annotated[str | None, typer.Option(
        "--peers-dns", metavar="NAME:PORT", help="the peers are every address of NAME (A and AAAA records, e.g. a headless "
                                                 "Service over the nodes' `webb hubble serve`) at PORT, resolved again "
                                                 "every --dns-interval seconds: nodes that come and go are followed")] = None,
    dns_interval: Annotated[float, typer.Option(min=1, max=3600, help="seconds between two resolutions of "
                                                                       "--peers-dns")] = 5.0,
    listen: Annotated[str, typer.Option(help="ADDRESS:PORT to serve on (no TLS, no authentication: keep it on "
                                             "loopback unless the network is trusted)")] = DEFAULT_LISTEN,
    peer_timeout: Annotated[float, typer.Option(min=0.1, max=3600, help="seconds a peer has to answer a call "
                                                                         "(all its flows, without --follow)")] = 10.0,
    lifetime: Annotated[float, typer.Option(min=0, help="stop by itself after this many seconds (0: until stopped)")] = 0.0,
) -> None:
    """One Observer API over every node's (as Hubble Relay): the hubble CLI sees all nodes' flows at once."""
    host, port = parse_listen(listen)
    if not peer and not peers_dns:
        raise MissingParameter("give the nodes' `webb hubble serve` as --peer ADDRESS:PORT (repeated), or "
                               "--peers-dns NAME:PORT", param_type="option", param_hint="'--peer'")
    if peer and peers_dns:
        raise typer.BadParameter("give the nodes' `webb hubble serve` as --peer ADDRESS:PORT (repeated), or --peers-dns "
                                 "NAME:PORT; one of the two", param_hint="--peer/--peers-dns")
    dns = parse_dns(peers_dns) if peers_dns else None
    peers: list[str] = []
    for value in peer or []:
        p_host, p_port = parse_listen(value, "--peer")
        here = ipaddress.ip_address(p_host).is_loopback or ipaddress.ip_address(p_host).is_unspecified
        if p_port == port and (p_host == host or (ipaddress.ip_address(host).is_unspecified and here)):
            raise typer.BadParameter(f"{value!r} is the relay's own --listen address: give it the nodes' "
                                     "`webb hubble serve` addresses", param_hint="--peer")
        peers.append(join(p_host, p_port))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from mesh.hubble.relay import PeerWatch, serve_relay  # grpc and the stubs: loaded here only

    try:
        server, servicer = serve_relay(peers, join(host, port), peer_timeout_s=peer_timeout, dynamic=dns is not None)
    except OSError as e:
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(1) from None
    watch = PeerWatch(servicer, *dns, interval_s=dns_interval).start() if dns else None
    over = f"the addresses of {peers_dns} (every {dns_interval:g} s)" if dns else ", ".join(dict.fromkeys(peers))
    err.print(escape(f"Hubble Relay on {listen} over {over}; hubble observe --server {listen}"), highlight=False)
    try:
        _wait(lifetime)
    finally:
        if watch is not None:
            watch.stop()
        server.stop(grace=1).wait(5)
        servicer.close()
