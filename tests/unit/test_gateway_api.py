"""Gateway API: parsing, attachment, the status every object gets, and the Envoy listeners."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.manifests import ManifestError, parse_object
from mesh.model import ClusterState, Gateway, Route
from mesh.plan.gateway import intersect
from mesh.plan.node import NodeSpec, plan_node
from mesh.source import StandaloneSource
from xds import resources as r
from xds.cache import Snapshot

ROOT = Path(__file__).resolve().parents[2]
NODE = NodeSpec("node1", "10.244.0.1", gateway_addresses=("127.0.0.1", "127.0.0.2"))


def _docs() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((ROOT / "examples/gateway/gateway.yaml").read_text()))


def _plan(tmp_path: Path, *extra: dict[str, Any], docs: list[dict[str, Any]] | None = None) -> Any:
    (tmp_path / "01-app.yaml").write_text((ROOT / "examples/l7/01-app.yaml").read_text())
    (tmp_path / "gw.yaml").write_text(yaml.safe_dump_all([*(docs if docs is not None else _docs()), *extra]))
    return plan_node(StandaloneSource(tmp_path, "10.96.0.0/16").load(), NODE)


def _status(plan: Any, name: str) -> dict[str, Any]:
    return dict(json.loads(dict(plan.gateway_status)[name]))


def _cond(conds: list[dict[str, Any]], kind: str) -> tuple[str, str]:
    c = next(c for c in conds if c["type"] == kind)
    return c["status"], c["reason"]


def test_example_parses() -> None:
    cls, gw, route = (parse_object(d) for d in _docs())
    assert isinstance(gw, Gateway) and gw.listeners[0].hostname == "*.example.test"
    assert isinstance(route, Route) and route.parents[0].kind == "Gateway" and route.hostnames == ("shop.example.test",)
    assert route.rules[1].filters.request_headers is not None


def test_gateway_serves_route_and_every_status_says_so(tmp_path: Path) -> None:
    plan = _plan(tmp_path)
    (gl,) = [g for g in plan.gateways if g.name.startswith("gateway:")]
    assert (gl.name, gl.listen_ip, gl.port) == ("gateway:default/shop:8080", "127.0.0.1", 8080)
    (chain,) = gl.chains
    (vh,) = chain.virtual_hosts
    assert vh.domains == ("shop.example.test",)
    assert [m.path for hr in vh.routes for m in hr.matches] == ["/v2", "/"]
    assert {u.name for u in plan.upstreams} == {"default/web-v1:80", "default/web-v2:80"}
    assert _cond(_status(plan, "GatewayClass webb")["conditions"], "Accepted") == ("True", "Accepted")
    # what the conformance suite tests: the core features, and no extended feature no run verified
    claimed = [f["name"] for f in _status(plan, "GatewayClass webb")["supportedFeatures"]]
    assert claimed == sorted(claimed) and {"Gateway", "HTTPRoute", "Mesh"} <= set(claimed)
    gws = _status(plan, "Gateway default/shop")
    assert gws["addresses"] == [{"type": "IPAddress", "value": "127.0.0.1"}]
    assert _cond(gws["conditions"], "Programmed") == ("True", "Programmed")
    (lst,) = gws["listeners"]
    assert lst["attachedRoutes"] == 1 and [k["kind"] for k in lst["supportedKinds"]] == ["HTTPRoute", "GRPCRoute"]
    (parent,) = _status(plan, "HTTPRoute default/shop")["parents"]
    assert parent["controllerName"] == "webb.io/gateway-controller"
    assert _cond(parent["conditions"], "Accepted") == ("True", "Accepted")
    assert _cond(parent["conditions"], "ResolvedRefs") == ("True", "ResolvedRefs")
    res = r.build(list(plan.http), "/tmp/a.log", list(plan.upstreams), plan.gateways, plan.secrets)
    assert Snapshot.of(res).problems() == []
    route = res[r.LISTENER]["gateway:default/shop:8080"]
    assert r.dependencies(r.LISTENER, route)[r.CLUSTER] == {"default/web-v1:80", "default/web-v2:80"}


def _with(docs: list[dict[str, Any]], i: int, edit: Any) -> list[dict[str, Any]]:
    out = copy.deepcopy(docs)
    edit(out[i]["spec"])
    return out


@pytest.mark.parametrize(("edit", "reason"), [
    (lambda s: s.update(hostnames=["other.test"]), "NoMatchingListenerHostname"),
    (lambda s: s["parentRefs"][0].update(sectionName="https"), "NoMatchingParent"),
    (lambda s: s["parentRefs"][0].update(port=9999), "NoMatchingParent"),
])
def test_route_not_attached_says_why(tmp_path: Path, edit: Any, reason: str) -> None:
    plan = _plan(tmp_path, docs=_with(_docs(), 2, edit))
    (parent,) = _status(plan, "HTTPRoute default/shop")["parents"]
    assert _cond(parent["conditions"], "Accepted") == ("False", reason)
    assert _status(plan, "Gateway default/shop")["listeners"][0]["attachedRoutes"] == 0


def test_cross_namespace_backend_needs_a_reference_grant(tmp_path: Path) -> None:
    docs = _with(_docs(), 2, lambda s: s["rules"][0]["backendRefs"][0].update(namespace="other"))
    other = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}},
             {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web-v2", "namespace": "other"},
              "spec": {"selector": {"app": "web-v2"}, "ports": [{"port": 80, "targetPort": 8080}]}}]
    plan = _plan(tmp_path, *other, docs=docs)
    (parent,) = _status(plan, "HTTPRoute default/shop")["parents"]
    assert _cond(parent["conditions"], "ResolvedRefs") == ("False", "RefNotPermitted")
    grant = {"apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
             "metadata": {"name": "from-default", "namespace": "other"},
             "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "default"}],
                      "to": [{"group": "", "kind": "Service"}]}}
    plan = _plan(tmp_path, *other, grant, docs=docs)
    (parent,) = _status(plan, "HTTPRoute default/shop")["parents"]
    assert _cond(parent["conditions"], "ResolvedRefs") == ("True", "ResolvedRefs")


def test_gateways_on_one_port_get_an_address_each_oldest_first_and_keep_it(tmp_path: Path) -> None:
    def gw(name: str, created: str, status: dict[str, Any] | None = None) -> dict[str, Any]:
        doc = {**copy.deepcopy(_docs()[1]), "metadata": {"name": name, "namespace": "default", "creationTimestamp": created}}
        return {**doc, "status": status} if status else doc
    docs = _docs()
    docs[1]["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    plan = _plan(tmp_path, gw("b", "2026-01-02T00:00:00Z"), gw("c", "2026-01-03T00:00:00Z"), docs=docs)
    addr = {k: json.loads(v)["addresses"] for k, v in plan.gateway_status if k.startswith("Gateway ")}
    assert {addr["Gateway default/shop"][0]["value"], addr["Gateway default/b"][0]["value"]} == {"127.0.0.1", "127.0.0.2"}
    assert addr["Gateway default/c"] == []  # the newest finds none free
    assert _cond(_status(plan, "Gateway default/c")["conditions"], "Programmed") == ("False", "AddressNotAssigned")
    # the status a Gateway already has keeps it where it is, whatever its name hashes to
    for where in ("127.0.0.1", "127.0.0.2"):
        mine = gw("b", "2026-01-02T00:00:00Z", {"addresses": [{"type": "IPAddress", "value": where}]})
        plan = _plan(tmp_path, mine, docs=_docs()[:1])
        assert json.loads(dict(plan.gateway_status)["Gateway default/b"])["addresses"][0]["value"] == where


def test_https_listener_without_its_secret_is_not_programmed(tmp_path: Path) -> None:
    docs = _with(_docs(), 1, lambda s: s["listeners"].append(
        {"name": "https", "port": 8443, "protocol": "HTTPS", "hostname": "shop.example.test",
         "tls": {"certificateRefs": [{"name": "shop-tls"}]}}))
    plan = _plan(tmp_path, docs=docs)
    gws = _status(plan, "Gateway default/shop")
    https = gws["listeners"][1]
    assert _cond(https["conditions"], "ResolvedRefs") == ("False", "InvalidCertificateRef")
    assert _cond(https["conditions"], "Programmed") == ("False", "Invalid")
    assert _cond(gws["conditions"], "Accepted") == ("True", "ListenersNotValid")
    assert [g.port for g in plan.gateways] == [8080]  # the HTTP listener still serves


def test_other_controllers_gateways_are_left_alone(tmp_path: Path) -> None:
    docs = _with(_docs(), 0, lambda s: s.update(controllerName="example.com/other"))
    plan = _plan(tmp_path, docs=docs)
    assert plan.gateways == () and plan.gateway_status == ()


@pytest.mark.parametrize(("listener", "routes", "want"), [
    ("", (), ("*",)), ("*.example.com", (), ("*.example.com",)), ("", ("a.test",), ("a.test",)),
    ("*.example.com", ("foo.example.com", "bar.other"), ("foo.example.com",)),
    ("foo.example.com", ("*.example.com",), ("foo.example.com",)), ("*.example.com", ("example.com",), ()),
])
def test_hostname_intersection(listener: str, routes: tuple[str, ...], want: tuple[str, ...]) -> None:
    assert intersect(listener, routes) == want


@pytest.mark.parametrize(("i", "edit", "field"), [
    (1, lambda s: s["listeners"][0].update(protocol=""), "spec.listeners[0].protocol"),
    (1, lambda s: s["listeners"].append(dict(s["listeners"][0])), "spec.listeners"),
    (2, lambda s: s["rules"][1]["filters"][0].update(type="ExtensionRef"), "spec.rules[1].filters[0].type"),
    (2, lambda s: s["rules"][0].update(sessionPersistence={}), "spec.rules[0].sessionPersistence"),
    (0, lambda s: s.update(controllerName="nocontroller"), "spec.controllerName"),
])
def test_malformed_names_the_field(i: int, edit: Any, field: str) -> None:
    with pytest.raises(ManifestError) as e:
        parse_object(_with(_docs(), i, edit)[i])
    assert e.value.field == field, str(e.value)


def test_state_has_every_gateway_kind(tmp_path: Path) -> None:
    (tmp_path / "gw.yaml").write_text(yaml.safe_dump_all(_docs()))
    st: ClusterState = StandaloneSource(tmp_path, "10.96.0.0/16").load()
    assert [c.name for c in st.gateway_classes] == ["webb"] and len(st.gateways) == 1 and len(st.routes) == 1


def test_grpc_route_matches_are_paths_and_backends_speak_h2(tmp_path: Path) -> None:
    route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute", "metadata": {"name": "g", "namespace": "default"},
             "spec": {"parentRefs": [{"name": "shop"}], "hostnames": ["grpc.example.test"], "rules": [
                 {"matches": [{"method": {"service": "echo.Echo", "method": "Say"}}], "backendRefs": [{"name": "web-v2", "port": 80}]},
                 {"matches": [{"method": {"service": "echo.Echo"}}], "backendRefs": [{"name": "web-v1", "port": 80}]}]}}
    g = parse_object(route)
    assert isinstance(g, Route) and [(m.path_type, m.path) for r_ in g.rules for m in r_.matches] == [
        ("Exact", "/echo.Echo/Say"), ("Prefix", "/echo.Echo/")]
    docs = _docs()
    docs[1]["spec"]["listeners"][0]["hostname"] = None
    plan = _plan(tmp_path, route, docs=[docs[0], {**docs[1], "spec": {**docs[1]["spec"], "listeners": [
        {"name": "http", "port": 8080, "protocol": "HTTP"}]}}, docs[2]])
    (parent,) = _status(plan, "GRPCRoute default/g")["parents"]
    assert _cond(parent["conditions"], "Accepted") == ("True", "Accepted")
    assert all(u.http2 for u in plan.upstreams)  # both web-v1 and web-v2 are a GRPCRoute's backends
    bad = copy.deepcopy(route)
    bad["spec"]["rules"][0]["matches"][0]["method"]["service"] = "not a name"
    with pytest.raises(ManifestError) as e:
        parse_object(bad)
    assert e.value.field == "spec.rules[0].matches[0].method.service"


def test_tls_passthrough_by_sni(tmp_path: Path) -> None:
    docs = _docs()
    docs[1]["spec"]["listeners"] = [{"name": "tls", "port": 8443, "protocol": "TLS", "tls": {"mode": "Passthrough"}},
                                    {"name": "term", "port": 9443, "protocol": "TLS", "tls": {"mode": "Terminate"}}]
    route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "TLSRoute", "metadata": {"name": "t", "namespace": "default"},
             "spec": {"parentRefs": [{"name": "shop", "sectionName": "tls"}], "hostnames": ["abc.example.test"],
                      "rules": [{"backendRefs": [{"name": "web-v1", "port": 80}]}]}}
    plan = _plan(tmp_path, route, docs=docs[:2])
    (gl,) = plan.gateways
    (chain,) = gl.chains
    assert chain.server_names == ("abc.example.test",) and chain.passthrough == (("default/web-v1:80", 1),)
    gws = _status(plan, "Gateway default/shop")
    tls, term = gws["listeners"]
    assert tls["attachedRoutes"] == 1 and [k["kind"] for k in tls["supportedKinds"]] == ["TLSRoute"]
    assert _cond(term["conditions"], "Accepted") == ("False", "UnsupportedValue")
    res = r.build([], "/tmp/a.log", list(plan.upstreams), plan.gateways, plan.secrets)
    assert Snapshot.of(res).problems() == []
    assert r.dependencies(r.LISTENER, res[r.LISTENER][gl.name]) == {r.CLUSTER: {"default/web-v1:80"}}


def test_tls_listener_without_routes_and_rules_without_backends(tmp_path: Path) -> None:
    docs = _docs()
    docs[1]["spec"]["listeners"].append({"name": "tls", "port": 8443, "protocol": "TLS", "tls": {"mode": "Passthrough"}})
    docs[2]["spec"]["rules"].insert(0, {"matches": [{"path": {"type": "Exact", "value": "/none"}}]})  # no backendRefs: 500
    plan = _plan(tmp_path, docs=docs)
    tls = next(g for g in plan.gateways if g.port == 8443)
    assert [c.passthrough for c in tls.chains] == [()]  # a chain that closes: Envoy takes no listener without one
    res = r.build([], "/tmp/a.log", list(plan.upstreams), plan.gateways, plan.secrets)
    assert Snapshot.of(res).problems() == []
    (parent,) = _status(plan, "HTTPRoute default/shop")["parents"]
    assert _cond(parent["conditions"], "ResolvedRefs") == ("True", "ResolvedRefs")
    routes = res[r.LISTENER]["gateway:default/shop:8080"]
    assert "no valid backend" in str(routes)


def test_filters_become_envoy_route_actions() -> None:
    from mesh import model as mm
    from xds import model as xm
    prefix = mm.RouteMatch("PathPrefix", "/api")
    rewrite = xm.HttpRoute((prefix,), (("default/web:80", 1),), filters=mm.RouteFilters(
        request_headers=mm.HeaderModifier(set=(("X-A", "1"),), add=(("X-B", "2"),), remove=("X-C",)),
        rewrite=mm.Rewrite(hostname="internal.test", path_type="ReplacePrefixMatch", path="/v2")))
    (route,) = r._routes(rewrite)
    assert route.route.host_rewrite_literal == "internal.test"
    assert (route.route.regex_rewrite.pattern.regex, route.route.regex_rewrite.substitution) == ("^/api(/|$)", "/v2\\1")
    assert [(h.header.key, h.append_action) for h in route.request_headers_to_add] == [
        ("x-a", 2), ("x-b", 0)]  # OVERWRITE_IF_EXISTS_OR_ADD, APPEND_IF_EXISTS_OR_ADD
    assert list(route.request_headers_to_remove) == ["x-c"]
    redirect = xm.HttpRoute((prefix,), (), filters=mm.RouteFilters(redirect=mm.Redirect(scheme="https", status_code=308)))
    (route,) = r._routes(redirect)
    assert (route.redirect.scheme_redirect, route.redirect.port_redirect, route.redirect.response_code) == ("https", 443, 4)


def test_headless_services_are_route_backends(tmp_path: Path) -> None:
    headless = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "hl", "namespace": "default"},
                "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 8080}]}}
    sl = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {
        "name": "hl-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "hl"}},
        "addressType": "IPv4", "endpoints": [{"addresses": ["10.244.0.77"], "conditions": {"ready": True}}],
        "ports": [{"name": "http", "port": 3000, "protocol": "TCP"}]}
    docs = _docs()
    docs[2]["spec"]["rules"][0]["backendRefs"] = [{"name": "hl", "port": 8080}]
    plan = _plan(tmp_path, headless, sl, docs=docs)
    (parent,) = _status(plan, "HTTPRoute default/shop")["parents"]
    assert _cond(parent["conditions"], "ResolvedRefs") == ("True", "ResolvedRefs")
    (up,) = [u for u in plan.upstreams if u.name == "default/hl:8080"]
    assert up.backends == (("10.244.0.77", 3000),)
    assert not any(s.vip == "" for s in plan.services)  # no kernel entry without a VIP


def _served_routes(plan: Any) -> list[Any]:
    """The Envoy routes of the plan's one Gateway listener, in order."""
    (gl,) = [g for g in plan.gateways if g.name.startswith("gateway:")]
    return [rt for ch in gl.chains for vh in ch.virtual_hosts for hr in vh.routes for rt in r._routes(hr, gl.port)]


