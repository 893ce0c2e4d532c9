"""Workload identities of one node: issued on first use, renewed at 2/3 of their life, kept
on disk (keys 0600) so a restarted agent keeps them, and the TLS contexts built from them.

A renewal swaps the context used by *new* handshakes; established connections keep their
negotiated keys (a TLS session does not depend on the certificate after the handshake), so
rotation drops nothing.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

from certs.ca import (
    DEFAULT_TTL_S,
    CertificateAuthority,
    WorkloadCert,
    parse_spiffe_id,
    peer_spiffe_id,
    private_dir,
    spiffe_id,
    write_private,
)

INDEX = "identities.json"


def tls13_context(server_side: bool, bundle: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # the peer is checked by SPIFFE ID, not by host name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(bundle))
    if server_side:
        ctx.num_tickets = 0  # no post-handshake records: kTLS starts at sequence 0 both ways
    return ctx


class IdentityStore:
    def __init__(self, ca: CertificateAuthority, directory: Path, ttl_s: float = DEFAULT_TTL_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.ca, self.dir, self.ttl_s, self.clock = ca, directory, ttl_s, clock
        private_dir(self.dir)
        self.bundle = self.dir / "bundle.pem"
        self.bundle.write_bytes(ca.bundle_pem())
        self._lock = threading.Lock()
        self._certs: dict[tuple[str, str], WorkloadCert] = {}
        self._contexts: dict[tuple[str, str, bool], tuple[int, ssl.SSLContext]] = {}
        self.renewals = 0
        self._load()

    # ---- persistence ----
    def _paths(self, ns: str, sa: str) -> tuple[Path, Path]:
        d = self.dir / ns / sa
        return d / "cert.pem", d / "key.pem"

    def _load(self) -> None:
        index = self.dir / INDEX
        if not index.exists():
            return
        for entry in json.loads(index.read_text()):
            ns, sa = entry["namespace"], entry["service_account"]
            crt, key = self._paths(ns, sa)
            if not (crt.exists() and key.exists()) or entry.get("bundle_digest") != self._bundle_digest():
                continue  # another CA's certificate: issued again on first use
            self._certs[(ns, sa)] = WorkloadCert(entry["spiffe_id"], crt.read_bytes(), key.read_bytes(),
                                                 int(entry["serial"], 16), entry["not_before"], entry["not_after"])

    def _bundle_digest(self) -> str:
        return hashlib.sha256(self.ca.bundle_pem()).hexdigest()[:16]

    def _save(self, ns: str, sa: str, cert: WorkloadCert) -> None:
        crt, key = self._paths(ns, sa)
        private_dir(crt.parent)
        write_private(key, cert.key_pem)
        tmp = crt.with_suffix(".tmp")
        tmp.write_bytes(cert.chain_pem)
        tmp.replace(crt)
        self._write_index()

    def _write_index(self) -> None:
        rows = [{"namespace": ns, "service_account": sa, "spiffe_id": c.spiffe_id, "serial": f"{c.serial:x}",
                 "not_before": c.not_before, "not_after": c.not_after, "renew_at": c.renew_at,
                 "bundle_digest": self._bundle_digest()}
                for (ns, sa), c in sorted(self._certs.items())]
        tmp = self.dir / (INDEX + ".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(self.dir / INDEX)

    # ---- identities ----
    def get(self, namespace: str, service_account: str) -> WorkloadCert:
        """The current certificate of an identity: issued when missing, renewed when due."""
        with self._lock:
            cert = self._certs.get((namespace, service_account))
            if cert is None or self.clock() >= cert.renew_at:
                cert = self._issue(namespace, service_account)
            return cert

    def _issue(self, ns: str, sa: str) -> WorkloadCert:
        renewing = (ns, sa) in self._certs
        cert = self.ca.issue(ns, sa, self.ttl_s, now=self.clock())
        self._certs[(ns, sa)] = cert
        self._save(ns, sa, cert)
        self.renewals += renewing
        return cert

    def rotate(self) -> list[str]:
        """Renew every identity at or past 2/3 of its life; the SPIFFE IDs renewed."""
        with self._lock:
            due = [k for k, c in self._certs.items() if self.clock() >= c.renew_at]
            return [self._issue(ns, sa).spiffe_id for ns, sa in due]

    def identities(self) -> list[WorkloadCert]:
        with self._lock:
            return [c for _, c in sorted(self._certs.items())]

    def forget(self, keep: set[tuple[str, str]]) -> None:
        """Drop identities no workload of this node uses any more."""
        with self._lock:
            for k in set(self._certs) - keep:
                del self._certs[k]
                for p in self._paths(*k):
                    p.unlink(missing_ok=True)
            self._write_index()

    # ---- what a TLS peer needs (tunnel.session.Identities: the tunnel takes this store as one) ----
    def spiffe_id(self, namespace: str, service_account: str) -> str:
        """The SPIFFE ID of an identity of this store's trust domain."""
        return spiffe_id(self.ca.trust_domain, namespace, service_account)

    def peer_id(self, der: bytes) -> str:
        """The SPIFFE ID of a peer's certificate (DER): ValueError when it has none, several, a
        malformed one, or one outside this trust domain."""
        peer = peer_spiffe_id(der)
        if parse_spiffe_id(peer)[0] != self.ca.trust_domain:
            raise ValueError(f"peer {peer} is outside trust domain {self.ca.trust_domain}")
        return peer

    def server_context(self) -> ssl.SSLContext:
        """A TLS 1.3 server context presenting no certificate (an SNI callback sets the
        identity's context), requiring a client certificate verified against the bundle."""
        return tls13_context(server_side=True, bundle=self.bundle)

    def context(self, namespace: str, service_account: str, server_side: bool) -> ssl.SSLContext:
        """A TLS 1.3 context presenting the identity's current certificate (rebuilt after renewal)."""
        cert = self.get(namespace, service_account)
        key = (namespace, service_account, server_side)
        with self._lock:
            have = self._contexts.get(key)
            if have is not None and have[0] == cert.serial:
                return have[1]
            ctx = tls13_context(server_side, self.bundle)
            crt, keyfile = self._paths(namespace, service_account)
            ctx.load_cert_chain(str(crt), str(keyfile))
            self._contexts[key] = (cert.serial, ctx)
            return ctx


def read_index(directory: Path) -> list[dict[str, object]]:
    """What `webb certs` lists: the identities a node holds (no key material)."""
    index = directory / INDEX
    return list(json.loads(index.read_text())) if index.exists() else []

