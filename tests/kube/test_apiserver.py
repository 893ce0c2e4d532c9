"""The fixture's API server is up, is the release we built, and answers both the python client and kubectl."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from kubernetes import client

from tests.kube.apiserver import KubeAPI

pytestmark = pytest.mark.kube

GO_MOD = Path(__file__).resolve().parents[2] / "tools/kube/go.mod"


def test_lists_namespaces(kube_api: KubeAPI) -> None:
    names = {ns.metadata.name for ns in client.CoreV1Api(kube_api.api).list_namespace().items}
    assert {"default", "kube-system", "kube-public"} <= names


def test_kubectl_talks_to_the_release_we_built(kube_api: KubeAPI) -> None:
    release = re.search(r"k8s\.io/kubernetes (v[0-9.]+)", GO_MOD.read_text())
    assert release is not None
    versions = json.loads(kube_api.kubectl("version", "-o", "json").stdout)
    assert versions["serverVersion"]["gitVersion"] == release.group(1)
    assert versions["clientVersion"]["gitVersion"] == release.group(1)
    assert "namespace/default" in kube_api.kubectl("get", "namespaces", "-o", "name").stdout.split()


def test_kubernetes_service_is_first_address_of_service_range(kube_api: KubeAPI) -> None:
    svc = client.CoreV1Api(kube_api.api).read_namespaced_service("kubernetes", "default")
    assert svc.spec.cluster_ip == "10.96.0.1"
