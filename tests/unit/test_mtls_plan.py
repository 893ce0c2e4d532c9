"""Which service ports the node tunnels, and the accepting node's decision (pure)."""

from __future__ import annotations

from certs.ca import parse_spiffe_id
from datapath.types import EP_LOCAL, EP_MTLS_STRICT
from mesh.model import (
    ClusterState,
    IngressRule,
    MeshPolicy,
    MeshTLS,
    Namespace,
    Pod,
    PortRule,
    Selector,
    Service,
    ServicePort,
)
from mesh.plan.node import NodePlan, NodeSpec, Peer, plan_node
from mesh.plan.policy import Denial, authorize
from mesh.plan.tunnels import NODE_IDENTITY, TUNNEL_OUT_BASE, TUNNEL_OUT_COUNT, source_identity

GW = "10.244.1.1"
PEERS = {"n2": Peer("10.250.0.2")}


def _state(mode: str | None = "STRICT", policy: bool = False, label: str | None = None) -> ClusterState:
    pods = (Pod("empire", "deathstar", (("app", "ds"),), service_account="deathstar", ip="10.244.2.5", node="n2"),
            Pod("empire", "probe", (("app", "ds"),), service_account="probe", ip="10.244.1.9", node="n1"),
            Pod("alliance", "xwing", (("app", "xwing"),), service_account="xwing", ip="10.244.1.5", node="n1"))
    svc = Service("empire", "deathstar", (("app", "ds"),), (ServicePort(80, 8080),), cluster_ip="10.96.0.10")
    pols = (MeshPolicy("empire", "ds", Selector((("app", "ds"),)),
                       (IngressRule((Selector((("app", "xwing"), ("io.kubernetes.pod.namespace", "alliance"))),),
                                    (PortRule(((8080, "TCP"),)),)),)),) if policy else ()
    ns = (Namespace("empire", (("webb.io/mtls", label),)),) if label else ()
    return ClusterState(namespaces=ns, pods=pods, services=(svc,), policies=pols,
                        mtls=(MeshTLS("empire", "default", mode),) if mode else ())


def _plan(state: ClusterState, node: str = "n1", peers: dict[str, Peer] | None = None) -> NodePlan:
    return plan_node(state, NodeSpec(node, GW), peers)


def _auth(st: ClusterState, plan: NodePlan, node: str, peer_id: str, src: str, dst: str) -> Denial | None:
    _, ns, sa = parse_spiffe_id(peer_id)
    return authorize(st, plan, node, (ns, sa), peer_id, src, dst)


def test_remote_backends_in_mtls_namespaces_go_through_a_tunnel_listener() -> None:
    st = _state("STRICT")
    tp = _plan(st, peers=PEERS).tunnels
    (lst,) = tp.listeners
    assert TUNNEL_OUT_BASE <= lst.port < TUNNEL_OUT_BASE + TUNNEL_OUT_COUNT
    remote = [b for b in lst.backends if b.node_addr]
    local = [b for b in lst.backends if not b.node_addr]
    assert [(b.ip, b.port, b.namespace, b.service_account, b.node_addr) for b in remote] == \
        [("10.244.2.5", 8080, "empire", "deathstar", "10.250.0.2")]
    assert [b.ip for b in local] == ["10.244.1.9"]  # same node: plaintext
    (svc,) = tp.services
    assert (svc.proxy_ip, svc.proxy_port) == (GW, lst.port)  # connect4 sends the VIP to the listener
    flags = tp.flags()
    assert flags[GW] == EP_LOCAL and flags["10.244.1.5"] == EP_LOCAL
    assert flags["10.244.1.9"] == EP_LOCAL | EP_MTLS_STRICT  # a STRICT pod of this node
    assert "10.244.2.5" not in flags  # another node's pod: that node enforces


