"""A NACK quarantines the object(s) that caused it, not the node.

When Envoy refuses a plan, the objects that feed Envoy (policies, routes, Ingresses, TLS Secrets,
Services, Gateway API objects) and changed since the last plan Envoy accepted are the suspects. The agent tries the
plan with every suspect held back (its last accepted version in force, or absent if new); if Envoy
takes that, the suspects are added back one at a time and each one Envoy refuses is quarantined
with Envoy's message. A quarantined object stays held back, without another NACK, until it
changes; everything else (other objects, pods, the datapath's L3/L4 maps) keeps converging.

Pure bookkeeping over ``ClusterState``: the agent does the Envoy round trips.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from mesh.model import ClusterState, Gateway, GatewayClass, Ingress, MeshPolicy, ReferenceGrant, Route, Secret, Service
from mesh.state import Key, key_name, object_key

# the ClusterState fields whose objects make Envoy's config
FIELDS = ("services", "policies", "routes", "ingresses", "secrets", "gateway_classes", "gateways", "grants")
_FIELD_TYPES: dict[str, type] = {"services": Service, "policies": MeshPolicy, "routes": Route, "ingresses": Ingress,
                                 "secrets": Secret, "gateway_classes": GatewayClass, "gateways": Gateway, "grants": ReferenceGrant}
MAX_SUSPECTS = 16  # narrowed one by one up to this many; above it, all suspects are held back together


def envoy_objects(state: ClusterState) -> dict[Key, Any]:
    return {object_key(o): o for f in FIELDS for o in getattr(state, f)}


def with_objects(state: ClusterState, objs: dict[Key, Any]) -> ClusterState:
    """``state`` with its Envoy-feeding objects replaced by ``objs`` (in key order)."""
    ordered = [objs[k] for k in sorted(objs)]
    by_field = {f: tuple(o for o in ordered if isinstance(o, _FIELD_TYPES[f])) for f in FIELDS}
    return replace(state, **by_field)  # type: ignore[arg-type]  # each field gets its own type (_FIELD_TYPES)


@dataclass
class Quarantine:
    accepted: dict[Key, Any] = field(default_factory=dict)  # the Envoy-feeding objects of the last accepted plan
    held: dict[Key, tuple[Any, str]] = field(default_factory=dict)  # key -> (the refused version, Envoy's message)

    def hold_back(self, state: ClusterState) -> ClusterState:
        """``state`` with every quarantined object at its last accepted version; an object that
        changed since it was quarantined is released (tried again)."""
        objs = envoy_objects(state)
        for k in list(self.held):
            if objs.get(k) != self.held[k][0]:
                del self.held[k]
        return self.revert(state, list(self.held))

    def revert(self, state: ClusterState, keys: list[Key]) -> ClusterState:
        objs = envoy_objects(state)
        for k in keys:
            if k in self.accepted:
                objs[k] = self.accepted[k]
            else:
                objs.pop(k, None)
        return with_objects(state, objs)

    def suspects(self, state: ClusterState) -> list[Key]:
        """The Envoy-feeding objects that differ from the last accepted plan (new, changed)."""
        objs = envoy_objects(state)
        return sorted(k for k, o in objs.items() if self.accepted.get(k) != o)

    def hold(self, state: ClusterState, keys: list[Key], why: str) -> None:
        objs = envoy_objects(state)
        for k in keys:
            if k in objs:
                self.held[k] = (objs[k], why)

    def accept(self, state: ClusterState) -> None:
        self.accepted = envoy_objects(state)

    def errors(self) -> list[str]:
        return [f"{key_name(k)}: Envoy rejected it ({why}); quarantined: "
                + ("its previous version stays in force" if k in self.accepted else "it is not in force")
                + "; fix it and apply again" for k, (_, why) in sorted(self.held.items())]

    def names(self) -> list[str]:
        return [key_name(k) for k in sorted(self.held)]

    def reasons(self) -> dict[str, str]:
        """"Kind ns/name" -> Envoy's message, for the status and the CRs' Applied condition."""
        return {key_name(k): why for k, (_, why) in sorted(self.held.items())}
