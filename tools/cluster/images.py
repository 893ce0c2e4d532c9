"""Container images for the one-node test cluster, made from this host's files: no registry.

Each image is one layer, written as a ``docker save`` archive (its ``RepoTags`` name the image,
which ``ctr images import`` takes as is) and imported into containerd's ``k8s.io`` namespace,
where the CRI plugin, hence kubelet, finds it:

  webb.local/pause:1       the static pause of tools/cluster/pause (containerd's sandbox_image)
  webb.local/busybox:1     Debian's busybox-static, a symlink per applet, /etc/passwd, /tmp
  webb.local/python:1      Debian's /usr/bin/python3 (3.11) with its stdlib, every extension module
                           of lib-dynload and each shared library ``ldd`` names for them; enough for
                           the stdlib-only demo apps (examples/starwars/app.py, examples/l7/app.py).
                           Not grpc or websockets: those come from PyPI, not from Debian's python3.
  webb.local/coredns:1     the CoreDNS binary of tools/cluster/build.sh

Layers are deterministic (mtime 0, owner root, sorted), so the same host files give the same
image id. Archives are cached in ``/var/cache/webb/images`` (``WEBB_IMAGE_CACHE``) as
``<name>-<hash>.tar``, the hash taken over every entry's path, mode, link target and content:
an upgraded Debian package gives a new archive, the same files reuse the old one.

    python -m tools.cluster.images --pause PAUSE [--coredns COREDNS] [--import-to SOCKET]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

CACHE = Path(os.environ.get("WEBB_IMAGE_CACHE", "/var/cache/webb/images"))
PREFIX = "webb.local"
BUSYBOX = Path("/bin/busybox")
PYTHON = Path("/usr/bin/python3")
CTR = "/usr/bin/ctr"
# stdlib parts a server in a pod never imports (the GUI, the test helpers, pip's bootstrap, 2to3)
PY_SKIP = {"idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data", "site-packages", "dist-packages"}
PY_SKIP_RE = re.compile(r"^(config-3\.\d+-.*|_test.*\.so|xxlimited.*\.so|_xxtestfuzz.*\.so)$")
DIRS = ("bin", "dev", "etc", "proc", "root", "sys", "tmp", "usr", "usr/bin", "var")
PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = b"root:x:0:\nnogroup:x:65534:\n"


@dataclass(frozen=True)
class Entry:
    """One member of a layer: a directory, a regular file (its content from ``source``) or a symlink."""

    path: str  # inside the image, no leading slash
    kind: str  # "dir" | "file" | "link"
    mode: int = 0o755
    source: Path | None = None
    data: bytes | None = None
    target: str = ""

    def content(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.source is not None
        return self.source.read_bytes()


@dataclass
class Image:
    """An image being assembled: its entries by path (the last added wins) and its runtime config."""

    name: str  # short name: the reference is webb.local/<name>:1
    config: dict[str, object]
    entries: dict[str, Entry] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{PREFIX}/{self.name}:1"

    def dir(self, path: str, mode: int = 0o755) -> None:
        self._parents(path)
        self.entries.setdefault(path, Entry(path, "dir", mode))

    def file(self, path: str, *, source: Path | None = None, data: bytes | None = None, mode: int = 0o644) -> None:
        self._parents(path)
        self.entries[path] = Entry(path, "file", mode, source=source, data=data)

    def link(self, path: str, target: str) -> None:
        self._parents(path)
        self.entries[path] = Entry(path, "link", 0o777, target=target)

    def _parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent not in self.entries:
                self.entries[parent] = Entry(parent, "dir", 0o755)

    def host_path(self, path: Path) -> None:
        """Copy host ``path`` to the same place in the image. Each symlink on the way (Debian's
        /lib -> usr/lib, a library's soname link) is kept as a symlink, and its target is added too."""
        current = Path("/")
        for part in path.parts[1:]:
            here = current / part
            if here.is_symlink():
                target = os.readlink(here)
                self.link(str(here)[1:], target)
                self.host_path(Path(os.path.normpath(here.parent / target)))  # an absolute target replaces the parent
                current = here.resolve()  # the walk goes on in the real directory
            else:
                current = here
        if current.is_file():
            self.file(str(current)[1:], source=current, mode=current.stat().st_mode & 0o7777)
        elif current.is_dir():
            self.dir(str(current)[1:])
        else:
            raise FileNotFoundError(f"image {self.name}: {path} ({current}) is neither a file nor a directory")

    def host_tree(self, root: Path, skip: Iterable[str] = (), skip_re: re.Pattern[str] | None = None) -> None:
        """Every regular file and symlink under ``root``, walked in a fixed order."""
        skip = set(skip)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in skip and not (skip_re and skip_re.match(d)))
            base = Path(dirpath)
            self.dir(str(base)[1:])
            for name in sorted(filenames) + [d for d in dirnames if (base / d).is_symlink()]:
                if skip_re and skip_re.match(name):
                    continue
                p = base / name
                if p.is_symlink():
                    self.host_path(p)
                elif p.is_file():
                    self.file(str(p)[1:], source=p, mode=p.stat().st_mode & 0o7777)

    def digest(self) -> str:
        """The cache key: a hash of every entry and of the config."""
        h = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        for path in sorted(self.entries):
            e = self.entries[path]
            h.update(f"\0{path}\0{e.kind}\0{e.mode:o}\0{e.target}\0".encode())
            if e.kind == "file":
                h.update(hashlib.sha256(e.content()).digest())
        return h.hexdigest()[:16]


