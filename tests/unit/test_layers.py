"""The structure is enforced by tools: the planner loads no adapter, and a crossed layer fails lint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ADAPTERS = ("ctypes", "datapath.libbpf", "google.protobuf", "grpc", "kopf", "kubernetes", "envoy", "xds.resources", "cryptography")
PACKAGES = ("mesh", "datapath", "xds", "certs", "tunnel")


def test_importing_the_planner_loads_no_adapter() -> None:
    code = ("import json, sys; import mesh.plan.node, mesh.plan.policy, mesh.model, mesh.manifests, mesh.state, mesh.status; "
            "print(json.dumps(sorted(sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    loaded = json.loads(r.stdout)
    bad = [m for m in loaded if any(m == a or m.startswith(a + ".") for a in ADAPTERS)]
    assert not bad, f"importing the planner loaded {bad}"
    assert "mesh.plan.node" in loaded  # the check saw the planner itself


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    code = ("import sys; from importlinter.cli import lint_imports_command; "
            "sys.argv = ['lint-imports', '--no-cache']; lint_imports_command()")
    return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)})


def test_a_crossed_layer_fails_the_lint(tmp_path: Path) -> None:
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.o"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    ok = _lint(tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # the planner reaching up into the agent, and datapath reaching sideways into xds
    (tmp_path / "mesh" / "plan" / "crossing.py").write_text("import mesh.agent.loop  # noqa\n")
    (tmp_path / "datapath" / "crossing.py").write_text("import xds.cache  # noqa\n")
    broken = _lint(tmp_path)
    assert broken.returncode != 0
    out = broken.stdout
    assert "mesh.plan is not allowed to import mesh.agent" in out and "mesh.plan.crossing -> mesh.agent.loop" in out, out
    assert "datapath is not allowed to import xds" in out, out
