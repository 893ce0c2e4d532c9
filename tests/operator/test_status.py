"""The operator on a real API server: Valid (with the field at fault), per-node ACK/NACK from
node reports, printer columns."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from kubernetes import client

from mesh.kube.watch import REPORT_LABEL, SYSTEM_NAMESPACE, report_name
from tests.kube.apiserver import KubeAPI, Process
from tests.kube.meshpolicy import GROUP, PLURAL, VERSION, example_policy

pytestmark = pytest.mark.kube


def wait_for(what: str, get: Callable[[], Any], ok: Callable[[Any], bool], proc: Process, timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        proc.check_alive()
        value = get()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout_s:.0f} s; last: {value!r}\n{proc.log_tail(40)}")
        time.sleep(0.1)


def cr_status_of(api: KubeAPI, ns: str, name: str = "rule1") -> dict[str, Any]:
    obj = client.CustomObjectsApi(api.api).get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
    return dict(obj.get("status") or {})


def cond(st: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next((c for c in st.get("conditions") or [] if c["type"] == ctype), {})


def report_of(api: KubeAPI, node: str, report: dict[str, Any]) -> None:
    cm = {"apiVersion": "v1", "kind": "ConfigMap",
          "metadata": {"name": report_name(node), "namespace": SYSTEM_NAMESPACE, "labels": {REPORT_LABEL: node}},
          "data": {"report": json.dumps(report)}}
    api.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(cm))


def _events(api: KubeAPI, ns: str, name: str) -> list[dict[str, Any]]:
    out = api.kubectl("get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}", "-o", "json").stdout
    return list(json.loads(out).get("items") or [])


def test_valid_condition_names_the_field_and_shows_in_kubectl(kube_api: KubeAPI, namespace: str, operator: Process) -> None:
    kube_api.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(example_policy(namespace)))
    st = wait_for("Valid=True", lambda: cr_status_of(kube_api, namespace), lambda s: cond(s, "Valid").get("status") == "True", operator)
    assert st["observedGeneration"] == 1 and cond(st, "Applied")["reason"] in ("NoNodes", "Pending")

    # valid for the schema (a string), not for Webb: the path is not a regular expression
    bad = example_policy(namespace)
    bad["spec"]["ingress"][0]["toPorts"][0]["rules"]["http"][0]["path"] = "/v1/(unclosed"
    kube_api.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(bad))
    st = wait_for("Valid=False", lambda: cr_status_of(kube_api, namespace), lambda s: cond(s, "Valid").get("status") == "False", operator)
    msg = cond(st, "Valid")["message"]
    assert "spec.ingress[0].toPorts[0].rules.http[0].path" in msg and "not a valid regular expression" in msg
    assert "keeping the previous version" in msg and st["observedGeneration"] == 2
    # Kubernetes conventions: Ready beside the others, each condition with the generation it speaks of,
    # a Warning Event for the rejection, and `kubectl get webb` lists Webb's objects
    assert cond(st, "Ready")["status"] == "False" and cond(st, "Ready")["reason"] == "Invalid"
    assert {c["type"]: c.get("observedGeneration") for c in st["conditions"]} == {"Ready": 2, "Valid": 2, "Applied": 2}
    events = wait_for("a Warning Event", lambda: _events(kube_api, namespace, "rule1"), lambda e: any(
        x["reason"] == "Invalid" and x["type"] == "Warning" for x in e), operator)
    assert any("not a valid regular expression" in x["message"] for x in events), events
    assert "rule1" in kube_api.kubectl("get", "webb", "-n", namespace, "-o", "name").stdout
    table = kube_api.kubectl("get", "mp", "rule1", "-n", namespace).stdout.split("\n")
    assert table[0].split()[:4] == ["NAME", "VALID", "MODE", "APPLIED"], table
    assert table[1].split()[:3] == ["rule1", "False", "enforce"], table

    kube_api.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(example_policy(namespace)))
    wait_for("Valid=True again", lambda: cr_status_of(kube_api, namespace), lambda s: cond(s, "Valid").get("status") == "True", operator)


def test_per_node_ack_nack_and_audit_counts(kube_api: KubeAPI, namespace: str, operator: Process) -> None:
    doc = example_policy(namespace)
    doc["spec"]["mode"] = "audit"
    kube_api.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(doc))
    key = f"MeshPolicy {namespace}/rule1"
    node = f"n-{namespace}"
    report_of(kube_api, node, {"node": node, "planVersion": "p1", "datapathVersion": "p1", "envoyVersion": "e1",
                             "generations": {key: 1}, "envoyRejected": {}, "auditWouldDeny": {f"{namespace}/rule1": 7}})
    st = wait_for("Applied", lambda: cr_status_of(kube_api, namespace),
                  lambda s: cond(s, "Applied").get("status") == "True" or any(n["node"] == node for n in s.get("nodes", [])
                                                                               if n.get("envoy") == "ACK"), operator)
    mine = next(n for n in st["nodes"] if n["node"] == node)
    assert mine == {"node": node, "datapathVersion": "p1", "envoyVersion": "e1", "observedGeneration": 1, "envoy": "ACK",
                    "auditWouldDeny": 7}

    report_of(kube_api, node, {"node": node, "planVersion": "p1", "datapathVersion": "p1", "envoyVersion": "e1",
                             "generations": {key: 1}, "envoyRejected": {"Listener": "Proto constraint validation failed"}})
    st = wait_for("NACK", lambda: cr_status_of(kube_api, namespace),
                  lambda s: any(n.get("envoy") == "NACK" for n in s.get("nodes", []) if n["node"] == node), operator)
    applied = cond(st, "Applied")
    assert applied["status"] == "False" and applied["reason"] == "EnvoyRejected"
    assert f"{node}: Listener: Proto constraint validation failed" in applied["message"]
    assert cond(st, "Ready")["reason"] == "EnvoyRejected"
    wait_for("an EnvoyRejected Event", lambda: _events(kube_api, namespace, "rule1"),
             lambda e: any(x["reason"] == "EnvoyRejected" and node in x["message"] for x in e), operator)
    kube_api.kubectl("delete", "configmap", report_name(node), "-n", SYSTEM_NAMESPACE)
