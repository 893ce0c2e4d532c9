"""Flows: datapath connect decisions and Envoy access-log entries, joined into one record.

Each flow names source pod, destination, verdict and reason; a denial names the policy
(and for L7 the rule it failed), so `webb observe` answers "why was this denied".
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datapath.maps import FlowEvent
from datapath.types import Reason, Verdict
from mesh.plan.node import NodePlan
from mesh.plan.policy import deny_reason, proto_name

MAX_BYTES = 8 << 20  # rotate flows.jsonl past this; one old file kept
MAX_COUNTED = 256  # distinct (verdict, layer, reason) counted; more are counted as "other"


@dataclass
class Names:
    """What the agent knows to name things in flows (refreshed on every plan)."""

    pod_by_cgroup: dict[int, str] = field(default_factory=dict)
    pod_by_ip: dict[str, str] = field(default_factory=dict)
    service_by_vip: dict[tuple[str, int], str] = field(default_factory=dict)
    pod_by_identity: dict[int, list[str]] = field(default_factory=dict)
    policies_selecting: dict[int, tuple[str, ...]] = field(default_factory=dict)
    http_rules: dict[str, str] = field(default_factory=dict)  # service -> allowed requests
    plan: NodePlan | None = None  # what the names come from: the plan in force

    @classmethod
    def of(cls, plan: NodePlan, pod_by_cgroup: dict[int, str]) -> Names:
        n = cls(pod_by_cgroup=dict(pod_by_cgroup), plan=plan)
        for ep in plan.endpoints:
            n.pod_by_ip[ep.ip] = ep.pod
            if ep.ip6:
                n.pod_by_ip[ep.ip6] = ep.pod
            n.pod_by_identity.setdefault(ep.identity, []).append(ep.pod)
        svc_of_vip = dict(plan.service_names)
        for s in plan.services:
            n.service_by_vip[(s.vip, s.port)] = svc_of_vip.get(s.vip, s.vip)
        n.policies_selecting = dict(plan.selected_by)
        for h in plan.http:
            allowed = []
            for p in h.policies or ():
                reqs = [f"{r.method or '*'} {r.path or '*'}" for r in p.rules] or ["any request"]
                allowed.append(f"{p.name} allows {', '.join(reqs)}")
            n.http_rules[h.name] = "; ".join(allowed)
        return n


def from_event(e: FlowEvent, names: Names) -> dict[str, Any]:
    src = names.pod_by_cgroup.get(e.cgroup_id, f"cgroup:{e.cgroup_id}")
    svc = names.service_by_vip.get((e.orig_ip, e.orig_port))
    dst_pod = names.pod_by_ip.get(e.new_ip)
    flow: dict[str, Any] = {
        "time": time.time(), "layer": "L4", "protocol": proto_name(e.proto), "src": src,
        "dst": f"{e.orig_ip}:{e.orig_port}", "service": svc, "dst_pod": dst_pod,
        "verdict": e.verdict.name.lower(), "reason": e.reason.text,
    }
    if e.reason == Reason.L7_PROXY:
        flow["dst_pod"] = None
        via = names.plan.via(e.new_port) if names.plan is not None else ""
        flow["via"] = f"{via or 'envoy'} {e.new_ip}:{e.new_port}"
    if e.verdict == Verdict.DENIED and e.reason == Reason.L7_BYPASS:
        flow["policy"] = ",".join(names.policies_selecting.get(e.dst_identity, ()))
        flow["why"] = (f"{dst_pod or e.new_ip} port {e.new_port}: L7 rules apply there, and only the node proxy "
                       "applies them; connect through the pod's Service")
    elif e.verdict == Verdict.DENIED:
        pols = names.policies_selecting.get(e.dst_identity, ())
        flow["policy"] = ",".join(pols)
        flow["why"] = (deny_reason(names.plan, e.dst_identity, dst_pod or e.new_ip, src, e.new_port, e.proto)
                       if names.plan is not None else f"{dst_pod or e.new_ip}: {e.reason.text}")
    elif e.verdict == Verdict.DROPPED and e.reason in (Reason.POLICY_DENIED, Reason.L7_BYPASS):
        # seen at the destination (a SYN no connect() hook judged: a raw socket, another address, another
        # sender): orig is the sender, new the pod, the cgroup the receiving pod's
        flow["src"] = names.pod_by_ip.get(e.orig_ip, e.orig_ip)
        flow["dst"] = f"{e.new_ip}:{e.new_port}"
        flow["dst_pod"] = names.pod_by_cgroup.get(e.cgroup_id, dst_pod)
        flow["policy"] = ",".join(names.policies_selecting.get(e.dst_identity, ()))
        flow["why"] = (f"new connection to {flow['dst_pod'] or e.new_ip} port {e.new_port} "
                       + ("needs the node proxy (L7 rules)" if e.reason == Reason.L7_BYPASS else
                          f"from {flow['src']}: no ingress rule allows it") + " (checked where it arrived)")
    elif e.verdict == Verdict.DROPPED and e.reason == Reason.MTLS_STRICT:
        # seen at the destination: orig is the sender, new the STRICT pod that refused it
        flow["src"] = names.pod_by_ip.get(e.orig_ip, e.orig_ip)
        flow["dst"] = f"{e.new_ip}:{e.new_port}"
        flow["dst_pod"] = dst_pod
        flow["why"] = (f"{dst_pod or e.new_ip} is in a MeshTLS STRICT namespace: plaintext connection from "
                       f"{flow['src']} (outside the mesh) refused; connect through the mesh (mTLS tunnel)")
    elif e.verdict == Verdict.DROPPED:
        flow["why"] = f"service {svc or e.orig_ip} has no backend" if e.reason == Reason.NO_BACKEND else e.reason.text
    elif e.verdict == Verdict.AUDIT:
        pols = names.policies_selecting.get(e.dst_identity, ())
        flow["policy"] = ",".join(pols)
        flow["why"] = f"would be denied by MeshPolicy {', '.join(pols)} (audit mode): no ingress rule allows {src}"
    return flow


def _host(addr_port: object) -> str:
    """"10.0.0.1:80" or "[fd00::1]:80" -> the address."""
    return str(addr_port or "").rsplit(":", 1)[0].strip("[]")


def from_access_log(entry: dict[str, Any], names: Names) -> dict[str, Any]:
    src_ip = _host(entry.get("src"))
    status = int(entry.get("status") or 0)
    details = str(entry.get("details", ""))
    denied = details.startswith("rbac_access_denied")
    would_deny = entry.get("shadow") == "denied"
    flow: dict[str, Any] = {
        "time": float(entry.get("time") or time.time()), "layer": "L7", "protocol": entry.get("protocol"),
        "src": names.pod_by_ip.get(src_ip, src_ip), "service": entry.get("service"),
        "dst_pod": names.pod_by_ip.get(_host(entry.get("upstream"))),
        "method": entry.get("method"), "path": entry.get("path"), "status": status,
        "verdict": "denied" if denied else "audit" if would_deny else "forwarded",
        "reason": "l7-policy-denied" if denied else "l7-policy-audit" if would_deny else "l7-forwarded",
        "envoy_details": details,
    }
    grpc_status = str(entry.get("grpc_status") or "")
    if grpc_status.isdigit():  # a gRPC call: its status rides in trailers, the HTTP status is 200
        flow["grpc_status"] = int(grpc_status)
    if denied or would_deny:
        pols = entry.get("policies")
        flow["policy"] = pols if isinstance(pols, str) and pols != "-" else ""
        flow["why"] = (f"no HTTP rule allows {entry.get('method')} {entry.get('path')}: "
                       f"{names.http_rules.get(str(entry.get('service')), '')}")
    return flow


class FlowLog:
    """Append-only JSON lines, rotated by size. ``counts()``: the flows written by (verdict, layer,
    reason) since start, what the agent's /metrics serves (mesh.agent.metrics)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._counts: dict[tuple[str, str, str], int] = {}
        self._counts_lock = threading.Lock()  # read by the metrics server's thread

    def counts(self) -> dict[tuple[str, str, str], int]:
        with self._counts_lock:
            return dict(self._counts)

    def _count(self, flows: list[dict[str, Any]]) -> None:
        with self._counts_lock:
            for fl in flows:
                key = (str(fl.get("verdict")), str(fl.get("layer")), str(fl.get("reason")))
                if key not in self._counts and len(self._counts) >= MAX_COUNTED:
                    key = ("other", "other", "other")  # bounded label sets, whatever a flow says
                self._counts[key] = self._counts.get(key, 0) + 1

    def write(self, flows: list[dict[str, Any]]) -> None:
        if not flows:
            return
        self._count(flows)
        if self.path.exists() and self.path.stat().st_size > MAX_BYTES:
            os.replace(self.path, self.path.with_suffix(".jsonl.1"))
        with open(self.path, "a") as f:
            for fl in flows:
                f.write(json.dumps(fl, sort_keys=True) + "\n")


class Tail:
    """Reads lines appended to a file since the last call (handles truncation)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self._partial = ""

    def lines(self) -> Iterator[str]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size < self.offset:
            self.offset = 0
        if size == self.offset:
            return
        with open(self.path) as f:
            f.seek(self.offset)
            data = self._partial + f.read()
            self.offset = f.tell()
        *complete, self._partial = data.split("\n")
        yield from (ln for ln in complete if ln.strip())


def read_flows(path: Path) -> list[dict[str, Any]]:
    out = []
    for p in (path.with_suffix(".jsonl.1"), path):
        if p.exists():
            for line in p.read_text().splitlines():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    out.sort(key=lambda f: float(f.get("time") or 0))
    return out
