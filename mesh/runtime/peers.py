"""Several nodes, one set of manifests: which pods this node runs, and where the others' are.

Every agent started with ``--cluster-dir DIR`` publishes ``DIR/nodes/<node>.json`` after each
sync (written to a temporary file, then renamed)::

    {"node": "mn2", "wire_ip": "10.250.0.2", "pod_cidr": "10.244.232.0/24", "gateway": "10.244.232.1",
     "pods": {"default/web": {"ip": "10.244.232.2", "ip6": "fd00:10:244::2"}}}

and reads the other nodes' files into its ClusterState before reconcile: a pod whose
``spec.nodeName`` is another node gets that node's IP for it, so a Service has backends on
every node. The other nodes' files are part of the source version, so a change in them makes
the agent sync again. Cross-node traffic is IPv4 (the wire routes the IPv4 pod CIDRs; every
node has the same IPv6 ULA by default), so remote pods are taken without their IPv6.

Assignment: a pod runs on the node its ``spec.nodeName`` names. With a cluster directory, a pod
without one runs nowhere and is reported; without (one node), it runs here, as always.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from mesh.model import ClusterState, Pod
from mesh.source import Source
from mesh.status import NodeRecord

__all__ = ["ClusterSource", "NodeRecord", "PeerDirectory", "Peers", "node_file", "split_pods"]

NODES_DIR = "nodes"


def node_file(cluster_dir: Path, node: str) -> Path:
    return cluster_dir / NODES_DIR / f"{node}.json"


def split_pods(pods: Iterable[Pod], node: str) -> tuple[list[Pod], list[Pod]]:
    """(pods this node runs, the others'): a pod runs where its nodeName says; one without a
    nodeName runs here (a clustered source has already dropped those, with an error)."""
    mine: list[Pod] = []
    others: list[Pod] = []
    for p in pods:
        (mine if p.node in ("", node) else others).append(p)
    return mine, others


class Peers:
    """This node's file in the cluster directory, and the other nodes' files."""

    def __init__(self, cluster_dir: Path, node: str, wire_ip: str, pod_cidr: str, gateway: str) -> None:
        self.cluster_dir = cluster_dir
        self.node = node
        self.wire_ip = wire_ip
        self.pod_cidr = pod_cidr
        self.gateway = gateway
        self.errors: list[str] = []
        self._published = ""

    @property
    def path(self) -> Path:
        return node_file(self.cluster_dir, self.node)

    def _other_files(self) -> list[Path]:
        d = self.cluster_dir / NODES_DIR
        return sorted(p for p in d.glob("*.json") if p.stem != self.node) if d.is_dir() else []

    def version(self) -> str:
        """Content hash of the other nodes' files (not this node's own: publishing it must not
        make this node sync again)."""
        h = hashlib.sha256()
        for p in self._other_files():
            try:
                h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
            except FileNotFoundError:  # withdrawn just now
                continue
        return h.hexdigest()[:16]

    def read(self) -> dict[str, NodeRecord]:
        """The other nodes' records by node name; unreadable files are skipped and reported in ``errors``."""
        out: dict[str, NodeRecord] = {}
        errors: list[str] = []
        for p in self._other_files():
            try:
                rec = NodeRecord.parse(p.read_text(), str(p))
            except FileNotFoundError:
                continue
            except ValueError as e:
                errors.append(str(e))
                continue
            if rec.node != p.stem:
                errors.append(f"read node file {p}: it says node {rec.node!r}; a node file is named after its node")
                continue
            out[rec.node] = rec
        self.errors = errors
        return out

    def publish(self, pods: Mapping[str, tuple[str, str]], mtls_ports: Mapping[str, int] | None = None) -> bool:
        """Write this node's file (``pods``: key -> (ip, ip6); ``mtls_ports``: see NodeRecord) when
        its content changed; True if written."""
        rec = NodeRecord(self.node, self.wire_ip, self.pod_cidr, self.gateway,
                         {k: {"ip": ip, "ip6": ip6} for k, (ip, ip6) in pods.items()}, dict(mtls_ports or {}))
        text = rec.to_json()
        if text == self._published and self.path.exists():
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.node}.json.{os.getpid()}.tmp")  # not *.json: readers skip it
        tmp.write_text(text)
        tmp.replace(self.path)
        self._published = text
        return True

    def withdraw(self) -> None:
        """Remove this node's file (a clean stop: its pods are gone)."""
        self.path.unlink(missing_ok=True)
        self._published = ""

    def assign(self, state: ClusterState) -> ClusterState:
        """Pods of this node as they are (the runtime gives them IPs); pods of other nodes with
        the IP their node published (none yet: left without, reconcile skips them); pods without
        a nodeName dropped, with an error."""
        records = self.read()
        errors = list(self.errors)
        pods: list[Pod] = []
        for p in sorted(state.pods, key=lambda p: p.key):
            if not p.node:
                errors.append(f"pod {p.key} has no spec.nodeName; with several nodes, set it")
                continue
            if p.node == self.node:
                pods.append(p)
                continue
            rec = records.get(p.node)
            if rec is None:
                errors.append(f"pod {p.key} is assigned to node {p.node}, which has not published "
                              f"{node_file(self.cluster_dir, p.node)} (is its agent running with --cluster-dir?)")
                pods.append(replace(p, ip="", ip6=""))
                continue
            ip = rec.pods.get(p.key, {}).get("ip", "")
            pods.append(replace(p, ip=ip, ip6=""))
        return replace(state, pods=tuple(pods), errors=tuple(state.errors) + tuple(errors))


class PeerDirectory(Protocol):
    """Where the nodes find each other: ``Peers`` (files in a cluster directory, the embedded mode)
    or ``mesh.kube.peers.KubePeers`` (ConfigMaps, in a cluster)."""

    errors: list[str]

    def version(self) -> str: ...

    def read(self) -> dict[str, NodeRecord]: ...

    def assign(self, state: ClusterState) -> ClusterState: ...

    def publish(self, pods: Mapping[str, tuple[str, str]], mtls_ports: Mapping[str, int] | None = None) -> bool: ...

    def withdraw(self) -> None: ...


class ClusterSource:
    """A source (the manifest directory, or the API) with the other nodes' records laid over it."""

    def __init__(self, inner: Source, peers: PeerDirectory) -> None:
        self.inner = inner
        self.peers = peers
        self.errors: list[str] = []

    def version(self) -> str:
        """``<inner version>+<peers version>``: `webb apply` compares the part before the "+"."""
        return f"{self.inner.version()}+{self.peers.version()}"

    def load(self) -> ClusterState:
        state = self.peers.assign(self.inner.load())
        self.errors = list(state.errors)
        return state
