"""One Webb flow (a dict of mesh.agent.flows / mesh.agent.tunnels, as the agent writes it to
flows.jsonl) -> Hubble's flow.Flow. Pure: no I/O, no grpc (the message classes come from the stubs).

What maps to what (docs/hubble.md has the table):

- verdict: forwarded -> FORWARDED; denied and dropped -> DROPPED (Hubble has no "denied": a policy
  denial is a drop whose reason is POLICY_DENIED); audit -> AUDIT; failed (a tunnel that could not be
  made) -> ERROR.
- reason -> drop_reason_desc (and the deprecated drop_reason, for old clients); Webb's own reason and
  its "why" go to Summary, which the CLI prints last: ``policy-denied: default/deathstar-1 is selected
  by MeshPolicy default/rule1 and no ingress rule allows default/xwing on port 80/TCP``.
- event type, as Cilium's would be: a drop (1, sub type = the drop reason: the CLI prints "Policy
  denied"), a policy verdict for audit (5), a trace to-endpoint / to-proxy (4) for what was forwarded,
  an access-log record (129) for an L7 request.
- L4: TCP/UDP with the destination port; L7: HTTP code, method, url (the path), protocol.
- source / destination: Endpoint namespace + pod_name from "ns/name"; what is not a pod (an address,
  "cgroup:N", "node proxy") goes to IP.source or source_names, so the CLI still shows it.
- destination_service from "service" (ns/name[:port]); the denying MeshPolicy as ingress_denied_by.
- time, node_name, a uuid derived from the node and the record (the same flow read twice, or from two
  files of one node, has the same uuid).

Strings from the flow are attacker-influenced (an HTTP path is what a pod sent): they are copied as
text only, made valid UTF-8 (protobuf refuses anything else), and never parsed as markup or code.
"""

from __future__ import annotations

import ipaddress
import json
import re
import uuid
from typing import Any

from mesh.hubble.api import load

flow_pb = load("flow.flow_pb2")

# Cilium's monitor message types (pkg/monitor/api/types.go), which the CLI prints by
DROP, TRACE, POLICY_VERDICT, ACCESS_LOG = 1, 4, 5, 129
TRACE_TO_ENDPOINT, TRACE_TO_PROXY = 0, 1  # the sub types of TRACE (TraceToLxc, TraceToProxy)

VERDICTS = {
    "forwarded": flow_pb.FORWARDED,
    "denied": flow_pb.DROPPED,
    "dropped": flow_pb.DROPPED,
    "audit": flow_pb.AUDIT,
    "failed": flow_pb.ERROR,
}

# Webb's reasons (datapath.types.Reason, mesh.agent.flows, mesh.agent.tunnels) -> Hubble's DropReason
DROP_REASONS = {
    "policy-denied": flow_pb.POLICY_DENIED,
    "l7-bypass": flow_pb.POLICY_DENIED,  # a pod port with L7 rules, reached around the node proxy
    "l7-policy-denied": flow_pb.POLICY_DENIED,
    "mtls-denied": flow_pb.POLICY_DENIED,  # the tunnel's accepting side: the policy refused the peer
    "no-backend": flow_pb.SERVICE_BACKEND_NOT_FOUND,
    "backend-missing": flow_pb.SERVICE_BACKEND_NOT_FOUND,
    "mtls-strict": flow_pb.UNENCRYPTED_TRAFFIC,  # plaintext into a MeshTLS STRICT namespace
    "mtls-busy": flow_pb.DROP_RATE_LIMITED,  # the tunnel at its connection limit
    "no-backend-ipv6": flow_pb.SERVICE_BACKEND_NOT_FOUND,  # the IPv6 VIP empty, the IPv4 one not (curl then falls back)
    "l7-no-upstream": flow_pb.SERVICE_BACKEND_NOT_FOUND,  # Envoy: no healthy upstream, no cluster
}

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")  # a Kubernetes namespace or pod name
_U32 = (1 << 32) - 1


