"""requirements.lock (what the image installs, ``pip --require-hashes``) pins every runtime
dependency of pyproject.toml at a version its specifier allows, each with sha256s: a dependency
added or changed without ``make lock`` fails here, not in the image build."""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement

from tests.conftest import ROOT


def _locked() -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes)."""
    out: dict[str, tuple[str, int]] = {}
    for block in re.split(r"\n(?=\S)", (ROOT / "requirements.lock").read_text()):
        m = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", block)
        if m:
            out[m.group(1).lower().replace("_", "-")] = (m.group(2), block.count("--hash=sha256:"))
    return out


def test_every_runtime_dependency_is_locked_with_hashes() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    locked = _locked()
    assert locked and all(n >= 1 for _, n in locked.values()), "every pin carries its sha256s"
    for d in deps:
        req = Requirement(d)
        name = req.name.lower().replace("_", "-")
        assert name in locked, f"{req.name} is not in requirements.lock: run make lock"
        assert req.specifier.contains(locked[name][0], prereleases=True), (
            f"{req.name} {locked[name][0]} (locked) does not satisfy {req.specifier}: run make lock")
