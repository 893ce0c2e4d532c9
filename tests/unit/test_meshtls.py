"""MeshTLS (per-namespace mTLS mode): parsing, the namespace label shortcut, resolution order,
two objects in one namespace, the standalone source and the operator's indexer and status."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from mesh.kube.indexer import Indexer
from mesh.kube.status import cr_status
from mesh.manifests import ManifestError, parse_object
from mesh.model import ClusterState, MeshTLS, Namespace, Pod, mtls_conflicts, mtls_mode, mtls_modes
from mesh.plan.node import NodeSpec, plan_node
from mesh.source import StandaloneSource
from tests.unit.test_crds import strict

ROOT = Path(__file__).resolve().parents[2]
NODE = NodeSpec("node1", "10.244.0.1")


def _doc(mode: Any = "STRICT", name: str = "default", ns: str = "shop", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "webb.io/v1alpha1", "kind": "MeshTLS", "metadata": {"name": name, "namespace": ns},
            "spec": {"mode": mode, **spec}}


def _ns(name: str, mode: str | None = None) -> dict[str, Any]:
    labels = {"webb.io/mtls": mode} if mode is not None else {"team": name}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


@pytest.mark.parametrize("mode", ["STRICT", "PERMISSIVE", "DISABLE"])
def test_meshtls_parses(mode: str) -> None:
    m = parse_object(_doc(mode))
    assert m == MeshTLS("shop", "default", mode) and m.key == "shop/default"


@pytest.mark.parametrize(("doc", "field", "problem"), [
    (_doc("strict"), "spec.mode", "'strict' is not a mode; use STRICT, PERMISSIVE or DISABLE"),
    (_doc(True), "spec.mode", "True is not a mode; use STRICT, PERMISSIVE or DISABLE"),
    ({**_doc(), "spec": {}}, "spec.mode", "is required; use STRICT, PERMISSIVE or DISABLE"),
    (_doc(selector={}), "spec.selector", "unknown field; MeshTLS spec has mode"),
    ({**_doc(), "apiVersion": "webb.io/v1"}, "apiVersion", "'webb.io/v1': use webb.io/v1alpha1"),
])
def test_bad_meshtls_names_field_and_fix(doc: dict[str, Any], field: str, problem: str) -> None:
    with pytest.raises(ManifestError) as e:
        parse_object(doc)
    assert (e.value.field, e.value.problem) == (field, problem)
    assert str(e.value) == f"MeshTLS shop/default: {field}: {problem}"


def test_namespace_label_checked_like_the_mode() -> None:
    assert parse_object(_ns("shop", "PERMISSIVE")) == Namespace("shop", (("webb.io/mtls", "PERMISSIVE"),))
    with pytest.raises(ManifestError) as e:
        parse_object(_ns("shop", "on"))
    assert str(e.value) == "Namespace shop: metadata.labels.webb.io/mtls: 'on' is not a mode; use STRICT, PERMISSIVE or DISABLE"


def test_resolution_meshtls_then_label_then_disable() -> None:
    state = ClusterState(
        namespaces=(Namespace("labelled", (("webb.io/mtls", "STRICT"),)), Namespace("both", (("webb.io/mtls", "STRICT"),)),
                    Namespace("plain")),
        mtls=(MeshTLS("both", "m", "PERMISSIVE"), MeshTLS("objonly", "m", "STRICT")))
    assert mtls_mode(state, "labelled") == "STRICT"
    assert mtls_mode(state, "both") == "PERMISSIVE"  # the object wins over the label
    assert mtls_mode(state, "objonly") == "STRICT"  # no Namespace object needed
    assert mtls_mode(state, "plain") == "DISABLE"
    assert mtls_mode(state, "unknown") == "DISABLE"
    assert mtls_modes(state) == {"both": "PERMISSIVE", "labelled": "STRICT", "objonly": "STRICT", "plain": "DISABLE"}


def test_two_meshtls_in_a_namespace_first_name_wins_other_warned() -> None:
    state = ClusterState(mtls=(MeshTLS("shop", "zz", "DISABLE"), MeshTLS("shop", "aa", "STRICT"),
                               MeshTLS("ops", "one", "PERMISSIVE")))
    assert mtls_mode(state, "shop") == "STRICT"
    (warning,) = mtls_conflicts(state)
    assert warning.startswith("MeshTLS shop/zz: ignored: MeshTLS shop/aa sets the mode of namespace shop")
    assert "delete one of them" in warning
    plan = plan_node(state, NODE)
    assert warning in plan.warnings
    assert plan.mtls == (("ops", "PERMISSIVE"), ("shop", "STRICT"))


def test_plan_follows_the_mode_and_default_changes_nothing() -> None:
    pods = (Pod("shop", "a", (("app", "a"),), ip="10.244.0.5"),)
    plain = plan_node(ClusterState(pods=pods), NODE)
    assert plain.mtls == () and not plain.warnings
    strict = plan_node(ClusterState(pods=pods, mtls=(MeshTLS("shop", "m", "STRICT"),)), NODE)
    assert strict.mtls == (("shop", "STRICT"),) and strict.version != plain.version
    disabled = plan_node(ClusterState(pods=pods, mtls=(MeshTLS("shop", "m", "DISABLE"),)), NODE)
    assert disabled.mtls == ()


def _write(d: Path, name: str, *docs: dict[str, Any]) -> None:
    (d / name).write_text(yaml.safe_dump_all(docs))


def test_standalone_source_keeps_meshtls_and_last_good_version(tmp_path: Path) -> None:
    _write(tmp_path, "tls.yaml", _ns("shop", "PERMISSIVE"), _doc("STRICT"), _doc("PERMISSIVE", name="later"))
    src = StandaloneSource(tmp_path, "10.96.0.0/16")
    state = src.load()
    assert set(state.mtls) == {MeshTLS("shop", "default", "STRICT"), MeshTLS("shop", "later", "PERMISSIVE")}
    assert mtls_mode(state, "shop") == "STRICT" and not state.errors
    assert any("MeshTLS shop/later: ignored" in w for w in plan_node(state, NODE).warnings)

    _write(tmp_path, "tls.yaml", _ns("shop", "strict"), _doc("permissive"))
    state = src.load()
    assert mtls_mode(state, "shop") == "STRICT"  # the previous good versions stay in force
    assert any("metadata.labels.webb.io/mtls: 'strict' is not a mode" in e and "keeping the previous version" in e
               for e in state.errors), state.errors
    assert any("MeshTLS shop/default: spec.mode: 'permissive' is not a mode; use STRICT, PERMISSIVE or DISABLE" in e
               for e in state.errors), state.errors


def _api(doc: dict[str, Any], rv: str = "1", generation: int = 1) -> dict[str, Any]:
    return {**doc, "metadata": {**doc["metadata"], "resourceVersion": rv, "generation": generation}}


def test_indexer_state_carries_meshtls_and_errors() -> None:
    ix = Indexer()
    assert ix.upsert("Namespace", _api(_ns("shop", "DISABLE"))) is None
    assert ix.upsert("MeshTLS", _api(_doc("PERMISSIVE"))) is None
    assert mtls_mode(ix.state(), "shop") == "PERMISSIVE"
    error = ix.upsert("MeshTLS", _api(_doc("Strict"), "2", 2))
    assert error is not None and "spec.mode: 'Strict' is not a mode" in error and "keeping the previous version" in error
    state, generations = ix.snapshot("MeshTLS")
    assert mtls_mode(state, "shop") == "PERMISSIVE" and generations == {"MeshTLS shop/default": 1}
    assert error in state.errors


def test_status_of_a_shadowed_meshtls() -> None:
    report = {"node": "n1", "datapathVersion": "d", "envoyVersion": "e", "generations": {"MeshTLS shop/zz": 1}}
    st = cr_status("MeshTLS shop/zz", 1, None, "STRICT", {"n1": report}, {}, "2025-01-01T00:00:00Z", "MeshTLS shop/aa")
    ready, valid, applied = st["conditions"]
    assert valid["status"] == "True"
    assert (applied["status"], applied["reason"]) == ("False", "Shadowed")
    assert (ready["status"], ready["reason"]) == ("False", "Shadowed")
    assert "MeshTLS shop/aa is in force" in applied["message"]
    st = cr_status("MeshTLS shop/zz", 1, None, "STRICT", {"n1": report}, {}, "2025-01-01T00:00:00Z")
    assert [c["status"] for c in st["conditions"]] == ["True"] * 3 and "auditWouldDeny" not in st["nodes"][0]


def _crd_schema() -> dict[str, Any]:
    text = (ROOT / "crds/meshtls.yaml").read_text()
    assert "$ref" not in text
    crd = yaml.safe_load(text)
    assert crd["spec"]["group"] == "webb.io" and crd["spec"]["scope"] == "Namespaced"
    (version,) = crd["spec"]["versions"]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Valid", "Mode", "Applied", "Age"]
    return dict(strict(version["schema"]["openAPIV3Schema"]))


def test_crd_schema_accepts_the_modes_and_refuses_at_the_parsers_field() -> None:
    schema = _crd_schema()
    for mode in ("STRICT", "PERMISSIVE", "DISABLE"):
        jsonschema.validate(_doc(mode), schema)
    for doc, path in [(_doc("strict"), ["spec", "mode"]), ({**_doc(), "spec": {}}, ["spec"]),
                      (_doc(selector={}), ["spec"])]:
        with pytest.raises(jsonschema.ValidationError) as e:
            jsonschema.validate(doc, schema)
        assert list(e.value.absolute_path) == path
