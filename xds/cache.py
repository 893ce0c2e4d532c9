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
class _Entry:
    wire: bytes  # serialized once, sent as is
    version: str  # content hash
    needs: tuple[str, frozenset[str]]  # (type URL, names) this resource refers to


def _entry(type_url: str, res: Any) -> _Entry:
    wire = res.SerializeToString(deterministic=True)
    return _Entry(wire, hashlib.blake2b(wire, digest_size=8).hexdigest(), _needs(type_url, res))


def _needs(type_url: str, res: Any) -> tuple[str, frozenset[str]]:
    needs, names = references(type_url, res)
    return needs, frozenset(names)


def _type_version(entries: dict[str, _Entry]) -> str:
    """Order-free hash of (name, version) pairs: XOR of per-pair hashes."""
    acc = 0
    for name, e in entries.items():
        acc ^= int.from_bytes(hashlib.blake2b(f"{name}\0{e.version}".encode(), digest_size=8).digest(), "big")
    return f"{acc:016x}"


@dataclass(frozen=True)
class Snapshot:
    """One node's resources. Versions are content hashes: per resource (delta xDS) and per
    type (state of the world), so equal content always has equal versions.

    ``Snapshot.of(resources, previous)`` reuses the work done for every resource that is the
    very same object as in ``previous`` (a memoizing builder returns unchanged resources as
    is): a one-service change in a 10,000-service mesh serializes and checks only that service."""

    resources: dict[str, dict[str, Any]]  # type URL -> name -> proto message
    entries: dict[str, dict[str, _Entry]]  # type URL -> name -> wire bytes, version, references
    versions: dict[str, str]  # type URL -> hash of the type's resources

    @classmethod
    def of(cls, resources: dict[str, dict[str, Any]], previous: Snapshot | None = None) -> Snapshot:
        entries: dict[str, dict[str, _Entry]] = {}
        versions = {}
        for t in TYPE_ORDER:
            items = resources.get(t, {})
            old_res = previous.resources[t] if previous else {}
            old = previous.entries[t] if previous else {}
            entries[t] = {n: old[n] if old_res.get(n) is res else _entry(t, res) for n, res in items.items()}
            versions[t] = _type_version(entries[t])
        return cls({t: dict(resources.get(t, {})) for t in TYPE_ORDER}, entries, versions)

    @property
    def resource_versions(self) -> dict[str, dict[str, str]]:
        return {t: {n: e.version for n, e in es.items()} for t, es in self.entries.items()}

    def wire(self, type_url: str, name: str) -> bytes:
        return self.entries[type_url][name].wire

    def problems(self) -> list[str]:
        """go-control-plane's Consistent(): every EDS name in CDS has endpoints, every RDS name
        in LDS has a route configuration (and every SDS name in LDS a secret)."""
        out = []
        for type_url in TYPE_ORDER:
            for name, e in self.entries[type_url].items():
                needs, names = e.needs
                for missing in sorted(n for n in names if n not in self.entries.get(needs, {})):
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
