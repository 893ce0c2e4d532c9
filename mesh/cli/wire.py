"""`webb wire up|down`: several nodes on this machine (mesh.runtime.cluster.Wire), and the
agent command line of each node."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from mesh.cli.common import console

if TYPE_CHECKING:
    from mesh.runtime.cluster import Wire


app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Several nodes on this machine: one network namespace per node, linked by a wire.")
NodesOpt = Annotated[str, typer.Option(help="name=podCIDR,... e.g. n1=10.244.1.0/24,n2=10.244.2.0/24")]


def _nodes(spec: str) -> list[tuple[str, str]]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, cidr = item.partition("=")
        if not sep or not name or not cidr:
            raise typer.BadParameter(f"{item!r}: use name=podCIDR, e.g. n1=10.244.1.0/24", param_hint="--nodes")
        out.append((name, cidr))
    if len(out) < 2:
        raise typer.BadParameter("a wire links two nodes or more", param_hint="--nodes")
    return out


def _wire(nodes: str, prefix: str, cluster_cidr: str) -> Wire:
    from mesh.runtime.cluster import Wire  # netlink (pyroute2): imported when used, `webb` starts fast

    try:
        return Wire(_nodes(nodes), prefix=prefix, cluster_cidr=cluster_cidr)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--nodes") from None


@app.command()
def up(nodes: NodesOpt = "n1=10.244.1.0/24,n2=10.244.2.0/24", prefix: str = "webb",
       cluster_cidr: str = "10.244.0.0/16", root: Annotated[Path, typer.Option(help="state of every node")] = Path("/run/webb-nodes"),
       ) -> None:
    """Make the node namespaces and the wire; print each node's agent command."""
    w = _wire(nodes, prefix, cluster_cidr)
    w.setup()
    manifests, cluster_dir, ca = root / "manifests", root / "cluster", root / "ca"
    console.print(escape(f"wire {w.netns} ({w.wire_cidr}); start one agent per node:"))
    for n in w:
        argv = ["webb", "agent", "--node", n.name, "--node-netns", n.netns, "--pod-cidr", n.pod_cidr,
                "--cluster-cidr", cluster_cidr, "--cluster-dir", str(cluster_dir), "--wire-ip", n.wire_ip,
                "--ca-dir", str(ca), "--state-dir", str(root / n.name), "--manifests", str(manifests)]
        console.print(escape(shlex.join(argv) + " &"), soft_wrap=True)
    console.print(escape(f"then: webb apply --state-dir {root} --wait 0 -f FILE (pods need spec.nodeName); "
                  f"webb status --state-dir {root}/<node>; webb exec --node <node> --state-dir {root}/<node> POD -- CMD"),
                  soft_wrap=True)


@app.command()
def down(nodes: NodesOpt = "n1=10.244.1.0/24,n2=10.244.2.0/24", prefix: str = "webb",
         cluster_cidr: str = "10.244.0.0/16") -> None:
    """Remove the node namespaces and the wire (stop the agents first)."""
    _wire(nodes, prefix, cluster_cidr).teardown()
    console.print("wire removed")
