"""A real one-node cluster (tests/cluster/node.py): what kubelet, containerd, the scheduler and the
controller-manager do here, and where kubelet puts a pod's processes in the cgroup2 hierarchy (what
Webb's datapath attaches to and keys pods by)."""

from __future__ import annotations

import json
import random
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import cleanup
from tests.cluster.node import KubeNode

pytestmark = [pytest.mark.kube, pytest.mark.root]

RELEASE = "v1.37.2"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BUSYBOX = "webb.local/busybox:1"
PYTHON = "webb.local/python:1"


def pod(name: str, namespace: str, image: str, command: list[str], **spec: Any) -> dict[str, Any]:
    """A one-container pod of a local image (never pulled), stopped within a second when deleted."""
    container = {"name": name, "image": image, "imagePullPolicy": "Never", "command": command, **spec.pop("container", {})}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
            "spec": {"terminationGracePeriodSeconds": 1, "containers": [container], **spec}}


def container_id(p: dict[str, Any], index: int = 0) -> str:
    cid = str(p["status"]["containerStatuses"][index]["containerID"])
    assert cid.startswith("containerd://"), cid
    return cid.removeprefix("containerd://")


def unified_line(pid: int) -> str:
    """The cgroup2 (unified hierarchy) line of /proc/<pid>/cgroup: its path."""
    lines = [ln for ln in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if ln.startswith("0::")]
    assert len(lines) == 1, lines
    return lines[0].removeprefix("0::")


def dns_query(server: str, name: str, timeout_s: float = 3.0) -> tuple[int, list[str]]:
    """One A query over UDP: (rcode, addresses). Only to a pod's address on the node's bridge."""
    qid = random.randrange(1 << 16)
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout_s)
        s.sendto(struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question, (server, 53))
        reply = s.recv(4096)
    rid, flags, _, answers = struct.unpack(">HHHH", reply[:8])
    assert rid == qid
    pos, out = 12 + len(question), []
    for _ in range(answers):
        pos += 2 if reply[pos] & 0xC0 == 0xC0 else reply.index(b"\0", pos) + 1 - pos  # a compressed or a plain name
        rtype, _, _, length = struct.unpack(">HHIH", reply[pos:pos + 10])
        if rtype == 1:
            out.append(socket.inet_ntoa(reply[pos + 10:pos + 10 + length]))
        pos += 10 + length
    return flags & 0xF, out


def eventually(what: str, check: Any, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout_s:.0f} s")
        time.sleep(0.2)


def test_node_ready_at_the_release_with_its_pod_cidr(kube_node: KubeNode) -> None:
    node = kube_node.get("node", kube_node.name)
    conditions = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert conditions["Ready"] == "True"
    assert node["spec"]["podCIDR"] == kube_node.pod_cidr == "10.120.0.0/24"  # the controller-manager's, = CNI's range
    info = node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == RELEASE
    assert info["containerRuntimeVersion"].startswith("containerd://1.6.")
    assert {"type": "InternalIP", "address": kube_node.node_ip} in node["status"]["addresses"]
    server = json.loads(kube_node.kubectl("version", "-o", "json").stdout)["serverVersion"]["gitVersion"]
    assert server == RELEASE
    kube_bin = kube_node.kubectl_path.parent
    for binary in ("kube-controller-manager", "kube-scheduler", "kubelet"):
        out = subprocess.run([str(kube_bin / binary), "--version"], capture_output=True, text=True, timeout=30).stdout
        assert out.split() == ["Kubernetes", RELEASE], binary


def test_the_host_is_as_it_was_but_for_the_node(kube_node: KubeNode) -> None:
    before = kube_node.sysctls_before
    assert before
    for name, value in before.items():  # kubelet's kernel tunables were put back once it was Ready
        assert cleanup.read_sysctl(name) == value, name
    assert cleanup.blackhole_present(kube_node.service_cidr)  # no ClusterIP leads off the machine
    route = subprocess.run(["ip", "route", "get", kube_node.dns_ip], capture_output=True, text=True, timeout=10)
    assert route.returncode != 0 or route.stdout.startswith("blackhole"), (route.stdout, route.stderr)
    addrs = subprocess.run(["ip", "-o", "-4", "addr", "show", "dev", "webbkn0"], capture_output=True, text=True, timeout=10).stdout
    assert f"inet {kube_node.node_ip}/24" in addrs

