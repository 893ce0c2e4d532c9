"""Kubelet's pods under Webb (the one-node cluster of tests/cluster): how long a node takes to come
up, the window between a pod's start and its identity being enforced, and what an upgrade of the
agent costs (``kubectl rollout restart`` of the DaemonSet under load: tests/cluster/rollout.py).

The window, measured from inside: each of 50 probe pods (labels ``role: probe``) starts, takes
the time, and connects in a loop (1 ms apart, bounded) to a target pod that a MeshPolicy opens
to ``role: probe`` only. Until the agent has found the probe's pod cgroup and written its
identity, the kernel refuses (EPERM: fail closed — the connections are counted); the first
accepted connection ends the window. Two figures per pod:

- ``window``: the probe's own first instruction → its first accepted connection, when its first
  attempts were refused (0 when the first attempt already went through: the identity was there
  before the container's first connect);
- ``from cgroup``: kubelet made the pod's cgroup (its directory's ctime, before any container) →
  the first accepted connection: kubelet's own start-up of the pod (sandbox, CNI, container) is
  most of it, shown for scale.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PODS = 50  # the test node's kubelet has maxPods 64; CoreDNS and the target take two more
PYTHON = "webb.local/python:1"
PROBE = """
import json, os, socket, sys, time
t0 = time.time(); denied = 0; other = ""
end = time.monotonic() + 30
while time.monotonic() < end:
    try:
        socket.create_connection((sys.argv[1], 80), timeout=1).close(); break
    except PermissionError:
        denied += 1
    except OSError as e:
        other = repr(e)
    time.sleep(0.001)
print(json.dumps({"t0": t0, "t1": time.time(), "denied": denied, "other": other}), flush=True)
time.sleep(3600)
"""
TARGET = "import socket; s = socket.create_server(('', 80)); [s.accept()[0].close() for _ in iter(int, 1)]"


def _pod(name: str, ns: str, labels: dict[str, str], command: list[str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "main", "image": PYTHON, "imagePullPolicy": "Never", "command": command}]}}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run() -> tuple[dict[str, float], list[list[str]]]:
    from tests.cluster.agent import host_agent
    from tests.cluster.node import KubeNode

    node = KubeNode()
    t0 = time.monotonic()
    node.start()
    node_up = time.monotonic() - t0
    state = Path(tempfile.mkdtemp(prefix="webb-bench-kube-"))
    try:
        with host_agent(node, state):
            results, missing = _probe(node, state)
        node.kubectl("delete", "namespace", "bench", "--wait=false")
        rollout = _rollout(node, state)
    finally:
        node.stop()
        shutil.rmtree(state, ignore_errors=True)
    figures, rows = _figures(node_up, results, missing)
    return {**figures, **_rollout_figures(rollout)}, rows + _rollout_rows(rollout)


def _rollout(node: Any, home: Path) -> dict[str, Any]:
    """Webb from its chart (tests/cluster/test_install.py), Star Wars with rule1 and the echo Service, then
    the agent DaemonSet restarted under the loads of tests/cluster/rollout.py."""
    from tests.cluster.rollout import deploy_echo, rollout_under_load
    from tests.cluster.starwars import apply_rule1, deploy, url, wait_landing
    from tests.cluster.test_install import helm_installed

    (home / "helm").mkdir(exist_ok=True)
    with helm_installed(node, home / "helm"):
        for ns in ("rollout-l4", "rollout-l7"):
            node.kubectl("create", "namespace", ns)
        deploy_echo(node, "rollout-l4")
        deploy(node, "rollout-l7")
        wait_landing(node, "rollout-l7")
        apply_rule1(node, "rollout-l7")
        return rollout_under_load(node, "rollout-l4", ("rollout-l7", "tiefighter", url("rollout-l7", "/v1/request-landing")))


def _rollout_figures(r: dict[str, Any]) -> dict[str, float]:
    return {"kube.rollout_failed_requests": r["held"]["failed"] + r["new"]["failed"],
            "kube.rollout_l4_requests": r["held"]["ok"] + r["new"]["ok"] + r["held"]["failed"] + r["new"]["failed"],
            "kube.rollout_l7_pause_s": r["l7"]["longest_failure_s"], "kube.rollout_l7_failed": r["l7"]["failed"],
            "kube.rollout_s": r["rollout_s"]}


def _rollout_rows(r: dict[str, Any]) -> list[list[str]]:
    f = _rollout_figures(r)
    return [
        ["rollout restart of the agent DaemonSet: L4 requests failed (held + new connections)",
         f"{f['kube.rollout_failed_requests']:.0f} of {f['kube.rollout_l4_requests']:.0f}", "",
         f"goal 0; restart took {r['rollout_s']:.1f} s; the pinned datapath stays while the DaemonSet does"],
        ["rollout restart: L7 pause (longest run of failed requests through the node Envoy)",
         f"{f['kube.rollout_l7_pause_s']:.1f} s", "", f"{r['l7']['failed']} of {r['l7']['ok'] + r['l7']['failed']} L7 requests failed: "
         "Envoy is the agent pod's and restarts with it (fails closed meanwhile)"],
    ]


def _probe(node: Any, state: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The probes' reports, and the state of those that never reported."""
    from mesh.status import AgentStatus

    ns = "bench"
    node.kubectl("create", "namespace", ns)
    node.apply(_pod("target", ns, {"app": "target"}, ["python3", "-c", TARGET]))
    target_ip = node.wait_pod_ready(ns, "target")["status"]["podIP"]
    node.apply({"apiVersion": "webb.io/v1alpha1", "kind": "MeshPolicy", "metadata": {"name": "probes-only", "namespace": ns},
                "spec": {"endpointSelector": {"matchLabels": {"app": "target"}},
                         "ingress": [{"fromEndpoints": [{"matchLabels": {"role": "probe"}}]}]}})
    deadline = time.monotonic() + 30
    while not any("probes-only" in r for r in (AgentStatus.read(state) or AgentStatus("")).rules.values()):
        if time.monotonic() > deadline:
            raise RuntimeError("the policy was not applied in 30 s")
        time.sleep(0.05)
    node.apply(*(_pod(f"probe-{i}", ns, {"role": "probe"}, ["python3", "-c", PROBE, target_ip]) for i in range(PODS)))
    results: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 300
    while len(results) < PODS and time.monotonic() < deadline:
        for i in range(PODS):
            name = f"probe-{i}"
            if name in results:
                continue
            out = node.kubectl("logs", "-n", ns, name, check=False).stdout.strip()
            if out.startswith("{"):
                pod = node.get("-n", ns, "pod", name)
                cg = node.cgroup_root / "kubepods" / "besteffort" / f"pod{pod['metadata']['uid']}"
                results[name] = {**json.loads(out.splitlines()[0]), "cgroup_ctime": os.stat(cg).st_ctime}
        time.sleep(0.5)
    missing: dict[str, Any] = {}
    for i in range(PODS):
        if f"probe-{i}" not in results:
            pst = node.get("-n", ns, "pod", f"probe-{i}").get("status") or {}
            missing[f"probe-{i}"] = (pst.get("phase"), [c.get("state") for c in pst.get("containerStatuses") or []])
    if len(results) < PODS // 2:
        raise RuntimeError(f"only {len(results)} of {PODS} probes reported in 300 s: {missing}")
    return results, missing


