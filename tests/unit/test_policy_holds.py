"""What a policy denies does not get through a second, careless or hostile policy (issue 13):
an audit policy beside an enforcing one never allows, and a policy in one namespace never selects
another namespace's pods (at parse time it is refused; in the plan, selection is pinned anyway)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from mesh.manifests import ManifestError, parse_object
from mesh.model import ClusterState, MeshPolicy, Pod, Selector
from mesh.plan.node import NodeSpec, plan_node
from tests.unit.test_policy_fail_closed import RULE1

NODE = NodeSpec("node1", "10.244.0.1")


def _pod(ns: str, name: str, ip: str, **labels: str) -> Pod:
    return Pod(ns, name, tuple(sorted(labels.items())), ("sleep",), (), ip=ip)


def _allows(plan: object, dst: str, src: str) -> bool:
    ident = {e.pod: e.identity for e in plan.endpoints}  # type: ignore[attr-defined]
    return any(p.dst_identity == ident[dst] and p.src_identity in (ident[src], 0)
               for p in plan.policy)  # type: ignore[attr-defined]


def test_an_audit_policy_never_allows_where_an_enforcing_one_denies() -> None:
    pods = (_pod("default", "db", "10.244.0.2", app="db"), _pod("default", "web", "10.244.0.3", app="web"),
            _pod("default", "evil", "10.244.0.4", app="evil"))
    enforce = parse_object({**copy.deepcopy(RULE1), "metadata": {"name": "db-only-web", "namespace": "default"},
                            "spec": {"endpointSelector": {"matchLabels": {"app": "db"}},
                                     "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "web"}}]}]}})
    audit = parse_object({**copy.deepcopy(RULE1), "metadata": {"name": "audit-all", "namespace": "default"},
                          "spec": {"mode": "audit", "endpointSelector": {"matchLabels": {"app": "db"}},
                                   "ingress": [{"fromEndpoints": [{}]}]}})  # would allow everyone
    assert isinstance(enforce, MeshPolicy) and isinstance(audit, MeshPolicy)
    for policies in ((enforce, audit), (audit, enforce)):  # in either order
        plan = plan_node(ClusterState(pods=pods, policies=policies), NODE)
        assert _allows(plan, "default/db", "default/web")
        assert not _allows(plan, "default/db", "default/evil"), "the audit policy granted access"
        db = next(e for e in plan.endpoints if e.pod == "default/db")
        assert db.enforced and not db.audit


def test_a_policy_selects_only_its_own_namespace() -> None:
    victim = (_pod("victim", "db", "10.244.0.2", app="db"), _pod("victim", "client", "10.244.0.3", app="client"))
    # built past the parser (an API object that skipped validation): the plan pins it anyway
    lockout = MeshPolicy("attacker", "lockout", Selector((("app", "db"), ("io.kubernetes.pod.namespace", "victim"))), ())
    plan = plan_node(ClusterState(pods=victim, policies=(lockout,)), NODE)
    assert not any(e.enforced for e in plan.endpoints), "a policy in 'attacker' locked victim's pods"

    doc = copy.deepcopy(RULE1)
    doc["metadata"]["namespace"] = "attacker"
    doc["spec"]["endpointSelector"]["matchLabels"]["io.kubernetes.pod.namespace"] = "victim"
    with pytest.raises(ManifestError, match="selects pods of 'attacker' only; create it in namespace 'victim'"):
        parse_object(doc)


def test_a_source_in_another_namespace_is_still_named_explicitly() -> None:
    """fromEndpoints may name another namespace (as in Cilium): the destination's own policy decides."""
    pods = (_pod("shop", "db", "10.244.0.2", app="db"), _pod("front", "web", "10.244.0.3", app="web"))
    doc = {"apiVersion": "webb.io/v1alpha1", "kind": "MeshPolicy", "metadata": {"name": "from-front", "namespace": "shop"},
           "spec": {"endpointSelector": {"matchLabels": {"app": "db"}},
                    "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "web", "io.kubernetes.pod.namespace": "front"}}]}]}}
    pol = parse_object(doc)
    assert isinstance(pol, MeshPolicy)
    plan = plan_node(ClusterState(pods=pods, policies=(pol,)), NODE)
    assert _allows(plan, "shop/db", "front/web")
    assert next(e for e in plan.endpoints if e.pod == "shop/db").enforced


def test_the_source_names_what_it_refused(tmp_path: Path) -> None:
    """``webb apply`` fails on what the agent refused, by name; a problem of a kept object is a warning."""
    from mesh.source import StandaloneSource

    (tmp_path / "svc.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: far, namespace: default}\n"
        "spec: {clusterIP: 192.0.2.10, selector: {app: x}, ports: [{port: 80}]}\n")
    (tmp_path / "ok.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: near, namespace: default}\n"
        "spec: {selector: {app: x}, ports: [{port: 80}]}\n")
    state = StandaloneSource(tmp_path, "10.96.0.0/16").load()
    assert state.refused == ("Service default/far",)
    assert [s.name for s in state.services] == ["near"]
    assert any(e.startswith("Service default/far: spec.clusterIP") for e in state.errors)


def test_envoy_applies_every_backends_policy_not_the_first_ones() -> None:
    """A Service over two kinds of pods: the listener's RBAC holds one set per backend identity (Envoy may
    pick either, so each must allow; before: the first backend's rules only)."""
    from mesh.model import Service, ServicePort

    pods = (_pod("default", "a", "10.244.0.2", app="api", v="1"), _pod("default", "b", "10.244.0.3", app="api", v="2"),
            _pod("default", "web", "10.244.0.4", app="web"), _pod("default", "evil", "10.244.0.5", app="evil"))
    svc = Service("default", "api", (("app", "api"),), (ServicePort(80, 80),), cluster_ip="10.96.0.10")
    l7 = copy.deepcopy(RULE1)
    l7["metadata"]["name"] = "v1-l7"
    l7["spec"] = {"endpointSelector": {"matchLabels": {"v": "1"}},
                  "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "web"}}],
                               "toPorts": [{"ports": [{"port": "80"}], "rules": {"http": [{"method": "GET"}]}}]}]}
    l4 = copy.deepcopy(l7)
    l4["metadata"]["name"] = "v2-l4"
    l4["spec"] = {"endpointSelector": {"matchLabels": {"v": "2"}}, "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "evil"}}]}]}
    policies = tuple(parse_object(d) for d in (l7, l4))
    plan = plan_node(ClusterState(pods=pods, services=(svc,), policies=policies), NODE)  # type: ignore[arg-type]
    (http,) = plan.http
    sets = [http.policies, *http.also]
    assert len(sets) == 2 and all(sets)
    allowed = [{ip for p in s or () for ip in p.source_ips or ()} for s in sets]
    assert "10.244.0.4" in allowed[0] and "10.244.0.4" not in allowed[1]  # web: v1 only, so no request passes both
    assert "10.244.0.5" in allowed[1] and "10.244.0.5" not in allowed[0]  # evil: v2 only
    # a pod IP of an L7 port is marked: the kernel lets only the node proxy in there
    v1 = next(e.identity for e in plan.endpoints if e.pod == "default/a")
    assert all(p.l7 for p in plan.policy if p.dst_identity == v1 and p.port == 80)
