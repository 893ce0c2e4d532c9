"""Operator bench: a MeshPolicy written to a real kube-apiserver → the node agent (``webb agent
--kube``, real BPF datapath and Envoy) has converged on it.

Setup (not timed): the one-node cluster of the cluster tests (``tests.cluster.node.KubeNode``:
kubelet runs the pods), the CRDs, ``webb agent --kube`` on it as a host process (as the DaemonSet
runs it), the Star Wars pods and Service in namespace ``bench``, and one MeshPolicy ``bench-rule``
on the deathstar (L7, like the demo's rule1).

Converged means: the agent's ``status.json`` shows an ``applied.plan_version`` it had not
shown before. The agent writes ``applied`` only after Envoy ACKed the plan's snapshot AND the
datapath maps were written (``Agent.sync``). Each change makes a plan never seen before (a
new path ``/v1/cNNNN`` in the L7 rule: Envoy's RBAC; the allowed sources alternate between
``org: empire`` and ``org: alliance``: the datapath's policy map), and after timing each one is
checked: Envoy's config dump has the new path and the datapath changed map entries.

Figures, all from the same run:
- ``converge`` (headline): the API write (a merge patch) returning → ``status.json`` shows the
  plan, polled every 2 ms. This is what anyone on the node can observe.
- ``converge_applied``: API write returning → ``applied.at`` (the agent's own clock, taken right
  after ``datapath.apply`` returned): when the node really had converged.
- ``watch_seen``: API write returning → a watch of MeshPolicies in this process (the same client
  code as the agent's) delivers the change: the API server's share.
- ``burst``: 240 objects at once (16 client threads): 40 Pods (``sleep``, run by kubelet; the
  node takes 64), 100 Services and 100 L7 MeshPolicies, service and policy ``i`` on pod ``i % 40``
  → ``status.json`` has every one of them in its applied plan (the pod with its IP, the VIP
  with a backend, the policy's rule), and Envoy has the last policy's path. Kubelet starting
  40 pods is part of it.
- ``cr_status_applied`` (the operator path, kopf): only after the above, with the operator
  running: API write returning → the CR's status says ``Applied`` for that generation. The
  operator is not needed for convergence and is off while the agent path is measured (its
  status writes change resourceVersions, which the agent would re-sync on).

Network: 127.0.0.1 (etcd, Envoy admin/ingress), the node's bridge and its pods.
Every wait is bounded; every process started here is stopped by its PID, even on failure.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.kube.translate import RESOURCES
from mesh.kube.watch import api_path, request, watch_kind
from tests.kube.apiserver import Process

NS = "bench"
POLICY = "bench-rule"
CHANGES = 100
OPERATOR_CHANGES = 20
BURST_EACH = 100  # Services, MeshPolicies
BURST_PODS = 40  # the node's kubelet takes 64 pods
POLL_S = 0.002
CHANGE_TIMEOUT_S = 15.0
BURST_TIMEOUT_S = 180.0
SETUP_TIMEOUT_S = 120.0
AGENT_LIFETIME_S = 1500.0
APP_PODS = (f"{NS}/deathstar", f"{NS}/tiefighter", f"{NS}/xwing")
BUSYBOX = "webb.local/busybox:1"


@dataclass
class Kube:
    """The cluster as this bench uses it: an API client, kubectl and the kubeconfig (of the node)."""

    api: Any
    kubectl: Callable[..., Any]
    kubeconfig: Path


def _policy(i: int) -> dict[str, Any]:
    """The bench's MeshPolicy, version ``i``: a path of its own; sources alternate (datapath)."""
    src = "empire" if i % 2 == 0 else "alliance"
    return {
        "apiVersion": "webb.io/v1alpha1", "kind": "MeshPolicy", "metadata": {"name": POLICY, "namespace": NS},
        "spec": {"endpointSelector": {"matchLabels": {"org": "empire", "class": "deathstar"}},
                 "ingress": [{"fromEndpoints": [{"matchLabels": {"org": src}}],
                              "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}],
                                           "rules": {"http": [{"method": "POST", "path": _path_of(i)}]}}]}]},
    }


