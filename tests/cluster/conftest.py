"""Fixtures of the cluster tests: one real one-node Kubernetes cluster for the whole session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.cluster.node import KubeNode


@pytest.fixture(scope="session")
def kube_node() -> Iterator[KubeNode]:
    """webb-kn1, Ready (tests/cluster/node.py). At the end of the session it is stopped, and the teardown
    fails if anything of it is left on the host (process, mount, cgroup, bridge, route, sysctl, directory)."""
    yield from running(KubeNode())


def running(node: KubeNode) -> Iterator[KubeNode]:
    """``node`` started, yielded, stopped; the teardown fails if anything of it is left on the host."""
    try:
        node.start()
        yield node
    finally:
        node.stop()
    left = node.leftovers()
    assert not left, f"kube node {node.name} left behind: {left}"


@pytest.fixture
def ns(kube_node: KubeNode) -> Iterator[str]:
    """A namespace of the test's own, deleted afterwards (the namespace controller removes what is in it)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    kube_node.kubectl("create", "namespace", name)
    yield name
    kube_node.kubectl("delete", "namespace", name, "--wait=false")

