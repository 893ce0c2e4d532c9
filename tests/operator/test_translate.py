"""API objects → model: the standalone parser under the operator's indexer, NetworkPolicy → L3/L4 policy."""

from __future__ import annotations

from typing import Any

import pytest

from datapath.types import PROTO_TCP, PROTO_UDP
from mesh.kube.indexer import Indexer
from mesh.kube.translate import NETPOL_PREFIX, network_policy_doc
from mesh.manifests import ManifestError
from mesh.model import NAMESPACE_LABEL
from mesh.plan.node import NodeSpec, plan_node

NODE = NodeSpec("k1", "10.244.210.1")


def _pod(name: str, labels: dict[str, str], ip: str, ns: str = "shop", ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels, "resourceVersion": "1"},
            "spec": {"containers": [{"name": "c", "image": "busybox", "ports": ports or []},
                                    {"name": "sidecar-free", "image": "busybox"}], "nodeName": "k1"},
            "status": {"podIP": ip, "podIPs": [{"ip": ip}]}}


def _netpol(spec: dict[str, Any], name: str = "db", ns: str = "shop") -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns, "resourceVersion": "1"}, "spec": spec}


def _indexer(*netpols: dict[str, Any]) -> Indexer:
    ix = Indexer()
    for ns, labels in (("shop", {"team": "shop"}), ("ops", {"team": "ops"}), ("other", {})):
        assert ix.upsert("Namespace", {"metadata": {"name": ns, "labels": labels}}) is None
    for doc in (_pod("db", {"app": "db"}, "10.244.210.2", ports=[{"containerPort": 5432, "name": "pg"}]),
                _pod("api", {"app": "api"}, "10.244.210.3"),
                _pod("web", {"app": "web"}, "10.244.210.4"),
                _pod("monitor", {"app": "monitor"}, "10.244.210.5", ns="ops"),
                _pod("intruder", {"app": "api"}, "10.244.210.6", ns="other")):
        assert ix.upsert("Pod", doc) is None
    for np in netpols:
        assert ix.upsert("NetworkPolicy", np) is None
    return ix


def _allowed(ix: Indexer) -> tuple[dict[str, int], set[tuple[int, int, int, int]], set[str]]:
    plan = plan_node(ix.state(), NODE)
    ident = {e.pod: e.identity for e in plan.endpoints}
    return ident, {(p.dst_identity, p.src_identity, p.port, p.proto) for p in plan.policy}, {
        e.pod for e in plan.endpoints if e.enforced}


def test_pod_from_api_carries_ips_node_and_ports_of_every_container() -> None:
    ix = _indexer()
    (db,) = [p for p in ix.state().pods if p.name == "db"]
    assert (db.ip, db.node, db.command) == ("10.244.210.2", "k1", ())
    assert [(c.port, c.name) for c in db.ports] == [(5432, "pg")]


def test_networkpolicy_allows_selected_sources_on_its_port_only() -> None:
    ix = _indexer(_netpol({"podSelector": {"matchLabels": {"app": "db"}},
                           "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "api"}}}],
                                        "ports": [{"port": 5432}]}]}))
    (pol,) = ix.state().policies
    assert pol.name == NETPOL_PREFIX + "db" and pol.mode == "enforce"
    ident, allowed, enforced = _allowed(ix)
    assert enforced == {"shop/db"}
    db = ident["shop/db"]
    assert allowed == {(db, ident["shop/api"], 5432, PROTO_TCP)}  # not web, not the same labels in another namespace


