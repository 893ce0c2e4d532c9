"""crds/meshpolicy.yaml on a real API server: the CRD is accepted and Established, a valid
MeshPolicy is stored (with the schema's defaults), a malformed one is refused naming the field."""

from __future__ import annotations

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.kube.apiserver import KubeAPI
from tests.kube.meshpolicy import GROUP, MALFORMED, PLURAL, VERSION, example_policy, malformed

pytestmark = [pytest.mark.kube, pytest.mark.usefixtures("meshpolicy_crd")]


def test_crd_established_with_schema(kube_api: KubeAPI, meshpolicy_crd: str) -> None:
    crd = client.ApiextensionsV1Api(kube_api.api).read_custom_resource_definition(meshpolicy_crd)
    conditions = {c.type: c.status for c in crd.status.conditions}
    assert conditions["Established"] == "True"
    assert conditions.get("NonStructuralSchema") is None
    assert crd.status.accepted_names.kind == "MeshPolicy"
    assert "mp" in crd.status.accepted_names.short_names


def test_example_policy_accepted_with_defaults(kube_api: KubeAPI, namespace: str) -> None:
    out = kube_api.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(example_policy(namespace))).stdout
    assert "meshpolicy.webb.io/rule1 created" in out
    stored = client.CustomObjectsApi(kube_api.api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "rule1")
    assert stored["spec"]["endpointSelector"] == example_policy()["spec"]["endpointSelector"]
    assert stored["spec"]["mode"] == "enforce"  # the schema's default, filled in by the API server
    assert "rule1" in kube_api.kubectl("get", "mp", "-n", namespace, "-o", "name").stdout


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_policy_rejected_naming_field(kube_api: KubeAPI, namespace: str, case: str) -> None:
    field = MALFORMED[case][1]
    with pytest.raises(ApiException) as e:
        client.CustomObjectsApi(kube_api.api).create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, malformed(case, namespace))
    assert e.value.status == 422
    assert field in e.value.body

    res = kube_api.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(malformed(case, namespace)), check=False)
    assert res.returncode != 0
    assert field in res.stderr
    assert kube_api.kubectl("get", "mp", "-n", namespace, "-o", "name").stdout == ""


def test_unknown_field_rejected_by_kubectl(kube_api: KubeAPI, namespace: str) -> None:
    """kubectl asks for strict field validation: a misspelt field is an error, not silently pruned."""
    doc = example_policy(namespace)
    doc["spec"]["ingres"] = doc["spec"].pop("ingress")
    res = kube_api.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(doc), check=False)
    assert res.returncode != 0
    assert "spec.ingres" in res.stderr