def _path_of(i: int) -> str:
    return f"/v1/c{i:04d}"


def _burst_objects() -> list[tuple[str, dict[str, Any]]]:
    """Deployed at once: BURST_PODS Pods, and BURST_EACH Services and L7 MeshPolicies on pod ``i % BURST_PODS``."""
    objs: list[tuple[str, dict[str, Any]]] = []
    for k in range(BURST_PODS):
        app = {"app": f"burst-{k}", "org": "empire"}
        objs.append(("Pod", {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"burst-{k}", "namespace": NS, "labels": app},
            "spec": {"terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "app", "image": BUSYBOX, "imagePullPolicy": "Never", "command": ["sleep", "3600"],
                                     "ports": [{"containerPort": 80, "name": "http"}]}]}}))
    for i in range(BURST_EACH):
        objs.append(("Service", {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": f"burst-{i}", "namespace": NS},
            "spec": {"selector": {"app": f"burst-{i % BURST_PODS}"}, "ports": [{"port": 80, "targetPort": 80, "protocol": "TCP"}]}}))
        objs.append(("MeshPolicy", {
            "apiVersion": "webb.io/v1alpha1", "kind": "MeshPolicy", "metadata": {"name": f"burst-{i}", "namespace": NS},
            "spec": {"endpointSelector": {"matchLabels": {"app": f"burst-{i % BURST_PODS}"}},
                     "ingress": [{"fromEndpoints": [{"matchLabels": {"org": "empire"}}],
                                  "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}],
                                               "rules": {"http": [{"method": "GET", "path": f"/burst/{i}"}]}}]}]}}))
    return objs


def _pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p99 of 100 samples is the 99th smallest)."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))]


class Agent:
    """The agent process of ``tests.cluster.agent.host_agent``: alive or not, its log."""

    def __init__(self, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.popen, self.log = popen, log

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"the agent exited with {self.popen.returncode}:\n{self.log_tail(40)}")

    def log_tail(self, lines: int) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class Node:
    """The agent under test: its status.json, its log, its Envoy admin port."""

    def __init__(self, agent: Agent, state: Path, admin_port: int) -> None:
        self.agent, self.state, self.admin_port = agent, state, admin_port
        self.seen_plans: set[str] = set()

    def status(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.state / "status.json").read_text()))
        except (FileNotFoundError, json.JSONDecodeError):  # json.loads of an empty file: not written yet
            return {}

    def applied(self) -> dict[str, Any]:
        return dict(self.status().get("applied") or {})

    def until(self, what: str, ok: Callable[[dict[str, Any]], bool], timeout_s: float,
              interval_s: float = POLL_S) -> tuple[float, dict[str, Any]]:
        """Poll status.json until ``ok``; (perf_counter when seen, the status)."""
        deadline = time.monotonic() + timeout_s
        n = 0
        while True:
            st = self.status()
            if st and ok(st):
                return time.perf_counter(), st
            n += 1
            if n % 256 == 0:
                self.agent.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not after {timeout_s:.0f} s; applied {st.get('applied')}, "
                                   f"errors {st.get('errors')}\n{self.agent.log_tail(30)}")
            time.sleep(interval_s)

    def new_plan(self, st: dict[str, Any]) -> bool:
        return str((st.get("applied") or {}).get("plan_version", "")) not in self.seen_plans

    def settle(self, quiet_s: float = 2.0, timeout_s: float = SETUP_TIMEOUT_S) -> dict[str, Any]:
        """Wait until the applied plan has not changed for ``quiet_s`` (pod IP patches, etc. done)."""
        deadline = time.monotonic() + timeout_s
        last, since = "", time.monotonic()
        while time.monotonic() < deadline:
            self.agent.check_alive()
            a = self.applied()
            v = f"{a.get('plan_version')} {a.get('source_version')}"
            if v != last:
                last, since = v, time.monotonic()
            elif a and time.monotonic() - since >= quiet_s:
                self.seen_plans.add(str(a.get("plan_version")))
                return a
            time.sleep(0.05)
        raise TimeoutError(f"agent never settled: {self.applied()}\n{self.agent.log_tail(30)}")

    def envoy_has(self, text: str) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/config_dump", timeout=10) as r:  # noqa: S310 - loopback
            return text in r.read().decode()

    def applied_lines(self) -> int:
        return self.agent.log_tail(100_000).count("applied plan ")


