"""Several nodes: pod assignment by spec.nodeName, node files, the wire's names and CIDR checks."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from mesh.manifests import ManifestError, parse_object
from mesh.model import ClusterState, Pod
from mesh.runtime import cidrs
from mesh.runtime.cidrs import CidrConflictError, CidrError
from mesh.runtime.cluster import Wire, wire_ifname
from mesh.runtime.local import LocalNode, NodeConfig
from mesh.runtime.peers import ClusterSource, NodeRecord, Peers, node_file, split_pods


def _pod_doc(**spec: object) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "default"},
            "spec": {"containers": [{"name": "c", "command": ["sleep", "1"]}], **spec}}


def test_node_name_parsed_and_checked() -> None:
    p = parse_object(_pod_doc(nodeName="mn2"))
    assert isinstance(p, Pod) and p.node == "mn2"
    p = parse_object(_pod_doc())
    assert isinstance(p, Pod) and p.node == ""
    with pytest.raises(ManifestError, match="spec.nodeName"):
        parse_object(_pod_doc(nodeName="Node_2"))


def test_split_runs_own_and_unassigned_pods() -> None:
    pods = [Pod("default", "a", node="n1"), Pod("default", "b", node="n2"), Pod("default", "c")]
    mine, others = split_pods(pods, "n1")
    assert [p.name for p in mine] == ["a", "c"] and [p.name for p in others] == ["b"]


def _peers(tmp_path: Path, node: str, cidr: str, wire_ip: str) -> Peers:
    return Peers(tmp_path, node, wire_ip, cidr, cidr.replace(".0/24", ".1"))


def test_publish_assign_and_version(tmp_path: Path) -> None:
    n1 = _peers(tmp_path, "n1", "10.244.231.0/24", "10.250.0.1")
    n2 = _peers(tmp_path, "n2", "10.244.232.0/24", "10.250.0.2")
    v0 = n1.version()
    assert n1.publish({"default/a": ("10.244.231.2", "fd00:10:244::2")})
    assert not n1.publish({"default/a": ("10.244.231.2", "fd00:10:244::2")})  # same content: not rewritten
    assert n1.version() == v0  # its own file is not part of its version
    assert n2.version() != v0  # ...but is part of the other's
    rec = json.loads(node_file(tmp_path, "n1").read_text())
    assert rec == {"node": "n1", "wire_ip": "10.250.0.1", "pod_cidr": "10.244.231.0/24", "gateway": "10.244.231.1",
                   "pods": {"default/a": {"ip": "10.244.231.2", "ip6": "fd00:10:244::2"}}, "mtls_ports": {}}
    assert not list(tmp_path.glob("nodes/*.tmp"))

    state = ClusterState(pods=(Pod("default", "a", node="n1"), Pod("default", "b", node="n2"),
                               Pod("default", "c"), Pod("default", "d", node="n3")))
    out = n2.assign(state)
    by = {p.name: p for p in out.pods}
    assert set(by) == {"a", "b", "d"}
    assert (by["a"].ip, by["a"].ip6, by["a"].node) == ("10.244.231.2", "", "n1")  # other node: IPv4 only
    assert by["b"].ip == ""  # its own: the runtime gives it one
    assert "pod default/c has no spec.nodeName; with several nodes, set it" in out.errors
    assert any("pod default/d is assigned to node n3, which has not published" in e for e in out.errors)

    n1.withdraw()
    assert not node_file(tmp_path, "n1").exists() and n2.version() == v0


def test_bad_node_file_is_reported_and_skipped(tmp_path: Path) -> None:
    node_file(tmp_path, "n1").parent.mkdir(parents=True)
    node_file(tmp_path, "n1").write_text(NodeRecord("n1", "10.250.0.1", "10.244.231.0/24", "10.244.231.1",
                                                    {"default/a": {"ip": "10.9.9.9", "ip6": ""}}).to_json())
    node_file(tmp_path, "n3").write_text("{not json")
    n2 = _peers(tmp_path, "n2", "10.244.232.0/24", "10.250.0.2")
    assert n2.read() == {}
    assert any("outside the node's pod CIDR" in e for e in n2.errors) and any("n3.json" in e for e in n2.errors)


class _Dir:
    errors: list[str] = []

    def __init__(self) -> None:
        self.v = "abc"

    def version(self) -> str:
        return self.v

    def load(self) -> ClusterState:
        return ClusterState(pods=(Pod("default", "x"),))


def test_cluster_source_version_has_the_manifests_first(tmp_path: Path) -> None:
    src = ClusterSource(_Dir(), _peers(tmp_path, "n1", "10.244.231.0/24", "10.250.0.1"))
    assert src.version().split("+")[0] == "abc"
    assert src.load().pods == () and src.errors == ["pod default/x has no spec.nodeName; with several nodes, set it"]


def test_wire_names_and_addresses() -> None:
    w = Wire([("mn1", "10.244.231.0/24"), ("mn2", "10.244.232.0/24")], prefix="mn", cluster_cidr="10.244.0.0/16")
    assert w.netns == "webb-wire-mn" and w.namespaces == ["webb-wire-mn", "webb-node-mn1", "webb-node-mn2"]
    assert [(n.netns, n.wire_ip, n.wire_if) for n in w] == [("webb-node-mn1", "10.250.0.1", "wn-mn1"),
                                                           ("webb-node-mn2", "10.250.0.2", "wn-mn2")]
    assert len(wire_ifname("a-very-long-node-name")) <= 15
    with pytest.raises(ValueError, match="DNS label"):
        Wire([("Bad_Name", "10.244.231.0/24")])


@pytest.mark.parametrize(("nodes", "cluster", "wire", "flag"), [
    ([("a", "10.244.231.0/24"), ("b", "10.244.231.128/25")], "", "10.250.0.0/24", "--pod-cidr"),
    ([("a", "10.244.231.0/24")], "10.245.0.0/16", "10.250.0.0/24", "--cluster-cidr"),
    ([("a", "10.250.0.0/24")], "", "10.250.0.0/24", "wire_cidr"),
    ([("a", "10.244.231.0/24")], "10.0.0.0/8", "10.250.0.0/24", "wire_cidr"),
    ([("a", "10.96.1.0/24")], "", "10.250.0.0/24", "--pod-cidr"),
])
def test_wire_refuses_overlaps_naming_the_flag(nodes: list[tuple[str, str]], cluster: str, wire: str, flag: str) -> None:
    with pytest.raises(CidrConflictError, match=flag):
        Wire(nodes, prefix="t", cluster_cidr=cluster, wire_cidr=wire).check_cidrs()


@pytest.mark.parametrize(("args", "flag"), [
    ({"nodes": [("a", "10.244.231.1/24")]}, "--pod-cidr"),  # host bits set
    ({"nodes": [("a", "fd00:10:244::/64")]}, "--pod-cidr"),  # IPv6
    ({"nodes": [("a", "10.244.231.0/24")], "wire_cidr": "10.250.0/24"}, "wire_cidr"),
    ({"nodes": [("a", "10.244.231.0/24")], "cluster_cidr": "10.244.0.0/33"}, "--cluster-cidr"),
])
def test_wire_refuses_a_bad_cidr_naming_the_flag(args: dict, flag: str) -> None:
    with pytest.raises(CidrError, match=flag):
        Wire(**args)


@pytest.mark.parametrize(("cfg", "flag"), [
    (NodeConfig(pod_cidr="10.96.1.0/24"), "--pod-cidr or --service-cidr"),  # pod CIDR inside the service CIDR
    (NodeConfig(pod_cidr="10.244.1.0/24", cluster_cidr="10.245.0.0/16"), "--cluster-cidr"),
    (NodeConfig(cluster_cidr="10.0.0.0/8"), "--cluster-cidr or --service-cidr"),
    (NodeConfig(service_cidr="10.96.0.1/16"), "--service-cidr"),
])
def test_node_refuses_bad_cidrs_naming_the_flag(cfg: NodeConfig, flag: str) -> None:
    with pytest.raises((CidrError, CidrConflictError), match=flag):
        LocalNode(cfg).check_cidrs()


def test_one_cidr_check() -> None:
    a = cidrs.parse("10.244.1.0/24", "--pod-cidr", "pod CIDR", "node a")
    b = cidrs.parse("10.244.0.0/16", "--cluster-cidr", "cluster CIDR")
    v6 = cidrs.parse("fd00:10:244::/64", "pod_cidr6", "pod CIDR")
    assert str(a) == "pod CIDR 10.244.1.0/24 of node a"
    cidrs.refuse_overlaps("t", [a, v6])  # other IP version: no overlap
    cidrs.require_inside("t", [a], b)
    with pytest.raises(CidrConflictError, match="t: pod CIDR 10.244.1.0/24 of node a overlaps cluster CIDR 10.244.0.0/16; "
                                                "choose another --pod-cidr or --cluster-cidr"):
        cidrs.refuse_overlaps("t", [a, b])
    with pytest.raises(CidrConflictError, match="overlaps host route 10.244.1.128/25; choose another --pod-cidr"):
        cidrs.refuse_routes("t", [a, v6], [ipaddress.ip_network("10.244.1.128/25")])
    cidrs.refuse_routes("t", [a], [a.net], ours={a.net})  # our own route


def test_node_file_with_a_bad_pod_cidr_names_the_field() -> None:
    rec = NodeRecord("n1", "10.250.0.1", "10.244.231.1/24", "10.244.231.1", {}).to_json()
    with pytest.raises(ValueError, match="read node file n1.json: pod_cidr '10.244.231.1/24'"):
        NodeRecord.parse(rec, "n1.json")


@pytest.mark.root
def test_wire_refuses_a_host_route() -> None:
    """A route of the host (made here: a veth pair with a /24, both ends on this host, no traffic)
    overlapping a pod CIDR."""
    import subprocess

    subprocess.run(["ip", "link", "del", "wtdummy0"], capture_output=True)
    subprocess.run(["ip", "link", "add", "wtdummy0", "type", "veth", "peer", "name", "wtdummy1"], check=True,
                   capture_output=True)
    try:
        subprocess.run(["ip", "addr", "add", "10.253.7.1/24", "dev", "wtdummy0"], check=True, capture_output=True)
        for dev in ("wtdummy0", "wtdummy1"):
            subprocess.run(["ip", "link", "set", dev, "up"], check=True, capture_output=True)
        with pytest.raises(CidrConflictError, match="overlaps host route 10.253.7.0/24"):
            Wire([("a", "10.253.7.0/25")], prefix="t").check_cidrs()
    finally:
        subprocess.run(["ip", "link", "del", "wtdummy0"], capture_output=True)
