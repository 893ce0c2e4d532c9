"""The operator writes a route's status whatever order the watches deliver its route, Gateway and class in.

Only the API write is replaced (by a recorder): the order of events is what is under test, and the
real API server's ordering is not under our control (tests/operator covers the real server).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import yaml

import mesh.operator.controller as controller
from mesh.manifests import parse_object
from mesh.plan.node import NodeSpec, plan_node
from mesh.state import assemble

ROOT = Path(__file__).resolve().parents[2]


def _docs() -> list[dict[str, Any]]:
    docs = list(yaml.safe_load_all((ROOT / "examples/gateway/gateway.yaml").read_text()))
    for d in docs:
        d["metadata"]["generation"] = 1
        if d["kind"] != "GatewayClass":
            d["metadata"]["namespace"] = "t1"
    return docs


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_route_status_is_written_in_any_event_order(order: tuple[int, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _docs()
    plan = plan_node(assemble([o for o in map(parse_object, docs) if o is not None], []),
                     NodeSpec("n1", "10.244.0.1", gateway_addresses=("192.0.2.7",)))
    written: dict[str, Any] = {}

    def record(api: Any, method: str, path: str, body: dict[str, Any], content_type: str = "") -> dict[str, Any]:
        written[path] = body
        return body
    monkeypatch.setattr(controller, "request", record)
    c = controller.Controller(api=None)
    events = [lambda d=d: c.observe(d["kind"], "ADDED", d) for d in docs] + [
        lambda: c.node_report("n1", {"node": "n1", "running": True, "gatewayStatus": dict(plan.gateway_status)})]
    assert len(events) == 4
    for i in order:
        events[i]()
    route = written.get("/apis/gateway.networking.k8s.io/v1/namespaces/t1/httproutes/shop/status")
    assert route is not None, sorted(written)
    (parent,) = route["status"]["parents"]
    assert parent["parentRef"]["name"] == "shop"
    assert {c["type"]: c["status"] for c in parent["conditions"]}["Accepted"] == "True"
