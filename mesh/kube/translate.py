"""Kubernetes API objects → model objects.

Everything a user writes goes through ``mesh.manifests.parse_object``, the parser of the
standalone source, so both modes accept and refuse the same things with the same messages.
What the cluster owns is laid over it here: a pod's IPs (``status.podIPs``) and node
(``spec.nodeName``), a Service's VIPs (``spec.clusterIPs``, allocated by the API server).

Kubernetes NetworkPolicy (``networking.k8s.io/v1``, ingress) becomes an L3/L4 ``MeshPolicy``
named ``networkpolicy:<name>``: ``podSelector`` → endpoint selector, each ``from`` peer → a
source selector (a ``namespaceSelector`` is resolved against the namespaces known at the
time), ``ports`` → destination ports (named ports resolved against the selected pods). What
the model cannot express (``ipBlock`` peers, SCTP, a port range wider than 256) is left out —
which only ever allows less — and reported as a warning naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from mesh.manifests import Ctx, ManifestError, Obj, parse_object, parse_selector
from mesh.model import NAMESPACE_LABEL, ContainerPort, IngressRule, MeshPolicy, Namespace, Pod, PortRule, Selector

NETPOL_PREFIX = "networkpolicy:"
MAX_PORT_RANGE = 256


@dataclass(frozen=True)
class Resource:
    """Where a kind is served: the API group ("" = core), version and plural."""

    group: str
    version: str
    plural: str
    optional: bool = False  # a CRD that may not be installed (Gateway API): not served = no objects

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


# the kinds Webb reads (ServiceAccount is not needed: pods carry its name). EndpointSlices give
# the backends of Services without a selector; those with one are balanced over their pods.
RESOURCES: dict[str, Resource] = {
    "Namespace": Resource("", "v1", "namespaces"),
    "Pod": Resource("", "v1", "pods"),
    "Service": Resource("", "v1", "services"),
    "Secret": Resource("", "v1", "secrets"),
    "EndpointSlice": Resource("discovery.k8s.io", "v1", "endpointslices"),
    "Ingress": Resource("networking.k8s.io", "v1", "ingresses"),
    "NetworkPolicy": Resource("networking.k8s.io", "v1", "networkpolicies"),
    "MeshPolicy": Resource("webb.io", "v1alpha1", "meshpolicies"),
    "MeshRoute": Resource("webb.io", "v1alpha1", "meshroutes"),
    "MeshTLS": Resource("webb.io", "v1alpha1", "meshtlses"),
    "GatewayClass": Resource("gateway.networking.k8s.io", "v1", "gatewayclasses", optional=True),
    "Gateway": Resource("gateway.networking.k8s.io", "v1", "gateways", optional=True),
    "HTTPRoute": Resource("gateway.networking.k8s.io", "v1", "httproutes", optional=True),
    "GRPCRoute": Resource("gateway.networking.k8s.io", "v1", "grpcroutes", optional=True),
    "TLSRoute": Resource("gateway.networking.k8s.io", "v1", "tlsroutes", optional=True),
    "ReferenceGrant": Resource("gateway.networking.k8s.io", "v1beta1", "referencegrants", optional=True),
}


def where(kind: str, doc: dict[str, Any]) -> str:
    meta = doc.get("metadata") or {}
    return f"{kind} {meta.get('name')}" if kind == "Namespace" else f"{kind} {meta.get('namespace')}/{meta.get('name')}"


def from_api(kind: str, doc: dict[str, Any]) -> Obj | None:
    """One API object → a model object; None for what the mesh does not keep (a Service
    without a selector, a Secret not of type TLS). Raises ManifestError naming the field."""
    # items of a list carry neither kind nor apiVersion: they are the resource's
    doc = {**doc, "kind": kind, "apiVersion": doc.get("apiVersion") or RESOURCES[kind].api_version}
    if kind == "Pod":
        return _pod(doc)
    return parse_object(doc)


def _ips(status: dict[str, Any]) -> tuple[str, str]:
    ips = [str(x.get("ip", "")) for x in status.get("podIPs") or [] if isinstance(x, dict)]
    if not ips and status.get("podIP"):
        ips = [str(status["podIP"])]
    v4 = next((ip for ip in ips if ip and ":" not in ip), "")
    v6 = next((ip for ip in ips if ":" in ip), "")
    return v4, v6


def _pod(doc: dict[str, Any]) -> Pod:
    spec = doc.get("spec") or {}
    try:
        parsed = parse_object(doc)
        assert isinstance(parsed, Pod)
        pod = parsed
    except ManifestError as e:
        if not e.field.startswith("spec.containers"):
            raise
        # a pod the embedded runtime could not run (several containers, the image's entrypoint):
        # kubelet runs it; the mesh needs its labels, ports and IPs only
        meta = doc.get("metadata") or {}
        ctx = Ctx(e.where)
        ports = tuple(ContainerPort(ctx.port(p.get("containerPort"), f"spec.containers[{i}].ports[{j}].containerPort"),
                                    str(p.get("name", "")), ctx.protocol(p.get("protocol"), f"spec.containers[{i}].ports[{j}].protocol"))
                      for i, c in enumerate(ctx.seq(spec.get("containers"), "spec.containers"))
                      for j, p in enumerate(ctx.seq(ctx.mapping(c, f"spec.containers[{i}]").get("ports"), f"spec.containers[{i}].ports")))
        pod = Pod(str(meta.get("namespace") or "default"), str(meta.get("name")), ctx.labels(meta.get("labels"), "metadata.labels"),
                  (), ports, str(spec.get("serviceAccountName") or "default"))
    status = doc.get("status") or {}
    ip, ip6 = _ips(status)
    meta = doc.get("metadata") or {}
    return replace(pod, ip=ip, ip6=ip6, node=str(spec.get("nodeName") or ""), uid=str(meta.get("uid") or ""),
                   qos=str(status.get("qosClass") or ""))


# ---- NetworkPolicy ----

@dataclass(frozen=True)
class NetworkPolicyDoc:
    """A NetworkPolicy as stored: translated when the state is built, since namespace
    selectors and named ports depend on the namespaces and pods of that moment."""

    namespace: str
    name: str
    doc: dict[str, Any]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def network_policy_doc(doc: dict[str, Any]) -> NetworkPolicyDoc:
    """Check what can be checked alone (selectors, ports); the translation itself is later."""
    meta = doc.get("metadata") or {}
    ns, name = str(meta.get("namespace") or "default"), str(meta.get("name"))
    np = NetworkPolicyDoc(ns, name, doc)
    network_policy(np, {}, [])  # raises ManifestError on a malformed spec
    return np


def network_policy(np: NetworkPolicyDoc, namespaces: dict[str, dict[str, str]],
                   pods: list[Pod]) -> tuple[MeshPolicy | None, list[str]]:
    """The L3/L4 MeshPolicy of a NetworkPolicy (None: it has no ingress part) and warnings."""
    ctx = Ctx(f"NetworkPolicy {np.key}")
    spec = ctx.mapping(np.doc.get("spec"), "spec")
    types = [str(t) for t in ctx.seq(spec.get("policyTypes"), "spec.policyTypes")] or ["Ingress"]
    for i, t in enumerate(types):
        if t not in ("Ingress", "Egress"):
            raise ctx.fail(f"spec.policyTypes[{i}]", f"{t!r}: use Ingress or Egress")
    warnings = [f"{ctx.where}: spec.egress: egress rules are not enforced yet"] if "Egress" in types else []
    if "Ingress" not in types:
        return None, warnings
    selected = parse_selector(ctx, spec.get("podSelector"), "spec.podSelector")
    members = [p for p in pods if p.namespace == np.namespace and selected.matches(p.label_dict)]
    rules = []
    for i, r in enumerate(ctx.seq(spec.get("ingress"), "spec.ingress")):
        f = f"spec.ingress[{i}]"
        r = ctx.mapping(r, f)
        froms = _peers(ctx, r.get("from"), f"{f}.from", np.namespace, namespaces, warnings)
        ports = _ports(ctx, r.get("ports"), f"{f}.ports", members, warnings)
        if ports is None:  # every port of the rule was left out: the rule allows nothing
            continue
        rules.append(IngressRule(froms, (PortRule(ports),) if ports else ()))
    return MeshPolicy(np.namespace, NETPOL_PREFIX + np.name, selected, tuple(rules)), warnings


def _peers(ctx: Ctx, v: Any, field: str, ns: str, namespaces: dict[str, dict[str, str]],
           warnings: list[str]) -> tuple[Selector, ...] | None:
    peers = ctx.seq(v, field)
    if not peers:
        return None  # no from: every source
    out: list[Selector] = []
    for j, peer in enumerate(peers):
        pf = f"{field}[{j}]"
        peer = ctx.mapping(peer, pf)
        ctx.only(peer, pf, ("podSelector", "namespaceSelector", "ipBlock"), "a peer")
        if "ipBlock" in peer:
            warnings.append(f"{ctx.where}: {pf}.ipBlock: address blocks are not honoured yet; this peer allows nothing")
            continue
        pods = parse_selector(ctx, peer.get("podSelector"), f"{pf}.podSelector")
        if "namespaceSelector" not in peer:
            out.append(_in_namespace(pods, ns))
            continue
        nss = parse_selector(ctx, peer.get("namespaceSelector"), f"{pf}.namespaceSelector")
        out.extend(_in_namespace(pods, name) for name, labels in sorted(namespaces.items()) if nss.matches(labels))
    return tuple(out)


def _in_namespace(sel: Selector, ns: str) -> Selector:
    labels = tuple(sorted({**dict(sel.match_labels), NAMESPACE_LABEL: ns}.items()))
    return Selector(labels, sel.match_expressions)


def _ports(ctx: Ctx, v: Any, field: str, members: list[Pod],
           warnings: list[str]) -> tuple[tuple[int, str], ...] | None:
    """() = every port; None = every listed port was left out."""
    items = ctx.seq(v, field)
    out: list[tuple[int, str]] = []
    for k, p in enumerate(items):
        pf = f"{field}[{k}]"
        p = ctx.mapping(p, pf)
        proto = str(p.get("protocol") or "TCP").upper()
        if proto == "SCTP":
            warnings.append(f"{ctx.where}: {pf}.protocol: SCTP is not supported; this port allows nothing")
            continue
        proto = ctx.protocol(proto, f"{pf}.protocol")
        port = p.get("port")
        if port is None:
            out.append((0, proto))
            continue
        if isinstance(port, str) and not port.isdigit():
            named = sorted({cp.port for pod in members for cp in pod.ports if cp.name == port})
            if not named:
                warnings.append(f"{ctx.where}: {pf}.port: no selected pod has a port named {port!r}; it allows nothing")
            out.extend((n, proto) for n in named)
            continue
        first = ctx.port(port, f"{pf}.port")
        last = ctx.port(p["endPort"], f"{pf}.endPort") if p.get("endPort") is not None else first
        if last < first:
            raise ctx.fail(f"{pf}.endPort", f"{last} is below port {first}")
        if last - first >= MAX_PORT_RANGE:
            warnings.append(f"{ctx.where}: {pf}.endPort: ranges over {MAX_PORT_RANGE} ports are not supported; "
                            "only the first port is allowed")
            last = first
        out.extend((n, proto) for n in range(first, last + 1))
    if items and not out:
        return None
    return tuple(sorted(set(out)))


def namespace_labels(ns: Namespace) -> dict[str, str]:
    """A namespace's labels, with the one the API server sets on every namespace."""
    return {**dict(ns.labels), "kubernetes.io/metadata.name": ns.name}
