"""Webb's own image, ``webb.local/webb:<version>``: the agent (``webb agent``) and the operator
(``python -m mesh.operator``) in one image, made from a Debian root filesystem without a registry
or a container engine.

Two layers, each cached in ``/var/cache/webb/images`` (``WEBB_IMAGE_CACHE``) under a hash of what
it is made from:

  base   ``mmdebstrap`` (Debian's tool; unshare mode: its mounts live and die in a namespace of
         its own) of bookworm, variant minbase, with python3 (Debian's 3.11), python3-venv,
         libbpf1, iproute2; then, inside that root (chroot), a venv at /opt/webb and ``pip
         install --require-hashes`` of Webb's runtime dependencies as locked in requirements.lock
         (every package pinned with its sha256s: ``make lock`` writes it from pyproject.toml's
         [project.dependencies]) by the root's own python, so every compiled wheel is cp311 for
         Debian's 3.11. Docs, man pages and locales are left out (copyright files kept), apt's
         lists are cleaned. Key: the suite, mirrors, packages, dpkg options and the lock.
  webb   Webb itself, non-editable: a wheel built from a clean copy of the source tree (only what
         pyproject.toml packages), installed with ``pip --root --prefix /opt/webb`` (the console
         script's interpreter set to /opt/webb/bin/python3), plus the BPF object where
         ``datapath.loader`` looks for it (``<site-packages>/datapath/bpf/sock.bpf.o``; the wheel
         does not carry it yet). Key: the base's, every source file, the BPF object.

The archive is a ``docker save`` tar (manifest.json, the config, one layer.tar per layer) tagged
``webb.local/webb:<version>`` and ``webb.local/webb:<version>-<hash>``, imported with
``ctr images import`` like tools/cluster/images.py's. A change of Webb's code rebuilds only the
webb layer; the base is rebuilt when its inputs change or with ``--refresh-base`` (a Debian or PyPI
update under the same inputs is not noticed by itself).

    python -m tools.image.build [--import-to SOCKET] [--refresh-base] [--json]     (make image)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tools.cluster.images import import_archives

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("WEBB_IMAGE_CACHE", "/var/cache/webb/images"))
NAME = "webb.local/webb"
SUITE = "bookworm"
MIRRORS = ("deb http://deb.debian.org/debian bookworm main",
           "deb http://deb.debian.org/debian bookworm-updates main",
           "deb http://deb.debian.org/debian-security bookworm-security main")
PACKAGES = ("python3", "python3-venv", "libbpf1", "iproute2", "util-linux", "mount")
DPKG_OPTS = ("path-exclude=/usr/share/man/*", "path-exclude=/usr/share/info/*", "path-exclude=/usr/share/locale/*",
             "path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright")
VENV = "/opt/webb"
USER_ID = 65532  # "webb", the non-root user of the operator (charts/webb: runAsUser)
BASE_RECIPE = 5  # bump when the base's recipe below changes in a way its inputs do not show
# what `pip install` of the repository reads (pyproject.toml's packages), nothing else
SOURCES = ("pyproject.toml", "mesh", "datapath", "xds", "certs", "tunnel")
SKIP = re.compile(r"(^|/)(__pycache__|[^/]*\.egg-info|build)(/|$)|\.(pyc|o)$")
BPF_OBJECT = Path("datapath/bpf/sock.bpf.o")
LOCK = Path("requirements.lock")  # the runtime dependencies, pinned with hashes (make lock)
BPF_SOURCES = (Path("datapath/bpf/sock.bpf.c"), Path("datapath/bpf/webb.h"))
MMDEBSTRAP_TIMEOUT_S = 1800.0
PIP_TIMEOUT_S = 600.0


@dataclass
class Layer:
    """A layer's tar in the cache, its diff id and how it was made."""

    kind: str  # base | webb
    key: str
    path: Path
    diff_id: str = ""
    built_s: float = 0.0  # 0: taken from the cache
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    ref: str  # webb.local/webb:<version>-<hash>: exactly this build
    tags: list[str]
    archive: Path
    size_bytes: int
    seconds: float
    layers: list[Layer]
    imported_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["archive"] = str(self.archive)
        for layer in d["layers"]:
            layer["path"] = str(layer["path"])
        return d


