"""Snapshot cache: per-node resource sets with content-hash versions. No gRPC here.

The server reads snapshots and reports back what each Envoy ACKed or NACKed; the cache
keeps that record so status can say, per node, which version Envoy actually runs and why
it refused the last one.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xds.resources import TYPE_ORDER, WILDCARD_TYPES, references


class InconsistentSnapshotError(ValueError):
    pass


@dataclass(frozen=True)
class Snapshot:
    """One node's resources. Versions are content hashes: per resource (delta xDS) and per
    type (state of the world), so equal content always has equal versions."""

    resources: dict[str, dict[str, Any]]  # type URL -> name -> proto message
    versions: dict[str, str]  # type URL -> hash of the type's resources
    resource_versions: dict[str, dict[str, str]]  # type URL -> name -> hash
    serialized: dict[str, dict[str, bytes]]  # type URL -> name -> wire bytes (serialized once)

    @classmethod
    def of(cls, resources: dict[str, dict[str, Any]]) -> Snapshot:
        versions, rvs, wire = {}, {}, {}
        for type_url in TYPE_ORDER:
            items = resources.get(type_url, {})
            wire[type_url] = {n: m.SerializeToString(deterministic=True) for n, m in items.items()}
            rvs[type_url] = {n: hashlib.sha256(b).hexdigest()[:16] for n, b in wire[type_url].items()}
            h = hashlib.sha256()
            for name in sorted(items):
                h.update(name.encode() + b"\0" + rvs[type_url][name].encode())
            versions[type_url] = h.hexdigest()[:16]
        return cls({t: dict(resources.get(t, {})) for t in TYPE_ORDER}, versions, rvs, wire)

    def problems(self) -> list[str]:
        """go-control-plane's Consistent(): every EDS name in CDS has endpoints, every RDS name
        in LDS has a route configuration."""
        out = []
        for type_url in TYPE_ORDER:
            for name, res in self.resources[type_url].items():
                needs, names = references(type_url, res)
                for missing in sorted(names - set(self.resources.get(needs, {}))):
                    out.append(f"{type_url.rsplit('.', 1)[-1]} {name} needs {needs.rsplit('.', 1)[-1]} {missing}")
        return out

    @property
    def version(self) -> str:
        return hashlib.sha256("".join(self.versions[t] for t in TYPE_ORDER).encode()).hexdigest()[:16]


@dataclass
class TypeStatus:
    sent: str = ""
    acked: str = ""
    nacked: str = ""  # version Envoy refused (not resent)
    error: str = ""  # Envoy's message for it
    updated: float = field(default_factory=time.time)


class SnapshotCache:
    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._snapshots: dict[str, Snapshot] = {}
        self._status: dict[str, dict[str, TypeStatus]] = {}
        self._watchers: list[Callable[[str], None]] = []

    def set_snapshot(self, node_id: str, snap: Snapshot) -> None:
        """Serve ``snap`` to the node; an inconsistent one is refused (the last one stays)."""
        problems = snap.problems()
        if problems:
            raise InconsistentSnapshotError(f"set snapshot for {node_id}: {'; '.join(problems[:5])}")
        with self._lock:
            self._snapshots[node_id] = snap
            watchers = list(self._watchers)
        for w in watchers:
            w(node_id)

    def snapshot(self, node_id: str) -> Snapshot | None:
        with self._lock:
            return self._snapshots.get(node_id)

    def watch(self, callback: Callable[[str], None]) -> Callable[[], None]:
        with self._lock:
            self._watchers.append(callback)

        def cancel() -> None:
            with self._lock:
                self._watchers.remove(callback)
        return cancel

    # ---- what Envoy said ----
    def _type_status(self, node_id: str, type_url: str) -> TypeStatus:
        return self._status.setdefault(node_id, {}).setdefault(type_url, TypeStatus())

    def record(self, node_id: str, type_url: str, *, sent: str | None = None, acked: str | None = None,
               nacked: str | None = None, error: str = "") -> None:
        with self._lock:
            st = self._type_status(node_id, type_url)
            if sent is not None:
                st.sent = sent
            if acked is not None:  # Envoy runs a good config now: an older rejection is history
                st.acked = acked
                st.nacked, st.error = "", ""
            if nacked is not None:
                st.nacked, st.error = nacked, error
            st.updated = time.time()
            self._lock.notify_all()

    def status(self, node_id: str) -> dict[str, TypeStatus]:
        with self._lock:
            return {t: TypeStatus(**vars(s)) for t, s in self._status.get(node_id, {}).items()}

    def wait_acked(self, node_id: str, snap: Snapshot, timeout_s: float) -> bool:
        """True once Envoy ACKed every type of ``snap``; False on timeout or a NACK of it."""
        deadline = time.monotonic() + timeout_s

        def settled() -> bool | None:
            sts = self._status.get(node_id, {})
            for t in TYPE_ORDER:
                st = sts.get(t)
                if not snap.resources[t] and t not in WILDCARD_TYPES:
                    continue  # Envoy asks for EDS/RDS only while a cluster/listener names them
                if st is None:
                    return None
                if st.nacked == snap.versions[t]:
                    return False
                if st.acked != snap.versions[t]:
                    return None
            return True

        with self._lock:
            while True:
                result = settled()
                if result is not None:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
