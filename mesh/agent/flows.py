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
from xds.model import HttpRule, RbacPolicy

MAX_BYTES = 8 << 20  # rotate flows.jsonl past this; one old file kept
REASON_NO_BACKEND6 = "no-backend-ipv6"  # an IPv6 VIP without backends, its IPv4 VIP with some
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
    # (IPv6 VIP, port, proto) without backends -> its service's IPv4 VIP and how many backends that has
    ipv4_of_empty_ipv6: dict[tuple[str, int, int], tuple[str, int]] = field(default_factory=dict)
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
        v4_of: dict[tuple[str, int, int], tuple[str, int]] = {}
        for s in plan.services:
            n.service_by_vip[(s.vip, s.port)] = svc_of_vip.get(s.vip, s.vip)
            if ":" not in s.vip and s.backends and s.vip in svc_of_vip:
                v4_of[(svc_of_vip[s.vip], s.port, s.proto)] = (s.vip, len(s.backends))
        for s in plan.services:
            v4 = v4_of.get((svc_of_vip.get(s.vip, ""), s.port, s.proto))
            if ":" in s.vip and not s.backends and v4 is not None:
                n.ipv4_of_empty_ipv6[(s.vip, s.port, s.proto)] = v4
        n.policies_selecting = dict(plan.selected_by)
        for h in plan.http:
            text = "; ".join(_allows(p) for p in h.policies or ())
            for more in h.also:  # a further backend identity's policies: a request must pass them too
                if more:
                    text += "; and " + "; ".join(_allows(p) for p in more)
            n.http_rules[h.name] = text
        return n


def _rule(r: HttpRule) -> str:
    """One allowed request shape, whole: method, path and every header condition."""
    heads = [f"header {k}: {v}" if v is not None else f"header {k} present" for k, v in r.headers]
    return f"{r.method or '*'} {r.path or '*'}" + (f" ({', '.join(heads)})" if heads else "")


def _allows(p: RbacPolicy) -> str:
    src = "" if p.source_ips is None else f" from its {len(p.source_ips)} allowed source address(es)"
    return f"{p.name} allows {', '.join(_rule(r) for r in p.rules) or 'any request'}{src}"


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
    elif e.verdict == Verdict.DROPPED and e.reason == Reason.NO_BACKEND and ":" in e.orig_ip:
        _no_backend6(flow, e, names, svc)
    elif e.verdict == Verdict.DROPPED:
        flow["why"] = f"service {svc or e.orig_ip} has no backend" if e.reason == Reason.NO_BACKEND else e.reason.text
    elif e.verdict == Verdict.AUDIT:
        pols = names.policies_selecting.get(e.dst_identity, ())
        flow["policy"] = ",".join(pols)
        flow["why"] = f"would be denied by MeshPolicy {', '.join(pols)} (audit mode): no ingress rule allows {src}"
    return flow


def _no_backend6(flow: dict[str, Any], e: FlowEvent, names: Names, svc: str | None) -> None:
    """A connect to a service's IPv6 VIP that has no IPv6 backend (its pods have only IPv4) while
    its IPv4 VIP has some: what a client trying IPv6 first (curl, happy eyeballs) does on every
    request before it falls back to IPv4 and succeeds. Still a drop (an IPv6-only client does
    fail), but named for what it is, not as a service without backends."""
    v4 = names.ipv4_of_empty_ipv6.get((e.orig_ip, e.orig_port, e.proto))
    if v4 is None:
        flow["why"] = f"service {svc or e.orig_ip} has no backend"
        return
    flow["reason"] = REASON_NO_BACKEND6
    flow["why"] = (f"service {svc or e.orig_ip} has no IPv6 backend (its pods have no IPv6 address); its IPv4 VIP "
                   f"{v4[0]}:{e.orig_port} has {v4[1]}: a client that tries IPv6 first (curl) falls back to it")


def _host(addr_port: object) -> str:
    """"10.0.0.1:80" or "[fd00::1]:80" -> the address."""
    return str(addr_port or "").rsplit(":", 1)[0].strip("[]")


# gRPC status codes (grpc/status.h): a gRPC call's outcome, the HTTP status being 200
GRPC_CODES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
              "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
              "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")