def _hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def project(repo: Path = REPO) -> tuple[str, list[str]]:
    """pyproject.toml's version and runtime dependencies."""
    meta = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    return str(meta["version"]), [str(d) for d in meta["dependencies"]]


def _tarinfo_clean(ti: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """A member of mmdebstrap's tar as a layer member: no leading "./", no device nodes (the runtime
    makes /dev), owners by number only."""
    name = ti.name.removeprefix("./").rstrip("/")
    if not name or name == ".":
        return None
    if ti.ischr() or ti.isblk() or ti.isfifo():
        return None
    ti.name = name
    if ti.islnk():
        ti.linkname = ti.linkname.removeprefix("./")
    ti.uname = ti.gname = ""
    # a long name came in a pax header, which would win over the new one when written
    ti.pax_headers = {k: v for k, v in ti.pax_headers.items() if k not in ("path", "linkpath", "uname", "gname")}
    return ti


def _store(layer: Layer, write: Any) -> Layer:
    """Write a layer with ``write(tar)`` into the cache (atomically), with its diff id beside it."""
    layer.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = layer.path.with_name(f".{layer.path.name}.{os.getpid()}.tmp")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            write(tar)
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        layer.diff_id = "sha256:" + h.hexdigest()
        tmp.rename(layer.path)
    finally:
        tmp.unlink(missing_ok=True)
    return layer


def _save_meta(layer: Layer) -> None:
    meta = {"diff_id": layer.diff_id, "built_s": layer.built_s, "info": layer.info}
    layer.path.with_suffix(".json").write_text(json.dumps(meta, indent=1, sort_keys=True))


def _cached(layer: Layer) -> Layer | None:
    meta_file = layer.path.with_suffix(".json")
    if not (layer.path.exists() and meta_file.exists()):
        return None
    meta = json.loads(meta_file.read_text())
    layer.diff_id, layer.info = meta["diff_id"], meta.get("info", {})
    return layer


def _prune(cache: Path, pattern: str, keep: Path) -> None:
    for old in cache.glob(pattern):
        if old.with_suffix("") != keep.with_suffix(""):
            old.unlink(missing_ok=True)


def host_ca_bundle() -> Path | None:
    """The CA bundle this host's pip trusts (a TLS-intercepting proxy's root may be in it): lent to the
    root's pip for the build only, never left in the image."""
    for var in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        if (v := os.environ.get(var)) and Path(v).is_file():
            return Path(v)
    default = Path("/etc/ssl/certs/ca-certificates.crt")
    return default if default.is_file() else None


def mmdebstrap_argv(out: Path, lock: Path, ca: Path | None = None) -> list[str]:
    """Debian's root, then the venv and the dependencies by the root's own pip (in a clean environment:
    none of this host's PIP_* settings but the CA bundle it trusts)."""
    env = "env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 PIP_DEFAULT_TIMEOUT=180"
    if ca is not None:
        env += " PIP_CERT=/tmp/pip-ca.crt"
    pip = f'{env} chroot "$1" {VENV}/bin/python3 -m pip'
    hooks = [
        *([f'cat {shlex.quote(str(ca))} > "$1"/tmp/pip-ca.crt'] if ca is not None else []),
        f'cat {shlex.quote(str(lock))} > "$1"/tmp/requirements.lock',
        f'{env} chroot "$1" python3 -m venv {VENV}',
        # every file checked against the lock's sha256s; nothing resolved at build time
        f"{pip} install --require-hashes --no-deps --no-cache-dir --disable-pip-version-check "
        "--progress-bar off -q -r /tmp/requirements.lock",
        f'{pip} freeze --all > "$1{VENV}/requirements.lock"',
        f"{pip} uninstall -q -y pip setuptools",  # nothing installs at run time
        # the operator's user (kopf asks the passwd database who it is)
        f'chroot "$1" useradd --system --uid {USER_ID} --user-group --no-create-home --home-dir /nonexistent '
        '--shell /usr/sbin/nologin webb',
        f'chroot "$1" dpkg-query -W -f \'${{Package}} ${{Version}}\\n\' > "$1{VENV}/debian-packages.txt"',
        # only what these hooks made: mmdebstrap keeps its apt configuration in the root's /tmp (TMPDIR) until its
        # own cleanup (apt's lists and caches), which without it would run apt against this host's state
        'rm -rf "$1"/root/.cache "$1"/tmp/pip-ca.crt "$1"/tmp/requirements.lock',
        ': > "$1"/etc/resolv.conf && : > "$1"/etc/hostname',  # the runtime's
    ]
    return ["mmdebstrap", "--mode=unshare", "--variant=minbase", "--format=tar", "--quiet",
            f"--include={','.join(PACKAGES)}", *(f"--dpkgopt={o}" for o in DPKG_OPTS),
            *(f"--customize-hook={h}" for h in hooks), SUITE, str(out), *MIRRORS]


def base_layer(lock: Path, cache: Path = CACHE, refresh: bool = False) -> Layer:
    """Debian bookworm + /opt/webb with Webb's dependencies as locked (cached by its inputs)."""
    key = _hash(BASE_RECIPE, SUITE, MIRRORS, PACKAGES, DPKG_OPTS, VENV, USER_ID, hashlib.sha256(lock.read_bytes()).hexdigest())
    layer = Layer("base", key, cache / f"webb-base-{key}.layer")
    if not refresh and (hit := _cached(layer)) is not None:
        return hit
    if shutil.which("mmdebstrap") is None:
        raise FileNotFoundError("mmdebstrap is not installed: apt-get install mmdebstrap (make image does)")
    t0 = time.monotonic()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".webb-base-", dir=cache) as tmp:
        raw = Path(tmp) / "rootfs.tar"
        res = subprocess.run(mmdebstrap_argv(raw, lock, host_ca_bundle()), capture_output=True, text=True, timeout=MMDEBSTRAP_TIMEOUT_S)
        if res.returncode != 0:
            raise RuntimeError(f"mmdebstrap: exit {res.returncode}:\n{res.stderr[-4000:]}")
        info: dict[str, Any] = {"mmdebstrap": "unshare, minbase, " + SUITE, "packages": list(PACKAGES)}
        with tarfile.open(raw) as src:
            def write(tar: tarfile.TarFile) -> None:
                for ti in src:
                    name = ti.name.removeprefix("./")
                    if name in (VENV[1:] + "/requirements.lock", VENV[1:] + "/debian-packages.txt"):
                        f = src.extractfile(ti)
                        assert f is not None
                        info[name.rsplit("/", 1)[1]] = f.read().decode().split("\n")
                    clean = _tarinfo_clean(ti)
                    if clean is not None:
                        tar.addfile(clean, src.extractfile(ti) if ti.isreg() else None)
            layer.info = info
            _store(layer, write)
    layer.built_s = round(time.monotonic() - t0, 1)
    _save_meta(layer)
    _prune(cache, "webb-base-*", layer.path)
    return layer


