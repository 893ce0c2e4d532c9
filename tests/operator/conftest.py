"""Fixtures of the operator tests: the Webb CRDs on the session's API server, the operator itself."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kube.apiserver import KubeAPI, Process

ROOT = Path(__file__).resolve().parents[2]
CRDS = ("meshpolicies.webb.io", "meshroutes.webb.io", "meshtlses.webb.io")


@pytest.fixture(scope="session")
def webb_crds(kube_api: KubeAPI) -> None:
    kube_api.kubectl("apply", "-f", str(ROOT / "crds"))
    for crd in CRDS:
        kube_api.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s", timeout_s=90)
    kube_api.kubectl("create", "namespace", "webb-system", check=False)


@pytest.fixture
def operator(kube_api: KubeAPI, webb_crds: None, tmp_path: Path) -> Iterator[Process]:
    """``python -m mesh.operator`` against the test API server: stops by itself after 300 s, by
    SIGTERM from this fixture, or when the test process dies (pdeathsig)."""
    proc = Process("operator", [sys.executable, "-m", "mesh.operator", "--kubeconfig", str(kube_api.kubeconfig),
                                "--lifetime", "300"], tmp_path / "operator.log")
    try:
        yield proc
        proc.check_alive()
    finally:
        proc.stop()
        if proc.popen.returncode not in (0, -15):
            print(proc.log_tail(60))


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