class Watcher:
    """A watch of MeshPolicies (the agent's own client code): when each resourceVersion arrived."""

    def __init__(self, kube: Kube) -> None:
        self.seen: dict[str, float] = {}
        self.cond = threading.Condition()
        self.stop = threading.Event()
        self.synced = threading.Event()
        self.thread = threading.Thread(target=watch_kind, args=(kube.api, "MeshPolicy", self._on, self.stop, self.synced),
                                       name="bench-watch", daemon=True)

    def _on(self, kind: str, obj: dict[str, Any]) -> None:
        t = time.perf_counter()
        rv = str((obj.get("metadata") or {}).get("resourceVersion", ""))
        with self.cond:
            self.seen.setdefault(rv, t)
            self.cond.notify_all()

    def wait(self, rv: str, timeout_s: float) -> float | None:
        with self.cond:
            self.cond.wait_for(lambda: rv in self.seen, timeout_s)
            return self.seen.get(rv)


def _setup_app(kube: Kube, node: Node, cluster: Any) -> None:
    from tests.cluster.starwars import deploy

    kube.kubectl("create", "namespace", NS)
    deploy(cluster, NS)
    request(kube.api, "POST", api_path(RESOURCES["MeshPolicy"], NS), _policy(0))

    def ready(st: dict[str, Any]) -> bool:
        pods = st.get("pods") or {}
        return all((pods.get(p) or {}).get("ip") for p in APP_PODS) and any(
            "bench-rule" in r for r in (st.get("rules") or {}).values())

    node.until("the Star Wars pods run and bench-rule is applied", ready, SETUP_TIMEOUT_S, 0.1)
    node.settle()
    if not node.envoy_has(_path_of(0)):
        raise RuntimeError("bench-rule applied but not in Envoy's config dump")


def _changes(kube: Kube, node: Node, watcher: Watcher) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"converge": [], "applied": [], "watch": [], "datapath_changes": []}
    res = RESOURCES["MeshPolicy"]
    for i in range(1, CHANGES + 1):
        body = {"spec": _policy(i)["spec"]}
        obj = request(kube.api, "PATCH", api_path(res, NS, POLICY), body, content_type="application/merge-patch+json")
        t0, w0 = time.perf_counter(), time.time()
        seen, st = node.until(f"change {i} converged", node.new_plan, CHANGE_TIMEOUT_S)
        a = st["applied"]
        node.seen_plans.add(str(a["plan_version"]))
        t_watch = watcher.wait(str(obj["metadata"]["resourceVersion"]), CHANGE_TIMEOUT_S)
        if not node.envoy_has(_path_of(i)):  # the new plan must be this change
            raise RuntimeError(f"change {i}: plan {a['plan_version']} applied but Envoy has no {_path_of(i)}")
        if t_watch is None:
            raise RuntimeError(f"change {i}: the bench's own watch never saw it")
        out["converge"].append((seen - t0) * 1e3)
        out["applied"].append((float(a["at"]) - w0) * 1e3)
        out["watch"].append((t_watch - t0) * 1e3)
        out["datapath_changes"].append(float(a.get("datapath_changes") or 0))
        time.sleep(0.05 + (i % 7) * 0.013)  # do not phase-lock with the agent's loop
    return out


