"""Several nodes through the API server: each agent publishes its peer record (``NodeRecord``:
tunnel address, pod CIDR, the mTLS ports it opened for its pods) as ConfigMap
``webb-system/webb-peer-<node>`` (label ``webb.io/peer``), and watches the other nodes' ones.

The pods themselves, their node and their IPs come from the API (kubelet writes them), so the
records carry no pods. A record is checked as the cluster directory's files are
(``NodeRecord.parse``): one that does not parse, or names another node than its ConfigMap, is
skipped and reported, never half-used. Only agents write there (a Role in webb-system), so a
pod cannot announce a tunnel.

A stopping agent does not withdraw its record: in a cluster its pods outlive it (kubelet runs
them), and a restart (an upgrade) must not take the node's tunnels out of the other nodes'
plans. A Node that is gone for good leaves its record behind until the ConfigMap is deleted;
pods are no longer scheduled there, so no plan sends traffic to it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from mesh.kube.translate import Resource
from mesh.kube.watch import api_path, request, watch_resource
from mesh.model import SYSTEM_NAMESPACE, ClusterState
from mesh.status import NodeRecord

log = logging.getLogger("webb.kube")
PEER_LABEL = "webb.io/peer"
PEER_KEY = "peer.json"
CONFIGMAPS = Resource("", "v1", "configmaps")
PUBLISH_TIMEOUT_S = 5.0


def peer_name(node: str) -> str:
    return f"webb-peer-{node}"


@dataclass
class KubePeers:
    """The peer directory of ``mesh.runtime.peers.Peers`` (``version``/``read``/``assign``/``publish``/
    ``withdraw``), kept in the API server."""

    api: Any
    node: str
    wire_ip: str
    pod_cidr: str
    gateway: str
    errors: list[str] = field(default_factory=list)
    _docs: dict[str, dict[str, Any]] = field(default_factory=dict)  # ConfigMap name -> object
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _published: str = ""

    def start(self, timeout_s: float = 30.0) -> None:
        """Watch the records; return once they were listed (or raise after ``timeout_s``)."""
        synced = threading.Event()
        self._thread = threading.Thread(target=watch_resource, args=(self.api, CONFIGMAPS, self._on, self._stop, synced),
                                        kwargs={"namespace": SYSTEM_NAMESPACE, "label_selector": PEER_LABEL},
                                        name="watch-peers", daemon=True)
        self._thread.start()
        if not synced.wait(timeout_s):
            raise TimeoutError(f"list ConfigMaps {SYSTEM_NAMESPACE} -l {PEER_LABEL}: not done after {timeout_s:.0f} s")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _on(self, kind: str, obj: dict[str, Any]) -> None:
        with self._lock:
            if kind == "SYNC":
                for name in [n for n in self._docs if (SYSTEM_NAMESPACE, n) not in obj["seen"]]:
                    del self._docs[name]
                return
            name = str((obj.get("metadata") or {}).get("name", ""))
            if kind == "DELETED":
                self._docs.pop(name, None)
            else:
                self._docs[name] = obj

    def _others(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            return sorted((n, d) for n, d in self._docs.items() if n != peer_name(self.node))

    def version(self) -> str:
        """Changes when another node's record changes (this node's own does not count)."""
        h = hashlib.sha256()
        for name, doc in self._others():
            h.update(f"{name}\0{(doc.get('metadata') or {}).get('resourceVersion', '')}\0".encode())
        return h.hexdigest()[:16]

    def read(self) -> dict[str, NodeRecord]:
        out: dict[str, NodeRecord] = {}
        errors: list[str] = []
        for name, doc in self._others():
            where = f"ConfigMap {SYSTEM_NAMESPACE}/{name}"
            text = str((doc.get("data") or {}).get(PEER_KEY, ""))
            try:
                rec = NodeRecord.parse(text, where)
            except ValueError as e:
                errors.append(str(e))
                continue
            if peer_name(rec.node) != name:
                errors.append(f"read {where}: it says node {rec.node!r}; the record of node N is named {peer_name('N')}")
                continue
            out[rec.node] = rec
        self.errors = errors
        return out

    def assign(self, state: ClusterState) -> ClusterState:
        """Pods carry their node and IPs from the API already: only the records' errors are added."""
        self.read()
        if not self.errors:
            return state
        return replace(state, errors=tuple(state.errors) + tuple(self.errors))

    def publish(self, pods: Mapping[str, tuple[str, str]], mtls_ports: Mapping[str, int] | None = None) -> bool:
        """Write this node's record when it changed (``pods`` is not published: the API has them).
        A failure is logged and tried again at the next publish."""
        text = NodeRecord(self.node, self.wire_ip, self.pod_cidr, self.gateway, {}, dict(mtls_ports or {})).to_json()
        if text == self._published:
            return False
        name = peer_name(self.node)
        body = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": SYSTEM_NAMESPACE, "labels": {PEER_LABEL: self.node}},
                "data": {PEER_KEY: text}}
        try:
            request(self.api, "PATCH", api_path(CONFIGMAPS, SYSTEM_NAMESPACE, name), body, content_type="application/apply-patch+yaml",
                    query={"fieldManager": f"webb-agent-{self.node}", "force": "true"}, timeout_s=PUBLISH_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - the API may be briefly away; the next sync publishes again
            log.warning("publish %s/%s: %s", SYSTEM_NAMESPACE, name, e)
            return False
        self._published = text
        return True

    def withdraw(self) -> None:
        """Nothing: the node's pods outlive its agent (see the module's docstring)."""
