"""Fixtures of the kube tests: one real kube-apiserver and etcd for the whole session."""

from __future__ import annotations

import pytest
import yaml

from tests.kube import meshpolicy
from tests.kube.apiserver import KubeAPI

# kube_api and namespace live in tests/conftest.py: one API server for every suite of a session


@pytest.fixture(scope="session")
def meshpolicy_crd(kube_api: KubeAPI) -> str:
    """crds/meshpolicy.yaml applied with kubectl and Established (served); returns the CRD's name."""
    kube_api.kubectl("apply", "-f", str(meshpolicy.CRD))
    name = str(yaml.safe_load(meshpolicy.CRD.read_text())["metadata"]["name"])
    kube_api.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s", timeout_s=90)
    return name
