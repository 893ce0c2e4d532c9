"""certs.ca and certs.store: SPIFFE workload certificates (URI SAN, 24 h, renewed at 2/3), key
files 0600 (a readable CA key refused with the fix), a user-supplied intermediate (made here,
at test time) verified up to its root, the store across a restart, rotate() renews only what is due;
the store as the tunnel's identities, and certs and tunnel importing nothing of each other."""

from __future__ import annotations

import ast
import datetime
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.ca import DEFAULT_TTL_S, SKEW_S, CertificateAuthority, peer_spiffe_id, spiffe_id, write_private
from certs.store import IdentityStore, read_index
from tunnel.session import Identities

ROOT = Path(__file__).resolve().parents[2]

TD = "webb.test"
NOW = 1_900_000_000.0  # a fixed issue time: lifetimes are compared exactly


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """The worst umask: files would be world-writable unless the code sets their mode itself."""
    old = os.umask(0)
    yield
    os.umask(old)


def _ca_cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
             issuer_key: ec.EllipticCurvePrivateKey, path_length: int | None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer.subject if issuer else name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
         .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if issuer is not None:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_intermediate(directory: Path) -> Path:
    """A user's own PKI, made now: a root, and an intermediate it signed for the mesh, as the
    docs ask for them — ca.crt / ca.key (0600) the intermediate, root.crt the root."""
    root_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = _ca_cert("corp root", root_key, None, root_key, None)
    inter = _ca_cert("corp mesh intermediate", key, root, root_key, 0)
    directory.mkdir(parents=True, mode=0o700)
    (directory / "ca.crt").write_bytes(inter.public_bytes(serialization.Encoding.PEM))
    (directory / "root.crt").write_bytes(root.public_bytes(serialization.Encoding.PEM))
    fd = os.open(directory / "ca.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return directory


def _mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


def test_workload_certificate_has_exactly_the_spiffe_uri_san(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", TD)
    cert = ca.issue("shop", "web", now=NOW)
    assert cert.spiffe_id == spiffe_id(TD, "shop", "web") == "spiffe://webb.test/ns/shop/sa/web"
    leaf = x509.load_pem_x509_certificates(cert.chain_pem)[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and list(san.value) == [x509.UniformResourceIdentifier("spiffe://webb.test/ns/shop/sa/web")]
    assert peer_spiffe_id(leaf.public_bytes(serialization.Encoding.DER)) == cert.spiffe_id
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert set(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.serial_number == cert.serial
    with pytest.raises(ValueError, match="not a DNS label"):
        ca.issue("Shop", "web")


def test_default_ttl_24h_renewed_at_two_thirds(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", TD)
    cert = ca.issue("shop", "web", now=NOW)
    assert DEFAULT_TTL_S == 24 * 3600
    assert cert.not_after - NOW == DEFAULT_TTL_S and NOW - cert.not_before == SKEW_S
    leaf = x509.load_pem_x509_certificates(cert.chain_pem)[0]
    assert leaf.not_valid_after_utc.timestamp() == cert.not_after
    assert cert.renew_at == pytest.approx(cert.not_before + 2 / 3 * (cert.not_after - cert.not_before))
    assert "PRIVATE KEY" not in repr(cert) and cert.key_pem.decode().splitlines()[1] not in repr(cert)


@pytest.mark.usefixtures("umask_zero")
def test_key_files_are_0600(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", TD)
    assert _mode(tmp_path / "ca" / "ca.key") == 0o600
    store = IdentityStore(ca, tmp_path / "certs", clock=lambda: NOW)
    store.get("shop", "web")
    assert _mode(tmp_path / "certs" / "shop" / "web" / "key.pem") == 0o600
    assert _mode(tmp_path / "certs" / "shop" / "web") == _mode(tmp_path / "certs") == 0o700


@pytest.mark.usefixtures("umask_zero")
def test_namespace_directories_are_private_whatever_the_umask(tmp_path: Path) -> None:
    store = IdentityStore(CertificateAuthority.load_or_create(tmp_path / "ca", TD), tmp_path / "certs", clock=lambda: NOW)
    store.get("shop", "web")
    assert _mode(tmp_path / "certs" / "shop") & 0o077 == 0


def test_readable_ca_key_refused_with_the_fix(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path / "ca", TD)
    key = tmp_path / "ca" / "ca.key"
    key.chmod(0o644)
    with pytest.raises(PermissionError) as e:
        CertificateAuthority.load_or_create(tmp_path / "ca", TD)
    assert "mode 0644" in str(e.value) and f"(fix: chmod 600 {key})" in str(e.value)
    key.chmod(0o600)
    CertificateAuthority.load_or_create(tmp_path / "ca", TD)


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[str, str]:
    """A TLS 1.3 handshake over a socket pair; (SPIFFE ID the client saw, SPIFFE ID the server saw)."""
    a, b = socket.socketpair()
    seen: dict[str, str] = {}

    def serve() -> None:
        with server_ctx.wrap_socket(a, server_side=True) as s:
            seen["server"] = peer_spiffe_id(s.getpeercert(binary_form=True) or b"")
    t = threading.Thread(target=serve)
    t.start()
    with client_ctx.wrap_socket(b) as c:
        seen["client"] = peer_spiffe_id(c.getpeercert(binary_form=True) or b"")
    t.join(10)
    return seen["client"], seen["server"]


def test_user_intermediate_issues_certificates_that_verify_up_to_the_root(tmp_path: Path) -> None:
    d = make_intermediate(tmp_path / "ca")
    ca = CertificateAuthority.load_or_create(d, TD)
    assert ca.intermediate and ca.bundle_pem() == (d / "root.crt").read_bytes()
    root = x509.load_pem_x509_certificate((d / "root.crt").read_bytes())
    cert = ca.issue("shop", "web")
    leaf, inter = x509.load_pem_x509_certificates(cert.chain_pem)  # the leaf, then the intermediate
    assert inter.subject.rfc4514_string() == "CN=corp mesh intermediate" and root not in (leaf, inter)
    leaf.verify_directly_issued_by(inter)
    inter.verify_directly_issued_by(root)

    # and OpenSSL agrees: a mutual handshake trusting only root.crt, each side seeing the other's SPIFFE ID
    store = IdentityStore(ca, tmp_path / "certs")
    client, server = _handshake(store.context("shop", "web", server_side=True),
                                store.context("shop", "api", server_side=False))
    assert (client, server) == ("spiffe://webb.test/ns/shop/sa/web", "spiffe://webb.test/ns/shop/sa/api")


def test_intermediate_without_its_root_is_refused(tmp_path: Path) -> None:
    d = make_intermediate(tmp_path / "ca")
    (d / "root.crt").unlink()
    with pytest.raises(FileNotFoundError, match="put its root"):
        CertificateAuthority.load_or_create(d, TD)


def test_store_persists_and_reloads_after_restart(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", TD)
    store = IdentityStore(ca, tmp_path / "certs", clock=lambda: NOW)
    web, db = store.get("shop", "web"), store.get("shop", "db")
    index = read_index(tmp_path / "certs")
    assert [e["spiffe_id"] for e in index] == [db.spiffe_id, web.spiffe_id]
    assert all("key" not in str(k).lower() for e in index for k in e)  # the index holds no key material

    again = IdentityStore(CertificateAuthority.load_or_create(tmp_path / "ca", TD), tmp_path / "certs", clock=lambda: NOW)
    assert [(c.spiffe_id, c.serial) for c in again.identities()] == [(db.spiffe_id, db.serial), (web.spiffe_id, web.serial)]
    assert again.get("shop", "web") == web and again.renewals == 0  # not issued again

    other = IdentityStore(CertificateAuthority.load_or_create(tmp_path / "other-ca", TD), tmp_path / "certs",
                          clock=lambda: NOW)
    assert other.identities() == []  # another CA's certificates are not taken
    assert other.get("shop", "web").serial != web.serial


def test_rotate_renews_only_what_is_due(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", TD)
    now = [NOW]
    store = IdentityStore(ca, tmp_path / "certs", ttl_s=3 * 3600, clock=lambda: now[0])
    early = store.get("shop", "early")
    now[0] = NOW + 3600
    late = store.get("shop", "late")
    now[0] = early.renew_at - 1
    assert store.rotate() == [] and store.renewals == 0
    now[0] = early.renew_at + 1  # early is at 2/3 of its life, late at 1/3
    assert store.rotate() == [early.spiffe_id]
    renewed = store.get("shop", "early")
    assert renewed.serial != early.serial and renewed.not_before > early.not_before
    assert store.get("shop", "late") == late and store.renewals == 1
    assert {e["serial"] for e in read_index(tmp_path / "certs")} == {f"{renewed.serial:x}", f"{late.serial:x}"}


def _ca_fingerprint(directory: str) -> bytes:
    from cryptography.hazmat.primitives import hashes as h

    return CertificateAuthority.load_or_create(Path(directory), TD).cert.fingerprint(h.SHA256())


def test_agents_starting_at_once_share_one_root(tmp_path: Path) -> None:
    """Several agents on one CA directory at the same moment: one root is made, all load it."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(4) as pool:
        prints = pool.map(_ca_fingerprint, [str(tmp_path / "ca")] * 8)
    assert len(set(prints)) == 1
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == [".lock", "ca.crt", "ca.key"]


def test_tls_alerts_are_told_in_words() -> None:
    from tunnel.ktls import alert_text

    assert alert_text(bytes([2, 48])) == "fatal alert unknown_ca (48)"
    assert alert_text(bytes([2, 42])) == "fatal alert bad_certificate (42)"
    assert alert_text(bytes([1, 0])) == "warning alert close_notify (0)"
    assert alert_text(b"\x02") == "a truncated TLS alert (02)"


def test_the_store_is_the_tunnels_identities(tmp_path: Path) -> None:
    """What tunnel.session.Identities asks of it: SPIFFE IDs built and read by certs.ca alone, a
    peer of another trust domain refused, a server context without a certificate."""
    store = IdentityStore(CertificateAuthority.load_or_create(tmp_path / "ca", TD), tmp_path / "certs")
    ids: Identities = store  # the composition mesh.agent.tunnels makes (mypy checks it there)
    assert ids.spiffe_id("shop", "web") == spiffe_id(TD, "shop", "web") == store.get("shop", "web").spiffe_id

    def der(cert_pem: bytes) -> bytes:
        return x509.load_pem_x509_certificates(cert_pem)[0].public_bytes(serialization.Encoding.DER)
    assert ids.peer_id(der(store.get("shop", "web").chain_pem)) == "spiffe://webb.test/ns/shop/sa/web"
    other = CertificateAuthority.load_or_create(tmp_path / "other-ca", "other.test").issue("shop", "web")
    with pytest.raises(ValueError, match="peer spiffe://other.test/ns/shop/sa/web is outside trust domain webb.test"):
        ids.peer_id(der(other.chain_pem))
    with pytest.raises(ValueError, match="no subjectAltName"):
        ids.peer_id(der(store.ca.bundle_pem()))  # a CA certificate: not a workload's

    base = ids.server_context()
    assert base.minimum_version == base.maximum_version == ssl.TLSVersion.TLSv1_3
    assert base.verify_mode == ssl.CERT_REQUIRED and base.num_tickets == 0
    assert ids.context("shop", "web", server_side=True) is ids.context("shop", "web", server_side=True)
    with pytest.raises(ValueError, match="not a DNS label"):
        ids.context("Shop", "web", server_side=True)  # what the tunnel answers unrecognized_name to


@pytest.mark.usefixtures("umask_zero")
def test_write_private_is_0600_and_atomic(tmp_path: Path) -> None:
    target = tmp_path / "key.pem"
    target.write_bytes(b"old")
    write_private(target, b"new")
    assert target.read_bytes() == b"new" and _mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["key.pem"]  # no temporary file left


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in a file, function-local ones too."""
    out: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [a.name for a in node.names]))
    return out


@pytest.mark.parametrize("package", ["certs", "tunnel"])
def test_certs_and_tunnel_import_nothing_of_each_other(package: str) -> None:
    """The layers' bottom: datapath, xds, certs, tunnel are independent (mesh composes them), and
    no module takes another's private names. SPIFFE IDs are spelled out in certs.spiffe only."""
    others = {"certs", "tunnel", "mesh", "xds", "datapath"} - {package}
    files = sorted((ROOT / package).glob("*.py"))
    assert files
    for f in files:
        for module, names in _imports(f):
            assert module.split(".")[0] not in others, f"{f.relative_to(ROOT)} imports {module}"
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{f.relative_to(ROOT)} imports private {private} from {module}"
        if f.name != "spiffe.py":
            assert "spiffe://{" not in f.read_text(), f"{f.relative_to(ROOT)} builds a SPIFFE ID (certs.spiffe.spiffe_id does)"
