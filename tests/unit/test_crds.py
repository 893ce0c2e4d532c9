"""The CRD schema accepts the examples and rejects what the parser rejects, at the same field."""

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _schema() -> dict[str, Any]:
    crd = yaml.safe_load((ROOT / "crds/meshpolicy.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    assert version["subresources"] == {"status": {}}
    assert "$ref" not in (ROOT / "crds/meshpolicy.yaml").read_text()  # not allowed in structural schemas
    return strict(dict(version["schema"]["openAPIV3Schema"]))


def strict(node: Any) -> Any:
    """What the API server does with strict field validation (kubectl's default): an object
    with ``properties`` takes no other field. (A structural schema may not say so itself:
    ``additionalProperties`` beside ``properties`` makes the API server refuse the CRD.)"""
    if isinstance(node, dict):
        assert not ("properties" in node and "additionalProperties" in node), "refused by the API server"
        out = {k: strict(v) for k, v in node.items()}
        if "properties" in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [strict(v) for v in node]
    return node


def test_example_policy_is_valid() -> None:
    jsonschema.validate(yaml.safe_load((ROOT / "examples/starwars/policy.yaml").read_text()), _schema())


@pytest.mark.parametrize(("mutate", "path"), [
    (lambda s: s["ingress"][0]["toPorts"][0]["ports"][0].update(port="eighty"), ["spec", "ingress", 0, "toPorts", 0, "ports", 0, "port"]),
    (lambda s: s.pop("endpointSelector"), ["spec"]),
    (lambda s: s["ingress"][0].update(fromEndpoint=[]), ["spec", "ingress", 0]),
])
def test_malformed_policy_rejected_at_field(mutate: Any, path: list[Any]) -> None:
    doc = yaml.safe_load((ROOT / "examples/starwars/policy.yaml").read_text())
    mutate(doc["spec"])
    with pytest.raises(jsonschema.ValidationError) as e:
        jsonschema.validate(doc, _schema())
    assert list(e.value.absolute_path) == path
