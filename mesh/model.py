"""The cluster model: plain, frozen dataclasses, the input of the pure reconcile."""

from __future__ import annotations

from dataclasses import dataclass, field

NAMESPACE_LABEL = "io.kubernetes.pod.namespace"


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


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    selector: tuple[tuple[str, str], ...]
    ports: tuple[ServicePort, ...]
    cluster_ip: str = ""
    affinity_timeout_s: int = 0  # sessionAffinity: ClientIP (timeoutSeconds); 0 = None
    cluster_ip6: str = ""  # the IPv6 of spec.clusterIPs (dual stack)

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
class ClusterState:
    namespaces: tuple[Namespace, ...] = ()
    pods: tuple[Pod, ...] = ()
    services: tuple[Service, ...] = ()
    policies: tuple[MeshPolicy, ...] = ()
    errors: tuple[str, ...] = field(default=())  # objects rejected by the source, with why
