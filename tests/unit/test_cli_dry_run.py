"""``webb apply --dry-run -f FILE``: validates without an agent, non-zero on any error, naming the
file, object, field and fix; an object twice is refused (YAML would keep the last one silently)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def _apply(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh.cli", "apply", "--dry-run", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={"COLUMNS": "300", "PATH": "/usr/bin:/bin"})


def test_a_valid_file_passes_and_nothing_is_applied(tmp_path: Path) -> None:
    r = _apply("-f", str(ROOT / "examples" / "starwars" / "policy.yaml"), "--state-dir", str(tmp_path))
    assert r.returncode == 0 and "1 object(s) valid" in r.stdout, r.stderr
    assert not (tmp_path / "manifests").exists()


def test_errors_fail_naming_file_object_field(tmp_path: Path) -> None:
    bad = tmp_path / "typo.yaml"
    bad.write_text((ROOT / "examples" / "starwars" / "policy.yaml").read_text().replace("rules:", "rule:"))
    r = _apply("-f", str(bad), "--state-dir", str(tmp_path))
    assert r.returncode == 1
    assert "MeshPolicy default/rule1 (typo.yaml): spec.ingress[0].toPorts[0].rule: unknown field" in " ".join(r.stderr.split())
    assert "did you mean 'rules'" in r.stderr


def test_the_same_object_twice_is_refused(tmp_path: Path) -> None:
    doc = (ROOT / "examples" / "starwars" / "policy.yaml").read_text()
    twice = tmp_path / "twice.yaml"
    twice.write_text(doc + "\n---\n" + doc.replace('"/v1/request-landing"', '"/v1/.*"'))
    r = _apply("-f", str(twice), "--state-dir", str(tmp_path))
    assert r.returncode == 1 and "only one would be kept" in " ".join(r.stderr.split()), r.stderr
