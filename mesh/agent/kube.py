"""The node agent with the API server as its source (``webb agent --kube``): no kopf.

The agent is the standalone one; only its source changes (``KubeSource``: list+watch into the
indexer the operator shares), and a ``NodeReporter`` publishes what it applied for the
operator to put into CR status.
"""

from __future__ import annotations

from pathlib import Path

from mesh.agent.loop import Agent, AgentConfig
from mesh.kube.client import api_client
from mesh.kube.indexer import Indexer
from mesh.kube.watch import KubeSource, NodeReporter


def run_agent(cfg: AgentConfig, kube: str, pod_workdir: Path | None = None) -> None:
    """``kube``: a kubeconfig path, or "in-cluster" (the pod's service account)."""
    api = api_client(None if kube == "in-cluster" else kube)
    source = KubeSource(api, Indexer(base_dir=pod_workdir))
    reporter = NodeReporter(api, cfg.node.name, cfg.state_dir, source)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    source.start()
    try:
        reporter.start()
        Agent(cfg, source).run()
        reporter.report_once()  # the final state (running: false)
    finally:
        reporter.stop()
        source.stop()
        api.close()
