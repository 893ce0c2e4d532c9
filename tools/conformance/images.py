"""The images the Gateway API conformance suite's manifests name, made on this machine: no registry.

Each is one deterministic layer (tools/cluster/images.py's layer writer), written as a ``docker save``
archive that carries every tag of the image, and imported into the node's containerd (``k8s.io``
namespace) under exactly the names the manifests use, so kubelet never pulls (``IfNotPresent`` finds them):

  registry.k8s.io/gateway-api/echo-basic:<tags>    sigs.k8s.io/gateway-api/conformance/echo-basic of the release
                                                   (tools/conformance/build.sh), as upstream's Dockerfile.echo-basic:
                                                   /echo-basic, user 65532. Every echo-basic tag the manifests name
                                                   (v1.5.1, and the v1.6.0-dev.* of a few TCP/UDP tests) is this build.
  registry.k8s.io/gateway-api/echo-advanced:<tag>  Istio's echo app, as Istio's Dockerfile.app: /usr/local/bin/server
                                                   (the entrypoint) and client (the mesh tests ``kubectl exec``
                                                   ``client <url>``), /cert.crt and /cert.key, user 1338. The pair is
                                                   a throwaway self-signed one made at the first build, kept in the
                                                   cache beside the binaries, never in the repo.
  registry.k8s.io/coredns/coredns:<tag>            the base manifests' UDP backend (a Deployment in the infra
                                                   namespace, which must be Ready before any test runs). A stand-in:
                                                   the cluster's own CoreDNS (tools/cluster/build.sh, v1.14.7) behind a
                                                   busybox shell that drops the Corefile's ``forward . 8.8.8.8 9.9.9.9``
                                                   line first, so it never sends a query off this machine.

Archives are cached in ``/var/cache/webb/conformance/<release>/images`` under a hash of the layer,
the config and the tags.

    python -m tools.conformance.images [--import-to SOCKET]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tools.cluster import images as cluster_images
from tools.cluster.images import Image
from tools.conformance import modules

ECHO_BASIC = "registry.k8s.io/gateway-api/echo-basic"
ECHO_ADVANCED = "registry.k8s.io/gateway-api/echo-advanced"
COREDNS = "registry.k8s.io/coredns/coredns"
CLUSTER_BUILD = modules.REPO / "tools" / "cluster" / "build.sh"
USERS = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
# the Corefile's forward line goes before CoreDNS starts: its queries would leave the machine
COREDNS_SHIM = "sed '/^[[:space:]]*forward[[:space:]]/d' \"$2\" > /tmp/Corefile && exec /coredns -conf /tmp/Corefile"


@dataclass(frozen=True)
class Tagged:
    image: Image
    tags: tuple[str, ...]

    def key(self) -> str:
        return hashlib.sha256(f"{self.image.digest()}\0{','.join(self.tags)}".encode()).hexdigest()[:16]


def _base(img: Image, users: str) -> None:
    for d in ("etc", "tmp"):
        img.dir(d, 0o1777 if d == "tmp" else 0o755)
    img.file("etc/passwd", data=users.encode())
    img.file("etc/group", data=b"root:x:0:\nnogroup:x:65534:\n")


def echo_basic_image(binary: Path) -> Image:
    img = Image("echo-basic", {"Entrypoint": ["/echo-basic"], "User": "65532:65532", "WorkingDir": "/"})
    _base(img, USERS + "nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n")
    img.file("echo-basic", source=binary, mode=0o755)
    return img


def throwaway_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed pair for echo-advanced's /cert.crt and /cert.key, made once (then cached with the binaries)."""
    crt, key = directory / "cert.crt", directory / "cert.key"
    if crt.exists() and key.exists():
        return crt, key
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "echo")])
    now = datetime.datetime.now(datetime.UTC)
    sans = ["echo", "localhost", "*.gateway-conformance-mesh", "*.gateway-conformance-mesh.svc.cluster.local"]
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(k.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
            .sign(k, hashes.SHA256()))
    tmp_key, tmp_crt = (directory / f".{p.name}.tmp{os.getpid()}" for p in (key, crt))
    tmp_key.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    tmp_crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tmp_key.chmod(0o600)
    tmp_key.rename(key)
    tmp_crt.rename(crt)
    return crt, key


