"""CR status from what is known: pure, no I/O (the operator writes what these return).

``Valid``: the spec parsed (False: the parse error, naming the field; the previous good
version stays in force). ``Applied``: every node that reported has this generation in the
plan its datapath and Envoy applied (Envoy ACK); False with Envoy's error when a node's Envoy
refused it (NACK), or quarantined this object after Envoy refused it. ``nodes[]``: per node
the datapath and Envoy versions, the generation in force there, and for an audit-mode policy
the would-deny count seen on that node. ``Ready``: both hold (what ``kubectl wait
--for=condition=Ready`` waits on); its reason is the first that does not. Every condition carries
the generation it speaks of (``observedGeneration``), as Kubernetes' own objects do.
"""

from __future__ import annotations

from typing import Any


def condition(ctype: str, ok: bool, reason: str, message: str, previous: list[dict[str, Any]], now: str,
              generation: int | None = None) -> dict[str, Any]:
    status = "True" if ok else "False"
    before = next((c for c in previous if c.get("type") == ctype), {})
    since = before.get("lastTransitionTime") if before.get("status") == status and before.get("lastTransitionTime") else now
    out = {"type": ctype, "status": status, "reason": reason, "message": message, "lastTransitionTime": since}
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def node_entry(key: str, report: dict[str, Any], audit: bool) -> dict[str, Any]:
    """One node's line for CR ``key`` ("MeshPolicy ns/name")."""
    e: dict[str, Any] = {"node": str(report.get("node")), "datapathVersion": report.get("datapathVersion", ""),
                         "envoyVersion": report.get("envoyVersion", "")}
    quarantined = (report.get("quarantined") or {}).get(key)
    gen = (report.get("generations") or {}).get(key)
    if gen is not None and not quarantined:  # quarantined: an older generation is in force there
        e["observedGeneration"] = gen
    rejected = report.get("envoyRejected") or {}
    if quarantined:
        e["envoy"] = "NACK"
        e["envoyError"] = f"quarantined, the previous generation stays in force: {quarantined}"
    elif rejected:
        e["envoy"] = "NACK"
        e["envoyError"] = "; ".join(f"{t}: {err}" for t, err in sorted(rejected.items()))
    else:
        e["envoy"] = "ACK" if e["envoyVersion"] else "Pending"
    if audit:
        e["auditWouldDeny"] = int((report.get("auditWouldDeny") or {}).get(key.split(" ", 1)[1], 0))
    return e


def cr_status(key: str, generation: int, error: str | None, mode: str, reports: dict[str, dict[str, Any]],
              previous: dict[str, Any], now: str, shadowed_by: str | None = None) -> dict[str, Any]:
    """``shadowed_by``: the object in force instead of this one (a second MeshTLS in a namespace)."""
    prev = list(previous.get("conditions") or [])
    def cond(ctype: str, ok: bool, reason: str, message: str) -> dict[str, Any]:
        return condition(ctype, ok, reason, message, prev, now, generation)
    valid = cond("Valid", error is None, "Invalid" if error else "Parsed", error or "the spec is valid")
    nodes = [node_entry(key, r, mode == "audit") for _, r in sorted(reports.items())]
    done = [n for n in nodes if n.get("observedGeneration") == generation and n["envoy"] == "ACK"]
    nacked = [n for n in nodes if n["envoy"] == "NACK"]
    if error:
        applied = cond("Applied", False, "Invalid", "this generation is not valid; the previous one stays in force")
    elif shadowed_by:
        applied = cond("Applied", False, "Shadowed", f"ignored: {shadowed_by} is in force in this namespace "
                       "(one per namespace: the name that sorts first wins); delete one of them")
    elif nacked:
        applied = cond("Applied", False, "EnvoyRejected", "; ".join(f"{n['node']}: {n['envoyError']}" for n in nacked))
    elif not nodes:
        applied = cond("Applied", False, "NoNodes", "no node has reported yet")
    elif len(done) == len(nodes):
        applied = cond("Applied", True, "Applied", f"generation {generation} applied on {len(nodes)} node(s)")
    else:
        waiting = ", ".join(n["node"] for n in nodes if n not in done)
        applied = cond("Applied", False, "Pending", f"generation {generation} not applied yet on {waiting}")
    not_ok = next((c for c in (valid, applied) if c["status"] != "True"), None)
    ready = cond("Ready", not_ok is None, not_ok["reason"] if not_ok else "Ready",
                 not_ok["message"] if not_ok else f"valid, and in force on {len(nodes)} node(s)")
    return {"observedGeneration": generation, "conditions": [ready, valid, applied], "nodes": nodes,
            "appliedNodes": f"{len(done)}/{len(nodes)}"}


# condition reasons that are a user's problem to fix: an Event (Warning) when a status turns to one
WARNING_REASONS = ("Invalid", "EnvoyRejected", "Shadowed")


def warnings_to_report(new: dict[str, Any], previous: dict[str, Any]) -> list[tuple[str, str]]:
    """(reason, message) of each Valid/Applied condition that newly failed with a warning reason
    (not when only the transition time or nothing moved): what the operator tells as an Event."""
    before = {c.get("type"): (c.get("status"), c.get("reason"), c.get("message")) for c in previous.get("conditions") or []}
    out = []
    for c in new.get("conditions") or []:
        if c["type"] == "Ready" or c["status"] == "True" or c["reason"] not in WARNING_REASONS:
            continue
        if before.get(c["type"]) != (c["status"], c["reason"], c["message"]):
            out.append((c["reason"], c["message"]))
    return out


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal but for transition times (which only move when a status moves)."""
    def strip(s: dict[str, Any]) -> dict[str, Any]:
        return {**s, "conditions": [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in s.get("conditions") or []]}
    return strip(a) == strip(b)
