"""The node agent with the API server as its source (``webb agent --kube``): no kopf.

The agent is the standalone one; its source is the API server (``KubeSource``: list+watch into
the indexer the operator shares) and its pods are kubelet's (``KubeletRuntime``: the agent
never starts a pod in a cluster). A ``NodeReporter`` publishes what it applied for the operator
to put into CR status.

``pod_workdir`` keeps the older test harness: the embedded runtime runs the API's pods itself
(an API server without kubelet, tests/operator and bench/operator); it never runs beside kubelet.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from mesh.agent.loop import Agent, AgentConfig
from mesh.kube.client import api_client
from mesh.kube.indexer import Indexer
from mesh.kube.translate import Resource
from mesh.kube.watch import KubeSource, NodeReporter, api_path, request
from mesh.runtime.base import PodRuntime
from mesh.runtime.kubelet import KubeletRuntime

log = logging.getLogger("webb.kube")
NODES = Resource("", "v1", "nodes")


def node_internal_ip(doc: dict[str, Any]) -> str:
    """The Node's first IPv4 InternalIP ("" when it has none)."""
    addrs = (doc.get("status") or {}).get("addresses") or []
    return next((str(a["address"]) for a in addrs if a.get("type") == "InternalIP" and ":" not in str(a.get("address"))), "")


def node_pod_cidr(doc: dict[str, Any], node: str) -> str:
    """The Node's IPv4 pod CIDR (spec.podCIDRs, set by the controller-manager or the installer)."""
    spec = doc.get("spec") or {}
    cidrs = [str(c) for c in (spec.get("podCIDRs") or [spec.get("podCIDR")]) if c]
    v4 = [c for c in cidrs if ":" not in c]
    if not v4:
        raise RuntimeError(f"node {node} has no IPv4 spec.podCIDRs: start the controller-manager with --allocate-node-cidrs, "
                           "or pass --pod-cidr")
    return v4[0]


def run_agent(cfg: AgentConfig, kube: str, pod_workdir: Path | None = None, kubelet_cgroup_root: Path | None = None,
              cgroup_driver: str = "cgroupfs", pod_cidr_from_node: bool = True) -> None:
    """``kube``: a kubeconfig path, or "in-cluster" (the pod's service account)."""
    from datapath.cgroup2 import cgroup2_mount

    api = api_client(None if kube == "in-cluster" else kube)
    runtime: PodRuntime | None = None
    if pod_workdir is None:  # kubelet's pods
        doc = request(api, "GET", api_path(NODES, "", cfg.node.name))
        if pod_cidr_from_node:
            cfg = replace(cfg, node=replace(cfg.node, pod_cidr=node_pod_cidr(doc, cfg.node.name)))
        cfg = replace(cfg, proxy_ip=cfg.proxy_ip or node_internal_ip(doc) or cfg.node.gateway)
        runtime = KubeletRuntime(cfg.node.name, kubelet_cgroup_root or cgroup2_mount(), cgroup_driver, [cfg.node.service_cidr])
    source = KubeSource(api, Indexer(base_dir=pod_workdir))
    reporter = NodeReporter(api, cfg.node.name, cfg.state_dir, source, patch_pod_ips=pod_workdir is not None)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    source.start()
    try:
        reporter.start()
        Agent(cfg, source, runtime).run()
        try:
            reporter.report_once()  # the final state (running: false)
        except Exception as e:  # noqa: BLE001 - the API may be away at shutdown; the node stopped cleanly anyway
            log.warning("final node report: %s", e)
    finally:
        reporter.stop()
        source.stop()
        api.close()
