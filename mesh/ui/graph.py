"""Flows -> the service map: nodes (services, pods, addresses) and edges (source -> destination, one per
verdict class seen between them, so an edge's colour is one verdict: forwarded green, denied red, audit
amber).

A flow's destination is its service when it went through one (an L7 flow names it with its port,
``default/deathstar:80``: the same node as the L4 flows' ``default/deathstar``), else the pod it reached,
else the address. The pods seen behind a service are listed on the service's node, not drawn apart.
"""

from __future__ import annotations

import re
from typing import Any

from mesh.status import AgentStatus

# the agent's verdicts (mesh.cli.observe.Verdict) -> the three colours of the map
EDGE_CLASS = {"forwarded": "forwarded", "denied": "denied", "dropped": "denied", "failed": "denied", "audit": "audit"}
_PORT = re.compile(r"(.+/.+):\d{1,5}")


def _text(v: object) -> str:
    return v if isinstance(v, str) else "" if v is None else str(v)


def destination(f: dict[str, Any]) -> tuple[str, str]:
    """(node id, kind) of a flow's destination."""
    svc = _text(f.get("service"))
    if svc:
        m = _PORT.fullmatch(svc)
        return (m.group(1) if m else svc), "service"
    pod = _text(f.get("dst_pod"))
    if pod:
        return pod, "pod"
    dst = _text(f.get("dst"))
    return (dst.rsplit(":", 1)[0].strip("[]") if dst else "unknown"), "address"


def _time(f: dict[str, Any]) -> float:
    try:
        return float(f.get("time") or 0)
    except (TypeError, ValueError):
        return 0.0


def build(flows: list[dict[str, Any]], status: AgentStatus | None) -> dict[str, Any]:
    """The map of ``flows`` (oldest first) and of the pods ``status`` lists."""
    nodes: dict[str, dict[str, Any]] = {}
    edges: dict[tuple[str, str, str], dict[str, Any]] = {}
    backends: dict[str, set[str]] = {}

    def node(name: str, kind: str) -> None:
        n = nodes.setdefault(name, {"id": name, "kind": kind, "pods": []})
        if kind == "service":  # a name seen as a service is drawn as one
            n["kind"] = kind

    for f in flows:
        src = _text(f.get("src")) or "unknown"
        dst, kind = destination(f)
        node(src, "pod" if "/" in src else "address")
        node(dst, kind)
        pod = _text(f.get("dst_pod"))
        if kind == "service" and pod:
            backends.setdefault(dst, set()).add(pod)
        cls = EDGE_CLASS.get(_text(f.get("verdict")).lower(), "denied")  # a verdict not known: shown as a problem
        e = edges.setdefault((src, dst, cls), {"src": src, "dst": dst, "verdict": cls, "count": 0, "verdicts": {},
                                                "layers": [], "policies": [], "last": f})
        e["count"] += 1
        v = _text(f.get("verdict")).lower()
        e["verdicts"][v] = e["verdicts"].get(v, 0) + 1
        for key, value in (("layers", _text(f.get("layer"))), ("policies", _text(f.get("policy")))):
            if value and value not in e[key]:
                e[key].append(value)
        if _time(f) >= _time(e["last"]):
            e["last"] = f
    for pod in (status.pods if status is not None else {}):
        node(pod, "pod")
    behind = set().union(*backends.values()) if backends else set()
    for svc, pods in backends.items():
        nodes[svc]["pods"] = sorted(pods)
    ends = {s for s, _, _ in edges} | {d for _, d, _ in edges}  # a pod behind a service is drawn when an edge needs it
    drawn = [n for name, n in nodes.items() if not (name in behind and n["kind"] == "pod" and name not in ends)]
    return {"nodes": sorted(drawn, key=lambda n: n["id"]), "edges": [edges[k] for k in sorted(edges)]}

