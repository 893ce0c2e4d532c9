"""Server-side dry run: the API server validates (and would default) but stores nothing."""

from __future__ import annotations

import pytest
import yaml

from tests.kube.apiserver import KubeAPI
from tests.kube.meshpolicy import example_policy, malformed

pytestmark = pytest.mark.kube


@pytest.mark.usefixtures("meshpolicy_crd")
def test_dry_run_server_stores_nothing(kube_api: KubeAPI, namespace: str) -> None:
    res = kube_api.kubectl("apply", "--dry-run=server", "-f", "-", "-o", "yaml",
                           stdin=yaml.safe_dump(example_policy(namespace)))
    assert yaml.safe_load(res.stdout)["spec"]["mode"] == "enforce"  # defaulted by the server, so it went there
    missing = kube_api.kubectl("get", "mp", "rule1", "-n", namespace, check=False)
    assert missing.returncode != 0 and "NotFound" in missing.stderr


@pytest.mark.usefixtures("meshpolicy_crd")
def test_dry_run_server_rejects_malformed(kube_api: KubeAPI, namespace: str) -> None:
    res = kube_api.kubectl("apply", "--dry-run=server", "-f", "-",
                           stdin=yaml.safe_dump(malformed("port-not-a-number", namespace)), check=False)
    assert res.returncode != 0
    assert "spec.ingress[0].toPorts[0].ports[0].port" in res.stderr


def test_dry_run_server_of_a_core_object(kube_api: KubeAPI, namespace: str) -> None:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "probe", "namespace": namespace},
          "data": {"k": "v"}}
    out = kube_api.kubectl("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(cm)).stdout
    assert "configmap/probe created (server dry run)" in out
    assert kube_api.kubectl("get", "configmap", "probe", "-n", namespace, check=False).returncode != 0