def _site_packages(base: Layer) -> str:
    """/opt/webb/lib/python3.X/site-packages of the venv: X from the base's Debian python3.X package."""
    pkgs = base.info.get("debian-packages.txt") or []
    versions = [re.match(r"python(3\.\d+) ", line) for line in pkgs]
    found = sorted({m.group(1) for m in versions if m})
    if len(found) != 1:
        raise RuntimeError(f"base layer {base.key}: expected one Debian python3.X package, found {found}")
    return f"{VENV}/lib/python{found[0]}/site-packages"


def source_files(repo: Path = REPO) -> list[Path]:
    """The files ``pip install`` of the repository reads, relative to it (no caches, no build products)."""
    out: list[Path] = []
    for top in SOURCES:
        p = repo / top
        if p.is_file():
            out.append(Path(top))
            continue
        for dirpath, dirnames, filenames in os.walk(p):
            rel = Path(dirpath).relative_to(repo)
            dirnames[:] = sorted(d for d in dirnames if not SKIP.search(f"{rel}/{d}"))
            out += [rel / f for f in sorted(filenames) if not SKIP.search(f"{rel}/{f}")]
    return out


def check_bpf_object(repo: Path = REPO) -> Path:
    obj = repo / BPF_OBJECT
    if not obj.exists():
        raise FileNotFoundError(f"{obj} is missing: run make bpf")
    newer = [s for s in BPF_SOURCES if (repo / s).stat().st_mtime > obj.stat().st_mtime]
    if newer:
        raise RuntimeError(f"{obj} is older than {', '.join(map(str, newer))}: run make bpf")
    return obj


