"""A MeshPolicy typo never widens a rule (issue 13): every mapping of the spec checks its keys, and
an unknown key is refused naming the field, what is allowed there and the nearest allowed key.
Before, each of these parsed, and the L7 rule became an L4 allow (PUT /v1/exhaust-port → 200)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from mesh.manifests import ManifestError, parse_object
from mesh.model import MeshPolicy
from tests.conftest import ROOT

RULE1 = yaml.safe_load((ROOT / "examples" / "starwars" / "policy.yaml").read_text())


def _tp(doc: dict[str, Any]) -> dict[str, Any]:
    tp: dict[str, Any] = doc["spec"]["ingress"][0]["toPorts"][0]
    return tp


def _rename(m: dict[str, Any], old: str, new: str) -> None:
    m[new] = m.pop(old)


CASES: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    ("rule: for rules:", lambda d: _rename(_tp(d), "rules", "rule"), "spec.ingress[0].toPorts[0].rule", "did you mean 'rules'"),
    ("HTTP: (Cilium's own example)", lambda d: _rename(_tp(d)["rules"], "http", "HTTP"), "spec.ingress[0].toPorts[0].rules.HTTP",
     "did you mean 'http'"),
    ("kafka:", lambda d: _rename(_tp(d)["rules"], "http", "kafka"), "spec.ingress[0].toPorts[0].rules.kafka",
     "HTTP rules only"),
    ("toPorts: [{port: 80}]", lambda d: d["spec"]["ingress"][0].update(toPorts=[{"port": "80"}]),
     "spec.ingress[0].toPorts[0].port", "did you mean 'ports'"),
    ("ports[].protcol", lambda d: _rename(_tp(d)["ports"][0], "protocol", "protcol"), "spec.ingress[0].toPorts[0].ports[0].protcol",
     "did you mean 'protocol'"),
    ("endPort", lambda d: _tp(d)["ports"][0].update(endPort=90), "spec.ingress[0].toPorts[0].ports[0].endPort",
     "port ranges are not implemented"),
    ("rules: {} (empty)", lambda d: _tp(d).update(rules={}), "spec.ingress[0].toPorts[0].rules.http", "would allow every request"),
    ("http: [] (empty)", lambda d: _tp(d).update(rules={"http": []}), "spec.ingress[0].toPorts[0].rules.http",
     "would allow every request"),
    ("fromCIDR", lambda d: d["spec"]["ingress"][0].update(fromCIDR=["10.0.0.0/8"]), "spec.ingress[0].fromCIDR",
     "would widen the rule"),
    ("egress", lambda d: d["spec"].update(egress=[{}]), "spec.egress", "ingress only"),
    ("specs", lambda d: d.update(spec={"specs": [d["spec"]]}), "spec.specs", "several MeshPolicy objects"),
    ("matchLabel", lambda d: _rename(d["spec"]["endpointSelector"], "matchLabels", "matchLabel"),
     "spec.endpointSelector.matchLabel", "did you mean 'matchLabels'"),
    ("http host", lambda d: _tp(d)["rules"]["http"][0].update(host="x"), "spec.ingress[0].toPorts[0].rules.http[0].host",
     "not supported"),
    ("http Method", lambda d: _rename(_tp(d)["rules"]["http"][0], "method", "Method"),
     "spec.ingress[0].toPorts[0].rules.http[0].Method", "did you mean 'method'"),
    ("a regex Python takes, RE2 (Envoy) refuses", lambda d: _tp(d)["rules"]["http"][0].update(path="/v1/(?!admin).*"),
     "spec.ingress[0].toPorts[0].rules.http[0].path", "not a valid regular expression (Envoy uses RE2"),
    ("matchExpressions extra key", lambda d: d["spec"]["endpointSelector"].update(
        matchExpressions=[{"key": "a", "operator": "Exists", "value": ["x"]}]),
     "spec.endpointSelector.matchExpressions[0].value", "did you mean 'values'"),
]


@pytest.mark.parametrize(("case", "mutate", "field", "says"), CASES, ids=[c[0] for c in CASES])
def test_a_typo_is_refused_naming_the_field(case: str, mutate: Callable[[dict[str, Any]], None], field: str, says: str) -> None:
    doc = copy.deepcopy(RULE1)
    mutate(doc)
    with pytest.raises(ManifestError) as e:
        parse_object(doc)
    assert e.value.field == field, str(e.value)
    assert says in e.value.problem, str(e.value)
    assert str(e.value).startswith("MeshPolicy default/rule1: ")  # the object, then the field, then the fix


def test_rule1_itself_parses_with_its_l7_rule() -> None:
    pol = parse_object(copy.deepcopy(RULE1))
    assert isinstance(pol, MeshPolicy)
    assert pol.ingress[0].to_ports[0].http  # an L7 rule, not an L4 allow


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))


@pytest.mark.parametrize(("text", "says"), [
    (BOMB, "YAML aliases"),  # 9^9 strings if expanded
    ("kind: Pod\nkind: Service\n", "duplicate key 'kind'"),
    ("a: " + "[" * 1000 + "]" * 1000 + "\n", "nested more than 64 levels"),
    ("a: b\n  c: [\n", "is not valid YAML"),
], ids=["alias bomb", "duplicate key", "1000 deep", "broken"])
def test_hostile_yaml_is_refused_quickly(text: str, says: str) -> None:
    from mesh.manifests import load_yaml

    with pytest.raises(ManifestError) as e:
        load_yaml(text, "evil.yaml")
    assert says in str(e.value) and str(e.value).startswith("evil.yaml: ")


def test_a_file_over_the_size_limit_is_refused_by_its_size() -> None:
    from mesh.manifests import MAX_FILE_BYTES, load_yaml

    with pytest.raises(ManifestError, match="the limit is"):
        load_yaml("a: " + "x" * MAX_FILE_BYTES, "big.yaml")


POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
       "spec": {"containers": [{"name": "c", "command": ["sleep", "1"]}]}}


def _meta(**kv: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d["metadata"].update(kv)


NAMES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("namespace Bad_NS (crashed the agent)", _meta(namespace="Bad_NS"), "metadata.namespace"),
    ("namespace with a newline (a hosts entry in every pod)", _meta(namespace="a\n10.0.0.1 evil"), "metadata.namespace"),
    ("name of 64 characters", _meta(name="a" * 64), "metadata.name"),
    ("serviceAccountName My_SA (crashed the agent)", lambda d: d["spec"].update(serviceAccountName="My_SA"),
     "spec.serviceAccountName"),
    ("label key with a space", _meta(labels={"my app": "x"}), "metadata.labels.my app"),
    ("label key with a bad prefix", _meta(labels={"Example_/tier": "x"}), "metadata.labels.Example_/tier"),
    ("label value of 64", _meta(labels={"app": "x" * 64}), "metadata.labels.app"),
    ("label value with a newline", _meta(labels={"app": "a\nb"}), "metadata.labels.app"),
    ("metadata a list", lambda d: d.update(metadata=["a"]), "metadata"),
]


@pytest.mark.parametrize(("case", "mutate", "field"), NAMES, ids=[c[0] for c in NAMES])
def test_names_and_labels_follow_kubernetes_rules(case: str, mutate: Callable[[dict[str, Any]], None], field: str) -> None:
    doc = copy.deepcopy(POD)
    mutate(doc)
    with pytest.raises(ManifestError) as e:
        parse_object(doc)
    assert e.value.field == field, str(e.value)


def test_selector_label_rules_allow_cilium_source_prefix() -> None:
    doc = copy.deepcopy(RULE1)
    doc["spec"]["endpointSelector"]["matchLabels"] = {"k8s:app.kubernetes.io/name": "deathstar"}
    assert isinstance(parse_object(doc), MeshPolicy)
    doc["spec"]["endpointSelector"]["matchLabels"] = {"app": "death star"}
    with pytest.raises(ManifestError, match="not a label value"):
        parse_object(doc)
