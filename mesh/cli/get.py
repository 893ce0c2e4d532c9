"""`webb get pods|services|policies|routes`: the objects of the agent's manifest directory with what
the agent reports of them (status.json): pod IPs, service VIPs and backends, and each object's
state — Applied (or Running, a pod), Pending (the agent has not applied the directory's version
yet), Refused (by the agent: its previous version stays), Quarantined (Envoy refused it),
Invalid (it does not validate).

Everything shown comes from manifests or the agent and is printed as rich ``Text`` (never markup);
-o json|yaml print a kubectl-like List: each stored object, its ``status`` what Webb reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from mesh.cli.apply import target_of
from mesh.cli.common import STATE, StateOpt, console, dump, err, output_option
from mesh.cli.manifests_store import ManifestStore, Stored
from mesh.manifests import ManifestError, parse_object
from mesh.model import NAMESPACE_LABEL, MeshPolicy, Pod, Route, Selector, Service
from mesh.source import allocate_vips, directory_version
from mesh.status import AgentStatus


class GetFormat(StrEnum):
    table = "table"
    wide = "wide"
    json = "json"
    yaml = "yaml"


# what `webb get` takes (kubectl's plural, singular and short names) -> the resource
RESOURCES = {
    "pods": "pods", "pod": "pods", "po": "pods",
    "services": "services", "service": "services", "svc": "services",
    "policies": "policies", "policy": "policies", "meshpolicies": "policies", "meshpolicy": "policies", "mp": "policies",
    "routes": "routes", "route": "routes", "httproutes": "routes", "httproute": "routes",
}
KINDS = {"pods": ("Pod",), "services": ("Service",), "policies": ("MeshPolicy",),
         "routes": ("HTTPRoute", "GRPCRoute", "TLSRoute", "MeshRoute")}
APPLIED, RUNNING, PENDING, REFUSED, QUARANTINED, INVALID = "Applied", "Running", "Pending", "Refused", "Quarantined", "Invalid"
_COLOUR = {RUNNING: "green", APPLIED: "green", PENDING: "yellow", REFUSED: "red", QUARANTINED: "red", INVALID: "red"}


@dataclass
class Node:
    """What the agents of the target report, merged (several nodes may read one directory)."""

    statuses: list[AgentStatus] = field(default_factory=list)
    current: bool = False  # every agent applied the directory's current version

    def pod(self, key: str) -> tuple[str, Any] | None:
        for st in self.statuses:
            if key in st.pods:
                return st.node, st.pods[key]
        return None

    def refused(self, name: str) -> tuple[str, str] | None:
        """(Quarantined or Refused, why) when an agent refused ``name`` ("Kind ns/name"), else None."""
        for st in self.statuses:
            if name in st.quarantined:
                return QUARANTINED, st.quarantined[name]
            if name in st.refused:
                return REFUSED, next((e.split(": ", 1)[-1] for e in st.errors if e.startswith(f"{name}:")), "")
        return None

    def backends(self, vip: str, port: int) -> int | None:
        found = [s.backends for st in self.statuses for s in st.services if s.vip == vip and s.port == port]
        return max(found) if found else None


def _state(name: str, obj: Any, node: Node, running: bool | None = None) -> tuple[str, str]:
    """(state, why) of one object; ``running``: a pod's, whether an agent runs it."""
    if isinstance(obj, ManifestError):
        return INVALID, str(obj)
    refused = node.refused(name)
    if refused:
        return refused
    if running is not None:
        return (RUNNING if running else PENDING), ""
    return (APPLIED if node.current else PENDING), ""


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    return ",".join(f"{k}={v}" for k, v in pairs if k not in (NAMESPACE_LABEL, f"k8s:{NAMESPACE_LABEL}")) or "<none>"


def _selector(s: Selector) -> str:
    exprs = [f"{r.key} {r.operator}" + (f" ({','.join(r.values)})" if r.values else "") for r in s.match_expressions]
    text = ",".join([_labels(s.match_labels)] if s.match_labels else []) + ("," if s.match_labels and exprs else "")
    return (text + ",".join(exprs)) or "<all>"