def text(value: Any, limit: int = 4096) -> str:
    """``value`` as a string protobuf accepts (valid UTF-8: lone surrogates replaced), bounded."""
    s = value if isinstance(value, str) else "" if value is None else str(value)
    return s[:limit].encode("utf-8", "replace").decode("utf-8")


def _int(value: Any, hi: int = _U32) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        return 0
    return n if 0 <= n <= hi else 0


def _seconds(value: Any) -> float:
    try:
        t = float(value)
    except (TypeError, ValueError):
        return 0.0
    return t if 0 <= t < 253402300800 else 0.0  # Timestamp's range ends at 9999-12-31


def split_name(value: Any) -> tuple[str, str] | None:
    """"ns/name" -> (ns, name) when both are Kubernetes names; anything else (an address,
    "cgroup:12", "node proxy") -> None."""
    ns, sep, name = text(value, 300).partition("/")
    if sep and _NAME.match(ns) and _NAME.match(name):
        return ns, name
    return None


def _address(value: Any) -> str:
    """An IP address, or ""."""
    try:
        return str(ipaddress.ip_address(text(value, 64).strip("[]")))
    except ValueError:
        return ""


def split_host_port(value: Any) -> tuple[str, int]:
    """"10.0.0.1:80", "[fd00::1]:80", "fd00::1:80" (as the agent writes v6: the last colon is the
    port's) -> (address, port); ("", 0) for what is neither."""
    host, sep, port = text(value, 300).rpartition(":")
    if not sep or not port.isdigit():
        return _address(value), 0
    return _address(host), _int(port, 65535)


def _service(value: Any) -> tuple[str, str, int] | None:
    """"ns/name" or "ns/name:port" -> (ns, name, port)."""
    s = text(value, 300)
    port = 0
    head, sep, tail = s.rpartition(":")
    if sep and tail.isdigit():
        s, port = head, _int(tail, 65535)
    got = split_name(s)
    return (got[0], got[1], port) if got else None


def _endpoint(ep: Any, who: Any) -> str:
    """Fill ``ep`` from a pod key; returns what is left to show when ``who`` is not a pod."""
    pod = split_name(who)
    if pod is not None:
        ep.namespace, ep.pod_name = pod
        return ""
    return text(who, 300)


def _policies(value: Any) -> list[Any]:
    """"default/rule1" or "default/rule1#ingress[0],default/rule2" -> Policy messages (kind MeshPolicy)."""
    out = []
    for item in text(value, 2000).split(","):
        name, _, rule = item.strip().partition("#")
        got = split_name(name)
        if got is None:
            continue
        p = flow_pb.Policy(namespace=got[0], name=got[1], kind="MeshPolicy")
        if rule:
            p.labels.append(f"webb.dev/rule={rule}")
        out.append(p)
    return out


