"""HTTP/2 to backends when the Service port says so; AUTO codec and WebSocket upgrades downstream."""

from __future__ import annotations

import pytest

from mesh.manifests import parse_object
from mesh.model import Service, ServicePort
from xds import model as xm
from xds import resources as r

OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


@pytest.mark.parametrize(("name", "app_protocol", "h2"), [
    ("grpc", "", True), ("grpc-web", "", True), ("http2", "", True), ("h2c-api", "", True),
    ("http", "", False), ("", "", False), ("grpcish", "", False),
    ("http", "kubernetes.io/h2c", True), ("http", "grpc", True), ("grpc", "http", False),
])
def test_http2_from_port_name_or_app_protocol(name: str, app_protocol: str, h2: bool) -> None:
    assert ServicePort(80, 80, name=name, app_protocol=app_protocol).http2 is h2


def test_app_protocol_is_parsed() -> None:
    svc = parse_object({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "g"},
                        "spec": {"selector": {"app": "g"}, "ports": [{"port": 80, "appProtocol": "kubernetes.io/h2c"}]}})
    assert isinstance(svc, Service) and svc.ports[0].http2


def test_upstream_http2_cluster_and_downstream_codec() -> None:
    assert OPTIONS in r.cluster(xm.Upstream("ns/g:50051", (), http2=True)).typed_extension_protocol_options
    assert OPTIONS not in r.cluster(xm.Upstream("ns/web:80", ())).typed_extension_protocol_options
    chain = r.l7_chain(xm.HttpService("ns/web:80", "10.244.0.1", 15001, (), None), "/tmp/a.log")
    m = r.hcm.HttpConnectionManager()
    chain.filters[0].typed_config.Unpack(m)
    assert m.codec_type == r.hcm.HttpConnectionManager.AUTO
    assert [u.upgrade_type for u in m.upgrade_configs] == ["websocket"]
