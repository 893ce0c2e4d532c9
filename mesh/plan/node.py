"""plan_node(state, node, peers) -> NodePlan: everything one node needs, pure, no I/O.

One function decides it all: identities and L3/L4 policy entries, service entries (after
tunnel planning: ports whose backends sit on other nodes in mTLS namespaces go to a tunnel
listener), every endpoint's kernel flags, L7 listeners with their RBAC and routes, Envoy's
upstreams (with Envoy-originated mTLS to other nodes), the Gateways and the ingress. The version is hashed
last, over all of it: two plans that differ in anything differ in version.

Same input → same plan → same version string. Identities, service ids and proxy ports
are derived from names by hashing (``mesh.plan.numbers``), so adding one object does not
renumber the others.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from datapath.types import EP_AUDIT, EP_INGRESS_ENFORCED, PROTO_TCP, PROTO_UDP, Backend, PolicyEntry, ServiceEntry
from mesh.model import (
    MTLS_DEFAULT,
    NAMESPACE_LABEL,
    ClusterState,
    EndpointSlice,
    HttpMatch,
    MeshPolicy,
    Pod,
    Selector,
    Service,
    ServicePort,
    mtls_conflicts,
    mtls_modes,
)
from mesh.plan.gateway import plan_gateways
from mesh.plan.numbers import alloc
from mesh.plan.routing import IngressListen, PortInfo, grpc_backends, ingress_gateway, mesh_routes, port_name, route_clusters, upstreams
from mesh.plan.tunnels import NODE_IDENTITY, TunnelPlan, mtls_upstreams, plan_tunnels
from mesh.state import key_name
from xds.model import GatewayListener, HttpRule, HttpService, RbacPolicy, TlsSecret, Upstream, service_routes

IDENTITY_MIN = 256
_PROTOS = {"TCP": (PROTO_TCP,), "UDP": (PROTO_UDP,), "ANY": (PROTO_TCP, PROTO_UDP)}
# the node Envoy's one L7 listener: every L7 service port is a filter chain of it, picked by the VIP:port
# the client connected to (the kernel answers Envoy's SO_ORIGINAL_DST)
L7_PORT = 15001


@dataclass(frozen=True)
class NodeSpec:
    name: str
    proxy_ip: str  # where the node Envoy listens (the bridge gateway)
    proxy_ip6: str = ""  # ...and its IPv6 (dual stack)
    ingress_ip: str = "127.0.0.1"  # the ingress listeners (Ingress objects of class webb)
    ingress_http_port: int = 80
    ingress_https_port: int = 443
    # where this node's Envoy serves Gateways (class webb): one address per Gateway whose ports would clash
    gateway_addresses: tuple[str, ...] = ("127.0.0.1",)
    trust_domain: str = "cluster.local"  # SPIFFE IDs of the mesh (Envoy-originated mTLS)
    host_ips: tuple[str, ...] = ()  # every address of the node itself (its proxy's, its tunnel's, kubelet's probes come from one)


@dataclass(frozen=True)
class Peer:
    """Another node, as this node knows it: its tunnel (wire) address and the mTLS port it
    opened for each of its pods' "ip:port" (Envoy-originated mTLS lands there)."""

    wire_ip: str
    mtls_ports: tuple[tuple[str, int], ...] = ()
    addresses: tuple[str, ...] = ()  # its other addresses a connection from it may carry (its pod bridge's)


@dataclass(frozen=True)
class Endpoint:
    pod: str  # namespace/name
    ip: str
    identity: int
    enforced: bool  # a MeshPolicy selects it: ingress is default-deny
    audit: bool = False  # ...but only audit-mode policies do: would-deny is reported, allowed
    ip6: str = ""
    flags: int = 0  # every bit the kernel gets (EP_*): policy, and this node's LOCAL / mTLS STRICT


