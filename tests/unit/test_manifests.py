from pathlib import Path

import pytest
import yaml

from mesh.manifests import ManifestError, parse_object
from mesh.source import StandaloneSource

ROOT = Path(__file__).resolve().parents[2]
POLICY = yaml.safe_load((ROOT / "examples/starwars/policy.yaml").read_text())


def _policy(**spec_changes: object) -> dict:
    doc = yaml.safe_load(yaml.safe_dump(POLICY))
    doc["spec"].update(spec_changes)
    return doc


def test_starwars_policy_parses_like_cilium_rule1() -> None:
    p = parse_object(POLICY)
    assert p.key == "default/rule1"
    assert dict(p.endpoint_selector.match_labels) == {"org": "empire", "class": "deathstar"}
    rule = p.ingress[0]
    assert dict(rule.from_endpoints[0].match_labels) == {"org": "empire"}
    assert rule.to_ports[0].ports == ((80, "TCP"),)
    assert rule.to_ports[0].http[0].method == "POST"
    assert rule.to_ports[0].http[0].path == "/v1/request-landing"


@pytest.mark.parametrize(("change", "field", "hint"), [
    ({"ingress": [{"toPorts": [{"ports": [{"port": "http"}]}]}]}, "spec.ingress[0].toPorts[0].ports[0].port", "1-65535"),
    ({"ingress": [{"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": [{"path": "(["}]}}]}]},
     "spec.ingress[0].toPorts[0].rules.http[0].path", "regular expression"),
    ({"ingress": [{"fromEndpoint": []}]}, "spec.ingress[0].fromEndpoint", "fromEndpoints"),
    ({"ingress": [{"toPorts": [{"ports": [{"port": "80", "protocol": "SCTP"}]}]}]},
     "spec.ingress[0].toPorts[0].ports[0].protocol", "TCP, UDP or ANY"),
    ({"ingress": [{"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": [{"method": "post"}]}}]}]},
     "spec.ingress[0].toPorts[0].rules.http[0].method", "HTTP method"),
])
def test_bad_policy_names_field_and_fix(change: dict, field: str, hint: str) -> None:
    with pytest.raises(ManifestError) as e:
        parse_object(_policy(**change))
    assert e.value.field == field
    assert hint in str(e.value)
    assert "MeshPolicy default/rule1" in str(e.value)


def test_missing_endpoint_selector() -> None:
    doc = _policy()
    del doc["spec"]["endpointSelector"]
    with pytest.raises(ManifestError, match="spec.endpointSelector: is required"):
        parse_object(doc)


def test_source_keeps_last_good_version_of_a_broken_object(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(POLICY))
    src = StandaloneSource(tmp_path, "10.96.0.0/16")
    good = src.load()
    assert [p.key for p in good.policies] == ["default/rule1"] and not good.errors
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(_policy(ingress=[{"toPorts": [{"ports": [{"port": 0}]}]}])))
    after = src.load()
    assert after.policies == good.policies
    assert "keeping the previous version" in after.errors[0]
    (tmp_path / "p.yaml").write_text("kind: [unclosed")
    assert src.load().policies == good.policies