def _burst(kube: Kube, node: Node) -> dict[str, float]:
    objs = _burst_objects()
    node.settle()
    lines0 = node.applied_lines()

    def create(item: tuple[str, dict[str, Any]]) -> dict[str, Any]:
        kind, doc = item
        return dict(request(kube.api, "POST", api_path(RESOURCES[kind], NS), doc))

    w0, t0 = time.time(), time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        created = list(pool.map(create, objs))
    t_created = time.perf_counter()
    vips = {str(c["spec"]["clusterIP"]) for c in created if c["kind"] == "Service"}
    want_rules = {f"MeshPolicy {NS}/burst-{i} spec.ingress[0]" for i in range(BURST_EACH)}
    want_pods = {f"{NS}/burst-{i}" for i in range(BURST_EACH)}

    def complete(st: dict[str, Any]) -> bool:
        pods = st.get("pods") or {}
        have = {s["vip"] for s in st.get("services") or [] if s.get("backends")}
        return (all((pods.get(p) or {}).get("ip") for p in want_pods) and vips <= have
                and want_rules <= set((st.get("rules") or {}).values()))

    seen, st = node.until("burst converged", complete, BURST_TIMEOUT_S, 0.01)
    if not node.envoy_has(f"/burst/{BURST_EACH - 1}"):
        raise RuntimeError("burst applied but Envoy has not its last path")
    node.seen_plans.add(str(st["applied"]["plan_version"]))
    node.settle()
    return {"burst_s": seen - t0, "create_s": t_created - t0, "applied_s": float(st["applied"]["at"]) - w0,
            "plans": float(node.applied_lines() - lines0), "services": float(len(st.get("services") or [])),
            "rules": float(len(st.get("rules") or {}))}


def _operator_path(kube: Kube, node: Node, tmp: Path) -> list[float]:
    """With the operator (kopf) running: write → CR status Applied for that generation."""
    res = RESOURCES["MeshPolicy"]
    op = Process("operator", [sys.executable, "-m", "mesh.operator", "--kubeconfig", str(kube.kubeconfig),
                              "--lifetime", "600"], tmp / "operator.log")
    out: list[float] = []
    try:
        def applied(gen: int) -> bool:
            st = request(kube.api, "GET", api_path(res, NS, POLICY)).get("status") or {}
            cond: dict[str, Any] = next((c for c in st.get("conditions") or [] if c.get("type") == "Applied"), {})
            return bool(st.get("observedGeneration") == gen and cond.get("status") == "True")

        def until(gen: int, timeout_s: float) -> float:
            deadline = time.monotonic() + timeout_s
            while not applied(gen):
                op.check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"CR status Applied for generation {gen}: not after {timeout_s:.0f} s\n"
                                       f"{op.log_tail(30)}")
                time.sleep(0.01)
            return time.perf_counter()

        gen = int(request(kube.api, "GET", api_path(res, NS, POLICY))["metadata"]["generation"])
        until(gen, SETUP_TIMEOUT_S)  # the operator has started and caught up
        for i in range(CHANGES + 1, CHANGES + 1 + OPERATOR_CHANGES):
            obj = request(kube.api, "PATCH", api_path(res, NS, POLICY), {"spec": _policy(i)["spec"]},
                          content_type="application/merge-patch+json")
            t0 = time.perf_counter()
            out.append((until(int(obj["metadata"]["generation"]), CHANGE_TIMEOUT_S * 2) - t0) * 1e3)
            time.sleep(0.05 + (i % 7) * 0.013)
    finally:
        op.stop()
    return out


