"""The `webb` command."""

from __future__ import annotations

import copy
import ipaddress
import logging
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.markup import escape

from mesh.cli.certs import app as certs_app
from mesh.cli.common import STATE, StateOpt, TableFormat, console, dump, err, output_option, version, wait_converged
from mesh.cli.observe import observe
from mesh.cli.status import status
from mesh.cli.wire import app as wire_app
from mesh.manifests import ManifestError, parse_object, read_documents
from mesh.state import key_name, key_of

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
    lifetime: Annotated[float, typer.Option(help="stop by itself after this many seconds (0: run until stopped)")] = 0.0,
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
) -> None:
    """Run the node agent on this machine (the embedded default), or on the API server's objects (--kube)."""
    from mesh.agent.loop import Agent, AgentConfig  # BPF, Envoy, netlink: loaded by the agent only
    from mesh.runtime.local import NodeConfig, enter_netns
    if node_netns:  # first: threads started from here on (gRPC, Envoy's supervisor) inherit it
        enter_netns(node_netns)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if xds not in ("delta", "sotw"):
        raise typer.BadParameter(f"{xds!r}: use delta or sotw", param_hint="--xds")
    cfg = AgentConfig(
        node=NodeConfig(name=node, bridge=bridge, pod_cidr=pod_cidr or POD_CIDR, service_cidr=service_cidr, state_dir=state_dir,
                        netns=node_netns, cluster_cidr=cluster_cidr),
        manifests=manifests or state_dir / "manifests", envoy_admin_port=envoy_admin_port,
        envoy_concurrency=envoy_concurrency, envoy_log_level=envoy_log_level, lifetime_s=lifetime,
        sockmap=sockmap, xds_delta=xds == "delta", envoy_all_stats=envoy_all_stats, ingress_http_port=ingress_http_port,
        ingress_https_port=ingress_https_port, gateway_addresses=_addresses(gateway_address or ["127.0.0.1"]),
        cluster_dir=cluster_dir, wire_ip=wire_ip,
        ca_dir=ca_dir, trust_domain=trust_domain,
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


def _validate(path: Path) -> tuple[list[str], list[tuple[Path, dict[str, Any]]]]:
    """Every object of ``path`` checked; returns their names ("Kind ns/name") and the documents (read
    once). One object twice (in one file or two) is refused: YAML and a directory would keep only
    the last, silently."""
    seen: dict[str, str] = {}
    docs = read_documents(path)
    for f, doc in docs:
        try:
            parse_object(doc, base_dir=f.parent)
        except ManifestError as e:
            raise ManifestError(f"{e.where} ({f.name})", e.field, e.problem) from None
        where = _name_of(doc)
        if where in seen:
            raise ManifestError(f"{where} ({f.name})", "metadata.name", f"this object is also in {seen[where]}: "
                                "only one would be kept; remove one or rename it")
        seen[where] = f.name
    return list(seen), docs


_Dumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's emitter when there


def _name_of(doc: dict[str, Any]) -> str:
    return key_name(key_of(str(doc.get("kind")), doc))


def _absolute_paths(doc: dict[str, Any], base: Path) -> dict[str, Any]:
    if doc.get("kind") == "Pod":
        for c in (doc.get("spec") or {}).get("containers") or []:
            for k in ("command", "args"):
                c[k] = [str((base / a).resolve()) if isinstance(a, str) and a.startswith("./") else a
                        for a in c.get(k) or []]
    return doc


def _dest(manifests: Path, f: Path) -> Path:
    return manifests / f.name


@app.command()
def apply(
    file: Annotated[Path, typer.Option("-f", "--filename", exists=True, help="YAML file or directory")],
    state_dir: StateOpt = STATE,
    wait: Annotated[float, typer.Option(help="seconds to wait for the agent to apply (0: don't)")] = 30.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="validate only (no agent needed); non-zero on any error")] = False,
) -> None:
    """Validate manifests and hand them to the agent's watched directory."""
    manifests = state_dir / "manifests"
    try:
        names, docs = _validate(file)
    except ManifestError as e:
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(1) from None
    if dry_run:
        console.print(f"{escape(str(file))}: {len(names)} object(s) valid (dry run: nothing applied)")
        return
    manifests.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in file.iterdir() if p.suffix in (".yaml", ".yml")) if file.is_dir() else [file]
    for f in files:
        # store the objects as applied: paths in Pod commands made absolute (like a build
        # context), since the watched directory is not where the file came from; a file without
        # such paths is stored as it was given (comments kept)
        mine = [d for g, d in docs if g == f]
        fixed = [_absolute_paths(copy.deepcopy(d), f.parent) for d in mine]
        tmp = manifests / f".{f.name}.tmp"
        if fixed == mine:
            shutil.copyfile(f, tmp)
        else:
            tmp.write_text(yaml.dump_all(fixed, Dumper=_Dumper, sort_keys=False))
        tmp.replace(_dest(manifests, f))
        console.print(f"{escape(f.name)} applied")
    _after_change(state_dir, manifests, wait, names)