# Envoy's own replies, by %RESPONSE_CODE_DETAILS%: the request never reached (or never got an
# answer from) a backend. Exact details, then prefixes (codec errors carry the codec's words).
_LOCAL = {"route_not_found": "l7-no-route", "cluster_not_found": "l7-no-upstream",
          "no_healthy_upstream": "l7-no-upstream", "maintenance_mode": "l7-no-upstream",
          "upstream_response_timeout": "l7-timeout", "upstream_per_try_timeout": "l7-timeout",
          "request_overall_timeout": "l7-timeout", "upstream_max_stream_duration_reached": "l7-timeout",
          "missing_host_header": "l7-bad-request", "request_headers_too_large": "l7-bad-request",
          "request_payload_too_large": "l7-bad-request", "path_normalization_failed": "l7-bad-request",
          "absolute_path_rejected": "l7-bad-request", "low_version": "l7-bad-request",
          "invalid_envoy_request_headers": "l7-bad-request", "missing_path_rejected": "l7-bad-request",
          "invalid_authority": "l7-bad-request"}
_LOCAL_PREFIX = (("upstream_reset_before_response_started", "l7-upstream-reset"), ("http1.", "l7-bad-request"),
                 ("http2.", "l7-bad-request"), ("http3.", "l7-bad-request"), ("codec_error", "l7-bad-request"))
_LOCAL_WHY = {"l7-no-route": "no route of {svc} matches the request",
              "l7-no-upstream": "{svc} has no healthy backend to send it to",
              "l7-timeout": "the backend of {svc} did not answer in time",
              "l7-upstream-reset": "the backend of {svc} could not be reached (connection refused or reset)",
              "l7-bad-request": "the request is malformed (the node proxy refused it)",
              "l7-local-reply": "the node proxy answered it itself"}


def _int(v: object) -> int | None:
    """A number Envoy's JSON log gives as a number or as text ("-": none)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    return int(v) if isinstance(v, str) and v.isascii() and v.isdigit() and len(v) < 16 else None


def local_reason(details: str, status: int, grpc_status: int | None) -> str | None:
    """The reason of an error Envoy answered itself (not forwarded to, or not answered by, a backend):
    None for a backend's answer (via_upstream), a configured direct response, an RBAC decision
    (its own verdict) or no error. A gRPC call's error is in its grpc-status (HTTP 200)."""
    failed = status >= 400 or (grpc_status is not None and grpc_status != 0)
    if not failed or details in ("", "-", "via_upstream", "direct_response") or details.startswith("rbac_access_denied"):
        return None
    if details in _LOCAL:
        return _LOCAL[details]
    return next((r for pre, r in _LOCAL_PREFIX if details.startswith(pre)), "l7-local-reply")


def from_access_log(entry: dict[str, Any], names: Names) -> dict[str, Any]:
    src_ip = _host(entry.get("src"))
    status = _int(entry.get("status")) or 0
    details = str(entry.get("details", ""))
    grpc_status = _int(entry.get("grpc_status"))  # a gRPC call: its status rides in trailers, HTTP says 200
    denied = details.startswith("rbac_access_denied")
    would_deny = entry.get("shadow") == "denied"
    local = local_reason(details, status, grpc_status)
    verdict, reason = (("denied", "l7-policy-denied") if denied else ("dropped", local) if local else
                       ("audit", "l7-policy-audit") if would_deny else ("forwarded", "l7-forwarded"))
    flow: dict[str, Any] = {
        "time": float(entry.get("time") or time.time()), "layer": "L7", "protocol": entry.get("protocol"),
        "src": names.pod_by_ip.get(src_ip, src_ip), "service": entry.get("service"),
        "dst_pod": names.pod_by_ip.get(_host(entry.get("upstream"))),
        "method": entry.get("method"), "path": entry.get("path"), "status": status,
        "verdict": verdict, "reason": reason, "envoy_details": details,
    }
    if grpc_status is not None:
        flow["grpc_status"] = grpc_status
        if grpc_status < len(GRPC_CODES):
            flow["grpc_code"] = GRPC_CODES[grpc_status]
    duration = _int(entry.get("duration_ms"))
    if duration is not None:
        flow["duration_ms"] = duration
    attempts = _int(entry.get("attempts"))
    if attempts:  # tries sent upstream: the first and the retries (none for a reply Envoy made itself)
        flow["retries"] = attempts - 1
    if denied or would_deny:
        pols = entry.get("policies")
        flow["policy"] = pols if isinstance(pols, str) and pols != "-" else ""
        flow["why"] = (f"no HTTP rule allows {entry.get('method')} {entry.get('path')}: "
                       f"{names.http_rules.get(str(entry.get('service')), '')}")
    elif local:
        what = f"{status}" if grpc_status is None else f"gRPC {flow.get('grpc_code', grpc_status)}"
        flow["why"] = (f"the node proxy answered {what} itself ({details}): "
                       + _LOCAL_WHY[local].format(svc=f"service {entry.get('service')}"))
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
