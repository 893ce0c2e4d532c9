"""An in-memory index of the cluster's objects → ``ClusterState``, with last-good semantics.

Fed by watch events (``upsert`` / ``delete``), from kopf handlers in the operator or from
``mesh.kube.watch`` in the agent. An object that fails validation keeps its previous good
version in force and its error is reported (the same rule as the standalone source); the
error is cleared when the object is fixed or deleted. Thread-safe: one lock, short sections.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from typing import Any

from mesh.kube.translate import NetworkPolicyDoc, from_api, namespace_labels, network_policy, network_policy_doc
from mesh.manifests import ManifestError, Obj
from mesh.model import ClusterState, MeshPolicy, Namespace, Pod
from mesh.state import Key, LastGood, assemble, key_of


@dataclass(frozen=True)
class Entry:
    obj: Obj | NetworkPolicyDoc | None  # None: read, not kept (e.g. a Secret not of type TLS)
    resource_version: str
    generation: int


@dataclass
class Indexer:
    _store: LastGood[Entry] = field(default_factory=LastGood)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def upsert(self, kind: str, doc: dict[str, Any]) -> str | None:
        """Add or replace an object; returns its validation error (the previous version stays)."""
        key = key_of(kind, doc)
        meta = doc.get("metadata") or {}
        try:
            obj: Obj | NetworkPolicyDoc | None = (network_policy_doc(doc) if kind == "NetworkPolicy"
                                                  else from_api(kind, doc))
        except ManifestError as e:
            with self._lock:
                return self._store.refuse(key, str(e))
        with self._lock:
            self._store.accept(key, Entry(obj, str(meta.get("resourceVersion", "")), int(meta.get("generation") or 0)))
        return None

    def delete(self, kind: str, doc: dict[str, Any]) -> None:
        key = key_of(kind, doc)
        with self._lock:
            self._store.forget(key)

    def error(self, kind: str, namespace: str, name: str) -> str | None:
        with self._lock:
            return self._store.errors.get((kind, namespace, name))

    def generation(self, kind: str, namespace: str, name: str) -> int | None:
        """The generation in force (the last good one), None if there is none."""
        with self._lock:
            e = self._store.good.get((kind, namespace, name))
        return e.generation if e is not None else None

    def version(self) -> str:
        """Changes when any object in force or any error changes (resourceVersions, not content)."""
        with self._lock:
            items = sorted((k, e.resource_version) for k, e in self._store.good.items())
            errors = sorted(self._store.errors.items())
        return hashlib.sha256(repr((items, errors)).encode()).hexdigest()[:16]

    def state(self) -> ClusterState:
        return self.snapshot()[0]

    def snapshot(self, *kinds: str) -> tuple[ClusterState, dict[str, int]]:
        """The state and, taken at the same moment, the generations of the given kinds in it."""
        with self._lock:
            objs = [e.obj for _, e in sorted(self._store.good.items()) if e.obj is not None]
            errors = [err for _, err in sorted(self._store.errors.items())]
            refused = list(self._store.errors)
            generations = {f"{k[0]} {k[1]}/{k[2]}": e.generation for k, e in self._store.good.items() if k[0] in kinds}
        return self._state(objs, errors, refused), generations

    def _state(self, objs: list[Obj | NetworkPolicyDoc], errors: list[str], refused: list[Key]) -> ClusterState:
        namespaces = [o for o in objs if isinstance(o, Namespace)]
        pods = [o for o in objs if isinstance(o, Pod)]
        policies = [o for o in objs if isinstance(o, MeshPolicy)]
        labels = {ns.name: namespace_labels(ns) for ns in namespaces}
        for np in (o for o in objs if isinstance(o, NetworkPolicyDoc)):
            try:
                pol, warnings = network_policy(np, labels, pods)
            except ManifestError as e:  # checked on upsert: only a bug gets here
                errors.append(str(e))
                continue
            errors += warnings
            if pol is not None:
                policies.append(pol)
        return assemble([*(o for o in objs if not isinstance(o, (MeshPolicy, NetworkPolicyDoc))), *policies], errors, refused)

    def keys(self, kind: str) -> list[Key]:
        with self._lock:
            return sorted({k for k in (*self._store.good, *self._store.errors) if k[0] == kind})
