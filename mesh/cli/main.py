"""The `webb` command."""

from __future__ import annotations

import ipaddress
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from mesh.cli.apply import apply, delete
from mesh.cli.certs import app as certs_app
from mesh.cli.common import STATE, StateOpt, TableFormat, console, dump, err, output_option, version
from mesh.cli.get import get
from mesh.cli.observe import observe
from mesh.cli.status import status
from mesh.cli.ui import ui
from mesh.cli.wire import app as wire_app
from mesh.hubble.cli import app as hubble_app
from mesh.manifests import ManifestError

app = typer.Typer(add_completion=True, no_args_is_help=True, help="Webb: a sidecar-free service mesh.")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "starwars"
POD_CIDR = "10.244.0.0/24"


def _show_version(value: bool) -> None:
    if value:
        print(f"webb {version()}")
        raise typer.Exit()


@app.callback()
def _webb(_version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                                 help="print the version and exit")] = False) -> None:
    """Webb: a sidecar-free service mesh."""


def _addresses(values: list[str]) -> tuple[str, ...]:
    out = []
    for v in values:
        try:
            out.append(str(ipaddress.ip_address(v)))
        except ValueError:
            raise typer.BadParameter(f"{v!r} is not an IP address; e.g. --gateway-address 192.0.2.10",
                                     param_hint="--gateway-address") from None
    return tuple(dict.fromkeys(out))


