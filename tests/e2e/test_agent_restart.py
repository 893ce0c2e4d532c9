"""kill -9 of the agent: L4 service traffic keeps flowing; the restarted agent adopts pods and
the pinned datapath; a clean stop removes everything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datapath.loader import pin_dir_for
from mesh.cli.demo import request
from mesh.runtime.local import NodeConfig
from tests.conftest import ROOT, leftovers
from tests.e2e.l7_support import status

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.envoy, pytest.mark.e2e]


def start_agent(state: Path) -> subprocess.Popen[bytes]:
    agent = subprocess.Popen([sys.executable, "-m", "mesh.cli", "agent", "--state-dir", str(state), "--lifetime", "120"],
                             cwd=ROOT, stdout=open(state / "agent.log", "ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not (status(state).get("pid") == agent.pid and status(state).get("running")):
        assert agent.poll() is None and time.monotonic() < deadline, (state / "agent.log").read_text()[-2000:]
        time.sleep(0.05)
    return agent


def landing(node: NodeConfig) -> str:
    return request(node, "tiefighter", "POST", "/v1/request-landing").body.strip()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_agent_sigkill_restart_adopts(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    node = NodeConfig(state_dir=state)
    agent = start_agent(state)
    try:
        r = subprocess.run([sys.executable, "-m", "mesh.cli", "apply", "-f", str(ROOT / "examples/starwars/01-app.yaml"),
                            "--state-dir", str(state)], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 20
        while landing(node) != "Ship landed":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        before = status(state)
        assert before["datapath_adopted"] is False
        envoy_pid = before["envoy_pid"]

        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _pid_alive(envoy_pid):  # Envoy follows its agent (parent-death signal)
            assert time.monotonic() < deadline, "Envoy outlived its agent"
            time.sleep(0.05)
        for _ in range(5):  # agent down: the kernel keeps translating the VIP
            assert landing(node) == "Ship landed"

        agent = start_agent(state)
        deadline = time.monotonic() + 20
        while status(state).get("applied", {}).get("plan_version") is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        after = status(state)
        assert after["datapath_adopted"] is True
        assert {k: p["ip"] for k, p in after["pods"].items()} == {k: p["ip"] for k, p in before["pods"].items()}
        assert all(p["adopted"] for p in after["pods"].values()), after["pods"]
        assert landing(node) == "Ship landed"
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)
    assert leftovers("webb-node1-") == []
    assert not pin_dir_for("node1").exists()
