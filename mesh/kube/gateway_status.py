"""Gateway API status from the nodes' reports: pure, no I/O (the operator writes what this returns).

Each agent's plan says, in the Gateway API's words, what it serves (``mesh.plan.gateway``); its
node report carries that. The status written is the first reporting node's (by name), with the
Gateway's addresses of every node. An object the parser refused gets Accepted False
(UnsupportedValue) with the parser's message, on each of our parents. Parent entries of other
controllers are kept as they are.
"""

from __future__ import annotations

import json
from typing import Any

from mesh.model import GATEWAY_CONTROLLER, GATEWAY_GROUP

GATEWAY_KINDS = ("GatewayClass", "Gateway", "HTTPRoute", "GRPCRoute", "TLSRoute")


def _times(conds: list[dict[str, Any]], previous: list[dict[str, Any]], now: str) -> list[dict[str, Any]]:
    out = []
    for c in conds:
        before = next((p for p in previous if p.get("type") == c["type"]), {})
        since = before.get("lastTransitionTime") if before.get("status") == c["status"] and before.get("lastTransitionTime") else now
        out.append({**c, "lastTransitionTime": since})
    return out


def _from_reports(key: str, reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for _, r in sorted(reports.items()):
        text = (r.get("gatewayStatus") or {}).get(key)
        if text:
            out.append(json.loads(text))
    return out


def _refused(doc: dict[str, Any], error: str) -> list[dict[str, Any]]:
    gen = int((doc.get("metadata") or {}).get("generation") or 0)
    parents = []
    for ref in (doc.get("spec") or {}).get("parentRefs") or []:
        if not isinstance(ref, dict):
            continue
        parents.append({"parentRef": ref, "controllerName": GATEWAY_CONTROLLER, "conditions": [
            {"type": "Accepted", "status": "False", "reason": "UnsupportedValue", "message": error[:1000], "observedGeneration": gen},
            {"type": "ResolvedRefs", "status": "True", "reason": "ResolvedRefs", "message": "not checked", "observedGeneration": gen}]})
    return parents


def _ours(doc: dict[str, Any], classes: dict[str, str], gateways: dict[str, str], ref: dict[str, Any]) -> bool:
    ns = str(ref.get("namespace") or (doc.get("metadata") or {}).get("namespace") or "default")
    if ref.get("kind", "Gateway") == "Gateway" and ref.get("group", GATEWAY_GROUP) == GATEWAY_GROUP:
        return classes.get(gateways.get(f"{ns}/{ref.get('name')}", ""), "") == GATEWAY_CONTROLLER
    return ref.get("kind") == "Service"


def gateway_api_status(kind: str, key: str, doc: dict[str, Any], error: str | None, reports: dict[str, dict[str, Any]],
                       now: str, classes: dict[str, str], gateways: dict[str, str]) -> dict[str, Any] | None:
    """The status to write (None: nothing of ours). ``key``: "Kind ns/name"; ``classes``: GatewayClass ->
    controllerName; ``gateways``: "ns/name" -> class name (to tell our parents from others')."""
    previous = doc.get("status") or {}
    found = _from_reports(key, reports)
    if kind == "GatewayClass":
        if not found:
            return None
        st = found[0]
        out = {**previous, "conditions": _times(st["conditions"], previous.get("conditions") or [], now)}
        if st.get("supportedFeatures"):
            out["supportedFeatures"] = st["supportedFeatures"]
        return out
    if kind == "Gateway":
        if not found:
            return None
        st = found[0]
        addresses = [a for s in found for a in s.get("addresses") or []]
        prev_l = {x.get("name"): x for x in previous.get("listeners") or []}
        listeners = [{**x, "conditions": _times(x["conditions"], (prev_l.get(x["name"]) or {}).get("conditions") or [], now)}
                     for x in st.get("listeners") or []]
        return {"addresses": list({a["value"]: a for a in addresses}.values()),
                "conditions": _times(st["conditions"], previous.get("conditions") or [], now), "listeners": listeners}
    mine = _refused(doc, error) if error else (found[0].get("parents") if found else [])
    mine = [p for p in mine or [] if _ours(doc, classes, gateways, p["parentRef"])]
    if not mine:
        return None
    prev_parents = previous.get("parents") or []
    others = [p for p in prev_parents if p.get("controllerName") != GATEWAY_CONTROLLER]

    def prev_of(ref: dict[str, Any]) -> list[dict[str, Any]]:
        hit: dict[str, Any] = next((p for p in prev_parents if p.get("parentRef") == ref
                                    and p.get("controllerName") == GATEWAY_CONTROLLER), {})
        return list(hit.get("conditions") or [])
    return {"parents": others + [{**p, "conditions": _times(p["conditions"], prev_of(p["parentRef"]), now)} for p in mine]}
