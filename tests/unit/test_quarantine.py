"""The bookkeeping of a NACK's quarantine (mesh.agent.quarantine): suspects are what changed since
Envoy's last accepted plan; a held object stays at its accepted version until it changes."""

from __future__ import annotations

from mesh.agent.quarantine import Quarantine, envoy_objects
from mesh.model import ClusterState, MeshPolicy, Selector, Service, ServicePort


def _pol(name: str, mode: str = "enforce") -> MeshPolicy:
    return MeshPolicy("default", name, Selector(), (), mode)


SVC = Service("default", "web", (("app", "web"),), (ServicePort(80, 80),))


def test_suspects_hold_and_release() -> None:
    q = Quarantine()
    old = ClusterState(services=(SVC,), policies=(_pol("a"), _pol("b")))
    q.accept(old)
    new = ClusterState(services=(SVC,), policies=(_pol("a", "audit"), _pol("b"), _pol("c")))
    assert q.suspects(new) == [("MeshPolicy", "default", "a"), ("MeshPolicy", "default", "c")]

    q.hold(new, [("MeshPolicy", "default", "a"), ("MeshPolicy", "default", "c")], "Envoy rejected Listener 7: bad")
    held = q.hold_back(new)
    assert envoy_objects(held) == envoy_objects(old)  # a at its accepted version, c (new) not in force
    assert q.names() == ["MeshPolicy default/a", "MeshPolicy default/c"]
    assert "previous version stays in force" in q.errors()[0] and "is not in force" in q.errors()[1]

    fixed = ClusterState(services=(SVC,), policies=(_pol("a", "audit2"), _pol("b"), _pol("c")))
    held = q.hold_back(fixed)  # a changed: released and tried again; c unchanged: still held
    assert q.names() == ["MeshPolicy default/c"]
    assert [p.mode for p in held.policies] == ["audit2", "enforce"]


def test_a_quarantined_cr_is_not_applied_on_that_node() -> None:
    """The node's report names the quarantined object: its CR shows NACK with Envoy's message, not
    the generation the node received (an older one is in force there)."""
    from mesh.kube.status import cr_status

    key = "MeshPolicy default/rule1"
    report = {"node": "n1", "datapathVersion": "p2", "envoyVersion": "e2", "generations": {key: 2}, "envoyRejected": {},
              "quarantined": {key: "Envoy rejected Listener 9: RE2 program size of 129 > max program size of 100"}}
    st = cr_status(key, 2, None, "enforce", {"n1": report}, {}, "2026-12-03T00:00:00Z")
    (node,) = st["nodes"]
    assert node["envoy"] == "NACK" and "observedGeneration" not in node and "program size" in node["envoyError"]
    applied = next(c for c in st["conditions"] if c["type"] == "Applied")
    assert applied["status"] == "False" and applied["reason"] == "EnvoyRejected" and "quarantined" in applied["message"]
