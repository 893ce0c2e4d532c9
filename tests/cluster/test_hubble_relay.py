"""Hubble in the cluster (charts/webb, hubble.enabled): `webb hubble serve` beside the DaemonSet's agent,
the headless Service webb-hubble-peer over the agent pods, and `webb hubble relay --peers-dns` (Deployment
webb-hubble-relay) that finds them by that Service's DNS name. The real hubble CLI on this host asks the
relay at its pod's address (the test cluster's pod range is routed to this host) and sees the Star Wars
denials of the node, named by the node.

The chart is installed by test_install's fixtures (imported: this module gets its own install, made
after test_install's module has uninstalled its own), then upgraded with hubble.enabled=true before
Star Wars runs (the agent's pod is replaced: its flows are in the pod's own state dir).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cluster.node import KubeNode
from tests.cluster.starwars import landing, request, url
from tests.cluster.test_install import CHART, NS, RELEASE, Install, diagnose, installed, starwars
from tests.cluster.test_node import eventually
from tests.hubble_cli import run_hubble

pytestmark = [pytest.mark.kube, pytest.mark.root]
__all__ = ["installed", "starwars"]  # test_install's fixtures, instantiated for this module
RELAY_PORT = 4245  # charts/webb/values.yaml: hubble.relay.port
PEER_PORT = 4244  # hubble.port
UPGRADE_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def relay(kube_node: KubeNode, installed: Install) -> Iterator[str]:
    """``helm upgrade --reuse-values --set hubble.enabled=true``, the agents and the relay Ready: the
    relay's address (its pod's IP, port 4245)."""
    res = installed.helm_run("upgrade", RELEASE, str(CHART), "--namespace", NS, "--reuse-values", "--set", "hubble.enabled=true",
                             "--wait", "--timeout", f"{UPGRADE_TIMEOUT_S}s", timeout_s=UPGRADE_TIMEOUT_S + 60, check=False)
    assert res.returncode == 0, f"helm upgrade: {res.stderr[-2000:]}\n{diagnose(kube_node)}"
    for what in ("daemonset/webb-agent", "deployment/webb-hubble-relay"):
        kube_node.kubectl("-n", NS, "rollout", "status", what, "--timeout=120s", timeout_s=130)
    pods = kube_node.get("-n", NS, "pods", "-l", "app.kubernetes.io/name=webb-hubble-relay")["items"]
    running = [p for p in pods if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]
    assert len(running) == 1, diagnose(kube_node)
    yield f"{running[0]['status']['podIP']}:{RELAY_PORT}"


def observe(server: str, *args: str) -> list[dict[str, Any]]:
    r = run_hubble("observe", "--server", server, *args, "-o", "json", timeout_s=30)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def test_the_chart_runs_hubble_beside_each_agent_and_a_relay(kube_node: KubeNode, installed: Install, relay: str) -> None:
    ds = kube_node.get("-n", NS, "daemonset", "webb-agent")
    containers = {c["name"]: c for c in ds["spec"]["template"]["spec"]["containers"]}
    assert containers["hubble"]["command"] == ["webb", "hubble", "serve"]
    assert f"--listen=[$(HOST_IP)]:{PEER_PORT}" in containers["hubble"]["args"]
    agent = kube_node.get("-n", NS, "pods", "-l", "app.kubernetes.io/name=webb-agent")["items"][0]
    host_ip = agent["status"]["hostIP"]
    peer = kube_node.get("-n", NS, "service", "webb-hubble-peer")
    assert peer["spec"]["clusterIP"] == "None"
    svc = kube_node.get("-n", NS, "service", "webb-hubble-relay")
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(80, "grpc")]
    deploy = kube_node.get("-n", NS, "deployment", "webb-hubble-relay")["spec"]["template"]["spec"]
    assert deploy["securityContext"]["runAsNonRoot"] is True and not deploy.get("hostNetwork")
    assert deploy["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    # the relay found the node's `webb hubble serve` by the headless Service's name (the node's address)
    logs = lambda: kube_node.kubectl("-n", NS, "logs", "deploy/webb-hubble-relay", check=False).stdout  # noqa: E731
    eventually("the relay's peer from DNS", lambda: f"'{host_ip}:{PEER_PORT}'" in logs(), 30)
    st = eventually("hubble status through the relay", lambda: (
        r := run_hubble("status", "--server", relay, timeout_s=20)).returncode == 0 and "Connected Nodes: 1/1" in r.stdout and r, 60)
    assert "Connected Nodes: 1/1" in st.stdout, st.stdout


def test_hubble_observe_through_the_relay_shows_the_xwings_denial(kube_node: KubeNode, installed: Install, relay: str,
                                                                   starwars: str) -> None:
    ns = starwars
    assert "PermissionError" in landing(kube_node, ns, "xwing")  # a denial now, after the upgrade's new agent

    def xwing() -> list[dict[str, Any]]:
        return [f for f in (r["flow"] for r in observe(relay, "--verdict", "DROPPED", "--last", "50") if "flow" in r)
                if f.get("source", {}).get("pod_name") == "xwing" and f["source"].get("namespace") == ns]
    got = eventually("the xwing's denial through the relay", xwing, 60)
    assert all(f["verdict"] == "DROPPED" and f["node_name"] == kube_node.name for f in got), got
    assert any(f.get("drop_reason_desc") == "POLICY_DENIED" for f in got), got
    st = run_hubble("status", "--server", relay, timeout_s=20)
    assert st.returncode == 0 and "Connected Nodes: 1/1" in st.stdout, (st.stdout, st.stderr)


def test_hubble_observe_through_the_relay_shows_the_l7_denial(kube_node: KubeNode, installed: Install, relay: str,
                                                               starwars: str) -> None:
    ns = starwars
    assert request(kube_node, ns, "tiefighter", "PUT", url(ns, "/v1/exhaust-port")) == "403 Access denied"

    def tiefighter() -> list[dict[str, Any]]:
        return [f for f in (r["flow"] for r in observe(relay, "--verdict", "DROPPED", "--last", "50", "--namespace", ns)
                            if "flow" in r)
                if f.get("source", {}).get("pod_name") == "tiefighter" and "l7" in f]
    got = eventually("the tiefighter's 403 through the relay", tiefighter, 60)
    assert all(f["node_name"] == kube_node.name for f in got), got
    assert any("/v1/exhaust-port" in json.dumps(f["l7"]) for f in got), got
