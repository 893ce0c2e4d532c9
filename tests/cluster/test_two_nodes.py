"""Two kubelet nodes of one cluster (webb-kn1 with the control plane, webb-kn2 a worker registered
with its API server), one ``webb agent --kube`` each: the agents learn each other (tunnel address,
mTLS ports) from the API server only (ConfigMaps ``webb-system/webb-peer-<node>``; no cluster
directory), pods on one node reach Services whose backends run on the other, and in a MeshTLS
STRICT namespace the traffic between the nodes is mTLS (a capture between the nodes sees TLS
records, never the request or the answer)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.status import AgentStatus
from tests.capture import Capture
from tests.cluster.agent import host_agent
from tests.cluster.conftest import running
from tests.cluster.node import KubeNode, free_port
from tests.cluster.starwars import APP, pod, request
from tests.cluster.test_node import eventually

pytestmark = [pytest.mark.kube, pytest.mark.root]
TUNNEL_PORT = 15008


@pytest.fixture(scope="module")
def worker(kube_node: KubeNode) -> Iterator[KubeNode]:
    """webb-kn2, a worker of webb-kn1's cluster, for this module; removed at its end, nothing left."""
    yield from running(KubeNode(kube_node.config.worker(2), server=kube_node))


@pytest.fixture(scope="module")
def agents(kube_node: KubeNode, worker: KubeNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """An agent per node (host processes, as the DaemonSet runs them), one mesh CA for both (the chart's
    Secret; here a directory the first agent makes its root in); the second one's ingress on other ports."""
    s1, s2 = tmp_path_factory.mktemp("agent-kn1"), tmp_path_factory.mktemp("agent-kn2")
    ca = ("--ca-dir", str(tmp_path_factory.mktemp("mesh-ca")))
    ports = ("--ingress-http-port", str(free_port("127.0.0.1")), "--ingress-https-port", str(free_port("127.0.0.1")))
    with host_agent(kube_node, s1, extra=ca), host_agent(worker, s2, extra=ca + ports):
        yield {kube_node.name: s1, worker.name: s2}


def _deploy(server: KubeNode, ns: str, client_node: str, backend_node: str) -> None:
    """The deathstar Service with its only backend on ``backend_node``; the tiefighter on ``client_node``."""
    server.kubectl("create", "configmap", "starwars", "-n", ns, f"--from-file=app.py={APP}")
    server.apply(
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "deathstar", "namespace": ns},
         "spec": {"selector": {"class": "deathstar"}, "ports": [{"port": 80, "targetPort": 80}]}},
        pod("deathstar", ns, {"class": "deathstar"}, ["python3", "/app/app.py", "--port", "80"], backend_node),
        pod("tiefighter", ns, {"class": "tiefighter"}, ["python3", "-c", "import time; time.sleep(3600)"], client_node))
    for name in ("deathstar", "tiefighter"):
        server.wait_pod_ready(ns, name)


def _landing(server: KubeNode, ns: str) -> str:
    return request(server, ns, "tiefighter", "POST", f"http://deathstar.{ns}.svc.cluster.local/v1/request-landing")


def test_the_agents_learn_each_other_from_the_api_server(kube_node: KubeNode, worker: KubeNode, agents: dict[str, Path]) -> None:
    def records() -> dict[str, dict[str, str]]:
        cms = kube_node.get("-n", "webb-system", "configmaps", "-l", "webb.io/peer")["items"]
        return {cm["metadata"]["name"]: json.loads(cm["data"]["peer.json"]) for cm in cms}
    recs = eventually("both peer records", lambda: len(r := records()) == 2 and r, 30)
    assert recs[f"webb-peer-{worker.name}"]["wire_ip"] == worker.node_ip
    assert recs[f"webb-peer-{kube_node.name}"]["pod_cidr"] == kube_node.pod_cidr
    for state in agents.values():
        st = AgentStatus.read(state)
        assert st is not None
        assert not [e for e in st.errors if "peer" in e], st.errors


