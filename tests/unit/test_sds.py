"""SDS builders for workload identity: the certificate Secret named by the SPIFFE ID, the trust
bundle Secret, the mTLS cluster naming both, the snapshot's consistency over them, no key in
any repr; and the delta stream sending a Secret subscribed in a later request."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.service.discovery.v3 import discovery_pb2

from certs.ca import CertificateAuthority, WorkloadCert
from xds import model as xm
from xds import resources as r
from xds.cache import Snapshot, SnapshotCache
from xds.server import DeltaStream

TD = "webb.test"
PEER = f"spiffe://{TD}/ns/default/sa/deathstar"


@pytest.fixture(scope="module")
def issued(tmp_path_factory: pytest.TempPathFactory) -> tuple[CertificateAuthority, WorkloadCert]:
    ca = CertificateAuthority.load_or_create(Path(tmp_path_factory.mktemp("ca")), TD)
    return ca, ca.issue("default", "tiefighter")


def _up(cert: WorkloadCert, name: str = "default/deathstar:443") -> xm.Upstream:
    return xm.Upstream(name, (("10.244.1.5", 8443),), tls=xm.UpstreamMtls(cert.spiffe_id, TD, (PEER,), sni="default.deathstar"))


def test_workload_and_bundle_secrets(issued: tuple[CertificateAuthority, WorkloadCert]) -> None:
    ca, cert = issued
    s = r.secret(xm.workload_secret(cert))
    assert s.name == cert.spiffe_id == f"spiffe://{TD}/ns/default/sa/tiefighter"
    assert s.tls_certificate.certificate_chain.inline_bytes == cert.chain_pem
    assert s.tls_certificate.private_key.inline_bytes == cert.key_pem
    b = r.bundle_secret(xm.TrustBundle(TD, ca.bundle_pem()))
    assert b.name == f"spiffe://{TD}" == xm.bundle_name(TD)
    assert b.validation_context.trusted_ca.inline_bytes == ca.bundle_pem()


def test_mtls_cluster_names_both_secrets_by_sds_and_matches_the_peer(issued: tuple[CertificateAuthority, WorkloadCert]) -> None:
    _, cert = issued
    c = r.cluster(_up(cert))
    assert c.transport_socket.name == "envoy.transport_sockets.tls"
    ctx = tls_pb2.UpstreamTlsContext()
    assert c.transport_socket.typed_config.Unpack(ctx)
    common = ctx.common_tls_context
    assert ctx.sni == "default.deathstar"
    assert common.tls_params.tls_minimum_protocol_version == common_pb2.TlsParameters.TLSv1_3
    (sds,) = common.tls_certificate_sds_secret_configs
    assert sds.name == cert.spiffe_id and sds.sds_config.HasField("ads")
    combined = common.combined_validation_context
    assert combined.validation_context_sds_secret_config.name == f"spiffe://{TD}"
    assert combined.validation_context_sds_secret_config.sds_config.HasField("ads")
    (san,) = combined.default_validation_context.match_typed_subject_alt_names
    assert (san.san_type, san.matcher.exact) == (common_pb2.SubjectAltNameMatcher.URI, PEER)
    assert r.references(r.CLUSTER, c) == {r.ENDPOINT: {"default/deathstar:443"}, r.SECRET: {cert.spiffe_id, f"spiffe://{TD}"}}
    assert not r.cluster(xm.Upstream("plain", ())).HasField("transport_socket")


def test_snapshot_needs_the_endpoints_and_both_secrets(issued: tuple[CertificateAuthority, WorkloadCert]) -> None:
    ca, cert = issued
    bundle = xm.TrustBundle(TD, ca.bundle_pem())
    full = Snapshot.of(r.build([], "/dev/null", [_up(cert)], secrets=(xm.workload_secret(cert),), bundles=(bundle,)))
    assert not full.problems()
    no_bundle = Snapshot.of(r.build([], "/dev/null", [_up(cert)], secrets=(xm.workload_secret(cert),)))
    assert no_bundle.problems() == [f"Cluster default/deathstar:443 needs Secret spiffe://{TD}"]
    # incremental: the cluster's endpoints gone too
    worse = no_bundle.updated({r.ENDPOINT: {"default/deathstar:443": None}})
    assert sorted(worse.problems()) == ["Cluster default/deathstar:443 needs ClusterLoadAssignment default/deathstar:443",
                                        f"Cluster default/deathstar:443 needs Secret spiffe://{TD}"]
    fixed = worse.updated({r.ENDPOINT: {"default/deathstar:443": r.endpoints(_up(cert))},
                           r.SECRET: {bundle.name: r.bundle_secret(bundle)}})
    assert not fixed.problems() and fixed.versions == full.versions


def test_renewal_changes_only_the_secret(issued: tuple[CertificateAuthority, WorkloadCert]) -> None:
    ca, cert = issued
    bundles = (xm.TrustBundle(TD, ca.bundle_pem()),)
    renewed = ca.issue("default", "tiefighter")
    a = Snapshot.of(r.build([], "/dev/null", [_up(cert)], secrets=(xm.workload_secret(cert),), bundles=bundles))
    b = Snapshot.of(r.build([], "/dev/null", [_up(renewed)], secrets=(xm.workload_secret(renewed),), bundles=bundles))
    assert [t for t in r.TYPE_ORDER if a.versions[t] != b.versions[t]] == [r.SECRET]
    assert a.resource_versions[r.SECRET][f"spiffe://{TD}"] == b.resource_versions[r.SECRET][f"spiffe://{TD}"]


def test_no_key_in_any_repr(issued: tuple[CertificateAuthority, WorkloadCert]) -> None:
    ca, cert = issued
    key_line = cert.key_pem.decode().splitlines()[1]
    ts = xm.workload_secret(cert)
    snap = Snapshot.of(r.build([], "/dev/null", [_up(cert)], secrets=(ts,), bundles=(xm.TrustBundle(TD, ca.bundle_pem()),)))
    for text in (repr(cert), repr(ts), repr(snap), repr(snap.entries[r.SECRET][cert.spiffe_id]), str(snap.problems())):
        assert "PRIVATE KEY" not in text and key_line not in text, text[:200]


def test_delta_stream_sends_a_secret_subscribed_in_a_later_request(issued: tuple[CertificateAuthority, WorkloadCert]) -> None:
    """Envoy subscribes a cluster's certificate and its validation context from two SDS
    providers, in two requests; the second name must be sent too (it was not: the stream took
    "nothing known" for "at the parent snapshot" and diffed only the changed names)."""
    ca, cert = issued
    cache = SnapshotCache()
    bundle = xm.TrustBundle(TD, ca.bundle_pem())
    cache.set_snapshot("n", Snapshot.of(r.build([], "/dev/null", [_up(cert)], secrets=(xm.workload_secret(cert),),
                                                bundles=(bundle,))))
    stream = DeltaStream(cache, Counter())
    sent: list[discovery_pb2.DeltaDiscoveryResponse] = []
    node = {"node": {"id": "n"}, "type_url": r.SECRET}
    stream.on_request(discovery_pb2.DeltaDiscoveryRequest(**node, resource_names_subscribe=[cert.spiffe_id]))
    sent.append(stream.out.get_nowait())
    stream.on_request(discovery_pb2.DeltaDiscoveryRequest(**node, response_nonce=sent[0].nonce))
    stream.on_request(discovery_pb2.DeltaDiscoveryRequest(**node, resource_names_subscribe=[bundle.name]))
    sent.append(stream.out.get_nowait())
    assert [[res.name for res in s.resources] for s in sent] == [[cert.spiffe_id], [bundle.name]]
