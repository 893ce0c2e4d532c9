"""HTTPRoute with Service parents (GAMMA) and the legacy MeshRoute: parsing (errors name the field and
the fix), CRD schema, reconcile, Envoy protos."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from mesh import model as mm
from mesh.manifests import ManifestError, parse_object
from mesh.model import ClusterState, Route, RouteMatch
from mesh.plan.node import NodeSpec, plan_node
from mesh.source import StandaloneSource
from tests.unit.test_crds import strict
from xds import model as xm
from xds import resources as r
from xds.cache import Snapshot

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples/l7"
NODE = NodeSpec("node1", "10.244.0.1")


def _route_doc() -> dict[str, Any]:
    return dict(yaml.safe_load((EXAMPLE / "route.yaml").read_text()))


def _legacy_doc() -> dict[str, Any]:
    """The example as the retired MeshRoute CRD wrote it (still read, as an HTTPRoute, with a warning)."""
    doc = _route_doc()
    doc.update(apiVersion="webb.io/v1alpha1", kind="MeshRoute")
    doc["spec"]["parentRefs"] = [{"name": "web", "port": 80}]
    return doc


def _state(tmp_path: Path, *files: str) -> ClusterState:
    tmp_path.mkdir(exist_ok=True)
    for f in ("01-app.yaml", *files):
        (tmp_path / f).write_text((EXAMPLE / f).read_text())
    st = StandaloneSource(tmp_path, "10.96.0.0/16").load()
    pods = tuple(replace(p, ip=f"10.244.0.{i + 2}") for i, p in enumerate(sorted(st.pods, key=lambda p: p.key)))
    return replace(st, pods=pods)


def test_example_route_parses() -> None:
    route = parse_object(_route_doc())
    assert isinstance(route, Route) and route.kind == "HTTPRoute"
    legacy = parse_object(_legacy_doc())
    assert isinstance(legacy, Route) and legacy.kind == "MeshRoute" and legacy.rules == route.rules
    assert legacy.parents == route.parents
    assert route.parents[0].name == "web" and route.parents[0].port == 80
    canary, slow, flaky, split = route.rules
    assert canary.matches[0].headers[0].name == "x-canary"
    assert slow.timeout_ms == 1000 and slow.matches == (RouteMatch("Exact", "/slow"),)
    assert flaky.retry is not None and (flaky.retry.attempts, flaky.retry.codes) == (2, (503,))
    assert [(b.name, b.weight) for b in split.backends] == [("web-v1", 50), ("web-v2", 50)]
    assert split.matches[0].method == "GET" and split.matches[0].path_type == "RegularExpression"


@pytest.mark.parametrize(("mutate", "field", "fix"), [
    (lambda s: s["rules"][1]["timeouts"].update(request="1 second"), "spec.rules[1].timeouts.request", '"2s"'),
    (lambda s: s["rules"][3]["backendRefs"][0].update(weight=-1), "spec.rules[3].backendRefs[0].weight", "0-1000000"),
    (lambda s: s["rules"][0]["backendRefs"][0].pop("port"), "spec.rules[0].backendRefs[0].port", "is required"),
    (lambda s: s["rules"][1]["matches"][0]["path"].update(type="Prefix"), "spec.rules[1].matches[0].path.type", "PathPrefix"),
    (lambda s: s["rules"][3]["matches"][0]["path"].update(value="/v[0-9"), "spec.rules[3].matches[0].path.value", "regular"),
    (lambda s: s["rules"][2]["retry"].update(retryOn=["sometimes"]), "spec.rules[2].retry.retryOn[0]", "connect-failure"),
    (lambda s: s["rules"][2]["retry"].update(attempts=99), "spec.rules[2].retry.attempts", "0-10"),
    (lambda s: s.update(parentRefs=[]), "spec.parentRefs", "e.g."),
    (lambda s: s["rules"][0].update(filters=[{"type": "CORS"}]), "spec.rules[0].filters[0].type", "RequestHeaderModifier"),
    (lambda s: s["parentRefs"][0].update(kind="Pod"), "spec.parentRefs[0].kind", "Gateway"),
])
def test_malformed_route_names_field_and_fix(mutate: Any, field: str, fix: str) -> None:
    doc = _route_doc()
    mutate(doc["spec"])
    with pytest.raises(ManifestError) as e:
        parse_object(doc)
    assert e.value.field == field and fix in e.value.problem, str(e.value)
    assert str(e.value).startswith(f"HTTPRoute default/web: {field}: ")


def _crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load((ROOT / "crds/meshroute.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    assert version["subresources"] == {"status": {}}
    return dict(strict(version["schema"]["openAPIV3Schema"]))


def test_crd_accepts_example_and_rejects_at_the_parsers_field() -> None:
    jsonschema.validate(_legacy_doc(), _crd_schema())
    for mutate, path in [
        (lambda s: s["rules"][1]["timeouts"].update(request="1 second"), ["spec", "rules", 1, "timeouts", "request"]),
        (lambda s: s["rules"][3]["backendRefs"][0].update(weight=-1), ["spec", "rules", 3, "backendRefs", 0, "weight"]),
        (lambda s: s["rules"][0].update(filters=[]), ["spec", "rules", 0]),
    ]:
        doc = _legacy_doc()
        mutate(doc["spec"])
        with pytest.raises(jsonschema.ValidationError) as e:
            jsonschema.validate(doc, _crd_schema())
        assert list(e.value.absolute_path) == path


def test_route_makes_parent_l7_and_clusters_for_every_backend(tmp_path: Path) -> None:
    without = plan_node(_state(tmp_path / "a"), NODE)
    assert not without.http and not without.upstreams
    plan = plan_node(_state(tmp_path / "b", "route.yaml"), NODE)
    (listener,) = plan.http
    assert listener.name == "default/web:80" and listener.policies is None
    assert {u.name for u in plan.upstreams} == {"default/web-v1:80", "default/web-v2:80"}  # no cluster of web itself
    (web,) = [s for s in plan.services if s.proxy_port]
    assert web.proxy_port == listener.listen_port
    # precedence: exact, regex, longest prefix, then for equal paths the one with more header matches
    kinds = [(h.matches[0].path_type, h.matches[0].path, len(h.matches[0].headers)) for h in listener.routes]
    assert kinds == [("Exact", "/slow", 0), ("RegularExpression", "/v[0-9]+/.*", 0), ("PathPrefix", "/flaky", 0),
                     ("PathPrefix", "/", 1), ("PathPrefix", "/", 0)]
    assert [c for c, _ in listener.routes[-1].clusters] == ["default/web-v1:80", "default/web-v2:80"]


def test_route_to_unknown_backend_warns_and_keeps_the_rest(tmp_path: Path) -> None:
    (tmp_path / "route.yaml").write_text((EXAMPLE / "route.yaml").read_text().replace("name: web-v2, port: 80}", "name: web-v2, port: 81}"))
    (tmp_path / "01-app.yaml").write_text((EXAMPLE / "01-app.yaml").read_text())
    plan = plan_node(StandaloneSource(tmp_path, "10.96.0.0/16").load(), NODE)
    assert any("spec.rules[0].backendRefs[0]: Service default/web-v2 has no TCP port 81" in w for w in plan.warnings)
    (listener,) = plan.http
    canary = next(h for h in listener.routes if h.matches[0].headers)
    assert canary.clusters == ()
    snap = Snapshot.of(r.build(list(plan.http), "/tmp/a.log", list(plan.upstreams)))
    assert snap.problems() == []
    routes = snap.resource(r.ROUTE, "default/web:80").virtual_hosts[0].routes
    assert [x.direct_response.status for x in routes if x.HasField("direct_response")] == [500]


def test_envoy_route_protos() -> None:
    route = xm.HttpRoute((mm.RouteMatch("PathPrefix", "/api/", "GET", (mm.HeaderMatch("X-V", "v[12]", "RegularExpression"),)),),
                        (("ns/a:80", 3), ("ns/b:80", 1), ("ns/c:80", 0)), timeout_ms=2500,
                        retry=mm.Retry(2, per_try_timeout_ms=500, codes=(503,)))
    svc = xm.HttpService("ns/web:80", "10.244.0.1", 15001, (), None, routes=(route,))
    (env,) = r.route(svc).virtual_hosts[0].routes
    assert env.match.path_separated_prefix == "/api"  # whole elements; trailing "/" ignored
    assert [(h.name, h.string_match.exact or h.string_match.safe_regex.regex) for h in env.match.headers] == [
        ("x-v", "v[12]"), (":method", "GET")]
    assert [(c.name, c.weight.value) for c in env.route.weighted_clusters.clusters] == [("ns/a:80", 3), ("ns/b:80", 1)]
    assert (env.route.timeout.seconds, env.route.timeout.nanos) == (2, 500_000_000)
    rp = env.route.retry_policy
    assert (rp.retry_on, rp.num_retries.value, list(rp.retriable_status_codes)) == ("retriable-status-codes", 2, [503])
    assert r.references(r.ROUTE, r.route(svc)) == {r.CLUSTER: {"ns/a:80", "ns/b:80"}}


def test_clusters_and_listeners_are_built_apart() -> None:
    svc = xm.HttpService("ns/web:80", "10.244.0.1", 15001, (("10.244.0.9", 80),), None,
                        routes=(xm.HttpRoute(clusters=(("ns/other:80", 1),)),))
    res = r.build([svc], "/tmp/a.log", [xm.Upstream("ns/other:80", (("10.244.0.5", 8080),))])
    assert set(res[r.CLUSTER]) == {"ns/other:80"} and set(res[r.LISTENER]) == {"l7:10.244.0.1:15001"}
    assert Snapshot.of(res).problems() == []
    missing = r.build([svc], "/tmp/a.log", [])
    assert Snapshot.of(missing).problems() == ["RouteConfiguration ns/web:80 needs Cluster ns/other:80"]
