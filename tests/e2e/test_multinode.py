"""Two nodes on one machine (mesh.runtime.cluster): each node a network namespace with its own
agent (bridge, Envoy, datapath, pods), both on one wire. A client pod on node mn1 reaches a
Service whose only backend runs on node mn2; a capture on the wire sees the response go by
(plain text: encryption between nodes is not built yet)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from datapath.loader import cleanup, pin_dir_for
from mesh.runtime.cluster import Wire, WireNode
from mesh.runtime.local import NETNS_DIR, LocalNode, NodeConfig
from mesh.runtime.peers import node_file
from mesh.source import directory_version
from tests.capture import Capture
from tests.conftest import ROOT, SLOW, leftovers
from tests.e2e.l7_support import status

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.envoy, pytest.mark.e2e]

# names and CIDRs no other test uses (tests use 10.244.0/200/210/220.0/24, bridges webb0/webbt0/webbk0)
NODES = (("mn1", "10.244.231.0/24"), ("mn2", "10.244.232.0/24"))
CLUSTER_CIDR = "10.244.0.0/16"
BRIDGE = "webbmn0"
MARKER = f"webb-multinode-{uuid.uuid4().hex}"


@dataclass
class MultiNode:
    wire: Wire
    root: Path
    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def manifests(self) -> Path:
        return self.root / "manifests"

    @property
    def cluster_dir(self) -> Path:
        return self.root / "cluster"

    def state(self, node: str) -> Path:
        return self.root / node

    def config(self, node: str) -> NodeConfig:
        n = self.wire.node(node)
        return NodeConfig(name=n.name, bridge=BRIDGE, pod_cidr=n.pod_cidr, state_dir=self.state(node), netns=n.netns,
                          cluster_cidr=CLUSTER_CIDR)

    def status(self, node: str) -> dict[str, Any]:
        return status(self.state(node))

    def start(self, n: WireNode) -> None:
        state = self.state(n.name)
        state.mkdir(parents=True, exist_ok=True)
        # setpriv --pdeathsig: the agent stops (and removes its node) if pytest itself is killed
        self.agents[n.name] = subprocess.Popen(
            ["setpriv", "--pdeathsig", "SIGTERM", "--", sys.executable, "-m", "mesh.cli", "agent",
             "--node", n.name, "--node-netns", n.netns, "--bridge", BRIDGE, "--pod-cidr", n.pod_cidr,
             "--cluster-cidr", CLUSTER_CIDR, "--cluster-dir", str(self.cluster_dir), "--wire-ip", n.wire_ip,
             "--state-dir", str(state), "--manifests", str(self.manifests), "--lifetime", str(int(240 * SLOW)),
             "--ca-dir", str(self.root / "ca")],  # one mesh CA for every node
            cwd=ROOT, stdout=open(state / "agent.log", "ab"), stderr=subprocess.STDOUT)

    def wait_running(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        for name, proc in self.agents.items():
            while not (self.status(name).get("pid") == proc.pid and self.status(name).get("running")):
                assert proc.poll() is None and time.monotonic() < deadline, self.log(name)
                time.sleep(0.05)

    def log(self, node: str) -> str:
        p = self.state(node) / "agent.log"
        return f"agent {node}: " + (p.read_text()[-3000:] if p.exists() else "no log")

    def put(self, name: str, text: str) -> str:
        """A manifest file into the directory both agents watch (atomic); the new version."""
        tmp = self.manifests / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(self.manifests / name)
        return directory_version(self.manifests)

    def remove(self, name: str) -> str:
        (self.manifests / name).unlink(missing_ok=True)
        return directory_version(self.manifests)

    def wait_applied(self, version: str, timeout_s: float = 30) -> dict[str, dict[str, Any]]:
        """Until every agent applied manifests ``version``; their status."""
        deadline = time.monotonic() + timeout_s
        out: dict[str, dict[str, Any]] = {}
        for name, proc in self.agents.items():
            while str(self.status(name).get("applied", {}).get("source_version", "")).split("+")[0] != version:
                assert proc.poll() is None and time.monotonic() < deadline, self.log(name)
                time.sleep(0.05)
            out[name] = self.status(name)
        return out

    def stop_agents(self) -> None:
        """SIGTERM to the agents started here (by PID): each removes its pods, node and datapath."""
        for proc in self.agents.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.agents.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def cleanup(self) -> list[str]:
        """Whatever is left, even after a failure: agents, pins, pods, cgroups, namespaces."""
        errors: list[str] = []
        self.stop_agents()
        for name, _ in NODES:
            cfg = self.config(name)
            for step in (lambda cfg=cfg: cleanup(pin_dir_for(cfg.name), str(cfg.pods_cgroup)),
                         lambda cfg=cfg: LocalNode(cfg).teardown()):
                try:
                    step()
                except (OSError, RuntimeError) as e:
                    errors.append(str(e))
        try:
            self.wire.teardown()
        except OSError as e:
            errors.append(str(e))
        return errors


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiNode]:
    mn = MultiNode(Wire(NODES, prefix="mn", cluster_cidr=CLUSTER_CIDR), tmp_path_factory.mktemp("multinode"))
    mn.manifests.mkdir()
    try:
        mn.wire.setup()
        for n in mn.wire:
            mn.start(n)
        mn.wait_running()
        yield mn
    finally:
        errors = mn.cleanup()
        assert not errors, errors


def _ipv4(frame: bytes) -> tuple[str, str] | None:
    """(src, dst) of an Ethernet frame carrying IPv4."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    return socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34])


