"""The agent's manifest directory as `webb apply` / `webb delete` keep it: one file per object.

Why per object: the directory used to hold each applied file under its own name, so applying
``examples/l7/01-app.yaml`` after ``examples/starwars/01-app.yaml`` replaced the first (its
objects were deleted without a word). Now each object lives in ``<Kind>_<namespace>_<name>.yaml``
(cluster-scoped kinds: an empty namespace), whatever file it came from, as kubectl keys objects
on kind, namespace and name: applying an object again updates it, deleting a file deletes the
objects it names.

File names never come from the user as they are: every character outside ``[A-Za-z0-9.-]`` of
the kind, namespace and name is written ``%XX`` (``_`` and ``%`` too, so the name maps back to
one object only), a name too long for a file is cut and a hash of the key appended. No ``/`` ever
reaches a file name, so no object name leads out of the directory.

A directory made by an earlier `webb` (a file per applied file, several objects each), or files
written there by hand, is migrated at the next apply/delete: every object of those files is
written to its own file, then the old files go, under the same rule the agent used to read
them (a later file in name order wins). Until then every reader here reads both layouts.

The agent (mesh.source) reads every ``*.yaml`` of the directory; it takes the same lock shared
(``LOCK_FILE``), so it never sees half of an apply: a pod without the policy that came with it.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mesh.manifests import ManifestError, load_yaml, read_documents
from mesh.source import LOCK_FILE
from mesh.state import Key, key_name, key_of

_Dumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's emitter when there
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-")
_OBJECT = "# webb-object: "  # the header: the object's key, as a JSON list
_SOURCE = "# webb-source: "  # the file it was applied from, as a JSON string ("": not known)
HEADER_LINES = 3
SMALL = 256 << 10  # stored objects compared as objects (YAML loaded) below this size, above only as text
MAX_NAME = 200  # bytes of a file name (the limit is 255)
CREATED, CONFIGURED, UNCHANGED, DELETED = "created", "configured", "unchanged", "deleted"


def _escape(part: str) -> str:
    return "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in part)


def file_name(key: Key) -> str:
    """The object's file: ``Kind_namespace_name.yaml``, escaped; never a path, never hidden."""
    name = "_".join(_escape(p) for p in key)
    if len(name) + len(".yaml") > MAX_NAME:
        digest = hashlib.sha256("\0".join(key).encode()).hexdigest()[:16]
        name = f"{name[:MAX_NAME - 30]}~{digest}"
    return name + ".yaml"


def dump(doc: dict[str, Any]) -> str:
    """One object as YAML, for its own file (an object of a file that holds several)."""
    return str(yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True))


def objects(text: str, where: str) -> list[dict[str, Any]]:
    """The objects of a YAML text as the agent reads them (a ``List``'s items; empty documents skipped)."""
    out: list[dict[str, Any]] = []
    for d in load_yaml(text, where):
        items = d.get("items") if isinstance(d, dict) and d.get("kind") == "List" else [d]
        out += [i for i in (items if isinstance(items, list) else [items]) if isinstance(i, dict)]
    return out


def absolute_paths(doc: dict[str, Any], base: Path) -> dict[str, Any]:
    """``doc`` with ``./`` paths in a Pod's command made absolute (like a build context), a copy when
    one changed: the stored object is read from the manifest directory, not from where its file was."""
    if doc.get("kind") != "Pod":
        return doc
    out = copy.deepcopy(doc)
    spec = out.get("spec")
    for c in (spec.get("containers") or []) if isinstance(spec, dict) else []:
        if not isinstance(c, dict):
            continue
        for k in ("command", "args"):
            if isinstance(c.get(k), list):
                c[k] = [str((base / a).resolve()) if isinstance(a, str) and a.startswith("./") else a for a in c[k]]
    return out if out != doc else doc


@dataclass
class Stored:
    """One object of the directory: its file, what is stored (``body``: the file's YAML after the
    header; None for an object of an old file of several), the file it was applied from."""

    key: Key
    path: Path
    source: str = ""  # "": not known (migrated, or written by hand)
    body: str | None = None
    _doc: dict[str, Any] | None = None
    error: str = ""  # the stored text does not read (edited by hand): why

    @property
    def name(self) -> str:
        return key_name(self.key)

    @property
    def doc(self) -> dict[str, Any]:
        """The object, parsed on first use (a large policy is not parsed to be replaced); {} when its
        text does not read (``error`` says why)."""
        if self._doc is None:
            try:
                found = objects(self.body or "", self.path.name)
                self._doc = found[0] if found else {}
            except ManifestError as e:
                self._doc, self.error = {}, str(e)
        return self._doc

    def same(self, body: str) -> bool:
        """Whether ``body`` stores this object unchanged: the same text, or (both small) the same object."""
        if self.body is not None and self.body == body:
            return True
        if len(body) > SMALL or len(self.body or "") > SMALL:
            return False
        try:
            new = objects(body, "(applied)")
        except ManifestError:
            return False
        return len(new) == 1 and bool(self.doc) and new[0] == self.doc