def test_the_plan_carries_tunnels_flags_and_upstreams_and_its_version_covers_them() -> None:
    """plan_node decides it all: services after tunnel planning, every endpoint's final flags,
    the node's own address; the version is hashed last, so the peers' view changes it."""
    st = _state("STRICT")
    plan = _plan(st, peers=PEERS)
    (lst,) = plan.tunnels.listeners
    (svc,) = plan.services
    assert svc.proxy_port == lst.port and plan.via(lst.port) == "mtls tunnel"
    flags = {e.ip: e.flags for e in plan.endpoints}
    assert flags["10.244.1.9"] & (EP_LOCAL | EP_MTLS_STRICT) == EP_LOCAL | EP_MTLS_STRICT
    # this node's address (the tunnel delivers from it: LOCAL), and the other node's (its proxy and tunnel)
    assert plan.node_endpoints == ((GW, NODE_IDENTITY, EP_LOCAL), ("10.250.0.2", NODE_IDENTITY, 0))
    assert _plan(st).version != plan.version  # same state, another view of the peers: another plan
    assert _plan(st, peers=PEERS).version == plan.version  # deterministic


def test_permissive_tunnels_without_strict_flags_and_disable_does_not_tunnel() -> None:
    st = _state("PERMISSIVE")
    tp = _plan(st, peers=PEERS).tunnels
    assert len(tp.listeners) == 1 and tp.flags()["10.244.1.9"] == EP_LOCAL
    st = _state("DISABLE")
    tp = _plan(st, peers=PEERS).tunnels
    assert tp.listeners == () and tp.services[0].proxy_port == 0
    st = _state(None, label="STRICT")  # the namespace label shortcut
    assert len(_plan(st, peers=PEERS).tunnels.listeners) == 1


def test_unknown_peer_node_is_a_warning_not_a_silent_plaintext() -> None:
    st = _state("STRICT")
    tp = _plan(st).tunnels
    assert tp.listeners == ()
    assert any("no tunnel address known" in w for w in tp.warnings)


def test_accepting_node_checks_certificate_against_the_source_pod_and_policy() -> None:
    st = _state("STRICT", policy=True)
    plan = _plan(st, "n2")
    xwing = "spiffe://cluster.local/ns/alliance/sa/xwing"
    assert _auth(st, plan, "n2", xwing, "10.244.1.5", "10.244.2.5:8080") is None
    # a certificate of another identity than the pod it claims to be
    why = _auth(st, plan, "n2", "spiffe://cluster.local/ns/empire/sa/probe", "10.244.1.5", "10.244.2.5:8080")
    assert why and "but the certificate is" in why.reason
    # policy: the probe (same labels as the deathstar, other namespace rule) is not allowed
    why = _auth(st, plan, "n2", "spiffe://cluster.local/ns/empire/sa/probe", "10.244.1.9", "10.244.2.5:8080")
    assert why and "MeshPolicy empire/ds" in why.reason and "no ingress rule allows empire/probe" in why.reason
    # a port the rule does not cover
    why = _auth(st, plan, "n2", xwing, "10.244.1.5", "10.244.2.5:9090")
    assert why and "port 9090/TCP" in why.reason
    # only pods of this node; that is this node's view, not a decision: the dialer tries the next backend
    why = _auth(st, plan, "n2", xwing, "10.244.1.5", "10.244.1.9:8080")
    assert isinstance(why, Denial) and not why.final and "not a pod of node n2" in why.reason, why
    why = _auth(st, plan, "n2", xwing, "10.244.9.9", "10.244.2.5:8080")
    assert isinstance(why, Denial) and not why.final and "not a pod of the mesh" in why.reason, why
    assert source_identity(st, "n1", "10.244.1.5") == ("alliance", "xwing")
    assert source_identity(st, "n1", "10.244.2.5") is None