def _vip(mn: MultiNode, node: str, pod: str, name: str) -> str:
    """The VIP of a Service, from the hosts file the agent writes for its pods."""
    key = pod if "/" in pod else f"default/{pod}"
    hosts = Path("/etc/netns") / f"webb-{node}-{key.replace('/', '-')}" / "hosts"
    for line in hosts.read_text().splitlines():
        ip, *names = line.split()
        if name in names:
            return ip
    raise AssertionError(f"{name} not in {hosts}: {hosts.read_text()}")


def _curl(mn: MultiNode, node: str, pod: str, url: str) -> tuple[int, str, str]:
    """`webb exec` curl in a pod (its netns and cgroup: connect() goes through the datapath)."""
    r = subprocess.run([sys.executable, "-m", "mesh.cli", "exec", pod, "--node", node, "--state-dir", str(mn.state(node)),
                        "--", "curl", "-sS", "--max-time", str(3 * SLOW), "-w", "\n%{http_code}", url],
                       cwd=ROOT, capture_output=True, text=True, timeout=30 * SLOW)
    body, _, code = r.stdout.rpartition("\n")
    return (int(code) if r.returncode == 0 and code.isdigit() else 0), body, r.stderr


APP = """\
apiVersion: v1
kind: Service
metadata: {{name: mn-web, namespace: default}}
spec:
  selector: {{app: mn-web}}
  ports: [{{port: 80, targetPort: 8080, protocol: TCP}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: mn-web, namespace: default, labels: {{app: mn-web}}}}
spec:
  nodeName: mn2
  containers:
  - name: web
    image: python:3.11-slim
    command: [python3, -m, http.server, "8080", --bind, 0.0.0.0, --directory, "{www}"]
    ports: [{{containerPort: 8080}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: mn-client, namespace: default, labels: {{app: mn-client}}}}
spec:
  nodeName: mn1
  containers:
  - name: client
    image: busybox
    command: [sleep, "300"]
"""


def _app(cluster: MultiNode) -> None:
    """The server on mn2 (serving MARKER) and the client on mn1, applied (idempotent)."""
    www = cluster.root / "www"
    www.mkdir(exist_ok=True)
    (www / "index.html").write_text(MARKER + "\n")
    cluster.wait_applied(cluster.put("app.yaml", APP.format(www=www)))


def _wait_backend(cluster: MultiNode, node: str, vip: str, timeout_s: float = 20) -> dict[str, Any]:
    """Until ``node`` has one backend for ``vip``:80 (the other node published its pod); that service."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = cluster.status(node)
        found = [s for s in st.get("services", []) if s["vip"] == vip and s["port"] == 80 and s["backends"] == 1]
        if found and not st["errors"]:
            return dict(found[0])
        assert time.monotonic() < deadline, st
        time.sleep(0.05)


def _curl_until_200(cluster: MultiNode, node: str, pod: str, url: str, timeout_s: float = 30) -> tuple[int, str, str]:
    deadline = time.monotonic() + timeout_s
    for _ in range(60):  # the server may still be starting
        code, body, err = _curl(cluster, node, pod, url)
        if code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    return code, body, err


def test_service_backend_on_the_other_node_over_the_wire(cluster: MultiNode) -> None:
    _app(cluster)

    # each node runs only its pods
    mn1, mn2 = cluster.status("mn1"), cluster.status("mn2")
    assert set(mn1["pods"]) == {"default/mn-client"} and set(mn2["pods"]) == {"default/mn-web"}, (mn1["pods"], mn2["pods"])
    server_ip, client_ip = mn2["pods"]["default/mn-web"]["ip"], mn1["pods"]["default/mn-client"]["ip"]
    assert server_ip.startswith("10.244.232.") and client_ip.startswith("10.244.231.")

    # mn2 published its pod; mn1 took it as the Service's backend
    record = json.loads(node_file(cluster.cluster_dir, "mn2").read_text())
    assert record["node"] == "mn2" and record["wire_ip"] == cluster.wire.node("mn2").wire_ip
    assert record["pod_cidr"] == "10.244.232.0/24" and record["gateway"] == "10.244.232.1"
    assert record["pods"]["default/mn-web"]["ip"] == server_ip
    vip = _vip(cluster, "mn1", "mn-client", "mn-web.default.svc.cluster.local")
    assert _wait_backend(cluster, "mn1", vip)["proxy_port"] == 0  # L4: the kernel picks the backend, no Envoy

    mn2_wire = cluster.wire.node("mn2")
    with Capture(cluster.wire.netns, mn2_wire.wire_if) as cap:
        code, body, err = _curl_until_200(cluster, "mn1", "mn-client", f"http://{vip}/")
        time.sleep(0.2)  # the last frames
    assert code == 200, (code, body, err, cluster.log("mn1"))
    assert body.strip() == MARKER

    # the response crossed the wire, pod to pod (the VIP was rewritten at connect(), in mn1)
    carrying = [_ipv4(f) for f in cap.frames if MARKER.encode() in f]
    assert carrying, f"marker not seen in {len(cap.frames)} frames on {mn2_wire.wire_if}"
    assert (server_ip, client_ip) in carrying, carrying
    assert not [f for f in cap.frames if (a := _ipv4(f)) and vip in a], "a packet to the VIP reached the wire"


L7 = """\
apiVersion: v1
kind: Service
metadata: {name: mn-web7, namespace: default}
spec:
  selector: {app: mn-web}
  ports: [{port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mn-web7, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: mn-web7, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: mn-web7, port: 80}]
    timeouts: {request: 3s}
