"""The standalone source: a directory of manifests → ClusterState.

An object that fails validation is reported and its previous good version stays in force
(nothing half-applied, nothing lost). Service VIPs are allocated from the service CIDR by
name hash, so they do not move when other services come and go.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import os
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from mesh.manifests import ManifestError, Obj, parse_object, read_documents
from mesh.model import ClusterState, Service
from mesh.state import Key, LastGood, assemble, key_of, object_key


class Source(Protocol):
    """Where the agent's ClusterState comes from: a manifest directory, or the API server
    (``mesh.kube.watch.KubeSource``). ``version()`` changes whenever ``load()`` would."""

    errors: list[str]

    def version(self) -> str: ...

    def load(self) -> ClusterState: ...


# `webb apply` / `webb delete` hold this file of the directory exclusively while they change several
# files (mesh.cli.manifests_store: one file per object); the agent holds it shared while it reads, so
# it never sees half of a change (a pod without the policy applied with it)
LOCK_FILE = ".webb.lock"
LOCK_WAIT_S = 2.0  # a writer holds it for milliseconds; a stopped one does not stall the agent longer


@contextmanager
def reading(directory: Path, wait_s: float = LOCK_WAIT_S) -> Iterator[bool]:
    """Shared hold of the directory's lock while reading it; yields False when a writer held it for
    ``wait_s`` (then the directory is read as it is). No lock file: nobody writes under it."""
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        yield True
        return
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                held = True
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    held = False
                    break
                time.sleep(0.005)
        yield held
    finally:
        os.close(fd)


def directory_version(directory: Path) -> str:
    """Content hash of a manifest directory; `webb apply` waits for the agent to reach it."""
    h = hashlib.sha256()
    for p in sorted(directory.glob("*.y*ml")):
        try:
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
        except FileNotFoundError:  # removed while we looked: the next look sees the new state
            continue
    return h.hexdigest()[:16]


def allocate_vips(services: list[Service], service_cidr: str, service_cidr6: str = "") -> list[Service]:
    """VIPs by name hash (linear probing in name order); IPv6 too when a v6 CIDR is given."""
    out = _allocate(services, service_cidr, "cluster_ip", "spec.clusterIP")
    return _allocate(out, service_cidr6, "cluster_ip6", "spec.clusterIPs") if service_cidr6 else out


def _allocate(services: list[Service], cidr: str, attr: str, field: str) -> list[Service]:
    net = ipaddress.ip_network(cidr)
    size = min(net.num_addresses, 1 << 20) - 2
    used = {getattr(s, attr) for s in services if getattr(s, attr)}
    out = []
    for s in sorted(services, key=lambda s: s.key):
        have = getattr(s, attr)
        if s.headless:
            out.append(s)
            continue
        if have:
            if ipaddress.ip_address(have) not in net:
                raise ManifestError(f"Service {s.key}", field, f"{have} is outside the service CIDR {cidr}")
            out.append(s)
            continue
        n = zlib.crc32(s.key.encode()) % size
        for _ in range(size):
            ip = str(net.network_address + 10 + (n % (size - 10)))
            if ip not in used:
                break
            n += 1
        used.add(ip)
        out.append(replace(s, cluster_ip=ip) if attr == "cluster_ip" else replace(s, cluster_ip6=ip))
    return out


# a file's objects: (file, key, the object / None for a kind not kept / why it was refused), or why the file was
Parsed = list[tuple[Path, Key, Obj | None | ManifestError]] | ManifestError


class StandaloneSource:
    def __init__(self, directory: Path, service_cidr: str, service_cidr6: str = "") -> None:
        self.directory = directory
        self.service_cidr = service_cidr
        self.service_cidr6 = service_cidr6
        self._last_good: LastGood[Obj] = LastGood()
        self._file_of: dict[Key, Path] = {}
        self._parsed: dict[Path, tuple[bytes, Parsed]] = {}  # by the file's sha256
        self.errors: list[str] = []
        self._version = ""

    def version(self) -> str:
        """The directory's version; while `webb apply` changes it, the version before (no waiting here:
        the agent's loop asks every few milliseconds)."""
        with reading(self.directory, wait_s=0.0) as held:
            if held or not self._version:
                self._version = directory_version(self.directory)
        return self._version

    def _check_vips(self, s: Service) -> str | None:
        for ip, cidr, field in ((s.cluster_ip, self.service_cidr, "spec.clusterIP"),
                                (s.cluster_ip6, self.service_cidr6, "spec.clusterIPs")):
            if ip and cidr and ipaddress.ip_address(ip) not in ipaddress.ip_network(cidr):
                return str(ManifestError(f"Service {s.key}", field, f"{ip} is outside the service CIDR {cidr}"))
        return None

    def load(self) -> ClusterState:
        with reading(self.directory):
            return self._load()

    def _load(self) -> ClusterState:
        objs: dict[Key, Obj] = {}
        errors: list[str] = []
        last = self._last_good
        paths = sorted(self.directory.glob("*.y*ml"))
        self._parsed = {p: v for p, v in self._parsed.items() if p in paths}
        for path in paths:
            try:
                parsed = self._parse(path)
            except FileNotFoundError:  # deleted between listing and reading: its objects are gone
                continue
            if isinstance(parsed, ManifestError):
                errors.append(str(parsed))
                # keep every object this file had before
                objs.update({k: v for k, v in last.good.items() if self._file_of.get(k) == path})
                continue
            for f, guess, o in parsed:
                if isinstance(o, ManifestError):
                    errors.append(self._refuse(objs, guess, f"{o} ({f.name})"))
                    continue
                if o is None:  # a kind the mesh reads but does not keep (a Secret not of type TLS)
                    continue
                problem = self._check_vips(o) if isinstance(o, Service) else None
                if problem:
                    errors.append(self._refuse(objs, object_key(o), f"{problem} ({f.name})"))
                    continue
                objs[object_key(o)] = o
                self._file_of[object_key(o)] = path
        refused = list(self._last_good.errors)
        self._last_good = LastGood()
        for k, o in objs.items():
            self._last_good.accept(k, o)
        self.errors = errors
        return replace(assemble(objs.values(), errors, refused),
                       services=tuple(allocate_vips([o for o in objs.values() if isinstance(o, Service)],
                                                    self.service_cidr, self.service_cidr6)))

    def _parse(self, path: Path) -> Parsed:
        """The file's objects (or why each was refused), parsed again only when its bytes changed: a
        large policy is not re-validated on every change of another file."""
        digest = hashlib.sha256(path.read_bytes()).digest()
        cached = self._parsed.get(path)
        if cached is not None and cached[0] == digest:
            return cached[1]
        out: Parsed
        try:
            out = []
            for f, doc in read_documents(path):
                try:
                    o: Obj | None | ManifestError = parse_object(doc, base_dir=f.parent)
                except ManifestError as e:
                    o = e
                out.append((f, key_of(str(doc.get("kind")), doc), o))
        except ManifestError as e:
            out = e
        self._parsed[path] = (digest, out)
        return out

    def _refuse(self, objs: dict[Key, Obj], key: Key, error: str) -> str:
        """A bad new version of ``key``: its last good version (if any) stays in force."""
        if key in self._last_good.good:
            objs[key] = self._last_good.good[key]
        return self._last_good.refuse(key, error)