def flow_uuid(node: str, f: dict[str, Any]) -> str:
    """The same for the same record of the same node (JSON, ASCII-escaped: any str hashes)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "webb-flow:" + json.dumps([node, f], sort_keys=True, default=str)))


def to_flow(f: dict[str, Any], node: str) -> Any:
    """A flow.Flow for one Webb flow record (any dict: unknown or malformed fields are left out)."""
    verdict_s = text(f.get("verdict"), 32).lower()
    reason = text(f.get("reason"), 64)
    layer = text(f.get("layer"), 8).upper()
    out = flow_pb.Flow(node_name=text(node, 253), uuid=flow_uuid(node, f))
    out.emitter.name = "Webb"
    t = _seconds(f.get("time"))
    out.time.seconds = int(t)  # microseconds: what a float of epoch seconds holds exactly enough
    out.time.nanos = min(round((t - int(t)) * 1e6), 999_999) * 1000
    out.verdict = VERDICTS.get(verdict_s, flow_pb.VERDICT_UNKNOWN)
    if out.verdict in (flow_pb.DROPPED, flow_pb.AUDIT, flow_pb.ERROR):
        out.drop_reason_desc = DROP_REASONS.get(reason, flow_pb.DROP_REASON_UNKNOWN)
        out.drop_reason = out.drop_reason_desc
    out.is_reply.value = False  # every Webb flow is the initiating side's (a connect, a request)

    # addresses and ports: "dst" is the address connected to (a service VIP, a pod); L7 flows have none
    dst_ip, dst_port = split_host_port(f.get("dst"))
    svc = _service(f.get("service"))
    if not dst_port and svc:
        dst_port = svc[2]
    out.IP.SetInParent()  # the CLI names the hosts only when IP is there
    src_left = _endpoint(out.source, f.get("src"))
    dst_left = _endpoint(out.destination, f.get("dst_pod"))
    src_ip = _address(src_left)
    if src_ip:
        out.IP.source = src_ip
    elif src_left:
        out.source_names.append(src_left)
    if dst_ip:
        out.IP.destination = dst_ip
    family = {4: flow_pb.IPv4, 6: flow_pb.IPv6}
    some_ip = dst_ip or src_ip
    if some_ip:
        out.IP.ipVersion = family[ipaddress.ip_address(some_ip).version]
    if f.get("tls"):
        out.IP.encrypted = True
    if svc:
        out.destination_service.namespace, out.destination_service.name = svc[0], svc[1]
    elif dst_left or (not dst_ip and f.get("service")):
        out.destination_names.append(text(f.get("service") or dst_left, 300))
    if text(f.get("direction"), 16).lower() == "ingress" or (
            verdict_s == "dropped" and reason in ("policy-denied", "l7-bypass", "mtls-strict")):
        out.traffic_direction = flow_pb.INGRESS  # decided where the connection arrived
    else:
        out.traffic_direction = flow_pb.EGRESS  # decided at the sender's connect() (or by its node proxy)

    proto = text(f.get("protocol"), 32).upper()
    if layer == "L7":
        out.Type = flow_pb.L7
        out.l4.TCP.destination_port = dst_port
        out.l7.type = flow_pb.RESPONSE
        http = out.l7.http
        http.code = _int(f.get("status"), 999)
        http.method = text(f.get("method"), 32)
        http.url = text(f.get("path"))
        http.protocol = text(f.get("protocol"), 32)
        out.event_type.type = ACCESS_LOG
    else:
        out.Type = flow_pb.L3_L4
        if proto == "UDP":
            out.l4.UDP.destination_port = dst_port
        elif proto in ("TCP", ""):
            out.l4.TCP.destination_port = dst_port
        if out.verdict in (flow_pb.DROPPED, flow_pb.ERROR):
            out.event_type.type, out.event_type.sub_type = DROP, out.drop_reason_desc
        elif out.verdict == flow_pb.AUDIT:
            out.event_type.type = POLICY_VERDICT
        else:
            to_proxy = reason == "l7-proxy"
            out.event_type.type, out.event_type.sub_type = TRACE, TRACE_TO_PROXY if to_proxy else TRACE_TO_ENDPOINT
            out.trace_observation_point = flow_pb.TO_PROXY if to_proxy else flow_pb.TO_ENDPOINT
    if verdict_s in ("denied", "dropped", "audit") and f.get("policy"):
        out.ingress_denied_by.extend(_policies(f.get("policy")))
    out.Summary = summary(f)
    return out


def summary(f: dict[str, Any]) -> str:
    """What the CLI prints last on a line: for L7 the request; Webb's reason and why; for L4 the protocol."""
    parts = []
    if text(f.get("layer"), 8).upper() == "L7":
        parts.append(" ".join(p for p in (text(f.get("protocol"), 32), text(f.get("status"), 8),
                                         text(f.get("method"), 32), text(f.get("path"))) if p))
    reason, why = text(f.get("reason"), 64), text(f.get("why"))
    parts.append(f"{reason}: {why}" if reason and why else reason or why)
    via = text(f.get("via"), 300)
    if via:
        parts.append(f"via {via}")
    if text(f.get("layer"), 8).upper() != "L7":
        parts.append(text(f.get("protocol"), 16))  # as Cilium's summaries end: "TCP Flags: SYN", "UDP"
    return "; ".join(p for p in parts if p)