def test_a_pod_reaches_a_service_whose_backend_runs_on_the_other_node(kube_node: KubeNode, worker: KubeNode,
                                                                       agents: dict[str, Path], ns: str) -> None:
    _deploy(kube_node, ns, client_node=kube_node.name, backend_node=worker.name)
    assert eventually("landing across the nodes", lambda: (r := _landing(kube_node, ns)).startswith("200") and r, 60) \
        == "200 Ship landed"
    pods = kube_node.get("-n", ns, "pods")["items"]
    assert {p["metadata"]["name"]: p["spec"]["nodeName"] for p in pods} == {"deathstar": worker.name, "tiefighter": kube_node.name}


def _diagnose(state: Path) -> str:
    st = AgentStatus.read(state)
    log = (state / "agent.log").read_text(errors="replace")[-3000:]
    flows = (state / "flows.jsonl").read_text().splitlines()[-15:] if (state / "flows.jsonl").exists() else []
    return f"--- {state.name}: errors {st.errors if st else None}\nmtls {json.dumps(st.mtls if st else None)[:3000]}\n" \
           f"flows:\n" + "\n".join(flows) + f"\nlog:\n{log}"


def _ipv4_ports(frame: bytes) -> tuple[str, int, str, int] | None:
    """(src, sport, dst, dport) of an Ethernet frame carrying IPv4 TCP."""
    if len(frame) < 54 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return None
    ihl = (frame[14] & 0x0F) * 4
    tcp = 14 + ihl
    return (socket.inet_ntoa(frame[26:30]), int.from_bytes(frame[tcp:tcp + 2], "big"),
            socket.inet_ntoa(frame[30:34]), int.from_bytes(frame[tcp + 2:tcp + 4], "big"))


def test_strict_mtls_between_the_nodes_shows_no_plaintext(kube_node: KubeNode, worker: KubeNode,
                                                          agents: dict[str, Path], ns: str) -> None:
    kube_node.apply({"apiVersion": "webb.io/v1alpha1", "kind": "MeshTLS", "metadata": {"name": "default", "namespace": ns},
                     "spec": {"mode": "STRICT"}})
    for state in agents.values():
        eventually("STRICT applied", lambda s=state: (st := AgentStatus.read(s)) is not None
                   and (st.mtls or {}).get("namespaces", {}).get(ns) == "STRICT", 30)
    _deploy(kube_node, ns, client_node=kube_node.name, backend_node=worker.name)
    last: list[str] = []

    def lands() -> bool:
        last.append(_landing(kube_node, ns))
        return last[-1].startswith("200")
    try:
        eventually("landing across the nodes, STRICT", lands, 60)
    except TimeoutError:
        raise AssertionError(f"last answer {last[-1:]}\n" + "\n".join(_diagnose(s) for s in agents.values())) from None

    # between the nodes: their addresses are this host's, so the tunnel runs over lo; the pods'
    # own packets would cross the bridges (forwarded): they must not go pod to pod at all
    pod_ips = {p["metadata"]["name"]: p["status"]["podIP"] for p in kube_node.get("-n", ns, "pods")["items"]}
    with Capture(None, "lo", timeout_s=30, max_frames=200_000) as lo, \
            Capture(None, worker.config.bridge, timeout_s=30) as bridge:
        answer = _landing(kube_node, ns)
    assert answer == "200 Ship landed", answer
    tunnel = [f for f in lo.frames if (t := _ipv4_ports(f)) and TUNNEL_PORT in (t[1], t[3]) and worker.node_ip in (t[0], t[2])]
    assert len(tunnel) > 4, "no traffic to the worker's tunnel port: not through the tunnel?"
    data = b"".join(tunnel)
    assert b"Ship landed" not in data and b"request-landing" not in data, "plaintext between the nodes"
    assert b"\x17\x03\x03" in data, "no TLS application data records"
    direct = [t for f in bridge.frames if (t := _ipv4_ports(f)) and {t[0], t[2]} == {pod_ips["tiefighter"], pod_ips["deathstar"]}]
    assert not direct, f"pod-to-pod packets bypassed the tunnel: {direct[:3]}"
    # and a pod that dials the other node's pod directly (no Service, no tunnel) is dropped there
    bypass = request(kube_node, ns, "tiefighter", "POST", f"http://{pod_ips['deathstar']}/v1/request-landing")
    assert not bypass.startswith("200"), bypass