def _row(s: Stored, obj: Any, node: Node, vips: dict[str, Service]) -> dict[str, Any]:
    kind, ns, name = s.key
    row: dict[str, Any] = {"namespace": ns, "name": name, "kind": kind}
    if kind == "Pod":
        where = node.pod(f"{ns}/{name}")
        row["status"], row["message"] = _state(s.name, obj, node, running=where is not None)
        row["ip"] = where[1].ip if where else ""
        row["ip6"] = where[1].ip6 if where else ""
        spec = s.doc.get("spec")
        row["node"] = where[0] if where else str(spec.get("nodeName") or "") if isinstance(spec, dict) else ""
        row["labels"] = _labels(obj.labels) if isinstance(obj, Pod) else ""
    elif kind == "Service":
        row["status"], row["message"] = _state(s.name, obj, node)
        svc = vips.get(f"{ns}/{name}", obj if isinstance(obj, Service) else None)
        row["cluster_ip"] = ("None" if svc.headless else svc.cluster_ip) if svc else ""
        row["cluster_ip6"] = svc.cluster_ip6 if svc else ""
        row["ports"] = ",".join(f"{p.port}/{p.protocol}" for p in svc.ports) if svc else ""
        counts = [node.backends(svc.cluster_ip, p.port) for p in svc.ports] if svc and svc.cluster_ip else []
        row["backends"] = ",".join("-" if c is None else str(c) for c in counts)
        row["selector"] = _labels(svc.selector) if svc else ""
    elif kind == "MeshPolicy":
        row["status"], row["message"] = _state(s.name, obj, node)
        p = obj if isinstance(obj, MeshPolicy) else None
        row["mode"] = p.mode if p else ""
        row["selector"] = _selector(p.endpoint_selector) if p else ""
        row["rules"] = len(p.ingress) if p else 0
        row["l7"] = bool(p and any(tp.http is not None for r in p.ingress for tp in r.to_ports))
    else:
        row["status"], row["message"] = _state(s.name, obj, node)
        r = obj if isinstance(obj, Route) else None
        row["hostnames"] = ",".join(r.hostnames) if r else ""
        row["parents"] = ",".join(f"{p.kind}/{p.name}" + (f":{p.port}" if p.port else "") for p in r.parents) if r else ""
        row["backends"] = ",".join(dict.fromkeys(b.name + (f":{b.port}" if b.port else "") for rule in r.rules
                                                 for b in rule.backends)) if r else ""
        row["rules"] = len(r.rules) if r else 0
    row["from"] = s.source
    return row


# resource -> columns (header, row key), then the ones -o wide adds
COLUMNS: dict[str, tuple[list[tuple[str, str]], list[tuple[str, str]]]] = {
    "pods": ([("NAME", "name"), ("STATUS", "status"), ("IP", "ip"), ("NODE", "node")],
             [("IPV6", "ip6"), ("LABELS", "labels"), ("MESSAGE", "message"), ("FROM", "from")]),
    "services": ([("NAME", "name"), ("CLUSTER-IP", "cluster_ip"), ("PORT(S)", "ports"), ("BACKENDS", "backends"),
                  ("STATUS", "status")],
                 [("CLUSTER-IPV6", "cluster_ip6"), ("SELECTOR", "selector"), ("MESSAGE", "message"), ("FROM", "from")]),
    "policies": ([("NAME", "name"), ("MODE", "mode"), ("SELECTOR", "selector"), ("RULES", "rules"), ("STATUS", "status")],
                 [("L7", "l7"), ("MESSAGE", "message"), ("FROM", "from")]),
    "routes": ([("NAME", "name"), ("KIND", "kind"), ("PARENTS", "parents"), ("HOSTNAMES", "hostnames"), ("STATUS", "status")],
               [("BACKENDS", "backends"), ("RULES", "rules"), ("MESSAGE", "message"), ("FROM", "from")]),
}