@dataclass(frozen=True)
class NodePlan:
    version: str
    services: tuple[ServiceEntry, ...]
    endpoints: tuple[Endpoint, ...]
    policy: tuple[PolicyEntry, ...]
    http: tuple[HttpService, ...]
    identities: tuple[tuple[int, str], ...]  # id -> label set text
    rules: tuple[tuple[int, str], ...]  # rule id -> "ns/policy ingress[i]"
    hosts: tuple[tuple[str, tuple[str, ...]], ...]  # VIP -> DNS names
    selected_by: tuple[tuple[int, tuple[str, ...]], ...] = ()  # identity -> policies selecting it
    warnings: tuple[str, ...] = field(default=())
    upstreams: tuple[Upstream, ...] = ()  # Envoy clusters: every service port a listener or route reaches
    gateways: tuple[GatewayListener, ...] = ()  # north-south listeners: Gateways, then the Ingress class
    secrets: tuple[TlsSecret, ...] = ()  # for the Gateways' and the ingress' HTTPS (SDS)
    mtls: tuple[tuple[str, str], ...] = ()  # namespace -> mTLS mode, for every namespace not DISABLE
    tunnels: TunnelPlan = TunnelPlan()  # mTLS tunnel listeners of this node, ports it serves to others
    node_endpoints: tuple[tuple[str, int, int], ...] = ()  # the node's own addresses: (ip, identity, flags)
    service_names: tuple[tuple[str, str], ...] = ()  # VIP -> "namespace/name"
    sources: tuple[tuple[str, int, int], ...] = ()  # pods without an address yet: (pod, identity, flags) for their cgroups
    # the Gateway API status this plan implies: ("Kind ns/name", JSON of the status), for the operator and webb status
    gateway_status: tuple[tuple[str, str], ...] = ()

    def via(self, port: int) -> str:
        """What listens on a port the kernel redirects to: "envoy" or "mtls tunnel" ("" = neither)."""
        if any(o.port == port for o in self.tunnels.listeners):
            return "mtls tunnel"
        return "envoy" if any(h.listen_port == port for h in self.http) else ""


def plan_node(state: ClusterState, node: NodeSpec, peers: Mapping[str, Peer] | None = None) -> NodePlan:
    """The plan of ``node``: pure and deterministic. ``peers``: the other nodes by name (several nodes)."""
    peers = peers or {}
    core = _policy_and_services(state, node)
    tplan = plan_tunnels(state, core.services, node.name, node.proxy_ip, {n: p.wire_ip for n, p in peers.items()})
    ups, up_warnings = mtls_upstreams(core.upstreams, state, node.name, node.trust_domain,
                                      {n: (p.wire_ip, dict(p.mtls_ports)) for n, p in peers.items()})
    extra = tplan.flags()  # this node's pods (LOCAL, STRICT) and its tunnel address
    plan = replace(
        core, services=tplan.services, upstreams=ups, tunnels=tplan,
        endpoints=tuple(replace(e, flags=e.flags | extra[e.ip]) if extra.get(e.ip) else e for e in core.endpoints),
        # the node's own addresses, and the other nodes' (their proxies and tunnels): identity NODE, which
        # the kernel lets into any pod (the proxy applied the L7 rules, the tunnel the L3/L4 ones)
        node_endpoints=tuple((ip, NODE_IDENTITY, extra.get(ip, 0)) for ip in dict.fromkeys(
            [node.proxy_ip, node.proxy_ip6, *node.host_ips, *(a for _, p in sorted(peers.items()) for a in (p.wire_ip, *p.addresses))])
            if ip),
        warnings=core.warnings + tplan.warnings + up_warnings,
    )
    # repr of secrets shows digests, never keys, so the version follows a new key too
    return replace(plan, version=hashlib.sha256(repr(plan).encode()).hexdigest()[:16])


def identity_labels(pod: Pod) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({**pod.label_dict, NAMESPACE_LABEL: pod.namespace}.items()))


def _labels_text(labels: tuple[tuple[str, str], ...]) -> str:
    return ",".join(f"{k}={v}" for k, v in labels)


def _selects(sel: Selector, default_ns: str, labels: dict[str, str]) -> bool:
    """A source selector: the policy's namespace unless it names another (Cilium's rule for fromEndpoints)."""
    if sel.namespace() is None and labels.get(NAMESPACE_LABEL) != default_ns:
        return False
    return sel.matches(labels)


