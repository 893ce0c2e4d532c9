"""Cilium's Star Wars demo on the real node (tests/cluster): the pods run Debian's Python from the
test image, the app comes from a ConfigMap; requests are made from inside the pods."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.cluster.node import KubeNode
from tests.cluster.test_node import PYTHON, eventually

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "starwars" / "app.py"
# a request from inside a pod: "<status> <body>" or the exception's name (e.g. PermissionError: refused at connect)
CLIENT = """
import sys, urllib.request, urllib.error
req = urllib.request.Request(sys.argv[1], method=sys.argv[2], data=b"")
try:
    with urllib.request.urlopen(req, timeout=5) as r:
        print(r.status, r.read().decode().strip())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode().strip())
except urllib.error.URLError as e:
    print(type(e.reason).__name__, e.reason)
"""


def pod(name: str, ns: str, labels: dict[str, str], command: list[str], node: str = "") -> dict[str, Any]:
    """A pod of the test image with the app mounted; ``node``: run it there (no scheduling)."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"terminationGracePeriodSeconds": 1, **({"nodeName": node} if node else {}),
                     "containers": [{"name": "main", "image": PYTHON, "imagePullPolicy": "Never", "command": command,
                                     "volumeMounts": [{"name": "app", "mountPath": "/app"}]}],
                     "volumes": [{"name": "app", "configMap": {"name": "starwars"}}]}}


def request(node: KubeNode, ns: str, pod: str, method: str, url: str) -> str:
    r = node.kubectl("exec", "-n", ns, pod, "--", "python3", "-c", CLIENT, url, method, check=False)
    return (r.stdout + r.stderr).strip()


def deploy(node: KubeNode, ns: str) -> dict[str, dict[str, Any]]:
    """Service deathstar, pods deathstar, tiefighter and xwing in ``ns``, Ready: name -> pod."""
    node.kubectl("create", "configmap", "starwars", "-n", ns, f"--from-file=app.py={APP}")
    sleep = ["python3", "-c", "import time; time.sleep(3600)"]
    node.apply(
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "deathstar", "namespace": ns},
         "spec": {"selector": {"org": "empire", "class": "deathstar"}, "ports": [{"port": 80, "targetPort": 80}]}},
        pod("deathstar", ns, {"org": "empire", "class": "deathstar"}, ["python3", "/app/app.py", "--port", "80"]),
        pod("tiefighter", ns, {"org": "empire", "class": "tiefighter"}, sleep),
        pod("xwing", ns, {"org": "alliance", "class": "xwing"}, sleep),
    )
    return {name: node.wait_pod_ready(ns, name) for name in ("deathstar", "tiefighter", "xwing")}


def url(ns: str, path: str) -> str:
    """By name: CoreDNS through its ClusterIP, then the deathstar's ClusterIP, both by Webb's socket LB."""
    return f"http://deathstar.{ns}.svc.cluster.local{path}"


def landing(node: KubeNode, ns: str, pod: str) -> str:
    return request(node, ns, pod, "POST", url(ns, "/v1/request-landing"))


def wait_landing(node: KubeNode, ns: str, timeout_s: float = 60.0) -> str:
    """The tiefighter's landing once it answers (the pods and the agent may still be starting)."""
    return str(eventually("landing without a policy", lambda: (r := landing(node, ns, "tiefighter")).startswith("200") and r,
                          timeout_s))


def apply_rule1(node: KubeNode, ns: str, timeout_s: float = 60.0) -> None:
    """Cilium's rule1 (examples/starwars/policy.yaml) in ``ns``, in force: the xwing refused at connect."""
    policy = (ROOT / "examples" / "starwars" / "policy.yaml").read_text().replace("namespace: default", f"namespace: {ns}")
    node.kubectl("apply", "-f", "-", stdin=policy)
    eventually("the xwing refused at connect", lambda: "PermissionError" in landing(node, ns, "xwing"), timeout_s)
