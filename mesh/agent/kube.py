"""The node agent with the API server as its source (``webb agent --kube``): no kopf.

The agent is the standalone one; its source is the API server (``KubeSource``: list+watch into
the indexer the operator shares) and its pods are kubelet's (``KubeletRuntime``: the agent
never starts a pod in a cluster). A ``NodeReporter`` publishes what it applied for the operator
to put into CR status.

Several nodes find each other through the API too (``mesh.kube.peers``), and a restart of the
agent's pod while its DaemonSet stays leaves the pinned datapath to the next agent (an upgrade).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from mesh.agent.loop import Agent, AgentConfig
from mesh.kube.client import api_client
from mesh.kube.indexer import Indexer
from mesh.kube.peers import KubePeers
from mesh.kube.translate import Resource
from mesh.kube.watch import ApiError, KubeSource, NodeReporter, api_path, request
from mesh.runtime.kubelet import KubeletRuntime

log = logging.getLogger("webb.kube")
NODES = Resource("", "v1", "nodes")
PODS = Resource("", "v1", "pods")
DAEMONSETS = Resource("apps", "v1", "daemonsets")


def owner_stays(api: Any, namespace: str, pod: str) -> bool:
    """Whether the agent's pod is replaced rather than removed: its DaemonSet is still there and
    not being deleted (``kubectl rollout restart``, an upgrade, a deleted pod) → the next agent of
    this node adopts the datapath. False when the DaemonSet is gone or going (``helm uninstall``),
    or the agent runs outside a DaemonSet's pod."""
    if not (namespace and pod):
        return False
    try:
        meta = (request(api, "GET", api_path(PODS, namespace, pod), timeout_s=5.0).get("metadata") or {})
        owner = next((o for o in meta.get("ownerReferences") or [] if o.get("kind") == "DaemonSet"), None)
        if owner is None:
            return False
        ds = (request(api, "GET", api_path(DAEMONSETS, namespace, str(owner["name"])), timeout_s=5.0).get("metadata") or {})
    except ApiError as e:
        # gone, or Webb's own account and rights gone with it (helm uninstall deletes them in the same breath)
        if e.status in (401, 403, 404):
            return False
        raise  # the API is away: the agent keeps the datapath (it does not know)
    return not ds.get("deletionTimestamp") and ds.get("uid") == owner.get("uid")


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


def run_agent(cfg: AgentConfig, kube: str, kubelet_cgroup_root: Path | None = None, cgroup_driver: str = "cgroupfs",
              pod_cidr_from_node: bool = True) -> None:
    """``kube``: a kubeconfig path, or "in-cluster" (the pod's service account)."""
    from datapath.cgroup2 import cgroup2_mount

    api = api_client(None if kube == "in-cluster" else kube)
    doc = request(api, "GET", api_path(NODES, "", cfg.node.name))
    if pod_cidr_from_node:
        cfg = replace(cfg, node=replace(cfg.node, pod_cidr=node_pod_cidr(doc, cfg.node.name)))
    cfg = replace(cfg, proxy_ip=cfg.proxy_ip or node_internal_ip(doc) or cfg.node.gateway)
    # the node's address for the other nodes' tunnels: its InternalIP, as for the node proxy
    cfg = replace(cfg, wire_ip=cfg.wire_ip or cfg.proxy_ip)
    runtime = KubeletRuntime(cfg.node.name, kubelet_cgroup_root or cgroup2_mount(), cgroup_driver, [cfg.node.service_cidr])
    peers = KubePeers(api, cfg.node.name, cfg.wire_ip, cfg.node.pod_cidr, cfg.node.gateway)
    source = KubeSource(api, Indexer())
    reporter = NodeReporter(api, cfg.node.name, cfg.state_dir, source)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    source.start()
    try:
        peers.start()
        reporter.start()
        # in the DaemonSet's pod (POD_NAMESPACE/POD_NAME from the downward API): a restart keeps the datapath
        pod_ns, pod_name = os.environ.get("POD_NAMESPACE", ""), os.environ.get("POD_NAME", "")
        Agent(cfg, source, runtime, peers, lambda: owner_stays(api, pod_ns, pod_name)).run()
        try:
            reporter.report_once()  # the final state (running: false)
        except Exception as e:  # noqa: BLE001 - the API may be away at shutdown; the node stopped cleanly anyway
            log.warning("final node report: %s", e)
    finally:
        reporter.stop()
        peers.stop()
        source.stop()
        api.close()