def measure() -> dict[str, Any]:
    from mesh.kube.client import api_client
    from tests.cluster.agent import host_agent
    from tests.cluster.node import KubeNode, free_port

    if os.geteuid() != 0:
        raise PermissionError("the operator bench runs a kube node and the agent (BPF): run it as root")
    cluster = KubeNode()
    with tempfile.TemporaryDirectory(prefix="webb-bench-operator-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            cluster.start()
            kube = Kube(api_client(str(cluster.kubeconfig)), cluster.kubectl, cluster.kubeconfig)
            admin = free_port("127.0.0.1")
            with host_agent(cluster, tmp, lifetime_s=AGENT_LIFETIME_S, envoy_admin_port=admin) as proc:
                node = Node(Agent(proc, tmp / "agent.log"), tmp, admin)
                watcher = Watcher(kube)
                try:
                    watcher.thread.start()
                    if not watcher.synced.wait(30):
                        raise TimeoutError("the bench's MeshPolicy watch did not list in 30 s")
                    _setup_app(kube, node, cluster)
                    changes = _changes(kube, node, watcher)
                    burst = _burst(kube, node)
                    operator = _operator_path(kube, node, tmp)
                finally:
                    watcher.stop.set()
                    kube.api.close()
        finally:
            cluster.stop()
    return {"changes": changes, "burst": burst, "operator": operator}


def run() -> tuple[dict[str, float], list[tuple[str, ...]]]:
    m = measure()
    c, b, op = m["changes"], m["burst"], m["operator"]
    conv, app, watch = c["converge"], c["applied"], c["watch"]
    figures = {
        "operator.changes": float(len(conv)),
        "operator.converge_p50_ms": round(statistics.median(conv), 1),
        "operator.converge_p99_ms": round(_pct(conv, 99), 1),
        "operator.converge_max_ms": round(max(conv), 1),
        "operator.converge_applied_p50_ms": round(statistics.median(app), 1),
        "operator.converge_applied_p99_ms": round(_pct(app, 99), 1),
        "operator.watch_seen_p50_ms": round(statistics.median(watch), 2),
        "operator.watch_seen_p99_ms": round(_pct(watch, 99), 2),
        "operator.datapath_changes_per_change": round(statistics.mean(c["datapath_changes"]), 1),
        "operator.burst_objects": float(BURST_PODS + 2 * BURST_EACH),
        "operator.burst_s": round(b["burst_s"], 2),
        "operator.burst_create_s": round(b["create_s"], 2),
        "operator.burst_applied_s": round(b["applied_s"], 2),
        "operator.burst_plans": b["plans"],
        "operator.cr_status_applied_p50_ms": round(statistics.median(op), 1),
        "operator.cr_status_applied_p99_ms": round(_pct(op, 99), 1),
    }
    rows: list[tuple[str, ...]] = [
        (f"MeshPolicy write → status.json applied ({len(conv)} changes)", f"{statistics.median(conv):.1f} ms",
         f"{_pct(conv, 99):.1f} ms", f"max {max(conv):.1f} ms"),
        ("  … → agent's applied.at (Envoy ACK + maps written)", f"{statistics.median(app):.1f} ms",
         f"{_pct(app, 99):.1f} ms", f"{statistics.mean(c['datapath_changes']):.0f} map entries/change"),
        ("  … → a watch in the bench sees it (API server's share)", f"{statistics.median(watch):.2f} ms",
         f"{_pct(watch, 99):.2f} ms", ""),
        (f"burst: {BURST_PODS + 2 * BURST_EACH} objects ({BURST_PODS} kubelet Pods, {BURST_EACH} × Service + L7 MeshPolicy)",
         f"{b['burst_s']:.2f} s", "", f"created in {b['create_s']:.2f} s, {b['plans']:.0f} plans applied; kubelet starts the pods"),
        (f"MeshPolicy write → CR status Applied (operator, {len(op)} changes)", f"{statistics.median(op):.1f} ms",
         f"{_pct(op, 99):.1f} ms", "needs the operator; the node does not"),
    ]
    return figures, rows


if __name__ == "__main__":
    figs, _ = run()
    print(json.dumps(figs, indent=1, sort_keys=True))