def test_query_params_per_backend_headers_backend_timeout_and_the_listener_port_in_redirects(tmp_path: Path) -> None:
    """HTTPRouteQueryParamMatching, HTTPRouteBackendRequestHeaderModification, HTTPRouteBackendTimeout and
    HTTPRoutePortRedirect (a redirect with neither scheme nor port keeps the listener's port, 8080 here)."""
    def edit(s: dict[str, Any]) -> None:
        s["rules"][0]["matches"][0]["queryParams"] = [{"name": "animal", "value": "whale"},
                                                      {"type": "RegularExpression", "name": "n", "value": "^[0-9]+$"}]
        s["rules"][0]["timeouts"] = {"request": "10s", "backendRequest": "2s"}
        s["rules"][1]["backendRefs"] = [
            {"name": "web-v1", "port": 80, "filters": [{"type": "RequestHeaderModifier",
                                                        "requestHeaderModifier": {"set": [{"name": "x-b", "value": "v1"}]}}]},
            {"name": "web-v2", "port": 80}]
        s["rules"].append({"matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
                           "filters": [{"type": "RequestRedirect", "requestRedirect": {"hostname": "new.example.test"}}]})

    routes = _served_routes(_plan(tmp_path, docs=_with(_docs(), 2, edit)))
    v2, redirect, rest = ([rt for rt in routes if (rt.match.path_separated_prefix or rt.match.prefix) == p][0]
                          for p in ("/v2", "/old", "/"))
    assert [(q.name, q.string_match.exact, q.string_match.safe_regex.regex) for q in v2.match.query_parameters] == [
        ("animal", "whale", ""), ("n", "", "^[0-9]+$")]
    assert v2.route.timeout.seconds == 2  # no retry: the backend's timeout bounds the one try (the shorter of the two)
    weights = {c.name: c for c in rest.route.weighted_clusters.clusters}
    assert [h.header.key for h in weights["default/web-v1:80"].request_headers_to_add] == ["x-b"]
    assert not weights["default/web-v2:80"].request_headers_to_add
    assert (redirect.redirect.host_redirect, redirect.redirect.port_redirect) == ("new.example.test", 8080)
    (gl,) = [g for g in _plan(tmp_path, docs=_with(_docs(), 2, edit)).gateways if g.name.startswith("gateway:")]
    on_80 = [rt for ch in gl.chains for vh in ch.virtual_hosts for hr in vh.routes for rt in r._routes(hr, 80)
             if rt.HasField("redirect")]
    assert [rt.redirect.port_redirect for rt in on_80] == [0]  # port 80 is implied: no ":80" in the Location