def echo_advanced_image(istio: Path) -> Image:
    crt, key = throwaway_cert(istio)
    img = Image("echo-advanced", {"Entrypoint": ["/usr/local/bin/server"], "User": "1338", "WorkingDir": "/",
                                  "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]})
    _base(img, USERS + "application:x:1338:1338::/home/application:/bin/sh\n")
    img.dir("home/application")
    img.file("usr/local/bin/server", source=istio / "server", mode=0o755)
    img.file("usr/local/bin/client", source=istio / "client", mode=0o755)
    img.file("cert.crt", source=crt, mode=0o644)
    img.file("cert.key", source=key, mode=0o644)  # a throwaway; user 1338 reads it, as in Istio's image
    return img


def coredns_image(coredns: Path, busybox: Path = cluster_images.BUSYBOX) -> Image:
    img = Image("coredns-standin", {"Entrypoint": ["/bin/sh", "-c", COREDNS_SHIM, "coredns"], "WorkingDir": "/",
                                    "Env": ["PATH=/bin"]})
    _base(img, USERS)
    img.dir("root")
    img.file("bin/busybox", source=busybox, mode=0o755)
    for applet in ("sh", "sed"):
        img.link(f"bin/{applet}", "busybox")
    img.file("coredns", source=coredns, mode=0o755)
    return img


def write_archive(tagged: Tagged, out: Path) -> None:
    """A ``docker save`` archive (as tools.cluster.images.write_archive) whose manifest lists every tag."""
    layer = cluster_images.layer_bytes(tagged.image)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = {"architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z", "config": tagged.image.config,
              "rootfs": {"type": "layers", "diff_ids": [diff_id]},
              "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "tools/conformance/images.py"}]}
    blob = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(blob).hexdigest() + ".json"
    layer_dir = diff_id.removeprefix("sha256:")
    manifest = [{"Config": config_name, "RepoTags": list(tagged.tags), "Layers": [f"{layer_dir}/layer.tar"]}]
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, data: bytes | None, kind: bytes = tarfile.REGTYPE, mode: int = 0o644) -> None:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.size, ti.mtime = kind, mode, len(data or b""), 0
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)

        add(layer_dir, None, tarfile.DIRTYPE, 0o755)
        add(f"{layer_dir}/layer.tar", layer)
        add(config_name, blob)
        add("manifest.json", json.dumps(manifest).encode())
    tmp.rename(out)


def archive(tagged: Tagged, cache: Path) -> Path:
    """The archive in the cache, written if absent; older archives of the same image removed."""
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"{tagged.image.name}-{tagged.key()}.tar"
    if not out.exists():
        write_archive(tagged, out)
        for old in cache.glob(f"{tagged.image.name}-*.tar"):
            if old != out:
                old.unlink(missing_ok=True)
    return out


def cluster_coredns() -> Path:
    """The one-node cluster's CoreDNS binary (tools/cluster/build.sh: instant when cached)."""
    out = subprocess.run(["bash", str(CLUSTER_BUILD)], check=True, stdout=subprocess.PIPE, text=True, timeout=3600)
    dirs = dict(line.split("=", 1) for line in out.stdout.split() if "=" in line)
    return Path(dirs["coredns"]) / "coredns"


def build_all(tools: modules.Tools | None = None, coredns: Path | None = None,
              refs: Iterable[str] | None = None) -> dict[str, Path]:
    """Every image the suite's manifests name (``refs``: default, read from the release's manifests), as
    ``{tag: archive}``; an image it names that this module cannot make is an error."""
    tools = tools or modules.build()
    refs = set(refs if refs is not None else modules.manifest_images())
    by_repo: dict[str, list[str]] = {}
    for ref in sorted(refs):
        by_repo.setdefault(ref.rsplit(":", 1)[0], []).append(ref)
    makers = {ECHO_BASIC: lambda: echo_basic_image(tools.echo_basic),
              ECHO_ADVANCED: lambda: echo_advanced_image(tools.echo_advanced),
              COREDNS: lambda: coredns_image(coredns or cluster_coredns())}
    unknown = sorted(set(by_repo) - set(makers))
    if unknown:
        raise RuntimeError(f"the suite's manifests name images no local build makes: {unknown} (tools/conformance/images.py)")
    cache = tools.out / "images"
    result: dict[str, Path] = {}
    for repo, tags in by_repo.items():
        tar = archive(Tagged(makers[repo](), tuple(tags)), cache)
        result.update(dict.fromkeys(tags, tar))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--import-to", type=Path, metavar="SOCKET", help="a containerd socket to import them into")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    archives = build_all()
    for ref, tar in sorted(archives.items()):
        print(f"{ref}\t{tar}\t{tar.stat().st_size // 1024} KiB")
    if args.import_to:
        cluster_images.import_archives(args.import_to, sorted(set(archives.values())), timeout_s=300)
    print(f"conformance images: {len(set(archives.values()))} archives, {len(archives)} tags in {time.monotonic() - t0:.1f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
