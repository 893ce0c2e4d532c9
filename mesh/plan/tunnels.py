"""Which connections of this node go through the mTLS tunnel: pure, from the state and plan.

A TCP service port with a backend on another node in a namespace whose MeshTLS mode is
STRICT or PERMISSIVE is redirected by connect4 to a tunnel listener of this node (one port
per service port, on the bridge address, like Envoy's listeners); that listener picks a
backend and dials the backend node's tunnel as the client pod's identity. Local backends
are connected in plaintext (same-node traffic never leaves the host). A pod of a STRICT
namespace takes new connections only from this node (the kernel drops other SYNs).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from certs.spiffe import spiffe_id
from datapath.types import EP_LOCAL, EP_MTLS_STRICT, IDENTITY_NODE, PROTO_TCP, ServiceEntry
from mesh.model import SYSTEM_NAMESPACE, ClusterState, Pod, mtls_modes
from mesh.plan.numbers import alloc
from xds.model import MtlsEndpoint, Upstream, UpstreamMtls

# above Envoy's listener range (15001-31000), below the ephemeral ports (32768+)
TUNNEL_OUT_BASE, TUNNEL_OUT_COUNT = 31001, 1700
TUNNEL_PORT = 15008  # the accepting side, on the node's wire address (Istio's HBONE port)
# Envoy-originated mTLS (L7 ports): one port per backend pod:port on the wire address (Envoy
# merges endpoints of one address, so each destination needs its own)
DIRECT_BASE, DIRECT_COUNT = 10000, 5000
PROXY_NAMESPACE, PROXY_SERVICE_ACCOUNT = SYSTEM_NAMESPACE, "webb-node-proxy"  # the identity of every node's Envoy
NODE_IDENTITY = IDENTITY_NODE  # the node itself in the endpoint map (the tunnel delivers from its address)
MODES = ("STRICT", "PERMISSIVE", "DISABLE")


@dataclass(frozen=True)
class TunnelBackend:
    ip: str
    port: int
    namespace: str
    service_account: str
    node_addr: str  # the backend node's tunnel address; "" = a pod of this node (plaintext)


@dataclass(frozen=True)
class OutListener:
    name: str  # service port name, ns/svc:port
    port: int  # on the bridge gateway
    backends: tuple[TunnelBackend, ...]


@dataclass(frozen=True)
class TunnelPlan:
    listeners: tuple[OutListener, ...] = ()
    endpoint_flags: tuple[tuple[str, int], ...] = ()  # pod IP -> extra flags (EP_LOCAL, EP_MTLS_STRICT)
    services: tuple[ServiceEntry, ...] = ()  # the plan's, tunnelled ports redirected to their listener
    modes: tuple[tuple[str, str], ...] = ()  # namespace -> mode, for status
    warnings: tuple[str, ...] = ()
    inbound: tuple[tuple[str, int], ...] = ()  # "pod ip:port" of this node -> its mTLS port on the wire address

    def flags(self) -> dict[str, int]:
        return dict(self.endpoint_flags)


def plan_tunnels(state: ClusterState, services: tuple[ServiceEntry, ...], node: str, gateway: str,
                 node_addrs: dict[str, str]) -> TunnelPlan:
    """``services``: the node's service entries; ``node_addrs``: node name -> its tunnel
    address (wire IP), for every other node."""
    pods = [p for p in state.pods if p.ip]
    by_ip: dict[str, Pod] = {p.ip: p for p in pods}
    modes = mtls_modes(state)
    flags: dict[str, int] = {gateway: EP_LOCAL}
    for p in pods:
        if p.node == node:
            flags[p.ip] = EP_LOCAL | (EP_MTLS_STRICT if modes.get(p.namespace) == "STRICT" else 0)
    warnings: list[str] = []
    tunnelled: dict[int, tuple[ServiceEntry, tuple[TunnelBackend, ...]]] = {}
    for e in services:
        if e.proto != PROTO_TCP or ":" in e.vip:
            continue
        backends = []
        for b in e.backends:
            pod = by_ip.get(b.ip)
            if pod is None:
                continue
            remote = pod.node != node and modes.get(pod.namespace, "DISABLE") != "DISABLE"
            addr = node_addrs.get(pod.node, "") if remote else ""
            if remote and not addr:
                warnings.append(f"pod {pod.key} on node {pod.node!r}: no tunnel address known for that node; "
                                "its traffic is not encrypted")
            backends.append(TunnelBackend(b.ip, b.port, pod.namespace, pod.service_account, addr))
        if not any(b.node_addr for b in backends):
            continue
        if e.proxy_port:  # an L7 port: Envoy originates the mTLS (mtls_upstreams)
            continue
        tunnelled[e.service_id] = (e, tuple(backends))
    # this node's backends other nodes may reach with Envoy-originated mTLS: a port each on the wire address
    inbound = sorted({f"{b.ip}:{b.port}" for e in services if e.proto == PROTO_TCP for b in e.backends
                      if _local_mtls(by_ip.get(b.ip), node, modes)})
    direct = alloc(inbound, DIRECT_BASE, DIRECT_COUNT)
    names = {sid: f"{e.vip}:{e.port}" for sid, (e, _) in tunnelled.items()}
    ports = alloc(names.values(), TUNNEL_OUT_BASE, TUNNEL_OUT_COUNT)
    listeners = tuple(OutListener(names[sid], ports[names[sid]], bs) for sid, (_, bs) in sorted(tunnelled.items()))
    services = tuple(replace(e, proxy_ip=gateway, proxy_port=ports[names[e.service_id]])
                     if e.service_id in tunnelled else e for e in services)
    return TunnelPlan(listeners, tuple(sorted(flags.items())), services, tuple(modes.items()), tuple(warnings),
                      tuple(sorted(direct.items())))


def _local_mtls(pod: Pod | None, node: str, modes: dict[str, str]) -> bool:
    return pod is not None and pod.node == node and modes.get(pod.namespace, "DISABLE") != "DISABLE"


def source_identity(state: ClusterState, node: str, ip: str) -> tuple[str, str] | None:
    """(namespace, service account) of this node's pod with address ``ip``."""
    for p in state.pods:
        if p.node == node and ip in (p.ip, p.ip6):
            return p.namespace, p.service_account
    return None