def _run(argv: list[str], timeout_s: float = PIP_TIMEOUT_S) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:5])}...: exit {res.returncode}:\n{res.stderr[-3000:]}")


def webb_layer(base: Layer, cache: Path = CACHE, repo: Path = REPO) -> Layer:
    """Webb installed into the base's venv (non-editable), the BPF object beside ``datapath.loader``."""
    obj = check_bpf_object(repo)
    files = source_files(repo)
    h = hashlib.sha256(base.key.encode() + Path(__file__).read_bytes())  # this recipe too: the layer is cheap to redo
    for f in [*files, BPF_OBJECT, BPF_OBJECT.with_name(BPF_OBJECT.name + ".sha256")]:
        h.update(f"\0{f}\0".encode() + hashlib.sha256((repo / f).read_bytes()).digest())
    key = h.hexdigest()[:16]
    layer = Layer("webb", key, cache / f"webb-app-{key}.layer")
    if (hit := _cached(layer)) is not None:
        return hit
    t0 = time.monotonic()
    site = _site_packages(base)
    with tempfile.TemporaryDirectory(prefix=".webb-app-", dir=cache) as tmp:
        src, wheels, root = Path(tmp) / "src", Path(tmp) / "wheels", Path(tmp) / "root"
        for f in files:  # a clean copy: pip builds in the tree it is given
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / f, src / f)
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
        _run([*pip, "wheel", "--no-deps", "--no-cache-dir", "-w", str(wheels), str(src)])
        (wheel,) = wheels.glob("webb-*.whl")
        _run([*pip, "install", "--no-deps", "--ignore-installed", "--no-warn-script-location", "--no-cache-dir",
              "--root", str(root), "--prefix", VENV, str(wheel)])
        host_site = f"{VENV}/lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
        if host_site != site:  # the wheel is pure Python: only the directory name differs
            (root / site.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            (root / host_site.lstrip("/")).rename(root / site.lstrip("/"))
        _relocate_scripts(root, site)
        (root / site.lstrip("/") / "datapath" / "bpf").mkdir(parents=True, exist_ok=True)
        shutil.copy2(obj, root / site.lstrip("/") / "datapath" / "bpf" / "sock.bpf.o")
        shutil.copy2(obj.with_name(obj.name + ".sha256"), root / site.lstrip("/") / "datapath" / "bpf" / (obj.name + ".sha256"))
        layer.info = {"wheel": wheel.name, "site_packages": site, "sources": len(files)}

        def write(tar: tarfile.TarFile) -> None:
            def owner(ti: tarfile.TarInfo) -> tarfile.TarInfo:
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = ""
                return ti
            tar.add(root / "opt", arcname="opt", filter=owner)  # sorted, parents first
        _store(layer, write)
    layer.built_s = round(time.monotonic() - t0, 1)
    _save_meta(layer)
    _prune(cache, "webb-app-*", layer.path)
    return layer


def _relocate_scripts(root: Path, site: str) -> None:
    """pip wrote the console scripts with the builder's interpreter: point them at the venv's, and
    fix their line in the RECORD; drop direct_url.json (the builder's temporary wheel)."""
    python = f"#!{VENV}/bin/python3".encode()
    changed: dict[str, str] = {}
    for script in (root / VENV.lstrip("/") / "bin").iterdir():
        data = script.read_bytes()
        if data.startswith(b"#!"):
            data = python + data[data.index(b"\n"):]
            script.write_bytes(data)
            digest = hashlib.sha256(data).digest()
            changed[script.name] = f"sha256={base64.urlsafe_b64encode(digest).rstrip(b'=').decode()},{len(data)}"
    for record in (root / site.lstrip("/")).glob("webb-*.dist-info/RECORD"):
        (record.parent / "direct_url.json").unlink(missing_ok=True)
        lines = []
        for line in record.read_text().splitlines():
            path = line.split(",", 1)[0]
            name = path.rsplit("/", 1)[-1]
            if name == "direct_url.json":
                continue
            if path.startswith("../../../bin/") and name in changed:
                line = f"{path},{changed[name]}"
            lines.append(line)
        record.write_text("\n".join(lines) + "\n")


def image_config(version: str, layers: list[Layer]) -> dict[str, Any]:
    return {
        "Env": [f"PATH={VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8",
                "PYTHONUNBUFFERED=1", f"VIRTUAL_ENV={VENV}"],
        "Cmd": ["webb", "--help"],
        "WorkingDir": "/",
        "Labels": {"org.opencontainers.image.title": "webb", "org.opencontainers.image.version": version,
                   **{f"dev.webb.layer.{layer.kind}": layer.key for layer in layers}},
    }


def _tarinfo(name: str, kind: bytes, size: int = 0) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.mode, ti.mtime = kind, size, 0o755 if kind == tarfile.DIRTYPE else 0o644, 0
    return ti


def write_archive(out: Path, tags: list[str], config: dict[str, Any], layers: list[Layer]) -> None:
    """A ``docker save`` (v1.2) archive of several layers: manifest.json, the config blob, <diff id>/layer.tar."""
    blob = json.dumps({
        "architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z", "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": f"tools/image/build.py: {layer.kind} layer {layer.key}"}
                    for layer in layers],
    }, sort_keys=True).encode()
    config_name = hashlib.sha256(blob).hexdigest() + ".json"
    names = [f"{layer.diff_id.removeprefix('sha256:')}/layer.tar" for layer in layers]
    manifest = [{"Config": config_name, "RepoTags": tags, "Layers": names}]
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for layer, name in zip(layers, names, strict=True):
                tar.addfile(_tarinfo(name.split("/")[0], tarfile.DIRTYPE))
                with open(layer.path, "rb") as f:
                    tar.addfile(_tarinfo(name, tarfile.REGTYPE, layer.path.stat().st_size), f)
            for name, data in ((config_name, blob), ("manifest.json", json.dumps(manifest).encode())):
                tar.addfile(_tarinfo(name, tarfile.REGTYPE, len(data)), io.BytesIO(data))
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)