"""


def test_l7_through_the_node_envoy_to_the_other_node(cluster: MultiNode) -> None:
    """An HTTPRoute with a Service parent makes the Service layer 7: mn1's Envoy (in mn1's netns) forwards
    to mn2's pod."""
    _app(cluster)
    cluster.wait_applied(cluster.put("l7.yaml", L7))
    try:
        vip = _vip(cluster, "mn1", "mn-client", "mn-web7.default.svc.cluster.local")
        assert _wait_backend(cluster, "mn1", vip)["proxy_port"] > 0
        code, body, err = _curl_until_200(cluster, "mn1", "mn-client", f"http://{vip}/")
        assert (code, body.strip()) == (200, MARKER), (code, body, err, cluster.log("mn1"))
        server_ip = cluster.status("mn2")["pods"]["default/mn-web"]["ip"]
        log = cluster.state("mn1") / "envoy-access.jsonl"
        deadline = time.monotonic() + 10
        while not any(e.get("upstream") == f"{server_ip}:8080" and e.get("status") == 200
                      for e in map(json.loads, log.read_text().splitlines() if log.exists() else [])):
            assert time.monotonic() < deadline, log.read_text() if log.exists() else "no access log"
            time.sleep(0.1)
    finally:
        cluster.wait_applied(cluster.remove("l7.yaml"))


UNASSIGNED = """\
apiVersion: v1
kind: Pod
metadata: {name: mn-lost, namespace: default, labels: {app: mn-lost}}
spec:
  containers:
  - name: lost
    image: busybox
    command: [sleep, "300"]
"""


def test_pod_without_node_name_is_reported_not_run(cluster: MultiNode) -> None:
    version = cluster.put("unassigned.yaml", UNASSIGNED)
    try:
        for name, st in cluster.wait_applied(version).items():
            assert "pod default/mn-lost has no spec.nodeName; with several nodes, set it" in st["errors"], (name, st["errors"])
            assert "default/mn-lost" not in st["pods"]
            assert not (NETNS_DIR / f"webb-{name}-default-mn-lost").exists()
    finally:
        cluster.wait_applied(cluster.remove("unassigned.yaml"))


def test_clean_stop_removes_everything(cluster: MultiNode) -> None:
    cluster.stop_agents()
    for name, _ in NODES:
        assert cluster.agents[name].returncode == 0, cluster.log(name)
        assert not node_file(cluster.cluster_dir, name).exists(), "node file not withdrawn"
        assert leftovers(f"webb-{name}-") == []
        assert not cluster.config(name).cgroup.exists()
        assert not pin_dir_for(name).exists()
        assert status(cluster.state(name))["running"] is False
        # the wire's routes to the other nodes are as the wire made them (no source address of the gone bridge)
        routes = subprocess.run(["ip", "-n", cluster.wire.node(name).netns, "-4", "route", "show", "table", "main"],
                                capture_output=True, text=True, check=True).stdout.splitlines()
        for o in cluster.wire:
            if o.name != name:
                assert [r for r in routes if r.startswith(f"{o.pod_cidr} via {o.wire_ip} dev eth0") and " src " not in r], routes
    cluster.wire.teardown()
    assert not [ns for ns in cluster.wire.namespaces if (NETNS_DIR / ns).exists()]