def test_networkpolicy_namespace_selector_is_resolved_against_namespaces() -> None:
    ix = _indexer(_netpol({"podSelector": {"matchLabels": {"app": "db"}},
                           "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "ops"}}}]}]}))
    (pol,) = ix.state().policies
    (rule,) = pol.ingress
    assert rule.from_endpoints is not None
    assert [dict(s.match_labels) for s in rule.from_endpoints] == [{NAMESPACE_LABEL: "ops"}]
    ident, allowed, _ = _allowed(ix)
    db = ident["shop/db"]
    assert allowed == {(db, ident["ops/monitor"], 0, PROTO_TCP), (db, ident["ops/monitor"], 0, PROTO_UDP)}


def test_networkpolicy_named_port_and_protocol() -> None:
    ix = _indexer(_netpol({"podSelector": {"matchLabels": {"app": "db"}},
                           "ingress": [{"ports": [{"port": "pg"}, {"port": 53, "protocol": "UDP"}]}]}))
    ident, allowed, _ = _allowed(ix)
    db = ident["shop/db"]
    assert allowed == {(db, 0, 5432, PROTO_TCP), (db, 0, 53, PROTO_UDP)}  # no from: every source


def test_networkpolicy_without_rules_denies_all_ingress() -> None:
    ix = _indexer(_netpol({"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"]}))
    _, allowed, enforced = _allowed(ix)
    assert enforced == {"shop/db"} and allowed == set()


def test_networkpolicy_empty_pod_selector_selects_the_whole_namespace() -> None:
    ix = _indexer(_netpol({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}))
    ident, allowed, enforced = _allowed(ix)
    assert enforced == {"shop/db", "shop/api", "shop/web"}
    assert {src for _, src, _, _ in allowed} == {ident["shop/db"], ident["shop/api"], ident["shop/web"]}


def test_networkpolicy_egress_only_is_not_an_ingress_policy() -> None:
    ix = _indexer(_netpol({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]}))
    st = ix.state()
    assert st.policies == ()
    assert any("egress rules are not enforced yet" in e for e in st.errors)


def test_networkpolicy_ip_block_allows_nothing_and_says_so() -> None:
    ix = _indexer(_netpol({"podSelector": {"matchLabels": {"app": "db"}},
                           "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]}))
    _, allowed, enforced = _allowed(ix)
    assert enforced == {"shop/db"} and allowed == set()
    assert any("spec.ingress[0].from[0].ipBlock" in e for e in ix.state().errors)


@pytest.mark.parametrize(("spec", "field"), [
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 70000}]}]}, "spec.ingress[0].ports[0].port"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 80, "endPort": 79}]}]}, "spec.ingress[0].ports[0].endPort"),
    ({"podSelector": {}, "policyTypes": ["Sideways"]}, "spec.policyTypes[0]"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}, "spec.podSelector.matchExpressions[0].operator"),
])
def test_malformed_networkpolicy_names_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ManifestError) as e:
        network_policy_doc(_netpol(spec))
    assert e.value.field == field and e.value.where == "NetworkPolicy shop/db"


def test_indexer_keeps_the_last_good_version_and_reports_why() -> None:
    good = {"apiVersion": "webb.io/v1alpha1", "kind": "MeshPolicy",
            "metadata": {"name": "p", "namespace": "shop", "resourceVersion": "1", "generation": 1},
            "spec": {"endpointSelector": {"matchLabels": {"app": "db"}}, "ingress": [{"toPorts": [{"ports": [{"port": "80"}]}]}]}}
    ix = _indexer()
    assert ix.upsert("MeshPolicy", good) is None
    bad = {**good, "metadata": {**good["metadata"], "resourceVersion": "2", "generation": 2},
           "spec": {"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "eighty"}]}]}]}}
    err = ix.upsert("MeshPolicy", bad)
    assert err is not None and "spec.ingress[0].toPorts[0].ports[0].port" in err and "keeping the previous version" in err
    st = ix.state()
    assert [p.endpoint_selector.match_labels for p in st.policies] == [(("app", "db"),)]
    assert ix.generation("MeshPolicy", "shop", "p") == 1 and st.errors == (err,)
    before = ix.version()
    assert ix.upsert("MeshPolicy", {**good, "metadata": {**good["metadata"], "resourceVersion": "3", "generation": 3}}) is None
    assert ix.error("MeshPolicy", "shop", "p") is None and ix.generation("MeshPolicy", "shop", "p") == 3
    assert ix.version() != before
    ix.delete("MeshPolicy", good)
    assert ix.state().policies == ()


def test_services_without_selector_are_balanced_over_their_endpoint_slices() -> None:
    """No kube-proxy on the node: Webb serves every ClusterIP, default/kubernetes too (CoreDNS needs the API)."""
    ix = Indexer()
    kubernetes = {"metadata": {"name": "kubernetes", "namespace": "default"},
                  "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443, "targetPort": 6443}]}}
    assert ix.upsert("Service", kubernetes) is None
    (svc,) = ix.state().services
    assert svc.selector == () and svc.cluster_ip == "10.96.0.1"
    assert ix.upsert("EndpointSlice", {
        "metadata": {"name": "kubernetes", "namespace": "default", "labels": {"kubernetes.io/service-name": "kubernetes"}},
        "addressType": "IPv4", "endpoints": [{"addresses": ["192.0.2.10"]}],
        "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]}) is None
    (entry,) = plan_node(ix.state(), NODE).services
    assert [(b.ip, b.port) for b in entry.backends] == [("192.0.2.10", 6443)]