@app.command()
def delete(
    file: Annotated[Path, typer.Option("-f", "--filename", help="a file applied before")],
    state_dir: StateOpt = STATE,
    wait: float = 30.0,
) -> None:
    """Remove manifests applied from FILE (by file name)."""
    manifests = state_dir / "manifests"
    files = sorted(p for p in file.iterdir() if p.suffix in (".yaml", ".yml")) if file.is_dir() else [file]
    for f in files:
        target = _dest(manifests, f)
        if target.exists():
            target.unlink()
            console.print(f"{escape(f.name)} deleted")
        else:
            err.print(f"{escape(f.name)}: not applied")
    _after_change(state_dir, manifests, wait)


def _after_change(state_dir: Path, manifests: Path, wait: float, names: list[str] | None = None) -> None:
    """Wait for the agent. The agent refusing what was just applied, or Envoy refusing the plan, fails
    the command; the node's other problems (a backend missing, an Ingress of another class) are warnings."""
    if wait <= 0:
        return
    try:
        st = wait_converged(state_dir, manifests, wait)
    except TimeoutError as e:
        err.print(f"[red]error:[/] {escape(str(e))}")
        raise typer.Exit(1) from None
    refused = [n for n in names or () if n in st.refused]  # by the source, or quarantined after Envoy's NACK
    plan_refused = any("not applied" in p for p in st.errors)  # Envoy refused the node's whole plan
    for problem in st.errors:
        mine = (plan_refused and problem.startswith("Envoy ")) or any(problem.startswith(f"{n}:") for n in refused)
        err.print(f"[red]error:[/] {escape(problem)}" if mine else f"[yellow]warning:[/] {escape(problem)}", highlight=False)
    if refused or plan_refused:
        raise typer.Exit(1)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec(  # noqa: A001 - like kubectl exec
    ctx: typer.Context,
    pod: Annotated[str, typer.Argument(help="namespace/name or name (namespace default)")],
    node: str = "node1",
    state_dir: StateOpt = STATE,
) -> None:
    """Run a command inside a pod (its netns and cgroup): webb exec tiefighter -- curl ..."""
    from mesh.runtime.local import LocalNode, NodeConfig, pod_sandbox
    key = pod if "/" in pod else f"default/{pod}"
    cfg = NodeConfig(name=node, state_dir=state_dir)
    try:
        sb = pod_sandbox(cfg, key)
    except LookupError as e:
        err.print(f"[red]error:[/] {escape(str(e))}")
        raise typer.Exit(1) from None
    proc = LocalNode(cfg).spawn(sb, ctx.args, stdout=None, stderr=None)
    raise typer.Exit(proc.wait())


app.command()(observe)  # mesh/cli/observe.py
app.command()(status)  # mesh/cli/status.py


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
) -> None:
    """Run the Star Wars demo end to end on this machine and check its outcomes."""
    from mesh.cli.demo import run_starwars

    raise typer.Exit(run_starwars(example, state_dir))


def main() -> None:
    try:
        app()
    except (OSError, RuntimeError, ManifestError) as e:
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