@app.command()
def agent(
    state_dir: StateOpt = STATE,
    manifests: Annotated[Path | None, typer.Option(help="watched manifest directory")] = None,
    node: str = "node1",
    pod_cidr: Annotated[str, typer.Option(help=f"this node's pod CIDR (default {POD_CIDR}; with --kube: the Node's "
                                                "spec.podCIDRs)")] = "",
    service_cidr: str = "10.96.0.0/16",
    envoy_admin_port: int = 15000,
    envoy_concurrency: int = 1,
    envoy_log_level: str = "warning",
    xds: Annotated[str, typer.Option(help="xDS protocol to Envoy: delta (incremental) or sotw")] = "delta",
    envoy_all_stats: Annotated[bool, typer.Option(help="keep every Envoy stat (default: config plane and server)")] = False,
    lifetime: Annotated[float, typer.Option(min=0.0, help="stop by itself after this many seconds (default 0: run until "
                                                         "stopped, SIGTERM or Ctrl-C)")] = 0.0,
    sockmap: Annotated[bool, typer.Option(help="same-node acceleration, on only if its self-test passes")] = False,
    ingress_http_port: Annotated[int, typer.Option(help="Ingress (class webb) HTTP listener on 127.0.0.1")] = 80,
    ingress_https_port: Annotated[int, typer.Option(help="Ingress (class webb) HTTPS listener on 127.0.0.1")] = 443,
    gateway_address: Annotated[list[str] | None, typer.Option(
        help="an address this node's Envoy serves Gateways (class webb) on; repeat it for more (Gateways that share a "
             "port need one each); default 127.0.0.1")] = None,
    kube: Annotated[str | None, typer.Option(help="read objects from the API server: a kubeconfig, or in-cluster")] = None,
    kubelet_cgroup_root: Annotated[Path | None, typer.Option(help="with --kube: kubelet's cgroupRoot in the cgroup2 "
                                                                  "hierarchy (default: the cgroup2 mount, kubelet's '/')")] = None,
    cgroup_driver: Annotated[str, typer.Option(help="with --kube: kubelet's cgroupDriver (cgroupfs or systemd)")] = "cgroupfs",
    bridge: Annotated[str, typer.Option(help="the node's bridge")] = "webb0",
    node_netns: Annotated[str, typer.Option(help="run the node in this network namespace (one of /var/run/netns, "
                                                 "e.g. made by mesh.runtime.cluster.Wire); default: the host's")] = "",
    cluster_cidr: Annotated[str, typer.Option(help="the supernet of every node's pod CIDR: pods route it via their node")] = "",
    cluster_dir: Annotated[Path | None, typer.Option(help="several nodes: where they publish their pods (nodes/<node>.json); "
                                                          "pods then need spec.nodeName")] = None,
    wire_ip: Annotated[str, typer.Option(help="this node's address between nodes, published in the cluster dir; "
                                              "the mTLS tunnel listens there (port 15008)")] = "",
    ca_dir: Annotated[Path | None, typer.Option(help="the mesh CA every node shares (ca.crt, ca.key 0600, root.crt for a "
                                                     "user intermediate); made on first use; default <state-dir>/ca")] = None,
    trust_domain: Annotated[str, typer.Option(help="SPIFFE trust domain of workload identities")] = "cluster.local",
    metrics_address: Annotated[str, typer.Option(help="serve Prometheus metrics on HOST:PORT/metrics (docs/metrics.md); "
                                                      "'off' for none")] = "127.0.0.1:9962",
) -> None:
    """Run the node agent on this machine (the embedded default), or on the API server's objects (--kube)."""
    from mesh.agent.loop import Agent, AgentConfig  # BPF, Envoy, netlink: loaded by the agent only
    from mesh.runtime.local import NodeConfig, enter_netns
    if node_netns:  # first: threads started from here on (gRPC, Envoy's supervisor) inherit it
        enter_netns(node_netns)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if xds not in ("delta", "sotw"):
        raise typer.BadParameter(f"{xds!r}: use delta or sotw", param_hint="--xds")
    from mesh.agent.metrics import parse_address
    try:
        parse_address(metrics_address)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--metrics-address") from None
    cfg = AgentConfig(
        node=NodeConfig(name=node, bridge=bridge, pod_cidr=pod_cidr or POD_CIDR, service_cidr=service_cidr, state_dir=state_dir,
                        netns=node_netns, cluster_cidr=cluster_cidr),
        manifests=manifests or state_dir / "manifests", envoy_admin_port=envoy_admin_port,
        envoy_concurrency=envoy_concurrency, envoy_log_level=envoy_log_level, lifetime_s=lifetime,
        sockmap=sockmap, xds_delta=xds == "delta", envoy_all_stats=envoy_all_stats, ingress_http_port=ingress_http_port,
        ingress_https_port=ingress_https_port, gateway_addresses=_addresses(gateway_address or ["127.0.0.1"]),
        cluster_dir=cluster_dir, wire_ip=wire_ip,
        ca_dir=ca_dir, trust_domain=trust_domain, metrics_address=metrics_address,
    )
    if kube:
        if cluster_dir is not None:
            raise typer.BadParameter("with --kube, pod IPs of other nodes come from the API server; "
                                     "--cluster-dir is for the manifest directory", param_hint="--cluster-dir")
        if sockmap or node_netns:
            raise typer.BadParameter("kubelet runs the pods of a cluster node: --sockmap's self-test pods and "
                                     "--node-netns are the embedded mode's", param_hint="--kube")
        from mesh.agent.kube import run_agent  # the kubernetes client: only paid for in a cluster

        run_agent(cfg, kube, kubelet_cgroup_root, cgroup_driver, pod_cidr_from_node=not pod_cidr)
        return
    Agent(cfg).run()


app.command()(apply)  # mesh/cli/apply.py: one file per object (kind, namespace, name), like kubectl
app.command()(delete)
app.command()(get)  # mesh/cli/get.py: pods, services, policies, routes


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec(  # noqa: A001 - like kubectl exec
    ctx: typer.Context,
    pod: Annotated[str, typer.Argument(help="namespace/name or name (namespace default)")],
    node: Annotated[str | None, typer.Option(help="the pod's node (default: the one the state dir names, else node1)")] = None,
    state_dir: StateOpt = STATE,
) -> None:
    """Run a command inside a pod (its netns and cgroup): webb exec tiefighter -- curl ..."""
    from mesh.cli.statedir import StateDirError, node_of
    from mesh.runtime.local import LocalNode, NodeConfig, pod_sandbox
    key = pod if "/" in pod else f"default/{pod}"
    if not ctx.args:
        raise typer.BadParameter("give the command to run after --, e.g. webb exec tiefighter -- curl ...", param_hint="COMMAND")
    try:
        name, node_dir = node_of(state_dir, node)
        cfg = NodeConfig(name=name, state_dir=node_dir)
        sb = pod_sandbox(cfg, key)
    except (LookupError, StateDirError) as e:
        err.print(f"[red]error:[/] {escape(str(e))}")
        raise typer.Exit(1) from None
    proc = LocalNode(cfg).spawn(sb, ctx.args, stdout=None, stderr=None)
    raise typer.Exit(proc.wait())


