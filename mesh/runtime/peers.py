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
import ipaddress
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mesh.model import ClusterState, Pod
from mesh.runtime import cidrs
from mesh.source import Source

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


@dataclass(frozen=True)
class NodeRecord:
    """What one node published: its addresses and its pods' IPs."""

    node: str
    wire_ip: str
    pod_cidr: str
    gateway: str
    pods: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # "ns/name" -> {"ip", "ip6"}
    # mTLS: "pod ip:port" -> the port on wire_ip where this node takes Envoy-originated mTLS for it
    mtls_ports: Mapping[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"node": self.node, "wire_ip": self.wire_ip, "pod_cidr": self.pod_cidr, "gateway": self.gateway,
                           "pods": {k: dict(v) for k, v in sorted(self.pods.items())},
                           "mtls_ports": dict(sorted(self.mtls_ports.items()))}, indent=1, sort_keys=True) + "\n"

    @classmethod
    def parse(cls, text: str, where: str) -> NodeRecord:
        """A node file, checked: its pod IPs must lie in its pod CIDR."""
        try:
            d: Any = json.loads(text)
            if not isinstance(d, dict) or not isinstance(d.get("pods", {}), dict):
                raise ValueError("not a JSON object with a 'pods' object")
            rec = cls(str(d["node"]), str(d.get("wire_ip", "")), str(d["pod_cidr"]), str(d.get("gateway", "")),
                      {str(k): {"ip": str(v.get("ip", "")), "ip6": str(v.get("ip6", ""))} for k, v in d["pods"].items()},
                      {str(k): int(v) for k, v in dict(d.get("mtls_ports") or {}).items()})
            if any(not 0 < p < 65536 for p in rec.mtls_ports.values()):
                raise ValueError("mtls_ports: a port is outside 1-65535")
            net = cidrs.parse(rec.pod_cidr, "pod_cidr", "pod CIDR", version=4).net
            for key, p in rec.pods.items():
                if ipaddress.IPv4Address(p["ip"]) not in net:
                    raise ValueError(f"pod {key}: IP {p['ip']} is outside the node's pod CIDR {net}")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"read node file {where}: {e}") from None
        return rec


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


class ClusterSource:
    """A source (the manifest directory) with the other nodes' pod IPs laid over it."""

    def __init__(self, inner: Source, peers: Peers) -> None:
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