def build(cache: Path = CACHE, refresh_base: bool = False, repo: Path = REPO) -> Result:
    """The image's archive in the cache (built or reused); ``Result.ref`` names exactly this build."""
    t0 = time.monotonic()
    version, _ = project(repo)
    base = base_layer(repo / LOCK, cache, refresh_base)
    app = webb_layer(base, cache, repo)
    layers = [base, app]
    config = image_config(version, layers)
    key = _hash(config, [layer.diff_id for layer in layers])
    tags = [f"{NAME}:{version}-{key[:12]}", f"{NAME}:{version}"]
    out = cache / f"webb-{key}.tar"
    if not out.exists():
        write_archive(out, tags, config, layers)
        _prune(cache, "webb-[0-9a-f]*.tar", out)
    return Result(tags[0], tags, out, out.stat().st_size, round(time.monotonic() - t0, 1), layers)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.image.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--refresh-base", action="store_true", help="rebuild the Debian + dependencies layer (new Debian and "
                                                                "PyPI releases under the same inputs)")
    ap.add_argument("--import-to", type=Path, metavar="SOCKET", help="a containerd socket to import the image into (k8s.io)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    res = build(args.cache, args.refresh_base)
    if args.import_to:
        t = time.monotonic()
        import_archives(args.import_to, [res.archive], timeout_s=600)
        res.imported_s = round(time.monotonic() - t, 1)
    if args.json:
        print(json.dumps(res.to_dict(), indent=1))
        return 0
    for layer in res.layers:
        how = f"built in {layer.built_s} s" if layer.built_s else "cached"
        print(f"  {layer.kind:5} layer {layer.key}: {layer.path.stat().st_size // 1024} KiB, {how}", file=sys.stderr)
    print(f"{res.ref}\t{res.archive}\t{res.size_bytes // 1024} KiB\t{res.seconds} s"
          + (f"\timported in {res.imported_s} s" if args.import_to else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
