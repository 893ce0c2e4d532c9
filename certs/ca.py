"""The mesh CA: an own root, or an intermediate the user supplies, signing SPIFFE X.509
workload certificates ``spiffe://<trust-domain>/ns/<ns>/sa/<sa>``.

Files in the CA directory (private keys 0600, refused when group/world readable):
  ca.crt, ca.key   the signing certificate and key (a self-signed root made on first use,
                   or the user's intermediate)
  root.crt         optional: the root(s) above a user-supplied intermediate (the trust bundle)
"""

from __future__ import annotations

import datetime
import fcntl
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.spiffe import parse_spiffe_id, spiffe_id

__all__ = ["parse_spiffe_id", "spiffe_id"]  # the SPIFFE IDs of certs.spiffe, with the certificates

DEFAULT_TTL_S = 24 * 3600.0
RENEW_FRACTION = 2 / 3
SKEW_S = 60.0  # not_before this much in the past: peers' clocks differ a little
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")


def peer_spiffe_id(der: bytes) -> str:
    """The one SPIFFE URI SAN of a certificate (DER); ValueError when there is none or several."""
    cert = x509.load_der_x509_certificate(der)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ValueError("peer certificate has no subjectAltName: not a workload certificate") from None
    uris = [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]
    if len(uris) != 1:
        raise ValueError(f"peer certificate has {len(uris)} SPIFFE URI SANs, expected exactly 1")
    return uris[0]


@dataclass(frozen=True)
class WorkloadCert:
    spiffe_id: str
    chain_pem: bytes  # the leaf, then any intermediate (never the root)
    key_pem: bytes
    serial: int
    not_before: float  # epoch seconds
    not_after: float

    @property
    def renew_at(self) -> float:
        """Renewed at 2/3 of its life: a third of it is left to ride out a CA outage."""
        return self.not_before + RENEW_FRACTION * (self.not_after - self.not_before)

    def __repr__(self) -> str:  # never the key
        return f"WorkloadCert({self.spiffe_id!r}, serial={self.serial:x}, not_after={self.not_after:.0f})"


def write_private(path: Path, data: bytes) -> None:
    """``data`` to ``path``, mode 0600 whatever the umask, replaced atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # another process may write the same file
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)  # whatever the umask
    tmp.replace(path)


def private_dir(path: Path) -> None:
    """``path`` and every directory made on the way to it: 0700 whatever the umask (mkdir's mode
    is masked, and ``parents=True`` gives the intermediate ones the umask's mode)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    for p in (path, *missing):
        os.chmod(p, 0o700)


def check_private(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(f"CA key {path} has mode {mode:04o}: a private key must be 0600 "
                              f"(fix: chmod 600 {path})")


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class CertificateAuthority:
    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, roots: list[x509.Certificate],
                 trust_domain: str) -> None:
        if not _TRUST_DOMAIN.match(trust_domain):
            raise ValueError(f"trust domain {trust_domain!r}: lower-case letters, digits, '.', '-', '_' only")
        self.cert, self.key, self.roots, self.trust_domain = cert, key, roots, trust_domain
        self.intermediate = cert.issuer != cert.subject

    @classmethod
    def load_or_create(cls, directory: Path, trust_domain: str = "cluster.local") -> CertificateAuthority:
        """Load the CA of ``directory``, or make its own root there first. Several agents may
        start at once on one directory: the first makes the root, the others wait and load it."""
        private_dir(directory)
        fd = os.open(directory / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return cls._load_or_create(directory, trust_domain)
        finally:
            os.close(fd)  # releases the lock

    @classmethod
    def _load_or_create(cls, directory: Path, trust_domain: str) -> CertificateAuthority:
        crt, key_file, root_file = directory / "ca.crt", directory / "ca.key", directory / "root.crt"
        if crt.exists() != key_file.exists():
            raise FileNotFoundError(f"CA in {directory}: ca.crt and ca.key go together; one of them is missing")
        if not crt.exists():
            return cls._create(directory, trust_domain)
        check_private(key_file)
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"CA key {key_file}: an EC key is expected")
        if not isinstance(cert.public_key(), ec.EllipticCurvePublicKey) or \
                cert.public_key().public_bytes(*_SPKI) != key.public_key().public_bytes(*_SPKI):
            raise ValueError(f"CA in {directory}: ca.key is not the key of ca.crt")
        if cert.issuer != cert.subject and not root_file.exists():
            raise FileNotFoundError(f"CA in {directory}: ca.crt is an intermediate; put its root(s) in {root_file}")
        roots = x509.load_pem_x509_certificates(root_file.read_bytes()) if root_file.exists() else [cert]
        return cls(cert, key, roots, trust_domain)

    @classmethod
    def _create(cls, directory: Path, trust_domain: str) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "webb"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"webb root CA {trust_domain}")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=3650))
                .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        write_private(directory / "ca.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        tmp = directory / f".ca.crt.{os.getpid()}.tmp"
        tmp.write_bytes(_pem(cert))
        tmp.replace(directory / "ca.crt")
        return cls(cert, key, [cert], trust_domain)

    def bundle_pem(self) -> bytes:
        """The trust bundle: the root(s) every peer verifies against."""
        return b"".join(_pem(r) for r in self.roots)

    def issue(self, namespace: str, service_account: str, ttl_s: float = DEFAULT_TTL_S,
              now: float | None = None) -> WorkloadCert:
        for what, v in (("namespace", namespace), ("service account", service_account)):
            if not _LABEL.match(v) or len(v) > 253:
                raise ValueError(f"issue certificate: {what} {v!r} is not a DNS label")
        if ttl_s < 60:
            raise ValueError(f"issue certificate: ttl {ttl_s:.0f} s is below the minimum of 60 s")
        sid = spiffe_id(self.trust_domain, namespace, service_account)
        key = ec.generate_private_key(ec.SECP256R1())
        t_issue = datetime.datetime.fromtimestamp(time.time() if now is None else now, datetime.UTC)
        t0, t1 = t_issue - datetime.timedelta(seconds=SKEW_S), t_issue + datetime.timedelta(seconds=ttl_s)
        not_after = min(t1, self.cert.not_valid_after_utc)  # never outlive the signer
        serial = x509.random_serial_number()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "webb")]))
                .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(serial)
                .not_valid_before(t0).not_valid_after(not_after)
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(sid)]), critical=True)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
                .sign(self.key, hashes.SHA256()))
        chain = _pem(cert) + (_pem(self.cert) if self.intermediate else b"")
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return WorkloadCert(sid, chain, key_pem, serial, t0.timestamp(), not_after.timestamp())
