"""Ingress (class webb) and TLS Secrets: parsing, the gateway plan, SDS references, no key in reprs."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.manifests import ManifestError, parse_object
from mesh.model import Ingress, Secret
from mesh.plan.node import NodeSpec, plan_node
from mesh.source import StandaloneSource
from xds import resources as r
from xds.cache import Snapshot

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples/l7"
CERT = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = b"-----BEGIN PRIVATE KEY-----\nSECRETKEYMATERIAL\n-----END PRIVATE KEY-----\n"
NODE = NodeSpec("node1", "10.244.0.1", ingress_http_port=18080, ingress_https_port=18443)


def _secret_doc(**data: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls", "metadata": {"name": "shop-tls"},
            "data": data or {"tls.crt": base64.b64encode(CERT).decode(), "tls.key": base64.b64encode(KEY).decode()}}


def _ingresses() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((EXAMPLE / "ingress.yaml").read_text()))


def test_secret_parses_and_never_shows_the_key() -> None:
    s = parse_object(_secret_doc())
    assert isinstance(s, Secret) and s.key_pem == KEY
    assert b"SECRETKEYMATERIAL".decode() not in repr(s)
    assert parse_object({**_secret_doc(), "type": "Opaque"}) is None  # other Secret types are not kept
    with pytest.raises(ManifestError) as e:
        parse_object(_secret_doc(**{"tls.crt": base64.b64encode(CERT).decode(), "tls.key": "not base64!!"}))
    assert e.value.field == "data.tls.key" and "not shown" in e.value.problem and "not base64" not in str(e.value)


def test_example_ingresses_parse() -> None:
    shop, api, legacy = (parse_object(d) for d in _ingresses())
    assert isinstance(shop, Ingress) and shop.class_name == "webb" and shop.tls[0].secret == "shop-tls"  # noqa: S105 - a name
    assert [(p.path, p.path_type, p.backend.port) for p in shop.rules[0].paths] == [("/v2", "Prefix", 80), ("/", "Prefix", "http")]
    assert isinstance(legacy, Ingress) and legacy.class_name == "nginx"


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda s: s["rules"][0]["http"]["paths"][0].update(pathType="Regex"), "spec.rules[0].http.paths[0].pathType"),
    (lambda s: s["rules"][0].update(host="Shop_Example"), "spec.rules[0].host"),
    (lambda s: s["tls"][0].pop("secretName"), "spec.tls[0].secretName"),
    (lambda s: s["rules"][0]["http"]["paths"][0]["backend"]["service"].update(port={}), "spec.rules[0].http.paths[0].backend.service.port"),
])
def test_malformed_ingress_names_the_field(mutate: Any, field: str) -> None:
    doc = _ingresses()[0]
    mutate(doc["spec"])
    with pytest.raises(ManifestError) as e:
        parse_object(doc)
    assert e.value.field == field and str(e.value).startswith("Ingress default/shop: ")


def _plan(tmp_path: Path, with_secret: bool) -> Any:
    (tmp_path / "01-app.yaml").write_text((EXAMPLE / "01-app.yaml").read_text())
    (tmp_path / "ingress.yaml").write_text((EXAMPLE / "ingress.yaml").read_text())
    if with_secret:
        (tmp_path / "secret.yaml").write_text(yaml.safe_dump(_secret_doc()))
    return plan_node(StandaloneSource(tmp_path, "10.96.0.0/16").load(), NODE)


def test_gateway_plan_and_resources(tmp_path: Path) -> None:
    plan = _plan(tmp_path, with_secret=True)
    http, https = plan.gateways
    assert (http.name, http.listen_ip, http.port, https.name, https.port) == ("ingress:http", "127.0.0.1", 18080, "ingress:https", 18443)
    (chain,) = http.chains
    assert [vh.name for vh in chain.virtual_hosts] == ["api.example.test", "shop.example.test"]  # not legacy (class nginx)
    assert [(c.server_names, c.secret) for c in https.chains] == [(("shop.example.test",), "default/shop-tls")]
    assert [s.name for s in plan.secrets] == ["default/shop-tls"]
    assert {u.name for u in plan.upstreams} == {"default/web-v1:80", "default/web-v2:80"}
    assert not plan.http  # ingress alone makes no east-west listener
    warnings = "\n".join(plan.warnings)
    assert "Ingress default/api: spec.tls[0].secretName: Secret default/api-tls not found" in warnings
    assert "Ingress default/legacy: spec.ingressClassName 'nginx' is not 'webb'; ignored" in warnings
    assert "SECRETKEYMATERIAL" not in repr(plan)

    res = r.build(list(plan.http), "/tmp/a.log", list(plan.upstreams), plan.gateways, plan.secrets)
    https = res[r.LISTENER]["ingress:https"]
    assert r.references(r.LISTENER, https) == {r.SECRET: {"default/shop-tls"}}
    assert r.dependencies(r.LISTENER, https)[r.CLUSTER] == {"default/web-v1:80", "default/web-v2:80"}
    assert list(https.filter_chains[0].filter_chain_match.server_names) == ["shop.example.test"]
    routes = r.dependencies(r.LISTENER, res[r.LISTENER]["ingress:http"])
    assert routes == {r.CLUSTER: {"default/web-v1:80", "default/web-v2:80"}}
    snap = Snapshot.of(res)
    assert snap.problems() == []
    del res[r.SECRET]["default/shop-tls"]
    assert Snapshot.of(res).problems() == ["Listener ingress:https needs Secret default/shop-tls"]


def test_missing_secret_keeps_http_and_other_hosts(tmp_path: Path) -> None:
    plan = _plan(tmp_path, with_secret=False)
    assert [g.name for g in plan.gateways] == ["ingress:http"] and plan.secrets == ()
    res = r.build([], "/tmp/a.log", list(plan.upstreams), plan.gateways, plan.secrets)
    assert set(res[r.LISTENER]) == {"ingress:http"}
    assert "Ingress default/shop: spec.tls[0].secretName: Secret default/shop-tls not found" in "\n".join(plan.warnings)


def test_every_built_resource_has_its_dependencies(tmp_path: Path) -> None:
    for f in ("route.yaml", "grpc.yaml", "grpc-policy.yaml", "websocket.yaml"):
        (tmp_path / f).write_text((EXAMPLE / f).read_text())
    plan = _plan(tmp_path, with_secret=True)
    res = r.build(list(plan.http), "/tmp/a.log", list(plan.upstreams), plan.gateways, plan.secrets)
    for type_url, items in res.items():
        for name, msg in items.items():
            for needed, names in r.dependencies(type_url, msg).items():
                assert names <= set(res[needed]), (type_url, name, needed, names - set(res[needed]))