def _tarinfo(name: str, kind: bytes, mode: int, size: int = 0, target: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.size, ti.linkname = kind, mode, size, target
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    ti.mtime = 0
    return ti


def layer_bytes(image: Image) -> bytes:
    """The layer as an uncompressed tar (parents before children: the paths are sorted)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(image.entries):
            e = image.entries[path]
            if e.kind == "dir":
                tar.addfile(_tarinfo(path, tarfile.DIRTYPE, e.mode))
            elif e.kind == "link":
                tar.addfile(_tarinfo(path, tarfile.SYMTYPE, 0o777, target=e.target))
            else:
                data = e.content()
                tar.addfile(_tarinfo(path, tarfile.REGTYPE, e.mode, len(data)), io.BytesIO(data))
    return buf.getvalue()


def write_archive(image: Image, out: Path) -> None:
    """A ``docker save`` (v1.2) archive: manifest.json, the config blob, <diff id>/layer.tar."""
    layer = layer_bytes(image)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = {
        "architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z", "config": image.config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "tools/cluster/images.py"}],
    }
    config_blob = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_blob).hexdigest() + ".json"
    layer_dir = diff_id.removeprefix("sha256:")
    manifest = [{"Config": config_name, "RepoTags": [image.ref], "Layers": [f"{layer_dir}/layer.tar"]}]
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, data: bytes) -> None:
            tar.addfile(_tarinfo(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))

        tar.addfile(_tarinfo(layer_dir, tarfile.DIRTYPE, 0o755))
        add(f"{layer_dir}/layer.tar", layer)
        add(config_name, config_blob)
        add("manifest.json", json.dumps(manifest).encode())
    tmp.rename(out)


def _base(image: Image) -> None:
    for d in DIRS:
        image.dir(d)
    image.dir("tmp", 0o1777)
    image.file("etc/passwd", data=PASSWD)
    image.file("etc/group", data=GROUP)


def pause_image(pause: Path) -> Image:
    img = Image("pause", {"Entrypoint": ["/pause"], "WorkingDir": "/"})
    img.file("pause", source=pause, mode=0o755)
    return img


def busybox_image(busybox: Path = BUSYBOX) -> Image:
    img = Image("busybox", {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"})
    _base(img)
    img.file("bin/busybox", source=busybox, mode=0o755)
    applets = subprocess.run([str(busybox), "--list"], check=True, capture_output=True, text=True, timeout=30).stdout.split()
    for applet in applets:
        if applet != "busybox":
            img.link(f"bin/{applet}", "busybox")
    return img


def shared_libraries(binaries: Iterable[Path]) -> list[Path]:
    """Every library ``ldd`` names for ``binaries``, and the dynamic loader."""
    libs: set[Path] = set()
    for b in binaries:
        out = subprocess.run(["ldd", str(b)], capture_output=True, text=True, timeout=30).stdout
        for line in out.splitlines():
            m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
            if m:
                libs.add(Path(m.group(1)))
    return sorted(libs)


def python_image(python: Path = PYTHON) -> Image:
    real = python.resolve()  # /usr/bin/python3 -> python3.11
    version = re.fullmatch(r"python(\d+\.\d+)", real.name)
    if version is None:
        raise RuntimeError(f"python image: {python} resolves to {real}, not pythonX.Y (apt-get install python3)")
    stdlib = Path("/usr/lib") / real.name
    img = Image("python", {
        "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8", "PYTHONUNBUFFERED=1"],
        "Cmd": ["/usr/bin/python3"], "WorkingDir": "/",
    })
    _base(img)
    img.host_path(real)
    img.link("usr/bin/python3", real.name)
    img.link("usr/bin/python", real.name)
    img.host_tree(stdlib, skip=PY_SKIP, skip_re=PY_SKIP_RE)
    etc = Path("/etc") / real.name  # Debian's sitecustomize.py is a link into /etc/pythonX.Y
    if etc.is_dir():
        img.host_tree(etc)
    extensions = [Path(p) for p in img.entries if p.endswith(".so") and "lib-dynload" in p]
    for lib in shared_libraries([real, *(Path("/") / e for e in extensions)]):
        img.host_path(lib)
    img.file("etc/nsswitch.conf", data=b"passwd: files\ngroup: files\nhosts: files dns\n")
    return img


def coredns_image(coredns: Path) -> Image:
    img = Image("coredns", {"Entrypoint": ["/coredns"], "WorkingDir": "/"})
    _base(img)
    img.file("coredns", source=coredns, mode=0o755)
    return img


def archive(image: Image, cache: Path = CACHE) -> Path:
    """The image's archive in the cache, written if absent; older archives of the same image removed."""
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"{image.name}-{image.digest()}.tar"
    if not out.exists():
        write_archive(image, out)
        for old in cache.glob(f"{image.name}-*.tar"):
            if old != out:
                old.unlink(missing_ok=True)
    return out


def build_all(pause: Path, coredns: Path | None = None, cache: Path = CACHE) -> dict[str, Path]:
    """Every image's archive (cached); ``{reference: archive}``."""
    images = [pause_image(pause), busybox_image(), python_image()]
    if coredns is not None:
        images.append(coredns_image(coredns))
    return {img.ref: archive(img, cache) for img in images}


def import_archives(socket: Path, archives: Iterable[Path], timeout_s: float = 120.0) -> None:
    """``ctr images import`` into the k8s.io namespace (unpacked for the default snapshotter), all at once."""
    procs = [(tar, subprocess.Popen([CTR, "--address", str(socket), "--namespace", "k8s.io", "images", "import", str(tar)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)) for tar in archives]
    deadline = time.monotonic() + timeout_s
    failed = []
    for tar, p in procs:
        try:
            _, err = p.communicate(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            failed.append(f"{tar}: no answer after {timeout_s:.0f} s")
            continue
        if p.returncode != 0:
            failed.append(f"{tar}: exit {p.returncode}: {err.decode(errors='replace').strip()}")
    if failed:
        raise RuntimeError("ctr images import: " + "; ".join(failed))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pause", type=Path, required=True, help="the static pause binary (tools/cluster/build.sh)")
    ap.add_argument("--coredns", type=Path, help="the CoreDNS binary (tools/cluster/build.sh)")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--import-to", type=Path, metavar="SOCKET", help="a containerd socket to import them into")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    archives = build_all(args.pause, args.coredns, args.cache)
    for ref, tar in archives.items():
        print(f"{ref}\t{tar}\t{tar.stat().st_size // 1024} KiB")
    if args.import_to:
        import_archives(args.import_to, archives.values())
    print(f"images: {len(archives)} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
