"""Fuzzing the manifest parser (issue 13): whatever a file holds, reading and parsing it raises
nothing but ``ManifestError`` (no crash of the CLI or the agent, no other exception type).

Two generators, each bounded in examples and time: YAML text (from random bytes and from mutated
lines of the examples), and structure-aware mutations of every example object (a value replaced by
another type, a key added or removed, at any depth)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.manifests import ManifestError, load_yaml, parse_object, read_documents
from tests.conftest import ROOT

EXAMPLES = [d for f in sorted((ROOT / "examples").rglob("*.yaml")) for _, d in read_documents(f)]
TEXTS = [f.read_text() for f in sorted((ROOT / "examples").rglob("*.yaml"))]
BOUNDED = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True,
                   database=None)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.text(max_size=40),
                    st.sampled_from(["", "80", "TCP", "GET", "/v1/.*", "(", "Bad_NS", "a\nb", "k8s:app", "*", "0.0.0.0/0",
                                     "::1", "fe80::1%eth0", "x" * 300]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                      max_leaves=12)


def _paths(v: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [at]
    if isinstance(v, dict):
        for k, x in v.items():
            out += _paths(x, (*at, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            out += _paths(x, (*at, i))
    return out


def _parse(doc: Any) -> None:
    try:
        if isinstance(doc, dict):
            parse_object(doc, base_dir=Path("/nonexistent"))
    except ManifestError:
        pass


@BOUNDED
@given(st.data())
def test_mutated_examples_raise_only_manifest_errors(data: st.DataObject) -> None:
    doc = copy.deepcopy(data.draw(st.sampled_from(EXAMPLES)))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(doc)))
        if not path:
            continue
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = data.draw(values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=12))] = data.draw(values)
    _parse(doc)


@BOUNDED
@given(st.data())
def test_yaml_text_raises_only_manifest_errors(data: st.DataObject) -> None:
    lines = data.draw(st.sampled_from(TEXTS)).splitlines()
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, max(0, len(lines) - 1)))
        lines.insert(i, data.draw(st.one_of(st.text(max_size=30), st.sampled_from(
            ["&a [x]", "*a", "<<: *a", "!!python/object:os.system", "- - - -", "{", "}", ": :", "\t", "? x", "---", "..."]))))
    text = "\n".join(lines) if data.draw(st.booleans()) else data.draw(st.text(max_size=200))
    try:
        docs = load_yaml(text, "fuzz.yaml")
    except ManifestError:
        return
    for d in docs:
        _parse(d)
    assert not any(isinstance(d, yaml.Node) for d in docs)