def _selects_own(sel: Selector, ns: str, labels: dict[str, str]) -> bool:
    """An endpointSelector: pods of the policy's own namespace only, whatever it says (a policy in one
    namespace must never lock out or open up another namespace's pods)."""
    return labels.get(NAMESPACE_LABEL) == ns and sel.matches(labels)


def _target_port(pod: Pod, target: int | str) -> int | None:
    if isinstance(target, int):
        return target
    return next((p.port for p in pod.ports if p.name == target), None)


def _http_rules(matches: Iterable[HttpMatch]) -> tuple[HttpRule, ...]:
    out = []
    for m in matches:
        headers: list[tuple[str, str | None]] = []
        for h in m.headers:
            name, sep, value = h.partition(":")
            headers.append((name.strip(), value.strip() if sep else None))
        out.append(HttpRule(m.method, m.path, tuple(headers)))
    return tuple(out)


def _policy_and_services(state: ClusterState, node: NodeSpec) -> NodePlan:
    """Identities, policy, services and L7 (before tunnels; no version yet)."""
    # every pod has an identity (its labels), even before it has an address: kubelet starts a
    # pod's containers before the API shows its IP, and their sockets must be known by then
    every = sorted(state.pods, key=lambda p: p.key)
    pods = [p for p in every if p.ip]
    id_labels = {p.key: identity_labels(p) for p in every}
    ident_of_labels = alloc((_labels_text(lbl) for lbl in id_labels.values()), IDENTITY_MIN, 1 << 24)
    pod_identity = {k: ident_of_labels[_labels_text(lbl)] for k, lbl in id_labels.items()}
    identities = {pod_identity[k]: dict(id_labels[k]) for k in pod_identity}
    ips_of_identity: dict[int, list[str]] = defaultdict(list)
    for p in pods:
        ips_of_identity[pod_identity[p.key]] += [ip for ip in (p.ip, p.ip6) if ip]

    policies = sorted(state.policies, key=lambda p: p.key)
    rule_text: dict[int, str] = {}
    entries: dict[tuple[int, int, int, int], PolicyEntry] = {}
    selected_by: dict[int, list[str]] = defaultdict(list)
    enforcing: set[int] = set()  # selected by at least one policy in enforce mode
    # (dst identity, port) -> RBAC policies; port 0 = rules for any port (L4 only)
    l7: dict[tuple[int, int], list[RbacPolicy]] = defaultdict(list)
    l4: dict[tuple[int, int], list[RbacPolicy]] = defaultdict(list)
    rule_id = 0
    dsts_of = {pol.key: sorted(i for i, lbl in identities.items() if _selects_own(pol.endpoint_selector, pol.namespace, lbl))
               for pol in policies}
    for pol in policies:
        for d in dsts_of[pol.key]:
            selected_by[d].append(pol.key)
            if pol.mode == "enforce":
                enforcing.add(d)
    for pol in policies:
        # an audit policy reports on what it would deny; it never allows: where an enforcing
        # policy also selects a pod, the audit policy's rules add nothing there
        dsts = [d for d in dsts_of[pol.key] if pol.mode == "enforce" or d not in enforcing]
        for idx, rule in enumerate(pol.ingress):
            rule_id += 1
            name = f"{pol.key}#ingress[{idx}]"
            rule_text[rule_id] = f"MeshPolicy {pol.key} spec.ingress[{idx}]"
            srcs = _sources(rule.from_endpoints, pol, identities)
            src_ips = None if srcs is None else tuple(sorted(ip for s in srcs for ip in ips_of_identity[s]))
            port_rules = rule.to_ports or ()
            for d in dsts:
                targets: list[tuple[int, int, tuple[HttpMatch, ...] | None]] = []
                if not port_rules:
                    targets += [(0, PROTO_TCP, None), (0, PROTO_UDP, None)]
                for pr in port_rules:
                    ports = list(pr.ports) or [(0, "ANY")]
                    targets.extend((p, n, pr.http) for p, proto in ports for n in _PROTOS[proto])
                for port, proto_n, matches in targets:
                    for s in (srcs if srcs is not None else [0]):
                        # L7 only while every rule allowing it has L7 rules (an L4-only rule allows all of it)
                        was = entries.get((d, s, port, proto_n))
                        entries[(d, s, port, proto_n)] = PolicyEntry(
                            d, s, port, was.rule_id if was else rule_id, proto_n,
                            (was.l7 if was else True) and matches is not None and proto_n == PROTO_TCP)
                    if proto_n != PROTO_TCP:
                        continue
                    rp = RbacPolicy(name, src_ips, _http_rules(matches or ()), pol.mode == "audit")
                    (l7 if matches is not None else l4)[(d, port)].append(rp)

    endpoints = tuple(_endpoint(p, pod_identity[p.key], pod_identity[p.key] in selected_by, pod_identity[p.key] in enforcing)
                      for p in pods)
    sources = tuple((e.pod, e.identity, e.flags) for e in (
        _endpoint(p, pod_identity[p.key], pod_identity[p.key] in selected_by, pod_identity[p.key] in enforcing)
        for p in every if not p.ip))

    out = _services(state, pods, pod_identity, l7, l4, node, enforcing)
    plan = NodePlan(
        "", tuple(out.services), endpoints,
        tuple(sorted(entries.values(), key=lambda e: (e.dst_identity, e.src_identity, e.port, e.proto))),
        tuple(out.http),
        tuple(sorted((i, _labels_text(tuple(sorted(lbl.items())))) for i, lbl in identities.items())),
        tuple(sorted(rule_text.items())), tuple(out.hosts),
        tuple(sorted((i, tuple(v)) for i, v in selected_by.items())),
        tuple(state.errors) + tuple(out.warnings) + tuple(mtls_conflicts(state)), out.upstreams, out.gateways, out.secrets,
        tuple((ns, mode) for ns, mode in mtls_modes(state).items() if mode != MTLS_DEFAULT),
        service_names=tuple(sorted((vip, s.key) for s in state.services for vip in (s.cluster_ip, s.cluster_ip6) if vip)),
        sources=sources, gateway_status=out.gateway_status,
    )
    return plan


