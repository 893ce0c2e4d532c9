"""The operator's state and its one job: keep every MeshPolicy's, MeshRoute's and MeshTLS' status true.

No kopf here (the handlers call in). ``observe`` feeds the indexer; the status of each CR is
computed by ``status.cr_status`` and written with a merge patch of the status subresource,
only when it changed (a write makes a new watch event, which then finds nothing to do).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from mesh.kube.gateway_status import GATEWAY_KINDS, gateway_api_status
from mesh.kube.indexer import Indexer
from mesh.kube.status import cr_status, same, warnings_to_report
from mesh.kube.translate import RESOURCES
from mesh.kube.watch import api_path, request
from mesh.state import Key, key_name, key_of

log = logging.getLogger("webb.operator")
STATUS_KINDS = ("MeshPolicy", "MeshRoute", "MeshTLS", *GATEWAY_KINDS)


@dataclass
class Controller:
    api: Any  # kubernetes.client.ApiClient
    indexer: Indexer = field(default_factory=Indexer)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    _bodies: dict[Key, dict[str, Any]] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def observe(self, kind: str, what: str, doc: dict[str, Any]) -> None:
        key = key_of(kind, doc)
        if what == "DELETED":
            self.indexer.delete(kind, doc)
            with self._lock:
                self._bodies.pop(key, None)
        else:
            self.indexer.upsert(kind, doc)
            if kind in STATUS_KINDS:
                with self._lock:
                    self._bodies[key] = doc
                self._write_status(key)
        if kind == "MeshTLS":  # one MeshTLS per namespace is in force: the others' status follows this one
            with self._lock:
                siblings = [k for k in self._bodies if k[0] == kind and k[1] == key[1] and k != key]
            for k in siblings:
                self._write_status(k)
        if kind in ("GatewayClass", "Gateway"):
            # whose parent a route names is known only once its Gateway and class are: watches of
            # different kinds arrive in any order, so a route seen first is written again now
            with self._lock:
                routes = [k for k in self._bodies if k[0] in GATEWAY_KINDS and k[0] not in ("GatewayClass", "Gateway")]
            for k in routes:
                self._write_status(k)

    def _shadowed_by(self, key: Key) -> str | None:
        """For a MeshTLS not in force: the one that is (another valid one in the namespace sorts first)."""
        kind, ns, name = key
        if kind != "MeshTLS":
            return None
        valid = sorted(k[2] for k in self.indexer.keys(kind) if k[1] == ns and self.indexer.generation(*k) is not None)
        return f"MeshTLS {ns}/{valid[0]}" if valid and valid[0] < name else None

    def node_report(self, node: str, report: dict[str, Any] | None) -> None:
        with self._lock:
            if report is None:
                self.reports.pop(node, None)
            else:
                self.reports[node] = report
            keys = list(self._bodies)
        for key in keys:
            self._write_status(key)

    def _event(self, doc: dict[str, Any], kind: str, reason: str, message: str, now: str) -> None:
        """A Warning Event on the object (``kubectl describe`` and ``kubectl get events`` show it):
        a rejection or a NACK, told once per change of the condition."""
        meta = doc.get("metadata") or {}
        ns = str(meta.get("namespace") or "default")
        body = {"apiVersion": "v1", "kind": "Event", "type": "Warning", "reason": reason, "message": message[:1024],
                "metadata": {"generateName": f"{meta.get('name', 'object')}.", "namespace": ns},
                "involvedObject": {"apiVersion": doc.get("apiVersion", ""), "kind": kind, "name": meta.get("name", ""),
                                   "namespace": ns, "uid": meta.get("uid", ""),
                                   "resourceVersion": meta.get("resourceVersion", "")},
                "source": {"component": "webb-operator"}, "reportingComponent": "webb.io/operator",
                "reportingInstance": "webb-operator", "firstTimestamp": now, "lastTimestamp": now, "count": 1}
        try:
            request(self.api, "POST", f"/api/v1/namespaces/{ns}/events", body)
        except Exception as e:  # noqa: BLE001 - an Event is best effort: the status says it all the same
            log.info("event on %s %s/%s: %s", kind, ns, meta.get("name"), e)

    def _write_status(self, key: Key) -> None:
        kind, ns, name = key
        with self._lock:
            doc = self._bodies.get(key)
            reports = dict(self.reports)
        if doc is None:
            return
        meta, spec = doc.get("metadata") or {}, doc.get("spec") or {}
        previous = doc.get("status") or {}
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if kind in GATEWAY_KINDS:
            state = self.indexer.state()
            gst = gateway_api_status(kind, key_name(key), doc, self.indexer.error(kind, ns, name), reports, now,
                                     {c.name: c.controller for c in state.gateway_classes},
                                     {g.key: g.class_name for g in state.gateways})
            if gst is None or gst == previous:
                return
            st = gst
        else:
            st = cr_status(f"{kind} {ns}/{name}", int(meta.get("generation") or 0), self.indexer.error(kind, ns, name),
                           str(spec.get("mode") or "enforce"), reports, previous, now, self._shadowed_by(key))
            if same(st, previous):
                return
            for reason, message in warnings_to_report(st, previous):
                self._event(doc, kind, reason, message, now)
        try:
            out = request(self.api, "PATCH", api_path(RESOURCES[kind], ns, name, "status"), {"status": st},
                          content_type="application/merge-patch+json")
        except Exception as e:  # noqa: BLE001 - gone meanwhile, or a conflict: the next event writes again
            log.info("write status of %s %s/%s: %s", kind, ns, name, e)
            return
        with self._lock:
            if key in self._bodies and out:
                self._bodies[key] = {**self._bodies[key], "status": out.get("status") or st}
