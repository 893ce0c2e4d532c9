"""Webb meshes pods a real kubelet runs: the agent (``webb agent --kube``) never starts a pod; it
finds kubelet's pod cgroups, serves ClusterIPs with its socket LB (no kube-proxy on this node,
CoreDNS reached through its Service), and enforces MeshPolicy at L4 and L7 (Star Wars rule1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.status import AgentStatus
from tests.cluster.agent import host_agent
from tests.cluster.node import KubeNode
from tests.cluster.starwars import APP, ROOT, apply_rule1, deploy, landing, pod, request, url, wait_landing
from tests.cluster.test_node import container_id, eventually

pytestmark = [pytest.mark.kube, pytest.mark.root]


@pytest.fixture(scope="module")
def agent(kube_node: KubeNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``webb agent --kube`` on the node (host network, as the DaemonSet runs it), stopped at the end."""
    state = tmp_path_factory.mktemp("agent")
    with host_agent(kube_node, state):
        yield state


def _status(agent: Path) -> AgentStatus:
    st = AgentStatus.read(agent)
    assert st is not None
    return st


def test_star_wars_on_kubelet_pods(kube_node: KubeNode, agent: Path, ns: str) -> None:
    pods = deploy(kube_node, ns)
    assert all(container_id(p) for p in pods.values())  # kubelet's containers (containerd://), not the agent's

    # the agent found every pod's cgroup (kubelet made them), by the pod's uid
    def known() -> bool:
        st = _status(agent)
        return all(st.pods.get(f"{ns}/{n}") is not None and p["metadata"]["uid"] in st.pods[f"{ns}/{n}"].cgroup
                   for n, p in pods.items())
    eventually("the agent knows the pods' cgroups", known, 30)

    assert wait_landing(kube_node, ns).startswith("200")
    assert landing(kube_node, ns, "xwing") == "200 Ship landed"

    apply_rule1(kube_node, ns)
    assert landing(kube_node, ns, "tiefighter") == "200 Ship landed"
    assert request(kube_node, ns, "tiefighter", "PUT", url(ns, "/v1/exhaust-port")) == "403 Access denied"

    def denied() -> list[dict[str, Any]]:
        flows = [json.loads(line) for line in (agent / "flows.jsonl").read_text().splitlines()]
        return [f for f in flows if f.get("verdict") == "denied"]
    eventually("the L7 denial in the flows", lambda: any(f["layer"] == "L7" and f.get("path") == "/v1/exhaust-port"
                                                          and f.get("src") == f"{ns}/tiefighter" for f in denied()), 10)
    assert any(f["layer"] == "L4" and f["src"] == f"{ns}/xwing" and f"{ns}/rule1" in f.get("policy", "") for f in denied())
    assert not _status(agent).rejected()
    # every node's state, from the reports the agents publish in webb-system
    def cluster_status() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mesh.cli", "status", "--kube", str(kube_node.kubeconfig), "-o", "json"],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
    r = eventually("webb status --kube", lambda: (c := cluster_status()).returncode == 0 and c, 30)
    assert json.loads(r.stdout)[kube_node.name]["running"] is True


def test_a_pod_the_agent_does_not_know_is_denied_where_policy_applies(kube_node: KubeNode, agent: Path, ns: str) -> None:
    """Fail closed: a cgroup under kubepods that is no pod the agent knows has no identity; a
    destination a policy selects refuses it (the window between a container's start and the
    agent learning its pod is this case)."""

    kube_node.kubectl("create", "configmap", "starwars", "-n", ns, f"--from-file=app.py={APP}")
    kube_node.apply(pod("db", ns, {"app": "db"}, ["python3", "/app/app.py", "--port", "80"]))
    db = kube_node.wait_pod_ready(ns, "db")
    ip = db["status"]["podIP"]
    kube_node.apply({"apiVersion": "webb.io/v1alpha1", "kind": "MeshPolicy", "metadata": {"name": "db", "namespace": ns},
                     "spec": {"endpointSelector": {"matchLabels": {"app": "db"}},
                              "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "db"}}]}]}})
    eventually("the policy applied", lambda: any("MeshPolicy" in r and f"{ns}/db" in r for r in _status(agent).rules.values()), 30)
    stranger = kube_node.cgroup_root / "kubepods" / "besteffort" / "stranger"
    stranger.mkdir()
    try:
        code = ("import socket, sys\ntry:\n socket.create_connection((sys.argv[1], 80), timeout=3); print('connected')\n"
                "except OSError as e:\n print(type(e).__name__)")
        out = subprocess.run(["sh", "-c", f'echo $$ > {stranger}/cgroup.procs && exec "$@"', "sh", sys.executable, "-c", code, ip],
                             capture_output=True, text=True, timeout=30, env={**os.environ})
        assert out.stdout.strip() == "PermissionError", out
    finally:
        deadline = time.monotonic() + 10
        while stranger.exists():
            try:
                stranger.rmdir()
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)


def test_the_operator_reports_what_the_node_applied(kube_node: KubeNode, agent: Path, ns: str, tmp_path: Path) -> None:
    """The operator (kopf, a host process here; a Deployment in tests/cluster/test_install.py) with the node's agent:
    rule1's status says Applied with the versions the node reports; a malformed MeshPolicy is refused by the API
    server naming the field, and the stored policy stays in force; deleting it restores access."""
    from tests.kube.apiserver import Process
    from tests.kube.meshpolicy import malformed

    deploy(kube_node, ns)
    wait_landing(kube_node, ns)
    operator = Process("operator", [sys.executable, "-m", "mesh.operator", "--kubeconfig", str(kube_node.kubeconfig),
                                    "--lifetime", "300"], tmp_path / "operator.log")
    try:
        apply_rule1(kube_node, ns)

        def node_entry() -> dict[str, Any] | None:
            st = kube_node.get("-n", ns, "meshpolicy", "rule1").get("status") or {}
            applied: dict[str, Any] = next((c for c in st.get("conditions") or [] if c["type"] == "Applied"), {})
            entry = next((n for n in st.get("nodes") or [] if n.get("node") == kube_node.name), None)
            return entry if applied.get("status") == "True" and entry and entry.get("observedGeneration") == 1 else None
        entry = eventually("rule1 Applied on the node (the operator)", node_entry, 60)
        assert entry["envoy"] == "ACK"

        def reported_as_applied() -> bool:
            """The node may apply again meanwhile (a pod's endpoints, say): its report, and so the operator's
            entry, follow; compare the two once they have caught up."""
            e, a = node_entry(), _status(agent).applied
            return e is not None and (e["datapathVersion"], e["envoyVersion"]) == (a.datapath_version, a.envoy_version)
        eventually("rule1's node entry carries the versions the node applied", reported_as_applied, 60)

        bad = json.dumps(malformed("port-not-a-number", ns))
        res = kube_node.kubectl("apply", "-f", "-", stdin=bad, check=False)
        assert res.returncode != 0 and "spec.ingress[0].toPorts[0].ports[0].port" in res.stderr, res.stderr
        assert "PermissionError" in landing(kube_node, ns, "xwing")  # the stored rule1 is still in force

        kube_node.kubectl("delete", "meshpolicy", "rule1", "-n", ns)
        eventually("the xwing lands again", lambda: landing(kube_node, ns, "xwing") == "200 Ship landed", 60)
        operator.check_alive()
    finally:
        operator.stop()
