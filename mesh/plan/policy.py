"""Questions about a plan's L3/L4 policy, answered the way the kernel answers them.

``allows`` is the kernel's lookup (``webb_policy``: the exact source identity or any source,
the exact port or any port); ``deny_reason`` is the one sentence a denial carries, in the flow
log and in a tunnel refusal alike. ``authorize`` is the accepting node's decision on a tunnel.
"""

from __future__ import annotations

from dataclasses import dataclass

from datapath.types import PROTO_TCP, PROTO_UDP
from mesh.model import ClusterState, Pod
from mesh.plan.node import Endpoint, NodePlan
from mesh.plan.tunnels import PROXY_NAMESPACE, PROXY_SERVICE_ACCOUNT

PROTO_NAMES = {PROTO_TCP: "TCP", PROTO_UDP: "UDP"}


def proto_name(proto: int) -> str:
    return PROTO_NAMES.get(proto, str(proto))


def allows(plan: NodePlan, dst_identity: int, src_identity: int, port: int, proto: int) -> bool:
    """Whether an entry of the plan lets ``src_identity`` reach ``dst_identity`` on port/proto
    (0 = any source / any port), as the kernel's policy lookup decides."""
    wanted = {(src_identity, port), (src_identity, 0), (0, port), (0, 0)}
    return any((e.src_identity, e.port) in wanted for e in plan.policy
               if e.dst_identity == dst_identity and e.proto == proto)


def deny_reason(plan: NodePlan, dst_identity: int, dst: str, src: str, port: int, proto: int) -> str:
    """Why a connection from ``src`` to ``dst`` (names as shown to the user) is denied."""
    selected = dict(plan.selected_by).get(dst_identity, ())
    return (f"{dst} is selected by MeshPolicy {', '.join(selected) or '?'} and no ingress rule allows "
            f"{src} on port {port}/{proto_name(proto)}")


def enforces(endpoint: Endpoint | None) -> bool:
    """Policy applies to this endpoint (selected by an enforcing policy; audit-only allows)."""
    return endpoint is not None and endpoint.enforced and not endpoint.audit


@dataclass(frozen=True)
class Denial:
    """Why the accepting node will not carry a tunnel. ``final``: every backend would say the
    same (policy, identity); not final: only this node's view (try the service's next backend)."""

    reason: str
    final: bool = True


def _pod_at(pods: tuple[Pod, ...], node: str | None, host: str) -> Pod | None:
    return next((p for p in pods if (node is None or p.node == node) and host in (p.ip, p.ip6)), None)


def authorize(state: ClusterState, plan: NodePlan, node: str, peer: tuple[str, str], peer_id: str, src_ip: str,
              dst: str) -> Denial | None:
    """The accepting node's decision on a tunnel: None (allowed) or the denial. ``peer``: the
    (namespace, service account) of the peer's certificate ``peer_id``. The certificate must
    be the identity of the pod it names as the source, the destination a pod of this node, and
    the L3/L4 policy of that pod must allow the source."""
    ns, sa = peer
    host, _, port_text = dst.rpartition(":")
    host = host.strip("[]")
    if not src_ip:  # Envoy-originated (a pod's mTLS port): only another node's proxy dials those
        if (ns, sa) != (PROXY_NAMESPACE, PROXY_SERVICE_ACCOUNT):
            return Denial(f"{peer_id} is not a node proxy: a workload reaches other nodes through its node's tunnel")
        if _pod_at(state.pods, node, host) is None:
            return Denial(f"destination {dst} is not a pod of node {node}", final=False)
        return None  # the L7 policy was enforced by that node's Envoy (RBAC), as for a local request
    src = _pod_at(state.pods, None, src_ip)
    if src is None:
        return Denial(f"source {src_ip} is not a pod of the mesh (as node {node} knows it)", final=False)
    if (src.namespace, src.service_account) != (ns, sa):
        return Denial(f"source {src_ip} is pod {src.key} (service account {src.service_account}), "
                      f"but the certificate is {peer_id}")
    target = _pod_at(state.pods, node, host)
    if target is None or not port_text.isdigit():
        return Denial(f"destination {dst} is not a pod of node {node}", final=False)
    port = int(port_text)
    if not 0 < port < 65536:
        return Denial(f"destination {dst}: port {port} is not a TCP port")
    eps = {e.pod: e for e in plan.endpoints}
    d, s = eps.get(target.key), eps.get(src.key)
    if d is None or not enforces(d):
        return None
    if allows(plan, d.identity, s.identity if s else 0, port, PROTO_TCP):
        return None
    return Denial(deny_reason(plan, d.identity, target.key, f"{src.key} ({peer_id})", port, PROTO_TCP))
