"""Snapshot cache: per-node resource sets with content-hash versions. No gRPC here.

The server reads snapshots and reports back what each Envoy ACKed or NACKed; the cache
keeps that record so status can say, per node, which version Envoy actually runs and why
it refused the last one.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from xds.resources import MESSAGES, TYPE_ORDER, WILDCARD_TYPES, references


class InconsistentSnapshotError(ValueError):
    pass


@dataclass(frozen=True, slots=True)  # 40,000 of them at 10k services: no per-object dict
class Entry:
    wire: bytes = field(repr=False)  # serialized once, sent as is (may hold a private key: never in repr)
    version: str  # content hash
    needs: tuple[tuple[str, frozenset[str]], ...]  # (type URL, names) this resource refers to
    mix: int  # hash of (name, version): XORed into the type's version


def wire_of(res: Any) -> bytes:
    return bytes(res.SerializeToString(deterministic=True))


def make_entry(type_url: str, name: str, res: Any, wire: bytes | None = None,
           refs: dict[str, set[str]] | None = None) -> Entry:
    """``refs``: the resource's references when the caller knows them (``res`` may then be None)."""
    wire = wire_of(res) if wire is None else wire
    version = hashlib.blake2b(wire, digest_size=8).hexdigest()
    needs = tuple((t, frozenset(names)) for t, names in sorted((references(type_url, res) if refs is None else refs).items()))
    mix = int.from_bytes(hashlib.blake2b(f"{name}\0{version}".encode(), digest_size=8).digest(), "big")
    return Entry(wire, version, needs, mix)


Problem = tuple[str, str, str, str]  # (type URL, name) needs (type URL, name) that is not there


def _missing(entries: dict[str, dict[str, Entry]], type_url: str, name: str) -> list[Problem]:
    return [(type_url, name, needs, n) for needs, names in entries[type_url][name].needs
            for n in sorted(names) if n not in entries.get(needs, {})]


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


Changes = dict[str, dict[str, Any]]  # type URL -> name -> new resource, or None: removed


@dataclass(frozen=True)
class Snapshot:
    """One node's resources. Versions are content hashes: per resource (delta xDS) and per
    type (state of the world; an order-free XOR of per-resource hashes), so equal content always
    has equal versions, however the snapshot was reached.

    ``updated(changes)`` derives the next snapshot from this one in time proportional to the
    change: a one-service change in a 10,000-service mesh serializes, hashes and checks only that
    service's resources. ``of(resources, previous)`` serializes everything but shares, with
    ``previous``, every entry whose bytes did not change (no new hash, no second copy).

    Only the wire bytes are kept, not the proto objects they came from (those take about five
    times the memory: 10,000 services, ~80 MB); ``resource()`` parses one back when asked."""

    # repr shows none: an SDS Secret carries a private key
    entries: dict[str, dict[str, Entry]] = field(repr=False)  # type URL -> name -> wire bytes, version, references
    mixes: dict[str, int]  # type URL -> XOR of its entries' mix
    missing: tuple[Problem, ...]  # references to resources that are not there (must be none to serve)
    changed: dict[str, frozenset[str]] = field(default_factory=dict)  # names changed since the parent...
    parent_versions: dict[str, str] = field(default_factory=dict)  # ...the snapshot it was derived from

    @classmethod
    def of(cls, resources: Changes, previous: Snapshot | None = None) -> Snapshot:
        return cls.stream(((t, n, res) for t in TYPE_ORDER for n, res in resources.get(t, {}).items()), previous)

    @classmethod
    def stream(cls, items: Iterable[tuple[str, str, Any]], previous: Snapshot | None = None) -> Snapshot:
        """``of`` for resources made one at a time (type URL, name, resource): each is serialized
        before the next is made, so a full sync never holds every proto at once."""
        entries: dict[str, dict[str, Entry]] = {t: {} for t in TYPE_ORDER}
        for t, n, res in items:
            wire = wire_of(res)
            prev = previous.entries[t].get(n) if previous else None
            entries[t][n] = prev if prev is not None and prev.wire == wire else make_entry(t, n, res, wire)
        return cls.of_entries(entries)

    @classmethod
    def of_entries(cls, entries: dict[str, dict[str, Entry]]) -> Snapshot:
        """From entries made already (``xds.incremental`` keeps them across syncs)."""
        mixes = {t: _xor(e.mix for e in entries[t].values()) for t in TYPE_ORDER}
        missing = tuple(p for t in TYPE_ORDER for n in entries[t] for p in _missing(entries, t, n))
        return cls(entries, mixes, missing)

    def updated(self, changes: Changes) -> Snapshot:
        """This snapshot with ``changes`` applied (a name mapped to None is removed)."""
        entries = {t: dict(v) if changes.get(t) else v for t, v in self.entries.items()}
        mixes = dict(self.mixes)
        removed = False
        for t, items in changes.items():
            for n, res in items.items():
                old = entries[t].pop(n, None)
                if old is not None:
                    mixes[t] ^= old.mix
                if res is None:
                    removed = removed or old is not None
                    continue
                entries[t][n] = e = make_entry(t, n, res)
                mixes[t] ^= e.mix
        touched = {(t, n) for t, items in changes.items() for n in items}
        if removed:  # something may still name what went away: check everything
            missing = tuple(p for t in TYPE_ORDER for n in entries[t] for p in _missing(entries, t, n))
        else:  # earlier gaps not yet filled, and what the new and changed resources name
            missing = tuple(p for p in self.missing if (p[0], p[1]) not in touched and p[3] not in entries[p[2]])
            missing += tuple(p for t, n in sorted(touched) if n in entries[t] for p in _missing(entries, t, n))
        return Snapshot(entries, mixes, missing,
                        {t: frozenset(items) for t, items in changes.items() if items}, self.versions)

    def resource(self, type_url: str, name: str) -> Any:
        """The resource ``name`` of ``type_url``, parsed back from its wire bytes (KeyError if none)."""
        msg = MESSAGES[type_url]()
        msg.ParseFromString(self.entries[type_url][name].wire)
        return msg

    def problems(self) -> list[str]:
        """go-control-plane's Consistent(): every EDS name in CDS has endpoints, every RDS (and
        SDS) name in LDS a route configuration (a secret)."""
        return [f"{_short(t)} {n} needs {_short(nt)} {m}" for t, n, nt, m in self.missing]

    @property
    def versions(self) -> dict[str, str]:
        return {t: f"{m:016x}" for t, m in self.mixes.items()}

    @property
    def resource_versions(self) -> dict[str, dict[str, str]]:
        return {t: {n: e.version for n, e in es.items()} for t, es in self.entries.items()}

    def wire(self, type_url: str, name: str) -> bytes:
        return self.entries[type_url][name].wire

    @property
    def version(self) -> str:
        return hashlib.sha256("".join(self.versions[t] for t in TYPE_ORDER).encode()).hexdigest()[:16]


def _xor(values: Any) -> int:
    acc = 0
    for v in values:
        acc ^= v
    return acc


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
        if snap.missing:
            raise InconsistentSnapshotError(f"set snapshot for {node_id}: {'; '.join(snap.problems()[:5])}")
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
                if not snap.entries[t] and t not in WILDCARD_TYPES:
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
