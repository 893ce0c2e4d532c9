"""Plan → datapath state and flows named from the plan (pure: no kernel, no Envoy)."""

from __future__ import annotations

from datapath.maps import FlowEvent
from datapath.types import EP_INGRESS_ENFORCED, EP_LOCAL, PROTO_UDP, Reason, Verdict
from mesh.agent.apply_datapath import datapath_state
from mesh.agent.flows import Names, from_event
from mesh.model import ClusterState, IngressRule, MeshPolicy, Pod, PortRule, Selector, Service, ServicePort
from mesh.plan.node import NodeSpec, plan_node
from mesh.plan.tunnels import NODE_IDENTITY

GW = "10.244.1.1"


def _state() -> ClusterState:
    pods = (Pod("shop", "db", (("app", "db"),), ip="10.244.1.5", node="n1"),
            Pod("shop", "web", (("app", "web"),), ip="10.244.1.6", node="n1"))
    svc = Service("shop", "dns", (("app", "db"),), (ServicePort(53, 53, "UDP"),), cluster_ip="10.96.0.53")
    pol = MeshPolicy("shop", "db-only-from-nobody", Selector((("app", "db"),)), (IngressRule(None, (PortRule(((80, "TCP"),)),)),))
    return ClusterState(pods=pods, services=(svc,), policies=(pol,))


def test_the_datapath_state_is_the_plan_as_decided() -> None:
    plan = plan_node(_state(), NodeSpec("n1", GW))
    db = next(e for e in plan.endpoints if e.pod == "shop/db")
    assert db.flags & EP_INGRESS_ENFORCED and db.flags & EP_LOCAL  # policy and this node's, decided by the plan
    dp = datapath_state(plan, {4242: "shop/db", 4343: "kube-system/other"}, {"10.244.1.200": (3, 0)})
    assert dp.endpoints["10.244.1.5"] == (db.identity, db.flags)
    assert dp.endpoints[GW] == (NODE_IDENTITY, EP_LOCAL)  # the node's own address
    assert dp.endpoints["10.244.1.200"] == (3, 0)  # the agent's own extra endpoints pass through
    assert dp.cgroups == {4242: (db.identity, db.flags)}  # a cgroup of no known pod gets no identity
    assert dp.services == list(plan.services) and dp.policy == list(plan.policy)


def test_flows_take_protocol_from_the_event_and_names_from_the_plan() -> None:
    plan = plan_node(_state(), NodeSpec("n1", GW))
    names = Names.of(plan, {4242: "shop/web"})
    db = next(e for e in plan.endpoints if e.pod == "shop/db")
    ev = FlowEvent(0, 4242, 0, db.identity, "10.96.0.53", 53, "10.244.1.5", 53, Verdict.DENIED, Reason.POLICY_DENIED, PROTO_UDP)
    flow = from_event(ev, names)
    assert flow["protocol"] == "UDP" and flow["service"] == "shop/dns" and flow["src"] == "shop/web"
    assert flow["why"] == ("shop/db is selected by MeshPolicy shop/db-only-from-nobody and no ingress rule allows "
                           "shop/web on port 53/UDP")


def test_a_pod_without_an_address_yet_is_known_by_its_cgroup() -> None:
    """kubelet starts containers before the API shows the pod's IP: its sockets carry its identity already."""
    st = _state()
    new = Pod("shop", "web-2", (("app", "web"),), node="n1")  # no IP yet
    plan = plan_node(ClusterState(pods=st.pods + (new,), services=st.services, policies=st.policies), NodeSpec("n1", GW))
    web = next(e for e in plan.endpoints if e.pod == "shop/web")
    assert all(e.pod != "shop/web-2" for e in plan.endpoints)  # nothing to reach it at yet
    dp = datapath_state(plan, {77: "shop/web-2"})
    assert dp.cgroups == {77: (web.identity, web.flags & ~EP_LOCAL)}  # same labels, same identity