@dataclass(frozen=True)
class Change:
    key: Key
    action: str  # created | configured | unchanged | deleted
    before: Stored | None = None

    @property
    def name(self) -> str:
        return key_name(self.key)


class ManifestStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, key: Key) -> Path:
        return self.directory / file_name(key)

    def files(self) -> list[Path]:
        """What the agent reads (mesh.source.StandaloneSource): the ``*.yaml``/``*.yml`` files, in name order."""
        return sorted(self.directory.glob("*.y*ml")) if self.directory.is_dir() else []

    def read(self) -> tuple[dict[Key, Stored], list[Path], list[str]]:
        """Every object of the directory (either layout; for one key in two files the later file in
        name order wins, as in the agent), the files not in the one-object layout, and a warning
        per file that cannot be read (left as it is; the agent reports it too). A file this store
        wrote is known by its header and not parsed here (only what is shown or compared is)."""
        objs: dict[Key, Stored] = {}
        legacy: list[Path] = []
        warnings: list[str] = []
        for f in self.files():
            try:
                text = f.read_text()
            except FileNotFoundError:  # removed while we looked
                continue
            except (UnicodeDecodeError, OSError) as e:
                warnings.append(f"{f.name} cannot be read, left as it is: {e}")
                continue
            mine = _header(text)
            if mine is not None and file_name(mine[0]) == f.name:
                objs[mine[0]] = Stored(mine[0], f, mine[1], text.split("\n", HEADER_LINES)[-1])
                continue
            try:
                docs = read_documents(f)
            except FileNotFoundError:
                continue
            except ManifestError as e:
                warnings.append(f"{f.name} cannot be read, left as it is: {e}")
                continue
            keys = [key_of(str(d.get("kind")), d) for _, d in docs]
            if len(docs) == 1 and file_name(keys[0]) == f.name:  # one object, under its name: written by hand
                objs[keys[0]] = Stored(keys[0], f, "", text, docs[0][1])
                continue
            legacy.append(f)
            for k, (_, d) in zip(keys, docs, strict=True):
                objs[k] = Stored(k, f, "", None, d)
        return objs, legacy, warnings

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive: one writer at a time, and the agent (shared) never reads in the middle of a change."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def write(self, key: Key, body: str, source: str = "") -> Path:
        """Store ``body`` (one object's YAML) as ``key``'s file, atomically (a temporary file, then
        rename); 0600: it may be a Secret. The header names the object and its source as JSON strings
        (one line each, whatever a name or path holds: nothing of it can end the comment)."""
        path = self.path(key)
        head = (f"# one object per file, named by kind, namespace, name: written by `webb apply`\n"
                f"{_OBJECT}{json.dumps(list(key))}\n{_SOURCE}{json.dumps(source)}\n")
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(head + body)
        tmp.replace(path)
        return path

    def migrate(self, objs: dict[Key, Stored], legacy: Iterable[Path]) -> list[str]:
        """Give every object of the old-layout files a file of its own, then remove those files;
        returns what was done, in words. Objects are written before any file goes, so the agent
        (which holds the lock shared while it reads) sees them throughout."""
        legacy = list(legacy)
        if not legacy:
            return []
        moved = 0
        for k, s in objs.items():
            if s.path in legacy:
                s.body = dump(s.doc)
                s.path = self.write(k, s.body, s.source)
                moved += 1
        for f in legacy:
            if not any(s.path == f for s in objs.values()):  # a file that was already one object's name
                f.unlink(missing_ok=True)
        names = ", ".join(f.name for f in legacy)
        return [f"migrated {moved} object(s) of {len(legacy)} file(s) stored by file name ({names}) "
                f"to one file per object"]

    def plan_apply(self, objs: dict[Key, Stored], items: Iterable[tuple[Key, str]]) -> list[Change]:
        """What storing ``items`` (key, the object's YAML) does to each object: created, configured
        (it differs), unchanged."""
        out = []
        for k, body in items:
            before = objs.get(k)
            if before is None:
                out.append(Change(k, CREATED))
            else:
                out.append(Change(k, UNCHANGED if before.same(body) else CONFIGURED, before))
        return out


def _header(text: str) -> tuple[Key, str] | None:
    """(key, source) from the header this store writes, or None (a file it did not write)."""
    lines = text.split("\n", HEADER_LINES)
    if len(lines) <= HEADER_LINES or not lines[1].startswith(_OBJECT) or not lines[2].startswith(_SOURCE):
        return None
    try:
        key, source = json.loads(lines[1][len(_OBJECT):]), json.loads(lines[2][len(_SOURCE):])
    except json.JSONDecodeError:
        return None
    if not (isinstance(key, list) and len(key) == 3 and all(isinstance(p, str) for p in key) and isinstance(source, str)):
        return None
    return (key[0], key[1], key[2]), source
