"""MeshTLS on a real API server: the CRD serves, a CR is accepted and the operator writes its
status (Valid, Applied from node reports, Shadowed for a second one in the namespace); a bad
mode is refused by the schema naming the field."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from mesh.kube.watch import SYSTEM_NAMESPACE, report_name
from tests.kube.apiserver import KubeAPI, Process
from tests.operator.test_status import cond, report_of, wait_for

pytestmark = [pytest.mark.kube, pytest.mark.usefixtures("webb_crds")]
GROUP, VERSION, PLURAL = "webb.io", "v1alpha1", "meshtlses"


def _mtls(namespace: str, mode: str = "STRICT", name: str = "default") -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MeshTLS", "metadata": {"name": name, "namespace": namespace},
            "spec": {"mode": mode}}


def _status(api: KubeAPI, ns: str, name: str = "default") -> dict[str, Any]:
    obj = client.CustomObjectsApi(api.api).get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
    return dict(obj.get("status") or {})


def test_crd_served_and_bad_mode_refused_naming_the_field(kube_api: KubeAPI, namespace: str) -> None:
    crd = client.ApiextensionsV1Api(kube_api.api).read_custom_resource_definition("meshtlses.webb.io")
    conditions = {c.type: c.status for c in crd.status.conditions}
    assert conditions["Established"] == "True" and conditions.get("NonStructuralSchema") is None
    assert crd.status.accepted_names.kind == "MeshTLS" and "mtls" in crd.status.accepted_names.short_names

    with pytest.raises(ApiException) as e:
        client.CustomObjectsApi(kube_api.api).create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, _mtls(namespace, "strict"))
    assert e.value.status == 422 and "spec.mode" in e.value.body and "STRICT" in e.value.body
    res = kube_api.kubectl("apply", "-f", "-", stdin=yaml.safe_dump({**_mtls(namespace), "spec": {}}), check=False)
    assert res.returncode != 0 and "spec.mode" in res.stderr
    res = kube_api.kubectl("apply", "-f", "-", stdin=yaml.safe_dump({**_mtls(namespace), "spec": {"mode": "STRICT",
                                                                                                   "port": 80}}), check=False)
    assert res.returncode != 0 and "spec.port" in res.stderr  # strict field validation: unknown fields refused
    assert kube_api.kubectl("get", "mtls", "-n", namespace, "-o", "name").stdout == ""


def test_meshtls_status_valid_applied_and_shadowed(kube_api: KubeAPI, namespace: str, operator: Process) -> None:
    out = kube_api.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(_mtls(namespace, "PERMISSIVE"))).stdout
    assert "meshtls.webb.io/default created" in out
    st = wait_for("Valid=True", lambda: _status(kube_api, namespace), lambda s: cond(s, "Valid").get("status") == "True",
                  operator)
    assert st["observedGeneration"] == 1 and cond(st, "Applied")["reason"] in ("NoNodes", "Pending")

    node = f"n-{namespace}"
    key = f"MeshTLS {namespace}/default"
    report_of(kube_api, node, {"node": node, "planVersion": "p1", "datapathVersion": "p1", "envoyVersion": "e1",
                             "generations": {key: 1}, "envoyRejected": {}})
    wait_for("Applied=True", lambda: _status(kube_api, namespace),
             lambda s: any(n["node"] == node and n.get("envoy") == "ACK" and n.get("observedGeneration") == 1
                           for n in s.get("nodes", [])), operator)
    table = kube_api.kubectl("get", "mtls", "-n", namespace).stdout.split("\n")
    assert table[0].split()[:4] == ["NAME", "VALID", "MODE", "APPLIED"], table
    assert table[1].split()[:3] == ["default", "True", "PERMISSIVE"], table

    # a second MeshTLS in the namespace: valid, but not in force ("default" sorts first)
    kube_api.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(_mtls(namespace, "STRICT", "other")))
    st = wait_for("Shadowed", lambda: _status(kube_api, namespace, "other"),
                  lambda s: cond(s, "Applied").get("reason") == "Shadowed", operator)
    assert cond(st, "Valid")["status"] == "True"
    assert f"MeshTLS {namespace}/default is in force" in cond(st, "Applied")["message"]

    # the first one goes: the second one is in force now, and its status says so
    kube_api.kubectl("delete", "mtls", "default", "-n", namespace)
    wait_for("not shadowed", lambda: _status(kube_api, namespace, "other"),
             lambda s: cond(s, "Applied").get("reason") != "Shadowed", operator)
    kube_api.kubectl("delete", "mtls", "other", "-n", namespace)  # the API server is shared by every suite
    kube_api.kubectl("delete", "configmap", report_name(node), "-n", SYSTEM_NAMESPACE)
