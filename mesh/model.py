"""The cluster model: plain, frozen dataclasses, the input of the pure planner (``mesh.plan``).

It owns the user-facing vocabulary: selectors, policies with their HTTP matches, route matches
and retries, Services, Pods, Secrets. Imports nothing but the standard library."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
SYSTEM_NAMESPACE = "webb-system"  # the mesh's own: node proxy identity, self-test pods, node reports
# mTLS between nodes, per namespace (docs/crds/meshtls.md): STRICT refuses plaintext from outside
# the mesh, PERMISSIVE takes both, DISABLE sends no tunnel. Without MeshTLS or label: DISABLE.
MTLS_MODES = ("STRICT", "PERMISSIVE", "DISABLE")
MTLS_LABEL = "webb.io/mtls"  # the namespace label shortcut for a MeshTLS
MTLS_DEFAULT = "DISABLE"


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # In | NotIn | Exists | DoesNotExist
    values: tuple[str, ...] = ()


@dataclass(frozen=True)
class Selector:
    """A label selector (matchLabels + matchExpressions); empty selects everything."""

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in self.match_labels):
            return False
        for r in self.match_expressions:
            present = r.key in labels
            if r.operator == "In" and not (present and labels[r.key] in r.values):
                return False
            if r.operator == "NotIn" and present and labels[r.key] in r.values:
                return False
            if r.operator == "Exists" and not present:
                return False
            if r.operator == "DoesNotExist" and present:
                return False
        return True

    def namespace(self) -> str | None:
        """The namespace this selector pins (Cilium's k8s:io.kubernetes.pod.namespace)."""
        return dict(self.match_labels).get(NAMESPACE_LABEL)


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ContainerPort:
    port: int
    name: str = ""
    protocol: str = "TCP"


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    labels: tuple[tuple[str, str], ...] = ()
    command: tuple[str, ...] = ()
    ports: tuple[ContainerPort, ...] = ()
    service_account: str = "default"
    ip: str = ""  # status.podIP: from the runtime (standalone) or the API (cluster)
    node: str = ""
    ip6: str = ""  # the IPv6 of status.podIPs (dual stack); "" when single-stack
    uid: str = ""  # metadata.uid (a cluster's pods: kubelet names the pod's cgroup by it)
    qos: str = ""  # status.qosClass: Guaranteed | Burstable | BestEffort (where kubelet puts the cgroup)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass(frozen=True)
class ServicePort:
    port: int
    target_port: int | str
    protocol: str = "TCP"
    name: str = ""
    app_protocol: str = ""

    @property
    def http2(self) -> bool:
        """HTTP/2 (h2c) to the backends: appProtocol, or the Istio port-name convention."""
        if self.app_protocol:
            return self.app_protocol.lower() in H2_APP_PROTOCOLS
        return self.name.lower().split("-")[0] in H2_PORT_PREFIXES


H2_APP_PROTOCOLS = ("kubernetes.io/h2c", "grpc", "h2c", "http2")
H2_PORT_PREFIXES = ("grpc", "http2", "h2c")


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    selector: tuple[tuple[str, str], ...]
    ports: tuple[ServicePort, ...]
    cluster_ip: str = ""
    affinity_timeout_s: int = 0  # sessionAffinity: ClientIP (timeoutSeconds); 0 = None
    cluster_ip6: str = ""  # the IPv6 of spec.clusterIPs (dual stack)
    headless: bool = False  # clusterIP None: no VIP (the kernel balances nothing); routes reach its endpoints

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class EndpointSlice:
    """The backends of a Service without a selector (discovery.k8s.io/v1): its ready addresses
    and named ports. ``service``: the label kubernetes.io/service-name."""

    namespace: str
    name: str
    service: str
    address_type: str  # IPv4 | IPv6
    addresses: tuple[str, ...]  # of the ready endpoints
    ports: tuple[tuple[str, int, str], ...]  # (name, port, protocol)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class HttpMatch:
    method: str | None = None
    path: str | None = None
    headers: tuple[str, ...] = ()  # "Name: value" or "Name" (present)


@dataclass(frozen=True)
class PortRule:
    ports: tuple[tuple[int, str], ...]  # (port, protocol); empty = all ports
    http: tuple[HttpMatch, ...] | None = None  # None: no L7 rule on these ports


@dataclass(frozen=True)
class IngressRule:
    from_endpoints: tuple[Selector, ...] | None  # None: from anywhere
    to_ports: tuple[PortRule, ...] = ()  # empty: all ports, no L7


@dataclass(frozen=True)
class MeshPolicy:
    namespace: str
    name: str
    endpoint_selector: Selector
    ingress: tuple[IngressRule, ...]
    mode: str = "enforce"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ParentRef:
    """Gateway API ParentReference: a Service (GAMMA, east-west) or a Gateway (north-south)."""

    name: str
    port: int | None = None  # None: every port of the Service / every listener of the Gateway
    kind: str = "Service"  # Service | Gateway
    namespace: str = ""  # "": the route's
    section_name: str = ""  # a Gateway listener's name; "": every listener


@dataclass(frozen=True)
class BackendRef:
    name: str
    port: int | None
    weight: int = 1
    namespace: str = ""  # "": the route's; another needs a ReferenceGrant there
    kind: str = "Service"  # anything else is kept and reported (ResolvedRefs False, InvalidKind)
    group: str = ""
    request_headers: HeaderModifier | None = None  # backendRefs[].filters: RequestHeaderModifier


@dataclass(frozen=True)
class HeaderMatch:
    name: str
    value: str
    type: str = "Exact"  # Exact | RegularExpression (RE2, whole value)


@dataclass(frozen=True)
class RouteMatch:
    """Gateway API HTTPRouteMatch. ``path_type``: Exact, PathPrefix (whole path elements:
    /a matches /a and /a/b, not /ab), RegularExpression (RE2, whole path), or Prefix
    (a plain string prefix: Ingress ImplementationSpecific)."""

    path_type: str = "PathPrefix"
    path: str = "/"
    method: str | None = None
    headers: tuple[HeaderMatch, ...] = ()
    query: tuple[HeaderMatch, ...] = ()  # queryParams (Exact | RegularExpression)


@dataclass(frozen=True)
class Retry:
    attempts: int  # retries after the first try (Gateway API, Istio): at most 1 + attempts tries
    per_try_timeout_ms: int = 0  # 0: only the request timeout bounds each try
    codes: tuple[int, ...] = ()  # HTTP statuses that are retried
    retry_on: tuple[str, ...] = ()  # Envoy retry conditions; both empty: 5xx and reset


@dataclass(frozen=True)
class HeaderModifier:
    """RequestHeaderModifier / ResponseHeaderModifier: set (replace), add (append), remove."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class Redirect:
    """RequestRedirect; None fields keep the request's."""

    scheme: str | None = None
    hostname: str | None = None
    port: int | None = None
    path_type: str | None = None  # ReplaceFullPath | ReplacePrefixMatch
    path: str | None = None
    status_code: int = 302


@dataclass(frozen=True)
class Rewrite:
    """URLRewrite; None fields keep the request's."""

    hostname: str | None = None
    path_type: str | None = None  # ReplaceFullPath | ReplacePrefixMatch
    path: str | None = None


@dataclass(frozen=True)
class RouteFilters:
    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None
    redirect: Redirect | None = None
    rewrite: Rewrite | None = None


@dataclass(frozen=True)
class RouteRule:
    matches: tuple[RouteMatch, ...]
    backends: tuple[BackendRef, ...]
    timeout_ms: int | None = None
    retry: Retry | None = None
    filters: RouteFilters = field(default_factory=RouteFilters)
    backend_timeout_ms: int | None = None  # timeouts.backendRequest (0: none)


@dataclass(frozen=True)
class Route:
    """A Gateway API HTTPRoute (or a legacy MeshRoute, read as one). Parents that are Services
    steer pod-to-service traffic (GAMMA); parents that are Gateways, the Gateway's listeners."""

    namespace: str
    name: str
    parents: tuple[ParentRef, ...]
    rules: tuple[RouteRule, ...]
    hostnames: tuple[str, ...] = ()
    kind: str = "HTTPRoute"
    generation: int = 0

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


GATEWAY_GROUP = "gateway.networking.k8s.io"
CLUSTER_SCOPED = ("Namespace", "GatewayClass")  # kinds without a namespace
GATEWAY_CONTROLLER = "webb.io/gateway-controller"


@dataclass(frozen=True)
class GatewayClass:
    name: str
    controller: str
    generation: int = 0

    @property
    def key(self) -> str:
        return self.name


@dataclass(frozen=True)
class CertRef:
    name: str
    namespace: str = ""  # "": the Gateway's
    kind: str = "Secret"
    group: str = ""


@dataclass(frozen=True)
class Listener:
    """A Gateway listener. ``namespaces``: From Same | All | Selector (``selector``)."""

    name: str
    port: int
    protocol: str  # HTTP | HTTPS | TLS | ...
    hostname: str = ""
    tls_mode: str = ""  # Terminate | Passthrough ("" without TLS)
    certificates: tuple[CertRef, ...] = ()
    namespaces: str = "Same"
    selector: Selector | None = None
    kinds: tuple[tuple[str, str], ...] = ()  # allowedRoutes.kinds (group, kind); empty: the protocol's


@dataclass(frozen=True)
class Gateway:
    namespace: str
    name: str
    class_name: str
    listeners: tuple[Listener, ...]
    addresses: tuple[str, ...] = ()  # spec.addresses (IPAddress) asked for
    generation: int = 0
    created: str = ""  # metadata.creationTimestamp (RFC 3339, sorts in time order): older Gateways choose first
    assigned: tuple[str, ...] = ()  # status.addresses: where it is served now (a Gateway keeps its address)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ReferenceGrant:
    """Lets objects of ``from_`` (group, kind, namespace) refer to objects of ``to`` (group, kind,
    name; "" = any name) in this namespace."""

    namespace: str
    name: str
    from_: tuple[tuple[str, str, str], ...]
    to: tuple[tuple[str, str, str], ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def allows(self, src: tuple[str, str, str], to_group: str, to_kind: str, to_name: str) -> bool:
        """``src``: (group, kind, namespace) of the referring object."""
        return src in self.from_ and any(g == to_group and k == to_kind and n in ("", to_name) for g, k, n in self.to)


@dataclass(frozen=True)
class IngressBackend:
    service: str
    port: int | str  # number or the Service port's name


@dataclass(frozen=True)
class IngressPath:
    path: str
    path_type: str  # Exact | Prefix | ImplementationSpecific
    backend: IngressBackend


@dataclass(frozen=True)
class IngressHostRule:
    host: str  # "" = any host
    paths: tuple[IngressPath, ...]


@dataclass(frozen=True)
class IngressTlsEntry:
    hosts: tuple[str, ...]
    secret: str  # a kubernetes.io/tls Secret in the Ingress' namespace


@dataclass(frozen=True)
class Ingress:
    namespace: str
    name: str
    class_name: str
    rules: tuple[IngressHostRule, ...] = ()
    tls: tuple[IngressTlsEntry, ...] = ()
    default_backend: IngressBackend | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, repr=False)
class Secret:
    """A kubernetes.io/tls Secret (other types are not kept). repr() shows digests only: key
    material is never printed or logged, yet a new key still changes the plan version."""

    namespace: str
    name: str
    cert_pem: bytes
    key_pem: bytes

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def __repr__(self) -> str:
        digest = hashlib.sha256(self.cert_pem + b"\0" + self.key_pem).hexdigest()[:16]
        return f"Secret({self.key!r}, sha256={digest})"


@dataclass(frozen=True)
class MeshTLS:
    """The mTLS mode of a namespace: STRICT | PERMISSIVE | DISABLE."""

    namespace: str
    name: str
    mode: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ClusterState:
    namespaces: tuple[Namespace, ...] = ()
    pods: tuple[Pod, ...] = ()
    services: tuple[Service, ...] = ()
    policies: tuple[MeshPolicy, ...] = ()
    routes: tuple[Route, ...] = ()  # HTTPRoute, GRPCRoute, MeshRoute
    ingresses: tuple[Ingress, ...] = ()
    secrets: tuple[Secret, ...] = ()
    mtls: tuple[MeshTLS, ...] = ()
    endpoint_slices: tuple[EndpointSlice, ...] = ()
    gateway_classes: tuple[GatewayClass, ...] = ()
    gateways: tuple[Gateway, ...] = ()
    grants: tuple[ReferenceGrant, ...] = ()
    errors: tuple[str, ...] = field(default=())  # objects rejected by the source, with why
    refused: tuple[str, ...] = field(default=())  # "Kind ns/name" of each object whose newest version was refused


def _in_force(state: ClusterState) -> dict[str, MeshTLS]:
    """Per namespace, the MeshTLS that sets its mode: with several, the name that sorts first."""
    out: dict[str, MeshTLS] = {}
    for m in sorted(state.mtls, key=lambda m: (m.namespace, m.name)):
        out.setdefault(m.namespace, m)
    return out


def _label_mode(ns: Namespace) -> str | None:
    mode = dict(ns.labels).get(MTLS_LABEL)
    return mode if mode in MTLS_MODES else None  # a bad value never gets here: the parser refuses it


def mtls_mode(state: ClusterState, namespace: str) -> str:
    """A namespace's mTLS mode: its MeshTLS (the name that sorts first, when several), else its
    label ``webb.io/mtls``, else DISABLE."""
    m = _in_force(state).get(namespace)
    if m is not None:
        return m.mode
    ns = next((n for n in state.namespaces if n.name == namespace), None)
    return (_label_mode(ns) if ns is not None else None) or MTLS_DEFAULT


def mtls_modes(state: ClusterState) -> dict[str, str]:
    """``mtls_mode`` of every namespace the state names (namespaces, pods, MeshTLS objects) at once."""
    out = {ns: MTLS_DEFAULT for ns in sorted({p.namespace for p in state.pods})}
    out.update((n.name, _label_mode(n) or MTLS_DEFAULT) for n in state.namespaces)
    out.update((ns, m.mode) for ns, m in _in_force(state).items())
    return dict(sorted(out.items()))


def mtls_conflicts(state: ClusterState) -> list[str]:
    """Warnings for the MeshTLS objects that are not in force (another one in the namespace sorts first)."""
    winners = _in_force(state)
    return [f"MeshTLS {m.key}: ignored: MeshTLS {winners[m.namespace].key} sets the mode of namespace {m.namespace} "
            f"(one MeshTLS per namespace: the name that sorts first wins); delete one of them"
            for m in sorted(state.mtls, key=lambda m: m.key) if winners[m.namespace].name != m.name]