@pytest.mark.parametrize(("edit", "field"), [
    (lambda s: s["rules"][0]["matches"][0].update(queryParams=[{"name": "a", "value": "b", "type": "Prefix"}]),
     "spec.rules[0].matches[0].queryParams[0].type"),
    (lambda s: s["rules"][0]["backendRefs"][0].update(filters=[{"type": "RequestMirror"}]),
     "spec.rules[0].backendRefs[0].filters[0].type"),
])
def test_unsupported_query_match_or_backend_filter_names_the_field(edit: Any, field: str) -> None:
    with pytest.raises(ManifestError) as e:
        parse_object(_with(_docs(), 2, edit)[2])
    assert e.value.field == field, str(e.value)


def test_backend_request_timeout_bounds_each_try() -> None:
    from mesh import model as mm
    from mesh.plan.routing import rule_timeout
    rule = mm.RouteRule((), (), timeout_ms=10_000, backend_timeout_ms=2_000)
    assert rule_timeout(rule) == (2_000, None)  # one try: the shorter bound
    retried = mm.RouteRule((), (), timeout_ms=10_000, retry=mm.Retry(2), backend_timeout_ms=2_000)
    assert rule_timeout(retried) == (10_000, mm.Retry(2, per_try_timeout_ms=2_000))  # each of the 3 tries
    assert rule_timeout(mm.RouteRule((), (), timeout_ms=5_000)) == (5_000, None)