def test_l7_upstreams_to_other_nodes_go_to_their_mtls_port_as_the_node_proxy() -> None:
    from mesh.plan.tunnels import mtls_upstreams
    from xds.resources import Upstream

    st = _state("STRICT")
    ups = (Upstream("empire/deathstar:80", (("10.244.2.5", 8080), ("10.244.1.9", 8080))),)
    out, warnings = mtls_upstreams(ups, st, "n1", "cluster.local", {"n2": ("10.250.0.2", {"10.244.2.5:8080": 10042})})
    (up,) = out
    assert up.backends == (("10.244.1.9", 8080),) and warnings == ()  # this node's pod: plaintext
    (e,) = up.mtls_backends
    assert (e.address, e.port) == ("10.250.0.2", 10042)
    assert e.tls.identity == "spiffe://cluster.local/ns/webb-system/sa/webb-node-proxy"
    assert e.tls.peer_ids == ("spiffe://cluster.local/ns/empire/sa/deathstar",) and e.tls.sni == "empire.deathstar"
    # not published yet: left out, said
    out, warnings = mtls_upstreams(ups, st, "n1", "cluster.local", {})
    assert out[0].backends == (("10.244.1.9", 8080),) and out[0].mtls_backends == ()
    assert warnings and "has not published an mTLS port" in warnings[0]
    # the node owning the backend offers a port for it
    tp = plan_node(st, NodeSpec("n2", "10.244.2.1"), {"n1": Peer("10.250.0.1")}).tunnels
    assert [k for k, _ in tp.inbound] == ["10.244.2.5:8080"]


def test_only_a_node_proxy_may_use_a_pods_mtls_port() -> None:
    st = _state("STRICT", policy=True)
    plan = _plan(st, "n2")
    proxy = "spiffe://cluster.local/ns/webb-system/sa/webb-node-proxy"
    assert _auth(st, plan, "n2", proxy, "", "10.244.2.5:8080") is None
    why = _auth(st, plan, "n2", "spiffe://cluster.local/ns/alliance/sa/xwing", "", "10.244.2.5:8080")
    assert why and "not a node proxy" in why.reason


def test_cluster_with_mtls_backends_matches_transport_sockets_by_endpoint_metadata() -> None:
    from xds import model as xm
    from xds import resources as r

    tls = xm.UpstreamMtls("spiffe://td/ns/webb-system/sa/webb-node-proxy", "td", ("spiffe://td/ns/a/sa/b",), "a.b")
    up = xm.Upstream("a/svc:80", (("10.244.1.9", 8080),), mtls_backends=(xm.MtlsEndpoint("10.250.0.2", 10042, tls),))
    c, cla = r.cluster(up), r.endpoints(up)
    assert not c.HasField("transport_socket")  # this node's backend: plaintext
    (m,) = c.transport_socket_matches
    assert m.match.fields[r.MTLS_MATCH_KEY].string_value == "0"
    plain, remote = cla.endpoints[0].lb_endpoints
    assert not plain.metadata.filter_metadata
    assert remote.endpoint.address.socket_address.port_value == 10042
    assert remote.metadata.filter_metadata["envoy.transport_socket_match"].fields[r.MTLS_MATCH_KEY].string_value == "0"
    # the snapshot's consistency check follows the secrets the match names
    assert r.dependencies(r.CLUSTER, c)[r.SECRET] == {"spiffe://td/ns/webb-system/sa/webb-node-proxy", "spiffe://td"}


def test_a_manifest_removed_while_the_source_reads_it_is_simply_gone(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Found in the guest: `rm` between the directory listing and the read crashed the agent."""
    from mesh import source

    (tmp_path / "a.yaml").write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n")
    (tmp_path / "b.yaml").write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n")
    real = source.read_documents

    def vanishing(path):  # type: ignore[no-untyped-def]
        if path.name == "b.yaml":
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real(path)
    monkeypatch.setattr(source, "read_documents", vanishing)
    state = source.StandaloneSource(tmp_path, "10.96.0.0/16").load()
    assert [n.name for n in state.namespaces] == ["a"] and not state.errors
