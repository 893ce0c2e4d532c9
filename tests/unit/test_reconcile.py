from dataclasses import replace
from pathlib import Path

from mesh.model import ClusterState
from mesh.plan.node import L7_PORT, NodeSpec, plan_node
from mesh.source import StandaloneSource

ROOT = Path(__file__).resolve().parents[2]
NODE = NodeSpec("node1", "10.244.0.1")


def _state(tmp_path: Path, with_policy: bool) -> ClusterState:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "app.yaml").write_text((ROOT / "examples/starwars/01-app.yaml").read_text())
    if with_policy:
        (tmp_path / "policy.yaml").write_text((ROOT / "examples/starwars/policy.yaml").read_text())
    st = StandaloneSource(tmp_path, "10.96.0.0/16").load()
    pods = tuple(replace(p, ip=f"10.244.0.{i + 2}") for i, p in enumerate(sorted(st.pods, key=lambda p: p.key)))
    return replace(st, pods=pods)


def test_without_policy_everything_is_l4_and_open(tmp_path: Path) -> None:
    plan = plan_node(_state(tmp_path, False), NODE)
    (svc,) = plan.services
    assert svc.proxy_port == 0 and len(svc.backends) == 2
    assert not plan.policy and not plan.http
    assert not any(e.enforced for e in plan.endpoints)


def test_starwars_policy_plan(tmp_path: Path) -> None:
    plan = plan_node(_state(tmp_path, True), NODE)
    ident = {e.pod: e.identity for e in plan.endpoints}
    assert ident["default/deathstar-1"] == ident["default/deathstar-2"]
    enforced = {e.pod for e in plan.endpoints if e.enforced}
    assert enforced == {"default/deathstar-1", "default/deathstar-2"}
    allowed = {(p.dst_identity, p.src_identity, p.port) for p in plan.policy}
    ds = ident["default/deathstar-1"]
    assert (ds, ident["default/tiefighter"], 80) in allowed
    assert not any(src == ident["default/xwing"] for _, src, _ in allowed)
    (svc,) = plan.services
    assert (svc.proxy_ip, svc.proxy_port) == ("10.244.0.1", L7_PORT)  # the one L7 listener, below the ephemeral range
    (http,) = plan.http
    assert http.listen_port == svc.proxy_port
    assert (http.match_ips, http.match_port) == ((svc.vip,), svc.port)  # its chain: the VIP:port connected to
    (rbac,) = http.policies
    assert rbac.name == "default/rule1#ingress[0]"
    assert "10.244.0.4" in rbac.source_ips  # tiefighter (sorted pods: deathstar-1, -2, tiefighter, xwing)
    assert "10.244.0.5" not in rbac.source_ips
    assert [(r.method, r.path) for r in rbac.rules] == [("POST", "/v1/request-landing")]


def test_plan_is_deterministic_and_versions_follow_content(tmp_path: Path) -> None:
    a = plan_node(_state(tmp_path / "a", True), NODE)
    b = plan_node(_state(tmp_path / "b", True), NODE)
    assert a == b
    c = plan_node(_state(tmp_path / "c", False), NODE)
    assert c.version != a.version


def test_unrelated_service_does_not_renumber(tmp_path: Path) -> None:
    st = _state(tmp_path, True)
    before = plan_node(st, NODE)
    extra = replace(st.services[0], name="other", cluster_ip="10.96.1.1")
    after = plan_node(replace(st, services=st.services + (extra,)), NODE)
    old = before.services[0]
    new = next(s for s in after.services if s.vip == old.vip)
    assert (new.service_id, new.proxy_port) == (old.service_id, old.proxy_port)
    assert before.identities == after.identities
