"""Services without a selector are balanced over their EndpointSlices (default/kubernetes: CoreDNS needs it)."""

from __future__ import annotations

import pytest

from datapath.types import Backend
from mesh.manifests import ManifestError, parse_object
from mesh.model import ClusterState, EndpointSlice, Service
from mesh.plan.node import NodeSpec, plan_node


def _slice(**over: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "kubernetes", "namespace": "default", "labels": {"kubernetes.io/service-name": "kubernetes"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.120.0.1"], "conditions": {"ready": True}},
                      {"addresses": ["10.120.0.9"], "conditions": {"ready": False}}],
        "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}],
    }
    doc.update(over)
    return doc


def test_a_selectorless_service_takes_the_ready_addresses_of_its_slices() -> None:
    sl = parse_object(_slice())
    assert isinstance(sl, EndpointSlice) and sl.addresses == ("10.120.0.1",) and sl.ports == (("https", 6443, "TCP"),)
    svc = parse_object({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kubernetes", "namespace": "default"},
                        "spec": {"clusterIP": "10.122.0.1", "ports": [{"name": "https", "port": 443, "targetPort": 6443}]}})
    assert isinstance(svc, Service) and svc.selector == ()
    plan = plan_node(ClusterState(services=(svc,), endpoint_slices=(sl,)), NodeSpec("kn1", "10.120.0.1"))
    (entry,) = plan.services
    assert (entry.vip, entry.port, entry.backends) == ("10.122.0.1", 443, (Backend("10.120.0.1", 6443),))
    # no slice (yet): the VIP answers "refused", like a Service with no ready pod
    (empty,) = plan_node(ClusterState(services=(svc,)), NodeSpec("kn1", "10.120.0.1")).services
    assert empty.backends == ()


def test_a_bad_slice_is_refused_naming_the_field() -> None:
    with pytest.raises(ManifestError, match=r"endpoints\[0\]\.addresses\[0\]: fd00::1 is not an IPv4 address"):
        parse_object(_slice(endpoints=[{"addresses": ["fd00::1"]}]))
    with pytest.raises(ManifestError, match="addressType: 'IPv5'"):
        parse_object(_slice(addressType="IPv5"))
    assert parse_object(_slice(addressType="FQDN", endpoints=[])) is None  # names, not addresses: not balanced here