def rows(resource: str, objs: dict[Any, Stored], node: Node, namespace: str | None,
         service_cidr: str, service_cidr6: str) -> list[tuple[Stored, dict[str, Any]]]:
    """The resource's objects (of ``namespace``; None: every one) as rows, sorted by namespace and name."""
    parsed: dict[Any, Any] = {}
    for k, s in objs.items():
        try:
            doc = s.doc
            parsed[k] = ManifestError(s.name, "(file)", s.error) if s.error else parse_object(doc, base_dir=s.path.parent)
        except ManifestError as e:
            parsed[k] = e
    try:  # VIPs as the agent allocates them: by name hash over every valid Service
        vips = {s.key: s for s in allocate_vips([o for o in parsed.values() if isinstance(o, Service)],
                                                service_cidr, service_cidr6)}
    except (ManifestError, ValueError):
        vips = {}
    out = [(s, _row(s, parsed[k], node, vips)) for k, s in objs.items()
           if k[0] in KINDS[resource] and (namespace is None or k[1] == namespace)]
    return sorted(out, key=lambda r: (r[0].key[1], r[0].key[2], r[0].key[0]))


def _cell(key: str, value: Any) -> Text:
    """A cell as plain text (a manifest's words are never markup)."""
    text = ("yes" if value else "no") if isinstance(value, bool) else "" if value is None else str(value)
    text = text or ("<none>" if key in ("ip", "cluster_ip", "hostnames", "selector") else "-")
    return Text(text, style=_COLOUR.get(text, "") if key == "status" else "")


def print_table(resource: str, found: list[dict[str, Any]], wide: bool, all_namespaces: bool) -> None:
    base, extra = COLUMNS[resource]
    cols = ([("NAMESPACE", "namespace")] if all_namespaces else []) + base + (extra if wide else [])
    table = Table(*(h for h, _ in cols), box=None, pad_edge=False, header_style="bold")
    for r in found:
        table.add_row(*(_cell(k, r.get(k)) for _, k in cols))
    # never cut a cell: as wide as the table needs (a narrow terminal wraps the lines instead)
    need = Measurement.get(console, console.options.update_width(10_000), table).maximum
    (console if need <= console.width else Console(width=need, emoji=False)).print(table)


def _statuses(nodes: tuple[Path, ...], manifests: Path) -> Node:
    sts = [st for n in nodes if (st := AgentStatus.read(n)) is not None]
    want = directory_version(manifests)
    return Node(sts, bool(sts) and all(st.applied_manifests() == want for st in sts))


def get(
    resource: Annotated[str, typer.Argument(help="pods, services, policies or routes (or po, svc, mp, route ...)")],
    namespace: Annotated[str, typer.Option("-n", "--namespace", help="the namespace")] = "default",
    all_namespaces: Annotated[bool, typer.Option("-A", "--all-namespaces", help="every namespace")] = False,
    output: Annotated[GetFormat, output_option("table, wide, json or yaml")] = GetFormat.table,
    state_dir: StateOpt = STATE,
    service_cidr: Annotated[str, typer.Option(help="the agent's --service-cidr (service VIPs are allocated from it)")]
    = "10.96.0.0/16",
) -> None:
    """List objects the agent runs: their state (Running, Applied, Pending, Refused, Quarantined, Invalid), pod IPs,
    service VIPs and backends. From the agent's manifest directory and status.json."""
    res = RESOURCES.get(resource.lower())
    if res is None:
        raise typer.BadParameter(f"{resource!r}: use one of pods, services, policies, routes", param_hint="RESOURCE")
    target = target_of(state_dir)
    objs, _, warnings = ManifestStore(target.manifests).read()
    for w in warnings:
        err.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    node = _statuses(target.nodes, target.manifests)
    if not node.statuses:
        err.print(escape(f"no agent status in {', '.join(map(str, target.nodes))}: the objects as stored, "
                         "none applied yet (is `webb agent` running?)"), highlight=False, soft_wrap=True)
    from mesh.runtime.local import NodeConfig  # its IPv6 service CIDR default, as the agent's

    try:
        found = rows(res, objs, node, None if all_namespaces else namespace, service_cidr, NodeConfig.service_cidr6)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--service-cidr") from None
    if output in (GetFormat.json, GetFormat.yaml):
        items = [{**s.doc, "status": {k: v for k, v in r.items() if k not in ("namespace", "name", "kind")}}
                 for s, r in found]
        dump({"apiVersion": "v1", "kind": "List", "items": items}, output.value)
        return
    if not found:
        where = "any namespace" if all_namespaces else f"namespace {namespace}"
        err.print(escape(f"No {res} found in {where}."), highlight=False)
        return
    print_table(res, [r for _, r in found], output is GetFormat.wide, all_namespaces)
