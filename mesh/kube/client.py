"""The kubernetes API client (no kopf): used by the operator and by the agent in a cluster."""

from __future__ import annotations

from typing import Any


def api_client(kubeconfig: str | None) -> Any:
    """A kubernetes ApiClient: the kubeconfig given, else the pod's service account."""
    from kubernetes import config

    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    config.load_incluster_config()  # type: ignore[no-untyped-call]
    from kubernetes import client

    return client.ApiClient()