def _endpoint(p: Pod, identity: int, selected: bool, enforcing: bool) -> Endpoint:
    audit = selected and not enforcing
    return Endpoint(p.key, p.ip, identity, selected, audit, p.ip6,
                    (EP_INGRESS_ENFORCED if selected else 0) | (EP_AUDIT if audit else 0))


def _sources(froms: tuple[Selector, ...] | None, pol: MeshPolicy,
             identities: dict[int, dict[str, str]]) -> list[int] | None:
    if froms is None:
        return None
    return sorted(i for i, lbl in identities.items() if any(_selects(s, pol.namespace, lbl) for s in froms))


def _label_index(pods: list[Pod]) -> dict[tuple[str, str, str], list[Pod]]:
    """(namespace, label, value) -> pods: a service's members without scanning every pod
    (10,000 services x 10,000 pods would be 10^8 label checks)."""
    index: dict[tuple[str, str, str], list[Pod]] = defaultdict(list)
    for p in pods:
        for k, v in p.labels:
            index[(p.namespace, k, v)].append(p)
    return index


def _members(s: Service, by_label: dict[tuple[str, str, str], list[Pod]]) -> list[Pod]:
    sel = Selector(s.selector)
    candidates = min((by_label.get((s.namespace, k, v), []) for k, v in s.selector), key=len)
    return [p for p in candidates if sel.matches(p.label_dict)]


def _targets(s: Service, sp: ServicePort, members: list[Pod], warnings: list[str]) -> list[tuple[Pod, int]]:
    targets: list[tuple[Pod, int]] = []
    for p in members:
        tp = _target_port(p, sp.target_port)
        if tp is None:
            warnings.append(f"Service {s.key} port {sp.port}: pod {p.key} has no port named {sp.target_port!r}")
            continue
        targets.append((p, tp))
    return sorted(targets, key=lambda t: (t[0].ip, t[1]))


def _dns(s: Service) -> tuple[str, ...]:
    return (s.name, f"{s.name}.{s.namespace}", f"{s.name}.{s.namespace}.svc", f"{s.name}.{s.namespace}.svc.cluster.local")


