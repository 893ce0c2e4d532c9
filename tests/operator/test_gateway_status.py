"""Gateway API status on a real API server, with the upstream CRDs (from their Go module): the
operator writes what the nodes' plans say (Accepted, Programmed, addresses, attachedRoutes,
ResolvedRefs) with observedGeneration, and Accepted False UnsupportedValue for a route the parser
refuses, naming the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from mesh.manifests import parse_object
from mesh.plan.node import NodeSpec, plan_node
from mesh.state import assemble
from tests.kube.apiserver import KubeAPI, Process
from tests.operator.test_status import report_of, wait_for
from tools.conformance.modules import crd_files

pytestmark = pytest.mark.kube
ROOT = Path(__file__).resolve().parents[2]
G, V = "gateway.networking.k8s.io", "v1"


@pytest.fixture(scope="module")
def gateway_crds(kube_api: KubeAPI) -> None:
    files = [str(f) for f in crd_files("standard")]
    kube_api.kubectl("apply", "--server-side", *(a for f in files for a in ("-f", f)), timeout_s=120)
    for name in ("gatewayclasses", "gateways", "httproutes", "referencegrants"):
        kube_api.kubectl("wait", "--for=condition=Established", f"crd/{name}.{G}", "--timeout=60s", timeout_s=90)


def _get(api: KubeAPI, plural: str, name: str, ns: str = "") -> dict[str, Any]:
    co = client.CustomObjectsApi(api.api)
    obj: Any = co.get_cluster_custom_object(G, V, plural, name) if not ns else co.get_namespaced_custom_object(G, V, ns, plural, name)
    return dict(obj)


def _cond(conds: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return next((c for c in conds if c["type"] == kind), {})


def test_operator_writes_gateway_api_status(kube_api: KubeAPI, gateway_crds: None, namespace: str, operator: Process) -> None:
    docs = list(yaml.safe_load_all((ROOT / "examples/gateway/gateway.yaml").read_text()))
    for d in docs[1:]:
        d["metadata"]["namespace"] = namespace
    kube_api.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(docs))
    # the node's report, as an agent makes it: its plan of the objects as the API server has them
    objs = [parse_object({**_get(kube_api, "gatewayclasses", "webb"), "kind": "GatewayClass"}),
            parse_object({**_get(kube_api, "gateways", "shop", namespace), "kind": "Gateway"}),
            parse_object({**_get(kube_api, "httproutes", "shop", namespace), "kind": "HTTPRoute"})]
    plan = plan_node(assemble([o for o in objs if o is not None], []), NodeSpec("n1", "10.244.0.1", gateway_addresses=("192.0.2.7",)))
    report_of(kube_api, "n1", {"node": "n1", "running": True, "gatewayStatus": dict(plan.gateway_status)})

    gw = wait_for("Gateway Programmed", lambda: _get(kube_api, "gateways", "shop", namespace),
                  lambda o: _cond((o.get("status") or {}).get("conditions") or [], "Programmed").get("status") == "True", operator)
    st = gw["status"]
    assert st["addresses"] == [{"type": "IPAddress", "value": "192.0.2.7"}]
    assert _cond(st["conditions"], "Accepted")["observedGeneration"] == gw["metadata"]["generation"]
    (listener,) = st["listeners"]
    assert listener["attachedRoutes"] == 1  # attached, though its Services do not exist here (ResolvedRefs below)
    wait_for("GatewayClass Accepted", lambda: _get(kube_api, "gatewayclasses", "webb"),
             lambda o: _cond((o.get("status") or {}).get("conditions") or [], "Accepted").get("status") == "True", operator)
    route = wait_for("HTTPRoute parents", lambda: _get(kube_api, "httproutes", "shop", namespace),
                     lambda o: bool((o.get("status") or {}).get("parents")), operator)
    (parent,) = route["status"]["parents"]
    assert parent["controllerName"] == "webb.io/gateway-controller" and parent["parentRef"]["name"] == "shop"
    assert _cond(parent["conditions"], "Accepted")["status"] == "True"
    assert _cond(parent["conditions"], "ResolvedRefs")["reason"] == "BackendNotFound"  # web-v1/web-v2 do not exist here

    # valid for the CRD, refused by Webb (RequestMirror): Accepted False, UnsupportedValue, the field named
    bad = docs[2]
    bad["spec"]["rules"][1]["filters"] = [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "web-v2", "port": 80}}}]
    kube_api.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(bad))
    route = wait_for("UnsupportedValue", lambda: _get(kube_api, "httproutes", "shop", namespace),
                     lambda o: _cond(o["status"]["parents"][0]["conditions"], "Accepted").get("reason") == "UnsupportedValue",
                     operator)
    msg = _cond(route["status"]["parents"][0]["conditions"], "Accepted")["message"]
    assert "spec.rules[1].filters[0].type" in msg and "RequestMirror" in msg, json.dumps(route["status"])
