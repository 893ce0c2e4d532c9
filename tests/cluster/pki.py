"""Keys, certificates and kubeconfigs of the one-node cluster, made at start (never committed).

The helpers and conventions of ``tests/kube/pki.py`` (ECDSA P-256, one day valid), extended:
``make_pki`` there keeps its CA key in memory, and a cluster needs more certificates from the
same CA, so the CA is made here and kept in the state directory (removed at stop). One client
certificate per component, named as the API server's bootstrap RBAC (and Node authorizer)
expects, so every component runs with its own, least, rights:

  admin                   CN=webb-admin, O=system:masters          kubectl, the tests
  node                    CN=system:node:<node>, O=system:nodes    kubelet (Node authorizer, NodeRestriction)
  controller-manager      CN=system:kube-controller-manager        kube-controller-manager
  scheduler               CN=system:kube-scheduler                 kube-scheduler
  apiserver-kubelet       CN=kube-apiserver-kubelet-client,        the API server towards the kubelet
                          O=system:masters                         (logs, exec)

The API server's serving certificate names 127.0.0.1, the node's address (the API server
listens there, for pods) and the first address of the service range (the ``kubernetes``
Service).
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.kube import pki as base

CLIENTS = {  # file stem: (common name, organization); "{node}" is the node's name
    "admin": ("webb-admin", "system:masters"),
    "node": ("system:node:{node}", "system:nodes"),
    "controller-manager": ("system:kube-controller-manager", None),
    "scheduler": ("system:kube-scheduler", None),
    "apiserver-kubelet": ("kube-apiserver-kubelet-client", "system:masters"),
}


@dataclass(frozen=True)
class ClusterPki:
    directory: Path
    base: base.Pki  # ca.crt, serving.crt/key, admin.crt/key, sa.key/pub: the fields tests/kube's fixture uses

    def cert(self, client: str) -> Path:
        return self.directory / f"{client}.crt"

    def key(self, client: str) -> Path:
        return self.directory / f"{client}.key"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"


def make_cluster_pki(directory: Path, node: str, serving_ips: list[str]) -> ClusterPki:
    """A CA (key kept), the API server's serving certificate, one client certificate per component,
    and the service-account key pair."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    ca_key = base._key()
    ca_name = base._name("webb-cluster-ca")
    ca = (base._builder(ca_name, ca_name, ca_key)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    p = ClusterPki(directory, base.Pki(*(directory / n for n in (
        "ca.crt", "serving.crt", "serving.key", "admin.crt", "admin.key", "sa.key", "sa.pub"))))
    base._write_cert(p.base.ca_cert, ca)
    base._write_key(p.ca_key, ca_key)

    ips = dict.fromkeys(["127.0.0.1", *serving_ips])  # ordered, no duplicates
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in base.SERVING_DNS]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
    serving, serving_key = base._leaf("kube-apiserver", None, ExtendedKeyUsageOID.SERVER_AUTH, ca, ca_key, sans)
    base._write_cert(p.base.serving_cert, serving)
    base._write_key(p.base.serving_key, serving_key)

    for stem, (cn, org) in CLIENTS.items():
        cert, key = base._leaf(cn.format(node=node), org, ExtendedKeyUsageOID.CLIENT_AUTH, ca, ca_key)
        base._write_cert(p.cert(stem), cert)
        base._write_key(p.key(stem), key)

    sa_key = base._key()
    base._write_key(p.base.sa_key, sa_key)
    p.base.sa_pub.write_bytes(sa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                               serialization.PublicFormat.SubjectPublicKeyInfo))
    return p


def write_kubeconfig(path: Path, url: str, pki: ClusterPki, client: str) -> None:
    """A self-contained kubeconfig (certificates embedded) for one client of ``CLIENTS``."""
    def b64(f: Path) -> str:
        return base64.b64encode(f.read_bytes()).decode()

    config: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Config", "current-context": "webb-cluster",
        "clusters": [{"name": "webb-cluster", "cluster": {"server": url, "certificate-authority-data": b64(pki.base.ca_cert)}}],
        "users": [{"name": client, "user": {"client-certificate-data": b64(pki.cert(client)),
                                            "client-key-data": b64(pki.key(client))}}],
        "contexts": [{"name": "webb-cluster", "context": {"cluster": "webb-cluster", "user": client}}],
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)


def issue_node_client(pki: ClusterPki, directory: Path, node: str) -> ClusterPki:
    """Another node's kubelet certificate (CN=system:node:<node>) from the cluster's CA, in ``directory``:
    a ClusterPki there whose "node" client is that kubelet (the CA and the other files stay the cluster's)."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    ca = x509.load_pem_x509_certificate(pki.base.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    cn, org = CLIENTS["node"]
    cert, key = base._leaf(cn.format(node=node), org, ExtendedKeyUsageOID.CLIENT_AUTH, ca, ca_key)
    out = ClusterPki(directory, pki.base)
    base._write_cert(out.cert("node"), cert)
    base._write_key(out.key("node"), key)
    return out