def proxy_id(trust_domain: str) -> str:
    return spiffe_id(trust_domain, PROXY_NAMESPACE, PROXY_SERVICE_ACCOUNT)


def mtls_upstreams(upstreams: tuple[Upstream, ...], state: ClusterState, node: str, trust_domain: str,
                   peers: dict[str, tuple[str, dict[str, int]]]) -> tuple[tuple[Upstream, ...], tuple[str, ...]]:
    """Envoy's clusters with every backend on another node in an mTLS namespace moved to that
    node's mTLS port for it (TLS 1.3 as the node proxy, the pod's identity expected).
    ``peers``: node -> (wire address, its published "ip:port" -> mTLS port)."""
    by_ip = {p.ip: p for p in state.pods if p.ip}
    modes = mtls_modes(state)
    out, warnings = [], []
    for up in upstreams:
        plain: list[tuple[str, int]] = []
        tls: list[MtlsEndpoint] = []
        for ip, port in up.backends:
            pod = by_ip.get(ip)
            if pod is None or pod.node == node or modes.get(pod.namespace, "DISABLE") == "DISABLE":
                plain.append((ip, port))
                continue
            addr, ports = peers.get(pod.node, ("", {}))
            lp = ports.get(f"{ip}:{port}")
            if not addr or not lp:
                warnings.append(f"upstream {up.name}: node {pod.node} has not published an mTLS port for {pod.key} "
                                f"({ip}:{port}) yet; Envoy leaves that backend out")
                continue
            tls.append(MtlsEndpoint(addr, lp, UpstreamMtls(proxy_id(trust_domain), trust_domain,
                                                           (spiffe_id(trust_domain, pod.namespace, pod.service_account),),
                                                           f"{pod.namespace}.{pod.service_account}")))
        out.append(replace(up, backends=tuple(plain), mtls_backends=tuple(tls)) if tls or len(plain) != len(up.backends)
                   else up)
    return tuple(out), tuple(warnings)
