"""Objects in force → ClusterState, for both sources (the manifest directory and the API server).

One key per object (kind, namespace, name), one rule for a bad new version (the last good one
stays in force, and the error says so), one assembly of the kept objects into a ClusterState.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Generic, TypeVar

from mesh.model import (
    CLUSTER_SCOPED,
    ClusterState,
    EndpointSlice,
    Gateway,
    GatewayClass,
    Ingress,
    MeshPolicy,
    MeshTLS,
    Namespace,
    Pod,
    ReferenceGrant,
    Route,
    Secret,
    Service,
)

Key = tuple[str, str, str]  # kind, namespace ("" for Namespace), name
KEEPING = "; keeping the previous version"
T = TypeVar("T")


def key_of(kind: str, doc: dict[str, Any]) -> Key:
    """The key of a document (parsed or not: a refused document still names its object)."""
    meta = doc.get("metadata") or {}
    meta = meta if isinstance(meta, dict) else {}
    return (kind, "" if kind in CLUSTER_SCOPED else str(meta.get("namespace") or "default"), str(meta.get("name")))


def key_name(key: Key) -> str:
    """ "Kind ns/name" (a Namespace: "Namespace name"), as errors and ``webb apply`` name objects."""
    kind, ns, name = key
    return f"{kind} {name}" if kind in CLUSTER_SCOPED else f"{kind} {ns}/{name}"


def object_key(o: Namespace | Pod | Service | MeshPolicy | Route | Ingress | Secret | MeshTLS | EndpointSlice | GatewayClass
               | Gateway | ReferenceGrant) -> Key:
    if isinstance(o, (Namespace, GatewayClass)):
        return (type(o).__name__, "", o.name)
    if isinstance(o, Route):
        return (o.kind, o.namespace, o.name)
    return (type(o).__name__, o.namespace, o.name)


class LastGood(Generic[T]):
    """The last good version of every object, and why a newer one was refused."""

    def __init__(self) -> None:
        self.good: dict[Key, T] = {}
        self.errors: dict[Key, str] = {}

    def accept(self, key: Key, value: T) -> None:
        self.good[key] = value
        self.errors.pop(key, None)

    def refuse(self, key: Key, error: str) -> str:
        """Record why ``key``'s new version was refused; the error says whether an older one stays."""
        self.errors[key] = error + (KEEPING if key in self.good else "")
        return self.errors[key]

    def forget(self, key: Key) -> None:
        self.good.pop(key, None)
        self.errors.pop(key, None)


def assemble(objs: Iterable[object], errors: Iterable[str], refused: Iterable[Key] = ()) -> ClusterState:
    """The ClusterState of the objects in force (any other object is left out); ``refused``: the
    objects whose newest version was refused."""
    objs = list(objs)

    def of(cls: type[T]) -> tuple[T, ...]:
        return tuple(o for o in objs if isinstance(o, cls))

    return ClusterState(namespaces=of(Namespace), pods=of(Pod), services=of(Service), policies=of(MeshPolicy),
                        routes=of(Route), ingresses=of(Ingress), secrets=of(Secret), mtls=of(MeshTLS),
                        endpoint_slices=of(EndpointSlice), gateway_classes=of(GatewayClass), gateways=of(Gateway),
                        grants=of(ReferenceGrant), errors=tuple(errors),
                        refused=tuple(sorted(key_name(k) for k in refused)))
