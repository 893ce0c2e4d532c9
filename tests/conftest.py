"""Shared fixtures. Root-only tests fail (not skip) when run without root: CI runs as root."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.runtime.local import NETNS_DIR, LocalNode, NodeConfig
from tests.kube.apiserver import KubeAPI, running_kube_api

ROOT = Path(__file__).resolve().parent.parent
# Time limits are stretched in the qemu guest: its CPU is emulated (TCG), often 10x slower
SLOW = 6.0 if os.environ.get("WEBB_IN_VM") else 1.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("root") and os.geteuid() != 0:
            item.add_marker(pytest.mark.xfail(reason="needs root", run=False, strict=True))


@pytest.fixture
def node(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LocalNode]:
    """A local node of its own (bridge, pod CIDR, cgroup subtree), removed even on failure."""
    cfg = NodeConfig(name=f"t{os.getpid() % 10000}", bridge="webbt0", pod_cidr="10.244.200.0/24",
                     state_dir=tmp_path / "state")
    n = LocalNode(cfg)
    n.setup()
    yield n
    n.teardown()
    assert not list(NETNS_DIR.glob(f"webb-{cfg.name}-*")), "netns left behind"
    assert not cfg.cgroup.exists(), "cgroup left behind"
    assert subprocess.run(["ip", "link", "show", cfg.bridge], capture_output=True).returncode != 0


def leftovers(prefix: str = "webb-") -> list[str]:
    return [p.name for p in NETNS_DIR.glob(f"{prefix}*")] if NETNS_DIR.exists() else []


@pytest.fixture(scope="session")
def kube_api() -> Iterator[KubeAPI]:
    """A ready API server on 127.0.0.1 (admin kubeconfig, python ApiClient, kubectl), stopped at session end.
    Here, not in tests/kube, so that every suite of a session (kube, operator) shares one."""
    with running_kube_api() as api:
        yield api


@pytest.fixture
def namespace(kube_api: KubeAPI) -> Iterator[str]:
    """A namespace of the test's own. No namespace controller runs, so deleting it leaves it Terminating: harmless."""
    from kubernetes import client

    name = f"t-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(kube_api.api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)
