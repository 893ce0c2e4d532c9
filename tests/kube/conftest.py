"""Fixtures of the kube tests: one real kube-apiserver and etcd for the whole session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import yaml

from tests.kube import meshpolicy
from tests.kube.apiserver import KubeAPI, running_kube_api


@pytest.fixture(scope="session")
def kube_api() -> Iterator[KubeAPI]:
    """A ready API server on 127.0.0.1 (admin kubeconfig, python ApiClient, kubectl), stopped at session end."""
    with running_kube_api() as api:
        yield api


@pytest.fixture(scope="session")
def meshpolicy_crd(kube_api: KubeAPI) -> str:
    """crds/meshpolicy.yaml applied with kubectl and Established (served); returns the CRD's name."""
    kube_api.kubectl("apply", "-f", str(meshpolicy.CRD))
    name = str(yaml.safe_load(meshpolicy.CRD.read_text())["metadata"]["name"])
    kube_api.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s", timeout_s=90)
    return name


@pytest.fixture
def namespace(kube_api: KubeAPI) -> Iterator[str]:
    """A namespace of the test's own. No namespace controller runs, so deleting it leaves it Terminating: harmless."""
    from kubernetes import client

    name = f"t-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(kube_api.api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)