@pytest.mark.parametrize(("qos", "resources"), [
    ("BestEffort", {}),
    ("Burstable", {"requests": {"cpu": "10m"}}),
    ("Guaranteed", {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"cpu": "50m", "memory": "32Mi"}}),
])
def test_pod_processes_are_in_the_unified_hierarchy_per_container(kube_node: KubeNode, ns: str, qos: str,
                                                                  resources: dict[str, Any]) -> None:
    name = qos.lower()
    t0 = time.monotonic()
    kube_node.apply(pod(name, ns, BUSYBOX, ["sleep", "3600"], container={"resources": resources}))
    p = kube_node.wait_pod_ready(ns, name)
    ready_s = time.monotonic() - t0
    assert p["status"]["qosClass"] == qos
    assert p["spec"]["nodeName"] == kube_node.name
    cid, uid = container_id(p), p["metadata"]["uid"]
    pid = kube_node.task_pids()[cid]

    qos_dir = {"BestEffort": "besteffort/", "Burstable": "burstable/", "Guaranteed": ""}[qos]
    assert unified_line(pid) == f"/webbkube/kubepods/{qos_dir}pod{uid}/{cid}"
    pod_dir = kube_node.cgroup_root / "kubepods" / f"{qos_dir}pod{uid}"
    assert pid in cleanup.cgroup_procs(f"webbkube/kubepods/{qos_dir}pod{uid}/{cid}")
    # one leaf per container, the sandbox's (pause) too, each a child of the pod's cgroup
    leaves = sorted(d.name for d in pod_dir.iterdir() if d.is_dir())
    assert len(leaves) == 2 and cid in leaves, leaves
    assert ready_s < 60


def test_the_kubelet_runtime_finds_each_pod_cgroup(kube_node: KubeNode, ns: str) -> None:
    """mesh.runtime.kubelet (the agent's view of kubelet's pods) finds what this kubelet made, per QoS class."""
    from mesh.model import Pod
    from mesh.runtime.kubelet import KubeletRuntime

    kube_node.apply(pod("be", ns, BUSYBOX, ["sleep", "3600"]),
                    pod("gu", ns, BUSYBOX, ["sleep", "3600"], container={"resources": {"limits": {"cpu": "50m", "memory": "32Mi"}}}))
    runtime = KubeletRuntime(kube_node.name, kube_node.cgroup_root)
    runtime.setup()
    for name, where in (("be", "besteffort/"), ("gu", "")):
        p = kube_node.wait_pod_ready(ns, name)
        uid, qos = p["metadata"]["uid"], p["status"]["qosClass"]
        assert runtime.pod_cgroup(Pod(ns, name, uid=uid, qos=qos)) == kube_node.cgroup_root / f"kubepods/{where}pod{uid}"


def test_python_pod_serves_http_to_the_host(kube_node: KubeNode, ns: str) -> None:
    """The python image runs the examples' stdlib apps (starwars' deathstar, l7's backend) from a ConfigMap."""
    apps = {"deathstar.py": (EXAMPLES / "starwars" / "app.py").read_text(), "backend.py": (EXAMPLES / "l7" / "app.py").read_text()}
    spec = pod("web", ns, PYTHON, ["python3", "/app/deathstar.py", "--port", "80"],
               volumes=[{"name": "app", "configMap": {"name": "apps"}}],
               container={"volumeMounts": [{"name": "app", "mountPath": "/app"}],
                          "readinessProbe": {"tcpSocket": {"port": 80}, "periodSeconds": 1}})
    spec["spec"]["containers"].append({
        "name": "backend", "image": PYTHON, "imagePullPolicy": "Never", "command": ["python3", "/app/backend.py", "--port", "8080"],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "volumeMounts": [{"name": "app", "mountPath": "/app"}],
        "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
    })
    kube_node.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "apps", "namespace": ns}, "data": apps}, spec)
    p = kube_node.wait_pod_ready(ns, "web")
    ip = p["status"]["podIP"]
    assert ip.startswith("10.120.0.")

    def curl(*args: str) -> str:
        return subprocess.run(["curl", "-sS", "--max-time", "5", *args], check=True, capture_output=True, text=True,
                              timeout=10).stdout

    assert curl("-X", "POST", f"http://{ip}/v1/request-landing") == "Ship landed\n"
    assert curl(f"http://{ip}:8080/hello") == "web GET /hello\n"
    logs = kube_node.kubectl("logs", "-n", ns, "web", "-c", "web").stdout
    assert '"POST /v1/request-landing HTTP/1.1" 200' in logs
    imports = kube_node.kubectl("exec", "-n", ns, "web", "-c", "web", "--", "python3", "-c",
                                "import http.server, json, socket, ssl, sqlite3; print(json.dumps(socket.gethostname()))").stdout
    assert imports.strip() == '"web"'


def test_exec_and_logs(kube_node: KubeNode, ns: str) -> None:
    kube_node.apply(pod("talk", ns, BUSYBOX, ["sh", "-c", "echo hello from $(hostname); exec sleep 3600"]))
    p = kube_node.wait_pod_ready(ns, "talk")
    assert eventually("the log line", lambda: kube_node.kubectl("logs", "-n", ns, "talk").stdout, 30) == "hello from talk\n"
    # an exec'd process joins the container's cgroup, the unified one included
    inside = kube_node.kubectl("exec", "-n", ns, "talk", "--", "cat", "/proc/self/cgroup").stdout
    assert f"0::/webbkube/kubepods/besteffort/pod{p['metadata']['uid']}/{container_id(p)}" in inside.splitlines()
    res = kube_node.kubectl("exec", "-n", ns, "talk", "--", "sh", "-c", "exit 3", check=False)
    assert res.returncode == 3


