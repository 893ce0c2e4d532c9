"""Workload certificates by SDS to the real Envoy: an mTLS cluster whose certificate and trust
bundle Envoy fetches over ADS, the peer checked by SPIFFE ID; rotation is one SDS update."""

from __future__ import annotations

import base64
import http.server
import json
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from certs.ca import CertificateAuthority, WorkloadCert, peer_spiffe_id
from certs.store import IdentityStore
from xds import model as xm
from xds import resources as r
from xds.cache import Snapshot

from .conftest import NODE, Plane, call, free_port

pytestmark = pytest.mark.envoy
TRUST_DOMAIN = "webb.test"
SERVER = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/deathstar"
CLIENT = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/tiefighter"


class _PeerEcho(http.server.BaseHTTPRequestHandler):
    """Answers with the SPIFFE ID of the client certificate the TLS handshake verified."""

    protocol_version = "HTTP/1.1"
    served: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        assert isinstance(self.connection, ssl.SSLSocket)
        self.served.append(self.path)
        body = (peer_spiffe_id(self.connection.getpeercert(binary_form=True) or b"") + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Mesh:
    ca: CertificateAuthority
    store: IdentityStore
    clock: list[float]
    backend: int  # port of the TLS 1.3 backend presenting SERVER and requiring a client certificate


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", TRUST_DOMAIN)
    clock = [time.time()]  # the store's clock: renewal happens when the test moves it
    store = IdentityStore(ca, tmp_path / "certs", clock=lambda: clock[0])
    _PeerEcho.served = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _PeerEcho)
    srv.socket = store.context("default", "deathstar", server_side=True).wrap_socket(srv.socket, server_side=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield Mesh(ca, store, clock, srv.server_address[1])
    finally:
        srv.shutdown()
        srv.server_close()


def _snapshot(m: Mesh, listen: int, cert: WorkloadCert, peer: str = SERVER) -> Snapshot:
    """A plain listener routing to a cluster that speaks mTLS to the backend as CLIENT."""
    svc = xm.HttpService("default/deathstar:443", "127.0.0.1", listen, (), None)
    up = xm.Upstream("default/deathstar:443", (("127.0.0.1", m.backend),),
                    tls=xm.UpstreamMtls(CLIENT, TRUST_DOMAIN, (peer,), sni="default.deathstar"))
    return Snapshot.of(r.build([svc], "/dev/null", [up], secrets=(xm.workload_secret(cert),),
                               bundles=(xm.TrustBundle(TRUST_DOMAIN, m.ca.bundle_pem()),)))


def _active_secrets(plane: Plane) -> dict[str, dict[str, Any]]:
    dump = json.loads(plane.envoy.admin("/config_dump?resource=dynamic_active_secrets"))
    return {c["name"]: c for c in dump.get("configs", [])}


def _dumped_serial(plane: Plane, name: str) -> int:
    tls = _active_secrets(plane)[name]["secret"]["tls_certificate"]
    chain = base64.b64decode(tls["certificate_chain"]["inline_bytes"])
    return int(x509.load_pem_x509_certificates(chain)[0].serial_number)


def _serials_in_use(plane: Plane) -> set[int]:
    """Serials of the certificates Envoy's TLS contexts hold (admin /certs), both ends."""
    out = set()
    for c in json.loads(plane.envoy.admin("/certs")).get("certificates", []):
        out |= {int(d["serial_number"], 16) for d in c.get("cert_chain", []) + c.get("ca_cert", [])}
    return out


def test_mtls_cluster_certificates_by_sds_and_rotation(plane: Plane, mesh: Mesh, tmp_path: Path) -> None:
    cache, listen = plane.cache, free_port()
    first = mesh.store.get("default", "tiefighter")
    snap = _snapshot(mesh, listen, first)
    assert not snap.problems()
    cache.set_snapshot(NODE, snap)
    assert cache.wait_acked(NODE, snap, 10), cache.status(NODE)

    # Envoy fetched both secrets over ADS, uses them, and the backend saw CLIENT
    active = _active_secrets(plane)
    assert set(active) == {CLIENT, f"spiffe://{TRUST_DOMAIN}"}
    assert _dumped_serial(plane, CLIENT) == first.serial
    assert base64.b64decode(active[CLIENT]["secret"]["tls_certificate"]["private_key"]["inline_bytes"]) == b"[redacted]"
    assert "trusted_ca" in active[f"spiffe://{TRUST_DOMAIN}"]["secret"]["validation_context"]
    assert call(listen, "GET", "/") == (200, CLIENT + "\n")
    assert first.serial in _serials_in_use(plane)

    # renewal at 2/3 of the life: the same name, a new certificate, one SDS update
    mesh.clock[0] = first.renew_at + 1
    assert CLIENT in mesh.store.rotate()
    second = mesh.store.get("default", "tiefighter")
    assert second.serial != first.serial
    renewed = _snapshot(mesh, listen, second)
    assert renewed.versions[r.CLUSTER] == snap.versions[r.CLUSTER]  # the cluster itself did not change
    assert renewed.versions[r.SECRET] != snap.versions[r.SECRET]
    cache.set_snapshot(NODE, renewed)
    assert cache.wait_acked(NODE, renewed, 10), cache.status(NODE)
    assert _dumped_serial(plane, CLIENT) == second.serial
    assert call(listen, "GET", "/") == (200, CLIENT + "\n")
    in_use = _serials_in_use(plane)
    assert second.serial in in_use and first.serial not in in_use

    # no key in what Envoy or this process wrote or printed
    key_body = first.key_pem.split(b"\n")[1]
    assert key_body not in plane.envoy.log_path.read_bytes()
    assert b"PRIVATE KEY" not in repr(renewed).encode() and b"PRIVATE KEY" not in repr(second).encode()


def test_peer_with_another_spiffe_id_is_refused(plane: Plane, mesh: Mesh) -> None:
    listen = free_port()
    snap = _snapshot(mesh, listen, mesh.store.get("default", "tiefighter"), peer=f"spiffe://{TRUST_DOMAIN}/ns/default/sa/xwing")
    plane.cache.set_snapshot(NODE, snap)
    assert plane.cache.wait_acked(NODE, snap, 10)
    # the backend's certificate chains to the bundle, but names another identity: Envoy hangs up
    status, body = call(listen, "GET", "/refused")
    assert (status, "connection failure" in body) == (503, True), body
    assert _PeerEcho.served == []
