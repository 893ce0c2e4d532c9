"""The Star Wars outcomes over IPv6 too: VIPv6 in the kernel, Envoy's IPv6 listener, RBAC on /128s."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from mesh.cli.demo import CASES, expected, request
from mesh.runtime.local import NodeConfig
from tests.conftest import ROOT
from tests.e2e.l7_support import status
from tests.e2e.test_agent_restart import start_agent

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.envoy, pytest.mark.e2e]


def _apply(state: Path, name: str) -> None:
    r = subprocess.run([sys.executable, "-m", "mesh.cli", "apply", "-f", str(ROOT / "examples/starwars" / name),
                        "--state-dir", str(state)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_starwars_over_ipv6(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    node = NodeConfig(state_dir=state)
    agent = start_agent(state)
    try:
        _apply(state, "01-app.yaml")
        deadline = time.monotonic() + 20
        while request(node, "tiefighter", "POST", "/v1/request-landing", family=6).exit_code != 0:
            assert time.monotonic() < deadline, "deathstar not reachable over IPv6"
            time.sleep(0.2)
        assert all(p["ip6"].startswith("fd00:10:244::") for p in status(state)["pods"].values())
        _apply(state, "policy.yaml")
        for (pod, method, path), (want_exit, want_body) in zip(CASES, expected(True), strict=True):
            o = request(node, pod, method, path, family=6)
            assert o.exit_code == want_exit, (pod, method, o)
            if want_exit == 0:
                assert o.body.strip() == want_body
    finally:
        agent.terminate()
        agent.wait(timeout=30)