@dataclass
class _Ports:
    """What the service loop collects: kernel entries by port name, the TCP port index, and
    per TCP port the RBAC of its first backend's L7 policies."""

    named: list[tuple[str, ServiceEntry]] = field(default_factory=list)
    index: dict[str, PortInfo] = field(default_factory=dict)
    # per TCP service port with a policy-selected backend: one RBAC set per backend identity (each must allow)
    rbac: dict[str, list[tuple[RbacPolicy, ...]]] = field(default_factory=dict)
    l7: set[str] = field(default_factory=set)  # service ports a backend's HTTP rules cover
    hosts: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _slice_backends(s: Service, sp: ServicePort, slices: list[EndpointSlice], family: str) -> tuple[Backend, ...]:
    """A selectorless Service port's backends: the ready addresses of its EndpointSlices, on the
    slice port of the same name and protocol."""
    return tuple(sorted({Backend(ip, port) for sl in slices if sl.address_type == family
                         for name, port, proto in sl.ports if name == sp.name and proto == sp.protocol for ip in sl.addresses}))


def _service_ports(svcs: list[Service], pods: list[Pod], pod_identity: dict[str, int],
                   l7: dict[tuple[int, int], list[RbacPolicy]], l4: dict[tuple[int, int], list[RbacPolicy]],
                   slices: dict[str, list[EndpointSlice]], enforcing: set[int]) -> _Ports:
    """Per service port: an IPv4 entry, an IPv6 entry when dual-stack. A Service without a
    selector takes its backends from its EndpointSlices (e.g. default/kubernetes: the API server)."""
    ids = alloc((n for s in svcs if s.cluster_ip for p in s.ports for n in (port_name(s, p), port_name(s, p) + "@v6")),
                1, (1 << 31) - 1)
    out = _Ports()
    by_label = _label_index(pods)
    for s in svcs:
        members = _members(s, by_label) if s.selector else []
        if not s.cluster_ip:  # headless: no VIP for the kernel; a route may still send to its pods (Envoy)
            for sp in (sp for sp in s.ports if sp.protocol == "TCP"):
                ends = (tuple((p.ip, tp) for p, tp in _targets(s, sp, members, [])) if s.selector else
                        tuple((b.ip, b.port) for b in _slice_backends(s, sp, slices.get(s.key, []), "IPv4")))
                out.index[port_name(s, sp)] = PortInfo(s, sp, ends)
            continue
        out.hosts += [(vip, _dns(s)) for vip in (s.cluster_ip, s.cluster_ip6) if vip]
        for sp in s.ports:
            name = port_name(s, sp)
            proto = PROTO_UDP if sp.protocol == "UDP" else PROTO_TCP
            if not s.selector:
                own = slices.get(s.key, [])
                v4 = ServiceEntry(s.cluster_ip, sp.port, ids[name], _slice_backends(s, sp, own, "IPv4"), proto=proto,
                                  affinity_timeout_s=s.affinity_timeout_s)
                out.named.append((name, v4))
                if s.cluster_ip6:
                    out.named.append((name, replace(v4, vip=s.cluster_ip6, service_id=ids[name + "@v6"],
                                                    backends=_slice_backends(s, sp, own, "IPv6"))))
                if proto == PROTO_TCP:
                    out.index[name] = PortInfo(s, sp, tuple((b.ip, b.port) for b in v4.backends))
                continue
            targets = _targets(s, sp, members, out.warnings)
            backends = tuple(Backend(p.ip, tp) for p, tp in targets)
            v4 = ServiceEntry(s.cluster_ip, sp.port, ids[name], backends, proto=proto, affinity_timeout_s=s.affinity_timeout_s)
            out.named.append((name, v4))
            if s.cluster_ip6:
                backends6 = tuple(Backend(p.ip6, tp) for p, tp in targets if p.ip6)
                out.named.append((name, replace(v4, vip=s.cluster_ip6, service_id=ids[name + "@v6"], backends=backends6)))
            if proto != PROTO_TCP:
                continue
            out.index[name] = PortInfo(s, sp, tuple((b.ip, b.port) for b in backends))
            # every backend's rules, not the first's: a request must be allowed by the policy of each
            # backend identity Envoy may pick (an identity selected by an enforcing policy without rules
            # for the port allows nothing; one without any policy, everything)
            keys = sorted({(pod_identity[p.key], tp) for p, tp in targets if isinstance(tp, int)})
            sets = [tuple(l7.get(k, []) + l4.get(k, []) + l4.get((k[0], 0), [])) for k in keys
                    if k[0] in enforcing or l7.get(k) or l4.get(k) or l4.get((k[0], 0))]
            if sets:
                out.rbac[name] = sets
            if any(l7.get(k) for k in keys):
                out.l7.add(name)
    return out


