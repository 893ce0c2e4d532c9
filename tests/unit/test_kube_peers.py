"""The peer records in the API (mesh.kube.peers): parsed as the cluster directory's files are; one
that lies about its node or does not parse is skipped and named, never half-used."""

from __future__ import annotations

from typing import Any

from mesh.kube.peers import PEER_KEY, KubePeers, peer_name
from mesh.model import ClusterState
from mesh.status import NodeRecord


def _cm(name: str, text: str, rv: str = "1") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "webb-system", "resourceVersion": rv}, "data": {PEER_KEY: text}}


def test_records_are_read_checked_and_versioned() -> None:
    peers = KubePeers(api=None, node="kn1", wire_ip="10.120.0.1", pod_cidr="10.120.0.0/24", gateway="10.120.0.1")
    good = NodeRecord("kn2", "10.120.1.1", "10.120.1.0/24", "10.120.1.1", {}, {"10.120.1.5:80": 10001}).to_json()
    liar = NodeRecord("kn2", "10.120.1.1", "10.120.1.0/24", "10.120.1.1").to_json()
    peers._on("ADDED", _cm(peer_name("kn2"), good))
    peers._on("ADDED", _cm(peer_name("kn3"), liar))  # says it is kn2
    peers._on("ADDED", _cm(peer_name("kn4"), "{not json"))
    peers._on("ADDED", _cm(peer_name("kn1"), good))  # its own: never read as a peer
    v0 = peers.version()
    recs = peers.read()
    assert list(recs) == ["kn2"] and recs["kn2"].mtls_ports == {"10.120.1.5:80": 10001}
    assert any("webb-peer-kn3" in e and "says node 'kn2'" in e for e in peers.errors)
    assert any("webb-peer-kn4" in e for e in peers.errors)
    state = peers.assign(ClusterState())
    assert len(state.errors) == 2  # reported with the state, as the cluster directory's errors are

    peers._on("MODIFIED", _cm(peer_name("kn1"), good, rv="2"))
    assert peers.version() == v0  # this node's own record does not make it sync again
    peers._on("DELETED", _cm(peer_name("kn2"), good))
    assert peers.version() != v0 and "kn2" not in peers.read()
    peers._on("SYNC", {"seen": {("webb-system", peer_name("kn1"))}})
    assert peers.read() == {} and peers.errors == []