app.command()(observe)  # mesh/cli/observe.py
app.command()(status)  # mesh/cli/status.py
app.command()(ui)  # mesh/cli/ui.py: the service map in a browser (mesh/ui)


def doctor_probes() -> list[Any]:
    """The datapath's kernel probes, and kTLS (the tunnel's: the TLS ULP on a loopback socket)."""
    from datapath import probes
    from tunnel.ktls import ktls_probe

    ok, why = ktls_probe()
    return [*probes.run(), probes.Probe("kTLS (TCP_ULP tls)", ok, why if ok else f"{why}: the mTLS tunnel falls back to "
                                        "user-space TLS", required=False)]


@app.command()
def doctor(output: Annotated[TableFormat, output_option("table, json or yaml")] = TableFormat.table) -> None:
    """Probe the kernel for what the datapath needs; exit 1 if something required is missing."""
    results = doctor_probes()
    if output is not TableFormat.table:
        dump([vars(p) for p in results], output.value)
    else:
        for p in results:
            mark = "[green]ok     [/]" if p.ok else ("[red]MISSING[/]" if p.required else "[yellow]absent [/]")
            console.print(f"{mark} {escape(p.name)}: {escape(p.detail)}", highlight=False, soft_wrap=True)
    raise typer.Exit(0 if all(p.ok or not p.required for p in results) else 1)


datapath_app = typer.Typer(help="The node's eBPF datapath.", no_args_is_help=True)
node_app = typer.Typer(help="The local node (bridge, pods).", no_args_is_help=True)
app.add_typer(datapath_app, name="datapath")
app.add_typer(node_app, name="node")
app.add_typer(certs_app, name="certs")  # mesh/cli/certs.py: webb certs, webb certs ca
app.add_typer(wire_app, name="wire")  # mesh/cli/wire.py: several nodes on this machine
app.add_typer(hubble_app, name="hubble")  # mesh/hubble/cli.py: Hubble's Observer API (webb hubble serve)


@datapath_app.command("cleanup")
def datapath_cleanup(node: str = "node1") -> None:
    """Detach the programs and remove every pin of NODE (the agent must not be running)."""
    from datapath.loader import cleanup, pin_dir_for
    from mesh.runtime.local import NodeConfig
    removed = cleanup(pin_dir_for(node), str(NodeConfig(name=node).pods_cgroup))
    console.print(escape(f"removed {len(removed)} pins of node {node}" + (f": {', '.join(removed)}" if removed else "")))


@node_app.command("cleanup")
def node_cleanup(node: str = "node1", state_dir: StateOpt = STATE, bridge: str = "webb0",
                 service_cidr: str = "10.96.0.0/16",
                 node_netns: Annotated[str, typer.Option(help="the node's network namespace, as given to the agent")] = "",
                 ) -> None:
    """Remove what a killed agent left: pods (their processes, netns, cgroups), bridge, pins."""
    from datapath.loader import cleanup, pin_dir_for
    from mesh.runtime.local import LocalNode, NodeConfig
    n = LocalNode(NodeConfig(name=node, bridge=bridge, service_cidr=service_cidr, state_dir=state_dir, netns=node_netns))
    n.teardown()
    removed = cleanup(pin_dir_for(node))
    console.print(escape(f"node {node} removed ({len(removed)} BPF pins)"))


@app.command()
def demo(
    example: Annotated[Path, typer.Argument(help="example directory")] = EXAMPLE,
    state_dir: StateOpt = STATE,
    screenshot: Annotated[Path | None, typer.Option(help="then write a PNG of `webb ui` here (needs Chromium; "
                                                         "skipped, saying why, without it)")] = None,
) -> None:
    """Run the Star Wars demo end to end on this machine and check its outcomes."""
    from mesh.cli.demo import run_starwars

    raise typer.Exit(run_starwars(example, state_dir, screenshot=screenshot))


def main() -> None:
    try:
        app()
    except (OSError, RuntimeError, ManifestError) as e:
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