@dataclass(frozen=True)
class _L7:
    services: list[ServiceEntry]
    http: list[HttpService]
    upstreams: tuple[Upstream, ...]
    gateways: tuple[GatewayListener, ...]
    secrets: tuple[TlsSecret, ...]
    hosts: list[tuple[str, tuple[str, ...]]]
    warnings: list[str]
    gateway_status: tuple[tuple[str, str], ...]


def _services(state: ClusterState, pods: list[Pod], pod_identity: dict[str, int],
              l7: dict[tuple[int, int], list[RbacPolicy]], l4: dict[tuple[int, int], list[RbacPolicy]],
              node: NodeSpec, enforcing: set[int]) -> _L7:
    """Kernel service entries, and an Envoy listener for every port an HTTP rule covers or a
    MeshRoute names (with the RBAC of its backends), clusters for what routes reach, ingress."""
    svcs = sorted(state.services, key=lambda s: s.key)
    slices: dict[str, list[EndpointSlice]] = defaultdict(list)
    for sl in state.endpoint_slices:
        slices[f"{sl.namespace}/{sl.service}"].append(sl)
    ports = _service_ports(svcs, pods, pod_identity, l7, l4, slices, enforcing)
    routes, warnings, mesh_status = mesh_routes(state.routes, ports.index)
    ingress, secrets, ingress_warnings = ingress_gateway(
        state.ingresses, state.secrets, ports.index,
        IngressListen(node.ingress_ip, node.ingress_http_port, node.ingress_https_port))
    reserved: dict[str, set[int]] = {}
    for gl in ingress:
        reserved.setdefault(gl.listen_ip, set()).add(gl.port)
    gw = plan_gateways(state, ports.index, node.gateway_addresses, reserved)
    status = dict(gw.status)
    for key, parents in mesh_status.items():
        status[key] = {"parents": [*status.get(key, {}).get("parents", []), *parents]}
    l7_names = sorted(ports.l7 | set(routes))
    http = []
    for name in l7_names:
        info = ports.index[name]
        rbac = ports.rbac.get(name, [])
        vips = tuple(ip for ip in (info.service.cluster_ip, info.service.cluster_ip6) if ip)
        if not vips:  # headless: no VIP a connection could be redirected from (a route backend only)
            continue
        http.append(HttpService(name, node.proxy_ip, L7_PORT, info.backends, rbac[0] if rbac else None,
                                also=tuple(rbac[1:]),
                                listen_ip6=node.proxy_ip6 if info.service.cluster_ip6 else "", routes=routes.get(name, ()),
                                match_ips=vips, match_port=info.port.port))
    proxy = {h.name: L7_PORT for h in http}
    wanted = {c for h in http for c in route_clusters(service_routes(h))}
    wanted |= {c for gl in ingress for ch in gl.chains for vh in ch.virtual_hosts for c in route_clusters(vh.routes)}
    wanted |= gw.clusters
    entries = [replace(e, proxy_ip=node.proxy_ip6 if ":" in e.vip else node.proxy_ip, proxy_port=proxy[n])
               if n in proxy else e for n, e in ports.named]
    used = tuple(dict.fromkeys((*gw.secrets, *secrets)))
    ups = upstreams(wanted, ports.index, gw.grpc | grpc_backends(state.routes, ports.index))
    return _L7(entries, http, ups, (*gw.listeners, *ingress), used, ports.hosts,
               ports.warnings + warnings + ingress_warnings + gw.warnings,
               tuple(sorted((key_name(k), json.dumps(v, sort_keys=True)) for k, v in status.items())))
