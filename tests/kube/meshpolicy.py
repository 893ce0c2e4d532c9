"""MeshPolicy documents for the kube tests: the Star Wars example, and ways to break it."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds/meshpolicy.yaml"
POLICY = ROOT / "examples/starwars/policy.yaml"
GROUP, VERSION, PLURAL = "webb.io", "v1alpha1", "meshpolicies"

Mutation = Callable[[dict[str, Any]], object]
# case: (mutation of the example's spec, the field path the API server must name)
MALFORMED: dict[str, tuple[Mutation, str]] = {
    "port-not-a-number": (lambda s: s["ingress"][0]["toPorts"][0]["ports"][0].update(port="eighty"),
                          "spec.ingress[0].toPorts[0].ports[0].port"),
    "endpointSelector-missing": (lambda s: s.pop("endpointSelector"), "spec.endpointSelector"),
    "protocol-not-in-enum": (lambda s: s["ingress"][0]["toPorts"][0]["ports"][0].update(protocol="SCTP"),
                             "spec.ingress[0].toPorts[0].ports[0].protocol"),
    "method-lowercase": (lambda s: s["ingress"][0]["toPorts"][0]["rules"]["http"][0].update(method="post"),
                         "spec.ingress[0].toPorts[0].rules.http[0].method"),
}


def example_policy(namespace: str | None = None) -> dict[str, Any]:
    doc = dict(yaml.safe_load(POLICY.read_text()))
    if namespace:
        doc["metadata"]["namespace"] = namespace
    return doc


def malformed(case: str, namespace: str) -> dict[str, Any]:
    doc = copy.deepcopy(example_policy(namespace))
    MALFORMED[case][0](doc["spec"])
    return doc