def _figures(node_up: float, results: dict[str, dict[str, Any]], missing: dict[str, Any]) -> tuple[dict[str, float], list[list[str]]]:
    failed = [r for r in results.values() if r["other"] or r["t1"] - r["t0"] >= 30] + [{"pod": k, "state": v} for k, v in missing.items()]
    from_cg = [(r["t1"] - r["cgroup_ctime"]) * 1000 for r in results.values()]
    window = [(r["t1"] - r["t0"]) * 1000 if r["denied"] else 0.0 for r in results.values()]
    from_proc = [(r["t1"] - r["t0"]) * 1000 for r in results.values()]
    denied = [r["denied"] for r in results.values()]
    figures = {
        "kube.node_up_s": round(node_up, 2),
        "kube.pod_enforced_p50_ms": round(_pct(window, 0.5), 1), "kube.pod_enforced_p99_ms": round(_pct(window, 0.99), 1),
        "kube.pod_cgroup_to_allowed_p50_ms": round(_pct(from_cg, 0.5), 1),
        "kube.pod_cgroup_to_allowed_p99_ms": round(_pct(from_cg, 0.99), 1),
        "kube.pod_enforced_from_process_p50_ms": round(_pct(from_proc, 0.5), 1),
        "kube.pod_enforced_from_process_p99_ms": round(_pct(from_proc, 0.99), 1),
        "kube.pods_denied_before_known": sum(1 for d in denied if d), "kube.probe_failures": len(failed),
        "kube.probes_reported": len(results),
    }
    rows = [
        ["node start → Ready (warm caches)", f"{node_up:.1f} s", "", "KubeNode.start: etcd, apiserver, controllers, containerd, kubelet"],
        [f"container start → identity enforced ({PODS} pods at once)", f"{_pct(window, 0.5):.0f} ms", f"{_pct(window, 0.99):.0f} ms",
         "goal p99 < 100 ms; 0 = the first connect was already allowed"],
        ["pod cgroup made → first connection allowed", f"{_pct(from_cg, 0.5):.0f} ms", f"{_pct(from_cg, 0.99):.0f} ms",
         f"kubelet's pod start-up (sandbox, CNI, container) under {PODS} pods at once, for scale"],
        ["probe's first instruction → identity enforced", f"{_pct(from_proc, 0.5):.0f} ms", f"{_pct(from_proc, 0.99):.0f} ms",
         f"{figures['kube.pods_denied_before_known']} of {PODS} probes were refused (EPERM) before: fail closed, "
         f"median {statistics.median(denied):.0f} refusals"],
    ]
    if failed:
        rows.append(["probes that never got through, never reported or saw another error", str(len(failed)), "", str(failed[:2])])
    return figures, rows


if __name__ == "__main__":
    figs, table = run()
    print(json.dumps(figs, indent=1))
    for row in table:
        print(" | ".join(row))