def test_deployment_is_scheduled_and_its_service_gets_an_endpointslice(kube_node: KubeNode, ns: str) -> None:
    labels = {"app": "httpd"}
    template = pod("httpd", ns, BUSYBOX, ["httpd", "-f", "-p", "8080", "-h", "/etc"],
                   container={"ports": [{"containerPort": 8080}], "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}})
    kube_node.apply(
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "httpd", "namespace": ns},
         "spec": {"replicas": 2, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": template["spec"]}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "httpd", "namespace": ns},
         "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": 8080}]}},
    )
    kube_node.kubectl("rollout", "status", "-n", ns, "deployment/httpd", "--timeout=90s", timeout_s=100)
    pods = kube_node.get("-n", ns, "pods", "-l", "app=httpd")["items"]
    assert len(pods) == 2
    assert {p["spec"]["nodeName"] for p in pods} == {kube_node.name}  # the scheduler bound them
    assert {p["metadata"]["ownerReferences"][0]["kind"] for p in pods} == {"ReplicaSet"}  # the controller-manager made them
    ips = sorted(p["status"]["podIP"] for p in pods)

    def slice_ips() -> list[str] | None:
        slices = kube_node.get("-n", ns, "endpointslices", "-l", "kubernetes.io/service-name=httpd")["items"]
        got = sorted(a for s in slices for e in s.get("endpoints") or [] if e["conditions"].get("ready")
                     for a in e["addresses"])
        return got if got == ips else None

    eventually("an EndpointSlice with both pods", slice_ips, 60)
    svc = kube_node.get("-n", ns, "service", "httpd")
    assert svc["spec"]["clusterIP"].startswith("10.122.0.")
    for ip in ips:  # the backends answer at their pod IPs (their ClusterIP waits for Webb's agent)
        out = subprocess.run(["curl", "-sS", "--max-time", "5", f"http://{ip}:8080/passwd"], capture_output=True, text=True,
                             timeout=10)
        assert out.stdout.startswith("root:x:0:0"), out


def test_daemonset_runs_on_the_node(kube_node: KubeNode, ns: str) -> None:
    labels = {"app": "agent"}
    template = pod("agent", ns, BUSYBOX, ["sleep", "3600"])
    kube_node.apply({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "agent", "namespace": ns},
                     "spec": {"selector": {"matchLabels": labels},
                              "template": {"metadata": {"labels": labels}, "spec": template["spec"]}}})
    kube_node.kubectl("rollout", "status", "-n", ns, "daemonset/agent", "--timeout=90s", timeout_s=100)
    ds = kube_node.get("-n", ns, "daemonset", "agent")
    assert ds["status"]["numberReady"] == ds["status"]["desiredNumberScheduled"] == 1


def test_coredns_answers_at_its_pod_ip(kube_node: KubeNode, ns: str) -> None:
    """CoreDNS serves cluster.local from the API; reached at its pod IP (no ClusterIP data path without Webb's agent)."""
    dns = kube_node.coredns_pod_ip()
    kube_node.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "named", "namespace": ns},
                     "spec": {"selector": {"app": "none"}, "ports": [{"port": 80}]}})
    cluster_ip = kube_node.get("-n", ns, "service", "named")["spec"]["clusterIP"]
    assert dns_query(dns, "kubernetes.default.svc.cluster.local") == (0, [kube_node.config.api_service_ip])
    assert dns_query(dns, "kube-dns.kube-system.svc.cluster.local") == (0, [kube_node.dns_ip])
    assert eventually("the new Service in DNS", lambda: dns_query(dns, f"named.{ns}.svc.cluster.local")[1], 30) == [cluster_ip]
    rcode, addrs = dns_query(dns, "example.com")
    assert addrs == [] and rcode in (2, 5)  # SERVFAIL / REFUSED: nothing is forwarded off the machine


def test_pods_get_the_cluster_dns_in_resolv_conf(kube_node: KubeNode, ns: str) -> None:
    kube_node.apply(pod("resolv", ns, BUSYBOX, ["sleep", "3600"]))
    kube_node.wait_pod_ready(ns, "resolv")
    conf = kube_node.kubectl("exec", "-n", ns, "resolv", "--", "cat", "/etc/resolv.conf").stdout
    assert f"nameserver {kube_node.dns_ip}" in conf.splitlines()
    assert f"search {ns}.svc.cluster.local svc.cluster.local cluster.local" in conf.splitlines()
